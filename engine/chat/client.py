"""Talking to the chat worker (engine.chat.worker) from the panel or a terminal.

Light module: stdlib only (+ the light config / prompt loaders), never torch or transformers.

* `ChatClient` spawns `python -u -m engine.chat.worker --model ...` with stdin/stdout pipes (its stderr goes
  to a log file, so the worker can never block on a full pipe) and a reader thread that turns each
  stdout line into a reply dict, handed to `on_reply` (called on the reader thread) or put on
  `client.replies` (a queue). A worker that dies (EOF on its stdout) becomes one reply
  `{"kind": "error", "fatal": true, "exit_code", "message": ... + the tail of its log}` unless it already
  said why with a fatal error of its own; every fatal error means "start a new client to go on".
* `chat_targets(config)` lists what there is to chat with; `cmd_chat` is `tas chat`, a terminal REPL.

Reply kinds: ready, token, end, error (see engine/chat.py for every field).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

Reply = dict[str, Any]

DEFAULT_PARAMS: dict[str, Any] = {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "max_new_tokens": 512}
TARGET_KEYS = ("kd", "ce", "assistant", "base")
TARGET_LABELS = {
    "kd": "KD student",
    "ce": "CE-only student",
    "assistant": "Assistant + LoRA",
    "base": "Base assistant",
}
LOG_TAIL_LINES = 12


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
        on_reply: Callable[[Reply], None] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        python: str = sys.executable,
    ):
        self.model = model
        self.adapter = adapter
        self.device = device
        self.on_reply = on_reply
        self.replies: queue.Queue[Reply] = queue.Queue()
        self.cwd = cwd
        self.python = python
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen[bytes] | None = None
        self.ready: Reply | None = None  # the latest `ready` reply: model, device, ...
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
        command = [self.python, "-u", "-m", "engine.chat.worker", "--model", self.model, "--device", self.device]
        if self.adapter:
            command += ["--adapter", str(self.adapter)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=self.cwd,
                env=_worker_env(),
                start_new_session=True,  # Ctrl-C in a terminal is ours to turn into `stop`
                close_fds=True,
                bufsize=0,
            )
        self._reader = threading.Thread(target=self._read, name="chat-client-reader", daemon=True)
        self._reader.start()
        self._writer = threading.Thread(target=self._write_loop, name="chat-client-writer", daemon=True)
        self._writer.start()
        if self._closing:  # closed while we were spawning (a panel leaving at once): do not leave it behind
            self._closing = False
            self.close()
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None and not self._closing

    def close(self, timeout: float = 5.0) -> None:
        """End the worker: EOF on its stdin (it stops any generation and exits), then TERM, then KILL."""
        process = self.process
        if self._closing:
            return
        self._closing = True
        if process is None:  # not started (yet): start() sees the flag
            return
        self._outbox.put(None)
        if self._writer is not None:
            self._writer.join(timeout=1)
        try:
            process.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.returncode = process.returncode
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=2)
        if self._own_log and self.returncode == 0 and not self._fatal_seen and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> ChatClient:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests
    def generate(self, messages: list[dict[str, str]], params: dict[str, Any] | None = None,
                 request_id: str | None = None) -> str:
        """Ask for a reply to `messages` (system prompt first, history, the new user message last)."""
        rid = request_id or f"r{next(self._ids)}"
        self.pending.add(rid)
        try:
            self._send({"op": "generate", "id": rid, "messages": messages, "params": params or {}})
        except ChatWorkerGone:
            self.pending.discard(rid)
            raise
        return rid

    def stop(self, request_id: str | None = None) -> None:
        """Stop one generation (or, without an id, every running and waiting one); its `end` still comes."""
        try:
            self._send({"op": "stop", **({"id": request_id} if request_id else {})})
        except ChatWorkerGone:
            pass  # nothing left to stop

    def load(self, model: str, adapter: str | None = None) -> None:
        """Switch the worker to another model; a `ready` reply (or an error, the old model kept) follows."""
        self._send({"op": "load", "model": model, "adapter": adapter})

    def send_raw(self, line: str) -> None:
        """Write one line as is (tests use it to send malformed requests)."""
        self._write((line.rstrip("\n") + "\n").encode("utf-8"))

    def _send(self, request: dict[str, Any]) -> None:
        self._write((json.dumps(request, ensure_ascii=False) + "\n").encode("utf-8"))

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
            view = memoryview(data)
            try:
                while view:
                    view = view[stdin.write(view):]
            except (BrokenPipeError, ValueError, OSError):
                self._broken = True  # the reader sees the EOF and reports the exit
                return

    # ---- replies
    def next_reply(self, timeout: float | None = None) -> Reply:
        """The next reply from the queue (only when no on_reply callback was given); queue.Empty on timeout."""
        return self.replies.get(timeout=timeout)

    def wait_ready(self, timeout: float = 300.0) -> Reply:
        """Block until `ready` (returned) or a fatal error (raised as ChatWorkerGone); queue mode only."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the chat worker did not load {self.model} in {timeout:.0f} s; see {self.log_path}")
            reply = self.next_reply(timeout=left)
            if reply["kind"] == "ready":
                return reply
            if reply["kind"] == "error" and reply.get("fatal"):
                raise ChatWorkerGone(reply["message"])

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

    def _deliver(self, reply: Reply) -> None:
        kind = reply.get("kind")
        if kind == "ready":
            self.ready = reply
            self.model = reply.get("model", self.model)
            self.adapter = reply.get("adapter")
        elif kind in ("end", "error") and reply.get("id") is not None:
            self.pending.discard(str(reply["id"]))
        if kind == "error" and reply.get("fatal"):
            self._fatal_seen = True
        if self.on_reply is not None:
            try:
                self.on_reply(reply)
            except Exception:  # noqa: BLE001 - a broken callback must not kill the reader
                import traceback

                traceback.print_exc()
        else:
            self.replies.put(reply)

    def _read(self) -> None:
        process = self.process
        assert process is not None and process.stdout is not None
        for raw in iter(process.stdout.readline, b""):
            try:
                reply = json.loads(raw)
            except json.JSONDecodeError:
                continue  # the worker keeps fd 1 for JSON lines; anything else is not a reply
            if isinstance(reply, dict) and "kind" in reply:
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
        reply: Reply = {
            "kind": "error",
            "fatal": True,
            "exit_code": code,
            "message": f"the chat worker ({self.model}) exited unexpectedly ({_exit_text(code)})"
                       + (f"; last lines of {self.log_path}:\n{tail}" if tail else f"; log: {self.log_path}"),
        }
        if self.pending:
            reply["id"] = min(self.pending)
            self.pending.clear()
        self._deliver(reply)


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


