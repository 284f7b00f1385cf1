"""Talking to the chat worker (engine.chat.worker) from the panel or a terminal.

Light module: stdlib + pydantic (engine.chat.protocol), never torch or transformers. A library: it
neither parses arguments nor prints (`tas chat`, the terminal REPL, is engine.cli.chat).

* `ChatClient` spawns `python -u -m engine.chat.worker --model ...` with stdin/stdout pipes (its stderr goes
  to a log file, so the worker can never block on a full pipe) and a reader thread that turns each
  stdout line into a reply model (engine.chat.protocol: ReadyReply, TokenReply, EndReply, ErrorReply),
  handed to `on_reply` (called on the reader thread) or put on `client.replies` (a queue). A worker that
  dies (EOF on its stdout) becomes one `ErrorReply(fatal=True, exit_code=..., message=... + the tail of its
  log)` unless it already said why with a fatal error of its own; every fatal error means "start a new
  client to go on".
* `printable`, `build_messages`, `format_stats`: what the Chat tab and `tas chat` both need to show a chat.

What there is to chat with: engine.chat.targets.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from engine.chat.protocol import (
    AnyReply,
    AnyRequest,
    EndReply,
    ErrorReply,
    GenerateRequest,
    GenerationParams,
    LoadRequest,
    ProtocolError,
    ReadyReply,
    StopRequest,
    encode,
    make,
    parse_reply,
)
from engine.chat.wire import BASE_URL_ENV, read_lines, write_all

LOG_TAIL_LINES = 12
log = logging.getLogger(__name__)


class ChatWorkerGone(RuntimeError):
    """The worker process is not running (never started, crashed, or closed)."""


# ------------------------------------------------------------------------------------------------ client


class ChatClient:
    """One chat worker process and the JSON lines to and from it."""

    _ids = itertools.count(1)

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        device: str = "auto",
        on_reply: Callable[[AnyReply], None] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        python: str = sys.executable,
        endpoint: str | None = None,
        config_path: str | os.PathLike[str] | None = None,
        load_in_4bit: bool = False,
        visible_devices: str | None = None,
        key: str | None = None,
    ):
        """`endpoint`: None for a local model (engine.chat.worker); an OpenAI-compatible base URL, or "vllm"
        for the teacher's vLLM server of `config_path` (engine.chat.api_worker, same protocol)."""
        self.endpoint = endpoint
        self.config_path = config_path
        self.load_in_4bit = load_in_4bit
        self.key = key  # the config key the model comes from (named by the worker when it cannot load it)
        self.visible_devices = visible_devices  # CUDA_VISIBLE_DEVICES of the worker (launch.cuda_visible_devices)
        self.model = model
        self.adapter = adapter
        self.device = device
        self.on_reply = on_reply
        self.replies: queue.Queue[AnyReply] = queue.Queue()
        self.cwd = cwd
        self.python = python
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen[bytes] | None = None
        self.ready: ReadyReply | None = None  # the latest `ready` reply: model, device, ...
        self.pending: set[str] = set()  # generate ids without an end / error yet
        self.returncode: int | None = None
        self._outbox: queue.Queue[bytes | None] = queue.Queue()  # requests, written in order by _writer
        self._reader: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._closing = False
        self._broken = False
        self._fatal_seen = False
        self._own_log = False  # a temp log we made: removed after a clean exit, kept after a failure

    # ---- lifecycle
    def start(self) -> ChatClient:
        """Spawn the worker; returns at once (the model loads in the worker, then a `ready` reply comes)."""
        if self.process is not None:
            raise RuntimeError("this ChatClient was already started; make a new one")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tas-chat-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
            self._own_log = True
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self._command()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=self.cwd,
                env=self._env(),
                start_new_session=True,  # Ctrl-C in a terminal is ours to turn into `stop`
                close_fds=True,
                bufsize=0,
            )
        self._reader = threading.Thread(target=self._read, name="chat-client-reader", daemon=True)
        self._reader.start()
        self._writer = threading.Thread(target=self._write_loop, name="chat-client-writer", daemon=True)
        self._writer.start()
        if self._closing:  # ended while we were spawning (a panel leaving at once): do not leave it behind
            self._closing = False
            self.close()
        return self

    def _env(self) -> dict[str, str]:
        env = _worker_env(self.visible_devices)
        if self.endpoint and self.endpoint != "vllm":
            env[BASE_URL_ENV] = self.endpoint  # not in argv: `ps` and the GPU tab show argv to everyone
        return env

    def _command(self) -> list[str]:
        if self.endpoint == "vllm":
            if self.config_path is None:
                raise ValueError("the teacher's vLLM server needs the config it is started from (config_path)")
            return [
                self.python,
                "-u",
                "-m",
                "engine.chat.api_worker",
                "--vllm-config",
                str(self.config_path),
                "--workdir",
                str(self.cwd or os.getcwd()),
            ]
        if self.endpoint:  # the URL itself goes by environment (BASE_URL_ENV): it may hold a password
            return [self.python, "-u", "-m", "engine.chat.api_worker", "--model", self.model]
        command = [self.python, "-u", "-m", "engine.chat.worker", "--model", self.model, "--device", self.device]
        command += ["--load-in-4bit"] if self.load_in_4bit else []
        command += [f"--key={self.key}"] if self.key else []  # one word: a key may start with --
        return command + (["--adapter", str(self.adapter)] if self.adapter else [])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None and not self._closing

    def close(self, timeout: float = 5.0) -> None:
        """End the worker and wait for it: `end()`, then `reap(timeout)`."""
        self.end()
        self.reap(timeout)

    def end(self) -> None:
        """The non-blocking half of close, safe on an event loop: no more requests; EOF on the worker's stdin
        (its writer closes it once the queued requests are out) and SIGTERM, so the worker is ending even if
        nobody ever waits for it (a panel exiting, whose workers are cancelled before they run)."""
        process = self.process
        if self._closing:
            return
        self._closing = True
        if process is None:  # not started (yet): start() sees the flag
            return
        self._outbox.put(None)
        if process.poll() is None:
            try:
                process.terminate()  # the worker has nothing to save; api_worker stops its vLLM server on it
            except OSError:
                pass

    def reap(self, timeout: float = 5.0) -> None:
        """The blocking half of close (a thread's): wait for the ended worker, KILL it after `timeout` s, join
        the reader, and drop our own temp log after a clean exit."""
        process = self.process
        if process is None:
            return
        if self._writer is not None and self._writer is not threading.current_thread():
            self._writer.join(timeout=1)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.returncode = process.returncode
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=2)
        if self._own_log and self.returncode in (0, -15) and not self._fatal_seen and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> ChatClient:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests
    def generate(
        self,
        messages: list[dict[str, str]],
        params: GenerationParams | Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> str:
        """Ask for a reply to `messages` (system prompt first, history, the new user message last).

        The request is checked here: ProtocolError (a ValueError naming the field) when it is not valid,
        before anything is sent."""
        rid = request_id or f"r{next(self._ids)}"
        request = make(
            GenerateRequest, id=rid, messages=messages, params=params if params is not None else GenerationParams()
        )
        self.pending.add(rid)
        try:
            self._send(request)
        except ChatWorkerGone:
            self.pending.discard(rid)
            raise
        return rid

    def stop(self, request_id: str | None = None) -> None:
        """Stop one generation (or, without an id, every running and waiting one); its `end` still comes."""
        try:
            self._send(StopRequest(id=request_id))
        except ChatWorkerGone:
            pass  # nothing left to stop

    def load(self, model: str, adapter: str | None = None) -> None:
        """Switch the worker to another model; a `ready` reply (or an error, the old model kept) follows."""
        self._send(make(LoadRequest, model=model, adapter=adapter))

    def send_raw(self, line: str) -> None:
        """Write one line as is (tests use it to send malformed requests)."""
        self._write((line.rstrip("\n") + "\n").encode("utf-8"))

    def _send(self, request: AnyRequest) -> None:
        self._write(encode(request).encode("utf-8"))

    def _write(self, data: bytes) -> None:
        """Queue a request line; never blocks (requests made before start() go out once it runs)."""
        process = self.process
        if self._closing or self._broken or (process is not None and process.poll() is not None):
            raise ChatWorkerGone(f"the chat worker is not running (log: {self.log_path})")
        self._outbox.put(data)

    def _write_loop(self) -> None:
        """The only writer of the worker's stdin: a full pipe (a worker still loading) blocks it, not the caller."""
        stdin = self.process.stdin  # type: ignore[union-attr]
        while (data := self._outbox.get()) is not None:
            if not write_all(stdin, data):
                self._broken = True  # the reader sees the EOF and reports the exit
                return
        try:
            stdin.close()  # end(): EOF, after every queued request
        except OSError:
            pass

    # ---- replies
    def next_reply(self, timeout: float | None = None) -> AnyReply:
        """The next reply from the queue (only when no on_reply callback was given); queue.Empty on timeout."""
        return self.replies.get(timeout=timeout)

    def wait_ready(self, timeout: float = 300.0) -> ReadyReply:
        """Block until `ready` (returned) or a fatal error (raised as ChatWorkerGone); queue mode only."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the chat worker did not load {self.model} in {timeout:.0f} s; see {self.log_path}")
            reply = self.next_reply(timeout=left)
            if isinstance(reply, ReadyReply):
                return reply
            if isinstance(reply, ErrorReply) and reply.fatal:
                raise ChatWorkerGone(reply.message)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the worker's stderr log (progress bars reduced to their final state)."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 16384))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        out = [line.split("\r")[-1].rstrip() for line in text.splitlines()]
        return "\n".join([line for line in out if line.strip()][-lines:])

    def _deliver(self, reply: AnyReply) -> None:
        if isinstance(reply, ReadyReply):
            self.ready = reply
            self.model = reply.model
            self.adapter = reply.adapter
        elif isinstance(reply, (EndReply, ErrorReply)) and reply.id is not None:
            self.pending.discard(reply.id)
        if isinstance(reply, ErrorReply) and reply.fatal:
            self._fatal_seen = True
        if self.on_reply is not None:
            try:
                self.on_reply(reply)
            except Exception:  # a broken callback must not kill the reader
                log.exception("chat client: on_reply failed for a %s reply", reply.kind)
        else:
            self.replies.put(reply)

    def _read(self) -> None:
        """The reader thread: whole lines of the worker's stdout → reply models, in order."""
        process = self.process
        assert process is not None and process.stdout is not None
        for line in read_lines(process.stdout):
            try:
                reply = parse_reply(line)
            except ProtocolError:
                continue  # the worker keeps fd 1 for JSON lines; anything else is not a reply
            self._deliver(reply)
        try:
            code = process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # stdout closed but still alive: not a worker we can talk to
            process.kill()
            code = process.wait()
        self.returncode = code
        if self._closing or self._fatal_seen:
            return
        tail = self.log_tail()
        message = f"the chat worker ({self.model}) exited unexpectedly ({_exit_text(code)})" + (
            f"; last lines of {self.log_path}:\n{tail}" if tail else f"; log: {self.log_path}"
        )
        rid = min(self.pending) if self.pending else None
        self.pending.clear()
        self._deliver(ErrorReply(id=rid, fatal=True, exit_code=code, message=message))


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _worker_env(visible_devices: str | None = None) -> dict[str, str]:
    from engine.runner.launcher import (
        python_env,  # PYTHONPATH (engine importable from any cwd), unbuffered
    )

    env = python_env()
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if visible_devices:  # the GPUs the config gives its work: not whatever GPU 0 is training on
        env["CUDA_VISIBLE_DEVICES"] = visible_devices
    return env


# ------------------------------------------------------------------------------------------------ display


_CONTROL = {c: None for c in [*range(9), 11, 12, *range(14, 32), 127, *range(0x80, 0xA0)]}
_CONTROL[13] = None


def printable(text: str) -> str:
    """Model text safe for a terminal: control characters (ESC sequences, BEL, CR, ...) removed; newlines and
    tabs kept. A small or broken model can emit any byte, and a raw ESC could rewrite the user's screen."""
    return text.translate(_CONTROL)


def build_messages(system: str | None, history: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + list(history)


def format_stats(end: EndReply) -> str:
    """`64 tokens · ttft 0.05 s · 512.3 tok/s` (+ `· stopped` / `· max tokens`)."""
    parts = [f"{end.tokens} tokens"]
    if end.ttft_s is not None:
        parts.append(f"ttft {end.ttft_s:.2f} s")
    if end.tokens_per_s is not None:
        parts.append(f"{end.tokens_per_s:.1f} tok/s")
    if end.stopped:
        parts.append("stopped")
    elif end.finish == "length":
        parts.append("max tokens")
    return " · ".join(parts)
