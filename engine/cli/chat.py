"""`tas chat`: chat with the student (or another model) in the terminal.

    tas chat [--target kd|ce|assistant|base | --model NAME [--adapter PATH]] [--system TEXT]
             [--max-new-tokens N] [--temperature T] [--device auto|cpu|cuda] [--config FILE] [--save FILE]

Light: the model runs in a chat worker process behind engine.chat.client.ChatClient; replies stream to
stdout as they decode.

* Interactive (stdin is a terminal): a REPL. One line is one message; several lines (code) go in a block: a
  line starting with three double quotes opens it, a line of only three double quotes sends it. Ctrl-C
  stops a reply, /reset clears the conversation, /save [FILE] writes it now, /quit or Ctrl-D exits.
* Piped (stdin is not a terminal): the whole of stdin is ONE message; its reply goes to stdout, the chrome
  (loading, stats) to stderr, and the command exits.

`--save FILE` writes the conversation at exit: Markdown and JSON (engine.chat.transcript).
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from engine.chat.client import ChatClient, ChatWorkerGone, build_messages, format_stats, printable
from engine.chat.protocol import (
    DEFAULT_PARAMS,
    EndReply,
    ErrorReply,
    GenerationParams,
    ProtocolError,
    TokenReply,
    make_params,
    param_bounds,
)
from engine.chat.targets import TARGET_KEYS, ChatTarget, chat_target, chat_targets, system_prompt, with_run_outputs
from engine.chat.transcript import chat_dir, make_record, message_text, new_name, save
from engine.store.runs import DEFAULT_CONFIG

_OPTIONS = {"temperature": "--temperature", "max_new_tokens": "--max-new-tokens"}
BLOCK = '"""'  # opens and closes a multi-line message in the REPL
HELP = (
    'several lines (code): a line starting with """ opens a block, """ alone ends it',
    "Ctrl-C stops a reply · /reset clears · /save [FILE] saves · /quit, Ctrl-D exits",
)


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use auto, cpu, cuda or cuda:N")


def add_parser(subparsers, common_parent) -> argparse.ArgumentParser:
    """Register `tas chat` on the `tas` subparsers."""
    chat = subparsers.add_parser(
        "chat",
        parents=[common_parent],
        help="chat with the student (or another model) in this terminal",
        description="Chat in the terminal. Replies stream as they are generated. One line is one message; "
        'for several lines (code) open a block with a line starting with """ and send it with a line '
        'of only """. Ctrl-C stops a reply, /reset clears the conversation, /save [FILE] writes it, '
        "/quit or Ctrl-D exits. Piped stdin (printf ... | tas chat) is sent whole as one message "
        "and the reply printed to stdout.",
    )
    which = chat.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="NAME_OR_PATH", help="hub id, local model folder or tiny:<name>")
    which.add_argument(
        "--target",
        choices=TARGET_KEYS,
        help="kd: KD student, ce: CE-only student, assistant: base + SFT adapter, base: base assistant "
        "(default: the first that exists, in that order); teacher: the teacher as teacher.source "
        "runs it (open: loaded here; vllm: its vLLM server, started for the chat; closed: the "
        "API model at teacher.closed.base_url)",
    )
    chat.add_argument("--adapter", metavar="PATH", help="PEFT adapter folder on top of --model")
    chat.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="load the model in 4-bit (NF4; the assistant targets follow assistant.quantization)",
    )
    chat.add_argument(
        "--run", metavar="RUN", help="chat with the models of this run (default: the newest run with one)"
    )
    chat.add_argument("--system", metavar="TEXT", help="system prompt (default: the Assistant prompt of prompts.path)")
    chat.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help=f"longest reply, {param_bounds('max_new_tokens')} (default: assistant.inference)",
    )
    chat.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help=f"sampling temperature, {param_bounds('temperature')}, 0 = greedy (default {DEFAULT_PARAMS.temperature})",
    )
    chat.add_argument(
        "--device",
        type=_device,
        default=None,
        metavar="auto|cpu|cuda|cuda:N",
        help="where the model runs: cuda:N picks one GPU among launch.cuda_visible_devices; auto "
        "splits a model too large for one GPU over the visible ones (default: device.type)",
    )
    chat.add_argument(
        "--save",
        metavar="FILE",
        help="write the conversation at exit as Markdown (FILE, or FILE.md when FILE ends in .json) "
        "and JSON (FILE.json beside it): messages, generation params, model",
    )
    chat.set_defaults(func=cmd_chat)
    return chat


def _say(text: str, style: str = "2", stream: TextIO | None = None) -> None:
    """A line of chrome (dim on a terminal) on stdout, or `stream`."""
    stream = stream or sys.stdout
    if stream.isatty():
        text = f"\x1b[{style}m{text}\x1b[0m"
    print(text, file=stream, flush=True)


