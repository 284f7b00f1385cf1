"""`tas chat`: chat with the student (or another model) in the terminal.

    tas chat [--target kd|ce|assistant|base | --model NAME [--adapter PATH]] [--system TEXT]
             [--max-new-tokens N] [--temperature T] [--device auto|cpu|cuda] [--config FILE]

Light: the model runs in a chat worker process behind engine.chat.client.ChatClient; replies stream to
stdout as they decode. Ctrl-C stops a reply, /reset clears the conversation, /quit or Ctrl-D exits.
"""

from __future__ import annotations

import argparse
import queue
import sys

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
from engine.core.runs import DEFAULT_CONFIG

_OPTIONS = {"temperature": "--temperature", "max_new_tokens": "--max-new-tokens"}


def add_parser(subparsers, common_parent) -> argparse.ArgumentParser:
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
    chat.add_argument("--run", metavar="RUN", help="chat with the models of this run (default: the newest run with one)")
    chat.add_argument("--system", metavar="TEXT", help="system prompt (default: the Assistant prompt of prompts.path)")
    chat.add_argument("--max-new-tokens", type=int, metavar="N",
                      help=f"longest reply, {param_bounds('max_new_tokens')} (default: assistant.inference)")
    chat.add_argument("--temperature", type=float, metavar="T",
                      help=f"sampling temperature, {param_bounds('temperature')}, 0 = greedy "
                           f"(default {DEFAULT_PARAMS.temperature})")
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
    from engine.core.config import ConfigError, load_config

    config = None
    config_path = getattr(args, "config", None) or DEFAULT_CONFIG
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
                _say(f"models of run {run_id}")
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
    name = target.label if target.label == ready.model else f"{target.label} ({ready.model})"
    _say(f"{name} on {ready.device}, ready. "
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


def _one_reply(client: ChatClient, messages: list[dict[str, str]],
               params: GenerationParams) -> tuple[int | None, str | None]:
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
            if isinstance(reply, TokenReply) and reply.id == rid:
                pieces.append(reply.text)
                sys.stdout.write(printable(reply.text))
                sys.stdout.flush()
            elif isinstance(reply, EndReply) and reply.id == rid:
                sys.stdout.write("\n")
                _say(f"[{format_stats(reply)}]")
                return None, "".join(pieces)
            elif isinstance(reply, ErrorReply) and (reply.id in (rid, None) or reply.fatal):
                sys.stdout.write("\n")
                _err(reply.message)
                if reply.fatal:
                    return 1, None
                if reply.id == rid:
                    return None, None
        except KeyboardInterrupt:
            if not stopping:
                stopping = True
                client.stop(rid)
                sys.stdout.write(" [stopping]")
                sys.stdout.flush()