def _worker_env() -> dict[str, str]:
    from engine.core.launcher import (
        python_env,  # PYTHONPATH (engine importable from any cwd), unbuffered
    )

    env = python_env()
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# ----------------------------------------------------------------------------------------------- targets


class ChatTarget(NamedTuple):
    label: str
    model: str
    adapter: str | None

    @property
    def key(self) -> str:
        return next((k for k, v in TARGET_LABELS.items() if v == self.label), "model")


def _target_paths(config, root: Path | None) -> dict[str, tuple[str, str | None, Path, str]]:
    """key → (model, adapter, the path whose file proves it exists, that file)."""
    def at(path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() or root is None else root / p

    out_dir = config.train.distillation.output_dir
    base = config.assistant.model.name
    sft = config.train.sft.save_path
    return {
        "kd": (str(at(out_dir)), None, at(out_dir), "config.json"),
        "ce": (str(at(f"{out_dir}_ce")), None, at(f"{out_dir}_ce"), "config.json"),
        "assistant": (base, str(at(sft)), at(sft), "adapter_config.json"),
        "base": (base, None, Path(), ""),
    }


def chat_targets(config, root: str | os.PathLike[str] | None = None) -> list[ChatTarget]:
    """What can be chatted with, best first: KD student, CE-only student, fine-tuned assistant (base +
    LoRA adapter), base assistant. Each only when its files exist, except the base assistant (always).
    Relative paths of the config count from `root` (default: the working directory, as for the stages)."""
    targets = []
    for key, (model, adapter, path, proof) in _target_paths(config, Path(root) if root else None).items():
        if key == "base" or (path / proof).exists():
            targets.append(ChatTarget(TARGET_LABELS[key], model, adapter))
    return targets


def chat_target(config, key: str, root: str | os.PathLike[str] | None = None) -> ChatTarget:
    """The target named kd / ce / assistant / base; ValueError saying which stage makes it when missing."""
    paths = _target_paths(config, Path(root) if root else None)
    if key not in paths:
        raise ValueError(f"unknown target {key!r}; targets are {', '.join(TARGET_KEYS)}")
    model, adapter, path, proof = paths[key]
    if key != "base" and not (path / proof).exists():
        made_by = {"kd": "the distill stage (train.distillation.output_dir)",
                   "ce": "the distill stage with train.distillation.ce_only_control: true",
                   "assistant": "the sft stage (train.sft.save_path)"}[key]
        raise ValueError(f"no {TARGET_LABELS[key]} yet: {path / proof} is missing; it is made by {made_by}")
    return ChatTarget(TARGET_LABELS[key], model, adapter)


def system_prompt(config) -> str | None:
    """The "Assistant" system prompt of prompts.path (prompt.yaml), or None when there is none."""
    from engine.teacher.output import load_system_prompts

    try:
        return load_system_prompts(config.prompts.path).get("Assistant")
    except (OSError, ValueError):
        return None


_CONTROL = {c: None for c in [*range(9), 11, 12, *range(14, 32), 127, *range(0x80, 0xA0)]}
_CONTROL[13] = None


def printable(text: str) -> str:
    """Model text safe for a terminal: control characters (ESC sequences, BEL, CR, ...) removed; newlines and
    tabs kept. A small or broken model can emit any byte, and a raw ESC could rewrite the user's screen."""
    return text.translate(_CONTROL)


def build_messages(system: str | None, history: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + list(history)


def format_stats(end: Reply) -> str:
    """`64 tokens · ttft 0.05 s · 512.3 tok/s` (+ `· stopped`)."""
    parts = [f"{end.get('tokens', 0)} tokens"]
    if end.get("ttft_s") is not None:
        parts.append(f"ttft {end['ttft_s']:.2f} s")
    if end.get("tokens_per_s") is not None:
        parts.append(f"{end['tokens_per_s']:.1f} tok/s")
    if end.get("stopped"):
        parts.append("stopped")
    elif end.get("finish") == "length":
        parts.append("max tokens")
    return " · ".join(parts)


# ------------------------------------------------------------------------------------------------ tas chat


def add_chat_command(subparsers, common_parent) -> argparse.ArgumentParser:
    """Register `tas chat` on the `tas` subparsers."""
    chat = subparsers.add_parser(
        "chat", parents=[common_parent],
        help="chat with the student (or another model) in this terminal",
        description="Chat in the terminal. Replies stream as they are generated; Ctrl-C stops a reply, "
                    "/reset clears the conversation, /quit or Ctrl-D exits.",
    )
    which = chat.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="NAME_OR_PATH", help="hub id, local model folder or tiny:<name>")
    which.add_argument("--target", choices=TARGET_KEYS,
                       help="kd: KD student, ce: CE-only student, assistant: base + SFT adapter, base: base assistant "
                            "(default: the first that exists, in that order)")
    chat.add_argument("--adapter", metavar="PATH", help="PEFT adapter folder on top of --model")
    chat.add_argument("--system", metavar="TEXT", help="system prompt (default: the Assistant prompt of prompts.path)")
    chat.add_argument("--max-new-tokens", type=int, metavar="N", help="longest reply (default: assistant.inference)")
    chat.add_argument("--temperature", type=float, metavar="T",
                      help=f"sampling temperature, 0 = greedy (default {DEFAULT_PARAMS['temperature']})")
    chat.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                      help="where the model runs (default: device.type of the config)")
    chat.set_defaults(func=cmd_chat)
    return chat


