"""The teacher's answers on disk: append-only JSONL keyed by prompt id, safe to kill at any moment.

Light module (stdlib). One record per line:

    {"id": "p3fa2c9e1b0aa", "instruction": "...", "output": "...", "model": "...", ...}

The line rules are engine.core.fsio's:
* records are appended and fsynced per batch, so a killed teacher loses at most the batch in flight;
* a torn last line (killed mid-write) is cut off when the stage starts again; it is regenerated, never
  duplicated, and a completed record is never dropped;
* a complete line that is not a usable record (edited by hand, damaged disk) is reported with its
  file:line and moved to `<output>.corrupt.jsonl` by `repair()`, so the prompt is answered again and
  the line never reaches sft.

An id already present is skipped on resume. Answers that failed (API errors, empty outputs) are never
written here: they are logged as failures and retried by the next run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.fsio import CorruptLine, append_jsonl, atomic_write, cut_torn_tail, iter_jsonl

KEY = "teacher.base.output_path"


@dataclass
class Repair:
    """What `TeacherOutput.repair` changed: bytes of a torn tail cut, and corrupt lines set aside."""

    torn_bytes: int = 0
    corrupt: list[str] = field(default_factory=list)  # "file:line: reason", one per quarantined line
    quarantine: Path | None = None


class TeacherOutput:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    @property
    def quarantine_path(self) -> Path:
        return self.path.with_name(self.path.name + ".corrupt.jsonl")

    def repair(self) -> Repair:
        """Cut a torn tail, and move complete-but-unusable lines to the quarantine file."""
        result = Repair(torn_bytes=cut_torn_tail(self.path) if self.path.exists() else 0)
        bad: list[CorruptLine] = []
        for number, record in iter_jsonl(self.path, on_corrupt=bad.append):
            if not _usable(record):
                bad.append(CorruptLine(self.path, number, "no string id or no non-empty output"))
        if not bad:
            return result
        lines = self.path.read_bytes().split(b"\n")
        bad_numbers = {error.line for error in bad}
        kept = [line for number, line in enumerate(lines, start=1) if number not in bad_numbers]
        quarantined = [{"line": error.line, "reason": str(error), "raw": lines[error.line - 1].decode("utf-8", "replace")}
                       for error in bad]
        append_jsonl(self.quarantine_path, quarantined, key=KEY)
        atomic_write(self.path, b"\n".join(kept), key=KEY)
        result.corrupt = [str(error) for error in bad]
        result.quarantine = self.quarantine_path
        return result

    def records(self) -> list[dict[str, Any]]:
        """Every complete, usable record (torn tails and corrupt lines are left out: `repair` reports them)."""
        return [record for _, record in iter_jsonl(self.path, on_corrupt=lambda error: None) if _usable(record)]

    def done_ids(self) -> set[str]:
        return {r["id"] for r in self.records()}

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Append complete records (non-empty `output` only) durably; returns how many were written."""
        records = list(records)
        for record in records:
            if not str(record.get("output", "")).strip():
                raise ValueError(f"refusing to store an empty answer for prompt {record.get('id')}")
        return append_jsonl(self.path, records, durable=True, key=KEY) if records else 0


def _usable(record: dict[str, Any]) -> bool:
    return isinstance(record.get("id"), str) and bool(str(record.get("output", "")).strip())
