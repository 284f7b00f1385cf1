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
    stale: int = 0  # answers with another fingerprint, moved to `stale_file`
    stale_file: Path | None = None


class TeacherOutput:
    """The answers file. With a `fingerprint` (engine.store.lineage), appended records are stamped with it,
    only records bearing it count as answered, and `repair` sets the others aside: answers made with other
    settings (another model, temperature, system prompt) are never mixed into this run's."""

    def __init__(self, path: str | os.PathLike[str], fingerprint: str | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint

    @property
    def quarantine_path(self) -> Path:
        return self.path.with_name(self.path.name + ".corrupt.jsonl")

    @property
    def stale_path(self) -> Path:
        return self.path.with_name(self.path.name + ".other-settings.jsonl")

    def repair(self) -> Repair:
        """Cut a torn tail, and move complete-but-unusable lines to the quarantine file."""
        result = Repair(torn_bytes=cut_torn_tail(self.path) if self.path.exists() else 0)
        bad: list[CorruptLine] = []
        stale: list[tuple[int, dict[str, Any]]] = []
        for number, record in iter_jsonl(self.path, on_corrupt=bad.append):
            if not _usable(record):
                bad.append(CorruptLine(self.path, number, "no string id or no non-empty output"))
            elif not self._ours(record):
                stale.append((number, record))
        if not bad and not stale:
            return result
        lines = self.path.read_bytes().split(b"\n")
        drop = {error.line for error in bad} | {number for number, _ in stale}
        if bad:
            quarantined = [
                {"line": e.line, "reason": str(e), "raw": lines[e.line - 1].decode("utf-8", "replace")} for e in bad
            ]
            append_jsonl(self.quarantine_path, quarantined, key=KEY)
            result.corrupt = [str(error) for error in bad]
            result.quarantine = self.quarantine_path
        if stale:
            append_jsonl(self.stale_path, [record for _, record in stale], key=KEY)
            result.stale, result.stale_file = len(stale), self.stale_path
        atomic_write(
            self.path, b"\n".join(line for number, line in enumerate(lines, start=1) if number not in drop), key=KEY
        )
        return result

    def _ours(self, record: dict[str, Any]) -> bool:
        return self.fingerprint is None or record.get("fp") == self.fingerprint

    def records(self) -> list[dict[str, Any]]:
        """Every complete, usable record (torn tails and corrupt lines are left out: `repair` reports them)."""
        return [
            record
            for _, record in iter_jsonl(self.path, on_corrupt=lambda error: None)
            if _usable(record) and self._ours(record)
        ]

    def done_ids(self) -> set[str]:
        return {r["id"] for r in self.records()}

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Append complete records (non-empty `output` only) durably; returns how many were written."""
        stamp = {"fp": self.fingerprint} if self.fingerprint else {}
        records = [{**record, **stamp} for record in records]
        for record in records:
            if not str(record.get("output", "")).strip():
                raise ValueError(f"refusing to store an empty answer for prompt {record.get('id')}")
        return append_jsonl(self.path, records, durable=True, key=KEY) if records else 0


def _usable(record: dict[str, Any]) -> bool:
    return isinstance(record.get("id"), str) and bool(str(record.get("output", "")).strip())
