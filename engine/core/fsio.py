"""Every file the project writes or tails goes through here: one set of rules for JSON lines and saves.

Light module (stdlib only). The rules, the same for events, teacher answers, failures, results and the
chat protocol:

* **A line is a record only when it ends with a newline.** Writers append whole lines and flush, so a
  reader never sees half a record; a process killed mid-write leaves at most one *torn* last line (bytes
  after the last newline). Readers ignore a torn tail; the next writer cuts it off before appending
  (`JsonlWriter`), so it is regenerated, never glued to the next record.
* **A complete line that is not a JSON object is corrupt**, not torn: readers never skip it silently.
  `iter_jsonl` raises `CorruptLine` naming file and line (or hands it to `on_corrupt`).
* **Replacing a file is atomic** (`atomic_write`: temp file, fsync, rename, fsync of the folder): a reader
  sees the old content or the new, never a mix.
* **Full disk or no permission names the path** (`describe_os_error`): an OSError from `write()` carries no
  filename, so every writer here re-raises with one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]


# ------------------------------------------------------------------------------------------ errors


class CorruptLine(ValueError):
    """A complete line that is not a JSON object: the file was edited or damaged, not torn by a kill."""

    def __init__(self, path: PathLike, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path = Path(path)
        self.line = line


class FileWriteError(OSError):
    """An OSError that names the path and what to do (the one raised by write() names neither)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def describe_os_error(exc: OSError, path: PathLike | None = None, key: str | None = None) -> FileWriteError:
    """The same error with the path, the config key it came from and a hint a user can act on."""
    if isinstance(exc, FileWriteError):
        return exc
    path = exc.filename or path or "a path"  # the OS names the real culprit (a parent folder, say)
    where = f"{key}: " if key else ""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        hint = "free some disk space, then run the stage again to resume"
    elif exc.errno in (errno.EEXIST, errno.ENOTDIR):
        path = _file_in_the_way(Path(path))
        error = FileWriteError(
            exc.errno, f"{where}{path} is a file where a folder is needed: move it or change the path in the config"
        )
        error.filename = str(path)
        return error
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "the stage cannot write there; fix the permissions or change the path in the config"
    else:
        hint = "check the path, then run the stage again"
    error = FileWriteError(exc.errno or 0, f"{where}cannot write {path}: {reason}; {hint}")
    error.filename = str(path)
    return error


def _file_in_the_way(path: Path) -> Path:
    """The first part of `path` that exists and is not a folder (what blocks creating it)."""
    for part in [*reversed(path.parents), path]:
        if part.exists() and not part.is_dir():
            return part
    return path


# ------------------------------------------------------------------------------------------ lines


def dumps_line(record: dict[str, Any]) -> str:
    """One record as one line (UTF-8 text, newline-terminated). Objects JSON cannot encode become str."""
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def parse_line(line: str | bytes) -> dict[str, Any] | None:
    """A JSON object, or None when the line is blank or not an object. Never raises."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line:
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def iter_jsonl(
    path: PathLike,
    *,
    final_line_may_lack_newline: bool = False,
    on_corrupt: Callable[[CorruptLine], None] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every complete record of a file; a missing file yields nothing.

    Streams we write follow the newline rule, so a last line without one is torn and ignored. A file a
    user wrote by hand often lacks the final newline: `final_line_may_lack_newline` accepts it. A
    corrupt line raises `CorruptLine`, or goes to `on_corrupt` and reading goes on.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n") and not final_line_may_lack_newline:
                return  # torn tail
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
                reason = "" if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"
            except UnicodeDecodeError as exc:
                value, reason = None, f"not UTF-8 (byte 0x{raw[exc.start]:02x})"
            except json.JSONDecodeError as exc:
                value, reason = None, f"bad JSON: {exc.msg} (column {exc.colno})"
            if reason:
                error = CorruptLine(path, number, reason)
                if on_corrupt is None:
                    raise error
                on_corrupt(error)
                continue
            yield number, value


def torn_tail_length(path: PathLike) -> int:
    """How many bytes follow the last newline (0 for a missing, empty or newline-terminated file)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            block = 4096
            position = size
            while position > 0:
                start = max(0, position - block)
                f.seek(start)
                chunk = f.read(position - start)
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    return size - (start + newline + 1)
                position = start
            return size
    except FileNotFoundError:
        return 0


def cut_torn_tail(path: PathLike) -> int:
    """Remove a torn last line in place (durably); returns the number of bytes removed."""
    torn = torn_tail_length(path)
    if torn:
        with open(path, "rb+") as f:
            f.truncate(f.seek(0, os.SEEK_END) - torn)
            f.flush()
            os.fsync(f.fileno())
    return torn