def _say(text: str, style: str = "2") -> None:
    """A line of chrome (dim on a terminal) on stdout."""
    if sys.stdout.isatty():
        text = f"\x1b[{style}m{text}\x1b[0m"
    print(text, flush=True)


def _err(text: str) -> None:
    print(f"error: {text}", file=sys.stderr, flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    from engine.core.config import ConfigError, load_config

    config = None
    config_path = getattr(args, "config", None) or "config.yaml"
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        if not getattr(args, "model", None):
            _err(f"{exc}\n(give --model NAME_OR_PATH to chat without a config)")
            return 2
    if getattr(args, "model", None):
        target = ChatTarget(args.model, args.model, getattr(args, "adapter", None))
    else:
        try:
            target = chat_target(config, args.target) if getattr(args, "target", None) else chat_targets(config)[0]
        except ValueError as exc:
            _err(str(exc))
            return 2
    system = getattr(args, "system", None)
    if system is None and config is not None:
        system = system_prompt(config)
    params = dict(DEFAULT_PARAMS)
    if config is not None:
        params["max_new_tokens"] = config.assistant.inference.max_new_tokens
    if getattr(args, "max_new_tokens", None):
        params["max_new_tokens"] = args.max_new_tokens
    if getattr(args, "temperature", None) is not None:
        params["temperature"] = args.temperature
    device = getattr(args, "device", None) or (config.device.type if config is not None else "auto")

    client = ChatClient(target.model, target.adapter, device=device)
    where = target.model + (f" + {target.adapter}" if target.adapter else "")
    _say(f"loading {target.label}: {where} …")
    client.start()
    try:
        ready = client.wait_ready()
    except (ChatWorkerGone, TimeoutError) as exc:
        client.close()
        _err(str(exc))
        return 2
    except KeyboardInterrupt:
        client.close()
        return 130
    name = target.label if target.label == ready.get("model") else f"{target.label} ({ready.get('model')})"
    _say(f"{name} on {ready.get('device')}, ready. "
         f"Ctrl-C stops a reply, /reset clears the conversation, /quit exits.")
    if system:
        _say(f"system: {system}")
    history: list[dict[str, str]] = []
    try:
        while True:
            try:
                line = input("you> " if sys.stdin.isatty() else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                print("\n(/quit or Ctrl-D to exit)", flush=True)
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit", "/q"):
                break
            if text == "/reset":
                history.clear()
                _say("(conversation cleared)")
                continue
            history.append({"role": "user", "content": text})
            code, answer = _one_reply(client, build_messages(system, history), params)
            if code is not None:
                return code
            if answer is None:  # the request failed: forget the question too
                history.pop()
            else:
                history.append({"role": "assistant", "content": answer})
    finally:
        client.close()
    return 0


def _one_reply(client: ChatClient, messages: list[dict[str, str]], params: dict[str, Any]) -> tuple[int | None, str | None]:
    """Stream one reply to stdout. Returns (exit code if the worker died, the reply text or None)."""
    try:
        rid = client.generate(messages, params)
    except ChatWorkerGone as exc:
        _err(str(exc))
        return 1, None
    pieces: list[str] = []
    if sys.stdout.isatty():
        sys.stdout.write("\x1b[1massistant>\x1b[0m ")
    stopping = False
    while True:
        try:
            try:
                reply = client.next_reply(timeout=0.2)
            except queue.Empty:
                continue
            kind = reply.get("kind")
            if kind == "token" and reply.get("id") == rid:
                pieces.append(reply["text"])
                sys.stdout.write(printable(reply["text"]))
                sys.stdout.flush()
            elif kind == "end" and reply.get("id") == rid:
                sys.stdout.write("\n")
                _say(f"[{format_stats(reply)}]")
                return None, "".join(pieces)
            elif kind == "error" and (reply.get("id") in (rid, None) or reply.get("fatal")):
                sys.stdout.write("\n")
                _err(reply.get("message", "unknown error"))
                if reply.get("fatal"):
                    return 1, None
                if reply.get("id") == rid:
                    return None, None
        except KeyboardInterrupt:
            if not stopping:
                stopping = True
                client.stop(rid)
                sys.stdout.write(" [stopping]")
                sys.stdout.flush()