def read_message(ask: Callable[[str], str], prompt: str = "you> ", more: str = "...> ") -> str:
    """One message typed at the REPL (`ask` is input()). A line is one message, unless it starts with the
    three double quotes of BLOCK: then every following line up to a line of only BLOCK is (text after the
    opening quotes is the first line; an indented BLOCK, e.g. a docstring's end, is text). Ctrl-D in a block
    sends what it holds; EOFError on the first line and KeyboardInterrupt (the block dropped) propagate."""
    line = ask(prompt)
    head = line.lstrip()
    if not head.startswith(BLOCK):
        return message_text(line)
    first = head[len(BLOCK) :]
    if first.rstrip().endswith(BLOCK) and first.strip() != "":  # """one line"""
        return message_text(first.rstrip()[: -len(BLOCK)])
    lines = [first] if first.strip() else []
    while True:
        try:
            line = ask(more)
        except EOFError:
            break
        if line.rstrip() == BLOCK:
            break
        lines.append(line)
    return message_text("\n".join(lines))


def _err(text: str) -> None:
    print(f"error: {text}", file=sys.stderr, flush=True)


def chat_params(args: argparse.Namespace, config) -> GenerationParams:
    """DEFAULT_PARAMS, the config's max_new_tokens, then the command line; ProtocolError naming the option."""
    changes = {}
    if config is not None:
        changes["max_new_tokens"] = config.assistant.inference.max_new_tokens
    if getattr(args, "max_new_tokens", None) is not None:
        changes["max_new_tokens"] = args.max_new_tokens
    if getattr(args, "temperature", None) is not None:
        changes["temperature"] = args.temperature
    try:
        return make_params(DEFAULT_PARAMS, **changes)
    except ProtocolError as exc:
        option = _OPTIONS.get(exc.field or "")
        if option and getattr(args, exc.field, None) is not None:
            raise ProtocolError(f"{option}: {exc}", field=exc.field) from None
        if exc.field == "max_new_tokens":
            raise ProtocolError(f"assistant.inference.max_new_tokens of the config: {exc}", field=exc.field) from None
        raise


def cmd_chat(args: argparse.Namespace) -> int:
    from engine.config.errors import ConfigError
    from engine.config.load import load_config

    config = None
    run_id = None
    config_path = getattr(args, "config", None) or DEFAULT_CONFIG
    piped = not sys.stdin.isatty()
    # piped: stdout carries the reply alone, the chrome goes to stderr
    say: Callable[[str], None] = (lambda text: _say(text, stream=sys.stderr)) if piped else _say
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
            config, run_id = with_run_outputs(config, config_path, getattr(args, "run", None))
            if run_id:
                say(f"models of run {run_id}")
            target = chat_target(config, args.target) if getattr(args, "target", None) else chat_targets(config)[0]
        except (ValueError, LookupError) as exc:
            _err(str(exc))
            return 2
    system = getattr(args, "system", None)
    if system is None and config is not None:
        system = system_prompt(config)
    try:
        params = chat_params(args, config)
    except ProtocolError as exc:
        _err(str(exc))
        return 2
    device = getattr(args, "device", None) or (config.device.type if config is not None else "auto")
    piped_text = ""
    if piped:  # the whole of stdin is one message: read it before starting the worker
        piped_text = message_text(sys.stdin.read())
        if not piped_text:
            _err("stdin is empty: nothing to send (pipe a message in, or run tas chat in a terminal)")
            return 2

    from_config = config is not None and not getattr(args, "model", None)
    client = ChatClient(
        target.model,
        target.adapter,
        device=device,
        endpoint=target.endpoint,
        config_path=config_path,
        key=target.config_key if from_config else "--model",
        visible_devices=config.launch.cuda_visible_devices if config is not None else None,
        load_in_4bit=getattr(args, "load_in_4bit", False)
        or bool(from_config and target.is_assistant and config.assistant.quantization.load_in_4bit),
    )
    where = target.model + (f" + {target.adapter}" if target.adapter else "")
    say(f"loading {target.label}: {where} …")
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
    name = target.label if target.label == ready.model else f"{target.label} ({ready.model})"
    if piped:
        say(f"{name} on {ready.device}, ready.")
    else:
        say(f"{name} on {ready.device}, ready. Enter sends a line.")
        for line in HELP:
            say(line)
    if system:
        say(f"system: {system}")
    chat = _Conversation(target, ready.device, run_id, system, params, config_path)
    save_to = getattr(args, "save", None)
    code = 0
    try:
        if piped:
            code = chat.turn(client, piped_text, say) or (0 if chat.history else 1)  # its one reply failed: 1
        else:
            code = _repl(client, chat, say, save_to)
    finally:
        client.close()
        if save_to and chat.history:
            _save(chat, save_to, say)
    return code


