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

import os
import time
from pathlib import Path
from typing import Any

from engine.core.fsio import JsonlTail, JsonlWriter, parse_line
from engine.core.secrets import redact

FINAL_STATES = ("done", "failed", "cancelled")
KINDS = ("status", "progress", "metric", "memory", "log", "artifact")


class EventWriter:
    """Appends events to a stage's stream. Thread-safe; every string passes through `redact`.

    Lines follow engine.core.fsio's rules: whole lines, flushed; a torn line left by a killed writer is
    cut off when the stream is opened again.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._writer = JsonlWriter(self.path)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = {"ts": round(time.time(), 3), "kind": kind, **_redacted(fields)}
        # final states must survive a power cut
        self._writer.write(event, sync=kind == "status")
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
        self._writer.close()


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v) for v in value]
    return value


def parse_event(line: str | bytes) -> dict[str, Any] | None:
    """One event, or None for a blank or foreign line (never raises)."""
    record = parse_line(line)
    return record if record is not None and "kind" in record else None


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
    tail = EventTail(key)
    events = tail.poll()
    if len(_PARSED) >= _PARSED_MAX:
        _PARSED.pop(next(iter(_PARSED)))  # the oldest entry
    _PARSED[key] = (stat.st_size, stat.st_mtime_ns, events)
    return list(events)


class EventTail(JsonlTail):
    """Incremental reader: each `poll()` returns the events appended since the last call.

    A line being written is never half-read (see engine.core.fsio.LineTail). One reader, one thread.
    """

    def poll(self) -> list[dict[str, Any]]:
        return [event for event in map(parse_event, self.poll_bytes()) if event is not None]
