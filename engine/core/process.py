"""Is this pid still the process we started? Asked one way everywhere, answered by one rule.

Light module (stdlib, psutil, engine.core.fsio). A pid alone names no process for long: once ours is
reaped the kernel may give its number to another program, and signalling that one is a bug no user
forgives. So a process is recorded as its pid plus its start (`ProcessRecord`), and two starts are
compared by one rule (`ProcessRecord.same_start`):

* the kernel's start tick count (field 22 of /proc/<pid>/stat) when both sides have it: exact, and a
  wall-clock step (NTP, VM resume) does not move it;
* otherwise psutil's create_time, to within 0.05 s: where /proc is missing, or for a record written
  without ticks (by older code, or by the GPU tab, which only keeps create_time).

A pid file says which process to signal, but anyone who can write `runs/` can write one: `send_signal`
signals only a process that is still the recorded one, whose command line its caller recognises as ours
for that run, and whose process group is the recorded one, through a pidfd where the kernel has them, so
that the pid cannot change hands between the check and the signal.

Pid files (`runs/<run>/supervisor.json`, `runs/<run>/<stage>/pid`, `runs/<run>/teacher/vllm.pid`) are one
JSON object: the record's keys plus whatever the writer adds (`stages`, `port`, `argv`). They are
replaced atomically (engine.core.fsio); a missing, torn or corrupt one reads as None.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from engine.core.fsio import PathLike, atomic_write_json, read_json

CREATE_TIME_TOLERANCE_S = 0.05
"""psutil derives create_time from boot time + ticks, so two readings of one process differ slightly."""


@dataclass(frozen=True)
class ProcessRecord:
    """A pid plus its start: a pid reused by another program after ours ended is not mistaken for it."""

    pid: int
    create_time: float | None  # psutil's wall-clock start (None in vllm.pid files of older code)
    start_ticks: int | None = None  # kernel start ticks (None without /proc)
    recorded_at: float | None = None  # time.time() when recorded: comparable with event timestamps
    pgid: int | None = None  # its process group when recorded (None in pid files of older code)

    @classmethod
    def of(cls, pid: int) -> ProcessRecord:
        """The process running as `pid` now (a zombie too); raises psutil.NoSuchProcess if there is none."""
        return cls(pid, psutil.Process(pid).create_time(), start_ticks_of(pid), time.time(), _pgid_of(pid))

    @property
    def started(self) -> float | None:
        """Wall-clock start, to compare with event `ts` (psutil's create_time can be off by up to 1 s)."""
        return self.recorded_at if self.recorded_at is not None else self.create_time

    def same_start(self, other: ProcessRecord) -> bool:
        """The rule: equal start ticks when both have them, else create_times within the tolerance.
        When neither can be compared the answer is no: an unknown process is never taken for ours."""
        if self.start_ticks is not None and other.start_ticks is not None:
            return self.start_ticks == other.start_ticks
        if self.create_time is not None and other.create_time is not None:
            return abs(self.create_time - other.create_time) <= CREATE_TIME_TOLERANCE_S
        return False

    def is_alive(self) -> bool:
        """Our process still runs: its pid exists with our start and is not a zombie."""
        now = current(self.pid)
        if now is None or not self.same_start(now):
            return False
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def is_reused(self) -> bool:
        """The pid now names another process (another start): ours has ended, never signal the pid."""
        now = current(self.pid)
        return now is not None and not self.same_start(now)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ProcessRecord | None:
        """The record in a pid file's object; None when it has no usable pid or a key has a wrong type.
        Keys other than the record's are ignored; only `pid` is required (older files lack the rest)."""
        if not data or "pid" not in data:
            return None
        try:
            pid = int(data["pid"])
            record = cls(
                pid,
                _optional(float, data.get("create_time")),
                _optional(int, data.get("start_ticks")),
                _optional(float, data.get("recorded_at")),
                _optional(int, data.get("pgid")),
            )
        except (TypeError, ValueError):
            return None
        return record if pid > 0 else None  # 0 or -1 would make kill/killpg signal our own group


def _optional(kind: type, value: Any) -> Any:
    return None if value is None else kind(value)


def current(pid: int) -> ProcessRecord | None:
    """The process running as `pid` now (a zombie too), or None when there is none."""
    try:
        return ProcessRecord.of(pid)
    except psutil.Error:
        return None


def _pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# ------------------------------------------------------------------------------------------- signals


def send_signal(
    record: ProcessRecord, sig: int, is_ours: Callable[[psutil.Process], bool], group: bool = False
) -> bool:
    """Send `sig` to the process of `record` (with `group`, to its process group), only if it is still that
    process, `is_ours` accepts it (its command line, in the caller's terms) and its group is the recorded
    one. Returns whether the signal was sent; a refusal sends nothing.

    A pidfd, opened before the checks, pins the process: the final signal goes through it, so a pid
    reused meanwhile gets nothing. A group signal cannot go through a pidfd; it is sent right after the
    pidfd shows the checked member still alive, while that member keeps the group's number taken.
    """
    with _pidfd(record.pid) as fd:
        now = current(record.pid)
        if now is None or not record.same_start(now):
            return False
        try:
            if not is_ours(psutil.Process(record.pid)):
                return False
        except (psutil.Error, OSError):
            return False
        pgid = _pgid_of(record.pid)
        if pgid is None or (record.pgid is not None and pgid != record.pgid) or pgid <= 1:
            return False
        try:
            if fd is not None:
                signal.pidfd_send_signal(fd, 0 if group else sig)  # still the process checked above
            if group:
                os.killpg(pgid, sig)
            elif fd is None:
                os.kill(record.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True


@contextlib.contextmanager
def _pidfd(pid: int) -> Iterator[int | None]:
    """A pidfd of `pid`, or None where the kernel or Python has none (then the pid is signalled)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def stat_fields(pid: int) -> list[bytes] | None:
    """Fields 3.. of /proc/<pid>/stat (index 0 is the state, 2 the process group); None without it.

    The command name (field 2) may hold spaces and parentheses: the split starts after its closing one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def start_ticks_of(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: start time in clock ticks after boot; None without /proc or process."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants, found by parent pid: torchrun's ranks run in sessions of
    their own, out of reach of a signal to their agent's process group."""
    try:
        parent = psutil.Process(pid)
        processes = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


# ------------------------------------------------------------------------------------------ pid files


def write_pid_file(path: PathLike, record: ProcessRecord, **extra: Any) -> None:
    """Replace `path` atomically with the record's keys plus `extra` (the writer's own keys)."""
    atomic_write_json(path, {**record.to_json(), **extra})


def read_pid_file(path: PathLike) -> ProcessRecord | None:
    """The record in `path`; None when it is missing, torn, corrupt or holds no usable pid."""
    return ProcessRecord.from_json(read_json(path))