class _Conversation:
    """The history sent each turn, and what the transcript adds: who answered each reply, with which params."""

    def __init__(
        self,
        target: ChatTarget,
        device: str,
        run_id: str | None,
        system: str | None,
        params: GenerationParams,
        config_path: str,
    ):
        self.target, self.device, self.run_id, self.system, self.params = target, device, run_id, system, params
        self.config_path = config_path
        self.history: list[dict[str, str]] = []
        self.meta: dict[int, dict[str, Any]] = {}  # index in history → label, model, params, stats
        self.started: float | None = None

    def turn(self, client: ChatClient, text: str, say: Callable[[str], None]) -> int:
        """Send `text`, stream the reply. Returns 0, or the exit code when the worker died."""
        if not self.history:
            self.started = time.time()
        self.history.append({"role": "user", "content": text})
        code, answer, stats = _one_reply(client, build_messages(self.system, self.history), self.params, say)
        if answer is None:  # the request failed: forget the question too
            self.history.pop()
        else:
            self.history.append({"role": "assistant", "content": answer})
            self.meta[len(self.history) - 1] = {
                "label": self.target.label,
                "model": _where(self.target),
                "params": self.params.given(),
                "stats": stats,
            }
        return code or 0

    def record(self) -> dict[str, Any]:
        messages = [dict(m, **self.meta.get(i, {})) for i, m in enumerate(self.history)]
        return make_record(
            build_messages(self.system, messages),
            label=self.target.label,
            model=self.target.model,
            adapter=self.target.adapter,
            params=self.params.given(),
            run=self.run_id,
            device=self.device,
        )


def _where(target: ChatTarget) -> str:
    return target.model + (f" + {target.adapter}" if target.adapter else "")


def _repl(client: ChatClient, chat: _Conversation, say: Callable[[str], None], save_to: str | None) -> int:
    while True:
        try:
            text = read_message(input)
        except EOFError:
            print(flush=True)
            return 0
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to exit)", flush=True)
            continue
        if not text:
            continue
        if text in ("/quit", "/exit", "/q"):
            return 0
        if text == "/reset":
            chat.history.clear()
            chat.meta.clear()
            say("(conversation cleared)")
            continue
        if text == "/save" or text.startswith("/save "):
            if chat.history:
                _save(chat, text[len("/save") :].strip() or save_to, say)
            else:
                say("(nothing to save yet)")
            continue
        code = chat.turn(client, text, say)
        if code:
            return code


def _save(chat: _Conversation, path: str | None, say: Callable[[str], None]) -> None:
    """Write the conversation (Markdown + JSON); without a path, into the run's chat/ folder or .chats/."""
    if not path:
        from engine.store.runs import RunStore, runs_root

        run_path = None
        if chat.run_id:
            try:
                run_path = RunStore(runs_root(chat.config_path)).get(chat.run_id).path
            except LookupError:  # the run was removed meanwhile
                pass
        path = str(chat_dir(run_path) / f"{new_name(chat.started)}.md")
    try:
        md_path, json_path = save(chat.record(), path)
    except OSError as exc:
        _err(f"cannot save the conversation: {exc}")
        return
    say(f"saved {md_path} and {json_path}")


def _one_reply(
    client: ChatClient, messages: list[dict[str, str]], params: GenerationParams, say: Callable[[str], None] = _say
) -> tuple[int | None, str | None, str | None]:
    """Stream one reply to stdout. Returns (exit code if the worker died, the reply text or None, its stats)."""
    try:
        rid = client.generate(messages, params)
    except ChatWorkerGone as exc:
        _err(str(exc))
        return 1, None, None
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
            if isinstance(reply, TokenReply) and reply.id == rid:
                pieces.append(reply.text)
                sys.stdout.write(printable(reply.text))
                sys.stdout.flush()
            elif isinstance(reply, EndReply) and reply.id == rid:
                sys.stdout.write("\n")
                sys.stdout.flush()
                stats = format_stats(reply)
                say(f"[{stats}]")
                return None, "".join(pieces), stats
            elif isinstance(reply, ErrorReply) and (reply.id in (rid, None) or reply.fatal):
                sys.stdout.write("\n")
                _err(reply.message)
                if reply.fatal:
                    return 1, None, None
                if reply.id == rid:
                    return None, None, None
        except KeyboardInterrupt:
            if not stopping:
                stopping = True
                client.stop(rid)
                sys.stdout.write(" [stopping]")
                sys.stdout.flush()
