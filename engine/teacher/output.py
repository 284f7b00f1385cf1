"""The teacher's answers on disk: append-only JSONL keyed by prompt id, safe to kill at any moment.

Light module (stdlib). One record per line:

    {"id": "p3fa2c9e1b0aa", "instruction": "...", "output": "...", "model": "...", ...}

* Records are appended and flushed + fsynced per batch, so a killed teacher loses at most the batch
  in flight.
* A torn last line (killed mid-write) is cut off when the file is opened again; it is regenerated, never
  duplicated, and a completed record is never dropped.
* An id already present is skipped on resume, so a re-run only answers what is missing.
* Answers that failed (API errors, empty outputs) are never written here: they are logged as failures
  and retried by the next run, so they can never become training data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


class TeacherOutput:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def repair(self) -> int:
        """Cut a torn last line off the file; returns the number of bytes removed."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb+") as f:
            data = f.read()
            end = len(data)
            good = end
            if data and not data.endswith(b"\n"):
                good = data.rfind(b"\n") + 1  # 0 when the only line is torn
            else:
                # a complete-looking last line can still be garbage (e.g. zero bytes after a crash)
                last_start = data.rfind(b"\n", 0, max(0, end - 1)) + 1
                if data and not _is_record(data[last_start:end]):
                    good = last_start
            if good < end:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
            return end - good

    def records(self) -> list[dict[str, Any]]:
        """Every complete record (unreadable lines are skipped)."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path, "rb") as f:
            for raw in f:
                record = _parse(raw)
                if record is not None:
                    out.append(record)
        return out

    def done_ids(self) -> set[str]:
        return {r["id"] for r in self.records()}

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Append complete records (non-empty `output` only) durably; returns how many were written."""
        lines = []
        for record in records:
            if not str(record.get("output", "")).strip():
                raise ValueError(f"refusing to store an empty answer for prompt {record.get('id')}")
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if not lines:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        return len(lines)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(record, dict) and isinstance(record.get("id"), str) and str(record.get("output", "")).strip():
        return record
    return None


def _is_record(raw: bytes) -> bool:
    return _parse(raw.strip()) is not None


def load_system_prompts(path: str | os.PathLike[str]) -> dict[str, str]:
    """The TAS prompt.yaml: {"Teacher": {"system": ...}, "Assistant": {"system": ...}} → {"Teacher": "...", ...}."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"prompts.path: {path} not found (the system prompts file, like prompt.yaml)") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"prompts.path: {path} is not valid YAML: {exc}") from None
    prompts = {}
    for role, value in data.items() if isinstance(data, dict) else []:
        if isinstance(value, dict) and isinstance(value.get("system"), str):
            prompts[role] = value["system"].strip()
    return prompts
