"""The JSON-lines wire between the chat client and its workers: one home for what both ends do alike.

Light module (stdlib + engine.chat.protocol), imported by engine.chat.client and by both workers
(engine.chat.worker, a local model; engine.chat.api_worker, a model behind an OpenAI-compatible server):

* `write_all`, `read_lines`: whole lines onto and off an unbuffered pipe, whichever end holds it;
* `Channel`, `protocol_channel`: a worker's replies on its real stdout, one writer at a time;
* `read_requests`: a worker's stdin, where a `stop` acts at once and the other requests queue up;
* `end_reply`: the `end` of a request, with the figures (ttft, rate) computed as the protocol defines them.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

from engine.chat.protocol import (
    EndReply,
    ErrorReply,
    GenerateRequest,
    LoadRequest,
    ProtocolError,
    ReadyReply,
    StopRequest,
    encode,
    parse_request,
)

EXIT_BAD_MODEL = 2
"""A worker's exit code when its model (or endpoint) cannot be used: its last line, a fatal `error`, says why."""
BASE_URL_ENV = "TAS_CHAT_BASE_URL"
"""The API worker's base URL goes by environment, not argv: a user:password@ in it would show in `ps`."""
READ_CHUNK = 1 << 16


def write_all(stream: BinaryIO, data: bytes) -> bool:
    """Write all of `data` to an unbuffered stream (one write may take only part of it); False when the
    reader is gone (the end that reads sees the EOF and reports it; the writer has nothing to add)."""
    view = memoryview(data)
    try:
        while view:
            view = view[stream.write(view) :]
    except (BrokenPipeError, ValueError, OSError):
        return False
    return True


def read_lines(stream: BinaryIO) -> Iterator[bytes]:
    """The lines of a pipe (without their newline) until EOF, read as whatever the pipe holds (up to 64 KiB).

    A readline on an unbuffered pipe would cost a system call per byte, on the CPU a worker decodes with."""
    fd = stream.fileno()
    partial = b""
    while True:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except OSError:
            break
        if not chunk:
            break
        lines = chunk.split(b"\n")
        lines[0] = partial + lines[0]
        partial = lines.pop()  # b"" when the chunk ended with a newline
        yield from lines
    if partial:
        yield partial


class Channel:
    """The protocol channel: whole JSON lines on the real stdout, one writer at a time, unbuffered."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.lock = threading.Lock()

    def send(self, reply: ReadyReply | EndReply | ErrorReply) -> None:
        self.write(encode(reply))

    def write(self, line: str) -> None:
        with self.lock:
            write_all(self.stream, line.encode("utf-8"))  # the client is gone: the stdin EOF ends us


def protocol_channel() -> Channel:
    """Keep fd 1 for the protocol only: stray prints of any library go to stderr (the client's log)."""
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return Channel(out)


def read_requests(
    stdin: BinaryIO,
    channel: Channel,
    stop: Callable[[str | None], None],
    enqueue: Callable[[GenerateRequest | LoadRequest], None],
) -> None:
    """Serve a worker's stdin until EOF: `stop(id)` at once for a `stop` (it must not wait behind the running
    generation), `enqueue(request)` for the others in arrival order, an `error` line for a malformed one.
    EOF means the client is gone: `stop(None)` stops whatever runs or waits."""
    for raw in read_lines(stdin):
        line = raw.decode("utf-8", errors="replace").strip()
        if not line:
            continue
        try:
            request = parse_request(line)
        except ProtocolError as exc:
            channel.send(ErrorReply(id=exc.id, message=f"bad request: {exc}"))
            continue
        if isinstance(request, StopRequest):
            stop(request.id)
        else:
            enqueue(request)
    stop(None)


def end_reply(
    request_id: str,
    finish: str = "stopped",
    *,
    tokens: int = 0,
    prompt_tokens: int = 0,
    began: float = 0.0,
    first: float | None = None,
    last: float | None = None,
    ended: float = 0.0,
) -> EndReply:
    """The `end` of a request; times are seconds of one clock. ttft_s runs from `began` (the worker took the
    request) to the `first` token; tokens_per_s is the decode rate after it, (tokens - 1) / (last - first);
    elapsed_s is the whole request. With the defaults: a request stopped while it waited (no tokens, no time)."""
    timed = first is not None and last is not None and tokens > 1 and last > first
    return EndReply(
        id=request_id,
        tokens=tokens,
        ttft_s=round(first - began, 4) if first is not None else None,
        tokens_per_s=round((tokens - 1) / (last - first), 2) if timed else None,
        elapsed_s=round(ended - began, 4),
        prompt_tokens=prompt_tokens,
        stopped=finish == "stopped",
        finish=finish,
    )