class JsonlWriter:
    """Appends records to a JSON-lines file, one whole line per write, flushed; thread-safe.

    Opening cuts a torn tail left by a writer that was killed. `durable=True` fsyncs every write (for
    records that must survive a power cut: teacher answers, final statuses); otherwise `sync()` does it.
    """

    def __init__(self, path: PathLike, durable: bool = False, key: str | None = None):
        self.path = Path(path)
        self.durable = durable
        self.key = key
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            cut_torn_tail(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise describe_os_error(exc, self.path, key) from None

    def write(self, record: dict[str, Any], sync: bool = False) -> None:
        self.write_many([record], sync=sync)

    def write_many(self, records: Iterable[dict[str, Any]], sync: bool = False) -> int:
        text = "".join(dumps_line(r) for r in records)
        if not text:
            return 0
        with self._lock:
            try:
                self._file.write(text)
                self._file.flush()
                if self.durable or sync:
                    os.fsync(self._file.fileno())
            except OSError as exc:
                raise describe_os_error(exc, self.path, self.key) from None
        return text.count("\n")

    def close(self) -> None:
        # close() flushes what a failed write left in the buffer: that error needs the path too
        with self._lock:
            try:
                self._file.close()
            except OSError as exc:
                raise describe_os_error(exc, self.path, self.key) from None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(OSError):  # the write's own error says it first; the file closes either way
            self.close()


def append_jsonl(
    path: PathLike, records: Iterable[dict[str, Any]], durable: bool = True, key: str | None = None
) -> int:
    """Open, append whole records, close: for writers that write rarely (failures, results)."""
    with JsonlWriter(path, durable=durable, key=key) as writer:
        return writer.write_many(records)


# ------------------------------------------------------------------------------------------- tails


class LineTail:
    """Incremental reader of a growing file: each `poll()` returns the complete lines added since the last.

    Keeps a partial last line until its newline arrives. Not thread-safe: one reader, one thread.
    """

    def __init__(self, path: PathLike, start_at_end: bool = False):
        self.path = Path(path)
        self._offset = 0
        self._pending = b""
        if start_at_end:
            with contextlib.suppress(OSError):
                self._offset = self.path.stat().st_size

    def poll_bytes(self) -> list[bytes]:
        try:
            with open(self.path, "rb") as f:
                if f.seek(0, os.SEEK_END) < self._offset:  # truncated or replaced: start over
                    self._offset, self._pending = 0, b""
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()  # b"" when the chunk ended with a newline
        return lines

    def poll_text(self) -> list[str]:
        return [line.decode("utf-8", errors="replace") for line in self.poll_bytes()]


class JsonlTail(LineTail):
    """A LineTail that returns records; blank and non-object lines are left out."""

    def poll(self) -> list[dict[str, Any]]:
        return [record for record in map(parse_line, self.poll_bytes()) if record is not None]


# ------------------------------------------------------------------------------------------ saving


def atomic_write(path: PathLike, data: bytes, backup: bool = False, key: str | None = None) -> None:
    """Replace `path` via temp file + fsync + rename: readers see the old file or the new one, never a mix.

    With `backup`, the current file is first copied (the same way) to `<name>.bak`. A symlink is
    followed: the file it points to is replaced and the link kept.
    """
    target = Path(os.path.realpath(path))
    try:
        if backup and target.exists():
            _replace_with(target.with_name(target.name + ".bak"), target.read_bytes(), mode_of=target)
        _replace_with(target, data, mode_of=target)
    except FileWriteError:
        raise
    except OSError as exc:
        raise describe_os_error(exc, target, key) from None


def atomic_write_jsonl(path: PathLike, records: Iterable[dict[str, Any]], key: str | None = None) -> None:
    atomic_write(path, "".join(dumps_line(r) for r in records).encode("utf-8"), key=key)


def atomic_write_json(path: PathLike, value: Any, key: str | None = None) -> None:
    atomic_write(path, (json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8"), key=key)


def read_json(path: PathLike) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing, being replaced, or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _replace_with(path: Path, data: bytes, mode_of: Path) -> None:
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)  # its error names the folder in the way: the real culprit
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        if mode_of.exists():
            os.chmod(tmp_name, mode_of.stat().st_mode & 0o7777)
        os.replace(tmp_name, path)
    except BaseException as exc:
        if tmp_name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        if isinstance(exc, OSError):  # the temp file is ours: name the file the user knows
            exc.filename, exc.filename2 = str(path), None
        raise
    fsync_dir(directory)


def fsync_dir(directory: PathLike) -> None:
    """Make a rename in `directory` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------- locks


@contextlib.contextmanager
def file_lock(path: PathLike):
    """An exclusive advisory lock (flock) held while the block runs; released when the process dies."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
