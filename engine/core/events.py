"""The event protocol: one JSON object per line in `runs/<run>/<stage>/events.jsonl`.

Light module. Writers are stage workers (and the supervisor, for a final status a dead worker could not
write); readers are the panel and `tas status/logs`. Every line is flushed as it is written, so a reader
tailing the file sees events live, and a worker killed mid-write leaves at most one torn last line,
which readers skip.

Kinds (every event has `ts` and `kind`):
  status    state: running | done | failed | cancelled   (+ error on failure, + message)
  progress  done, total, unit
  metric    step, name, value
  memory    devices: {name: peak bytes allocated}
  log       level, msg
  artifact  path, what
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from engine.core.secrets import redact

FINAL_STATES = ("done", "failed", "cancelled")
KINDS = ("status", "progress", "metric", "memory", "log", "artifact")


class EventWriter:
    """Appends events to a stage's stream. Thread-safe; every string passes through `redact`."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        if _ends_mid_line(self.path):  # a writer killed mid-line: start ours on a line of its own
            self._file.write("\n")
            self._file.flush()

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = {"ts": round(time.time(), 3), "kind": kind, **_redacted(fields)}
        line = json.dumps(event, ensure_ascii=False, default=str) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            if kind == "status":
                os.fsync(self._file.fileno())  # final states must survive a power cut
        return event

    def status(self, state: str, error: str | None = None, **fields: Any) -> None:
        if error is not None:
            fields["error"] = error
        self.emit("status", state=state, **fields)

    def progress(self, done: int | float, total: int | float | None, unit: str) -> None:
        self.emit("progress", done=done, total=total, unit=unit)

    def metric(self, name: str, value: float, step: int | None = None) -> None:
        self.emit("metric", step=step, name=name, value=value)

    def log(self, msg: str, level: str = "info") -> None:
        self.emit("log", level=level, msg=msg)

    def artifact(self, path: str | os.PathLike[str], what: str) -> None:
        self.emit("artifact", path=str(path), what=what)

    def memory(self, devices: dict[str, int]) -> None:
        self.emit("memory", devices=devices)

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _ends_mid_line(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v) for v in value]
    return value


def parse_line(line: str) -> dict[str, Any] | None:
    """One event, or None for a torn or foreign line (never raises)."""
    line = line.strip()
    if not line:
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "kind" in event else None


_PARSED: dict[str, tuple[int, int, list[dict[str, Any]]]] = {}
_PARSED_MAX = 1024


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete events of a stream; a missing file is an empty stream.

    The panel and `tas status` derive every stage's state from its whole stream, every second, for every
    run listed: a stream whose size and mtime have not changed since the last read is not parsed again
    (finished runs never change). Callers get their own list; the event dicts are shared, read-only.
    """
    key = str(path)
    try:
        stat = os.stat(key)
    except FileNotFoundError:
        _PARSED.pop(key, None)
        return []
    cached = _PARSED.get(key)
    if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
        return list(cached[2])
    try:
        with open(key, encoding="utf-8", errors="replace") as f:
            events = [e for e in map(parse_line, f) if e is not None]
    except FileNotFoundError:
        return []
    if len(_PARSED) >= _PARSED_MAX:
        _PARSED.pop(next(iter(_PARSED)))  # the oldest entry
    _PARSED[key] = (stat.st_size, stat.st_mtime_ns, events)
    return list(events)


class EventTail:
    """Incremental reader: each `poll()` returns the events appended since the last call.

    Keeps a partial last line until its newline arrives, so a line being written is never half-read.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._offset = 0
        self._pending = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._pending + chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()  # b"" when data ended with a newline
        events = []
        for raw in lines:
            event = parse_line(raw.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

