"""Chat: the protocol's models and bounds, the worker end to end (real subprocess, tiny:student), the client,
`tas chat`, the Chat tab.

Spawning a worker that loads a model costs seconds here, so the worker tests share one worker
(module fixture) and the Pilot test walks a whole session (bad model, retry, stream, stop) in one app.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.chat.client import ChatClient, ChatWorkerGone, format_stats, printable
from engine.chat.protocol import (
    DEFAULT_PARAMS,
    EndReply,
    ErrorReply,
    GenerateRequest,
    GenerationParams,
    LoadRequest,
    Message,
    ProtocolError,
    ReadyReply,
    StopRequest,
    TokenReply,
    encode,
    encode_token,
    make_params,
    param_bounds,
    parse_reply,
    parse_request,
)
from engine.chat.targets import ChatTarget, chat_target, chat_targets
from engine.cli.chat import add_parser as add_chat_command
from engine.cli.chat import cmd_chat
from engine.config.load import load_config

from .helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
# e2e (spawns chat workers, or compares snapshots): the tests marked so; the protocol's own tests are light

SYSTEM = {"role": "system", "content": "You are a senior Python developer."}
GREEDY = {"temperature": 0, "max_new_tokens": 12}


def collect(client: ChatClient, rid: str, timeout: float = 60.0, on_token=None):
    """Token texts and the end (or error) reply of request `rid`."""
    tokens: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        reply = client.next_reply(timeout=max(0.1, deadline - time.monotonic()))
        if reply.id != rid and not getattr(reply, "fatal", False):
            continue
        if isinstance(reply, TokenReply):
            tokens.append(reply.text)
            if on_token:
                on_token(len(tokens))
        else:
            return tokens, reply


def next_of(client: ChatClient, kind: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        reply = client.next_reply(timeout=max(0.1, deadline - time.monotonic()))
        if reply.kind == kind:
            return reply


@pytest.fixture(scope="module")
def worker(tiny_cache, tmp_path_factory):
    client = ChatClient("tiny:student", device="cpu", log_path=tmp_path_factory.mktemp("chat") / "worker.log")
    client.start()
    ready = client.wait_ready(timeout=120)
    assert ready.model == "tiny:student" and ready.device == "cpu" and ready.template == "chat"
    yield client
    client.close()


# ------------------------------------------------------------------------------------------- protocol

GOOD_MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]


def _generate(**changes) -> str:
    request = {"op": "generate", "id": "r1", "messages": GOOD_MESSAGES, **changes}
    return json.dumps({k: v for k, v in request.items() if v is not ...})


def test_protocol_valid_requests_round_trip():
    request = parse_request(
        _generate(
            params={
                "temperature": 0,
                "top_p": 1,
                "top_k": 0,
                "max_new_tokens": 8,
                "min_new_tokens": 8,
                "do_sample": False,
                "repetition_penalty": 1.1,
                "seed": 7,
            }
        )
    )
    assert isinstance(request, GenerateRequest) and request.id == "r1"
    assert request.messages == [Message(role="system", content="s"), Message(role="user", content="hi")]
    assert request.params.temperature == 0.0 and request.params.seed == 7
    assert parse_request(encode(request)) == request  # encode: one JSON line, parsed back to the same
    assert encode(request).endswith("}\n") and encode(request).count("\n") == 1
    assert parse_request(_generate(params=None)).params == GenerationParams()  # no params, null params: defaults
    assert parse_request(_generate(params=...)).params == GenerationParams()
    assert parse_request(_generate(id=7)).id == "7"  # an integer id is its text
    assert parse_request('{"op": "stop"}') == StopRequest()
    assert parse_request('{"op": "stop", "id": "r1"}') == StopRequest(id="r1")
    assert parse_request('{"op": "load", "model": " tiny:student ", "adapter": ""}') == LoadRequest(
        model="tiny:student", adapter=None
    )
    # messages may carry more than role and content (dropped); everything else is exact
    assert parse_request(_generate(messages=[{"role": "user", "content": "x", "name": "me"}])).messages == [
        Message(role="user", content="x")
    ]


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ("this is not json", None, "not a JSON object"),
        ("[1, 2]", None, "not a JSON object: a JSON list"),
        ('{"id": "r1"}', "op", "`op` is missing"),
        ('{"op": "fly"}', "op", "unknown op 'fly'; ops are generate, stop, load"),
        (_generate(id=...), "id", "`id` is missing"),
        (_generate(id=True), "id", "id must be a string"),
        (_generate(messages="hello"), "messages", "messages must be a list"),
        (_generate(messages=[]), "messages", "messages must not be empty"),
        (
            _generate(messages=[{"role": "bot", "content": "x"}]),
            "messages[0].role",
            "messages[0].role must be 'system'",
        ),
        (_generate(messages=[{"role": "user", "content": 5}]), "messages[0].content", "must be a string"),
        (
            _generate(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
            "messages",
            "the last message must be the user's",
        ),
        (
            _generate(params={"temperature": "hot"}),
            "params.temperature",
            "params.temperature must be a number, got 'hot'",
        ),
        (
            _generate(params={"temperature": 2.5}),
            "params.temperature",
            "params.temperature must be between 0 and 2, got 2.5",
        ),
        (_generate(params={"temperature": -1}), "params.temperature", "between 0 and 2"),
        (_generate(params={"top_p": 0}), "params.top_p", "params.top_p must be > 0 and ≤ 1, got 0"),
        (_generate(params={"top_k": -1}), "params.top_k", "params.top_k must be ≥ 0"),
        (_generate(params={"max_new_tokens": 0}), "params.max_new_tokens", "between 1 and"),
        (_generate(params={"max_new_tokens": 1.5}), "params.max_new_tokens", "must be an integer"),
        (_generate(params={"do_sample": "yes"}), "params.do_sample", "must be true or false"),
        (_generate(params={"seed": True}), "params.seed", "must be an integer"),
        (_generate(params={"temprature": 1}), "params.temprature", "unknown param 'temprature'"),
        (_generate(extra=1), "extra", "unknown field `extra`"),
        ('{"op": "load", "model": "  "}', "model", "model must not be empty"),
        ('{"op": "load"}', "model", "`model` is missing"),
    ],
)
def test_protocol_invalid_requests_name_the_field(line, field, words):
    with pytest.raises(ProtocolError) as caught:
        parse_request(line)
    assert caught.value.field == field
    assert words in str(caught.value)
    if field is not None and field != "id" and "r1" in line:
        assert caught.value.id == "r1"  # the worker's error reply carries the request's id


def test_protocol_replies_round_trip():
    ready = ReadyReply(
        model="tiny:student",
        device="cpu",
        dtype="float32",
        context=1024,
        template="chat",
        load_s=1.5,
        threads=1,
        pid=42,
    )
    end = EndReply(
        id="r1", tokens=12, ttft_s=0.01, tokens_per_s=300.5, elapsed_s=0.05, prompt_tokens=9, finish="length"
    )
    error = ErrorReply(id="r1", message="boom", op="load", model="x")
    for reply in (ready, end, error, TokenReply(id="r1", text='a\n"é\x1b')):
        assert parse_reply(encode(reply)) == reply
    # the worker's hot path writes token lines without a model: the same line
    assert encode_token('r"1', 'a\n"é\x1b') == encode(TokenReply(id='r"1', text='a\n"é\x1b'))
    assert "null" not in encode(ready)  # null fields are left out; absent means null
    assert (
        parse_reply(
            '{"kind": "end", "id": "r1", "tokens": 0, "elapsed_s": 0, "prompt_tokens": 0, '
            '"stopped": true, "finish": "stopped", "new_field": 1}'
        ).ttft_s
        is None
    )
    with pytest.raises(ProtocolError, match="unknown kind 'nope'"):
        parse_reply('{"kind": "nope"}')
    with pytest.raises(ProtocolError, match="finish must be 'stop', 'length' or 'stopped'"):
        parse_reply('{"kind": "end", "id": "r1", "tokens": 0, "elapsed_s": 0, "prompt_tokens": 0, "finish": "x"}')


def test_protocol_params_bounds_and_defaults():
    assert str(param_bounds("temperature")) == "0–2" and 2 in param_bounds("temperature")
    assert 2.01 not in param_bounds("temperature") and -0.1 not in param_bounds("temperature")
    assert str(param_bounds("top_p")) == "> 0 and ≤ 1" and 0 not in param_bounds("top_p")
    assert str(param_bounds("top_k")) == "≥ 0"
    assert DEFAULT_PARAMS.given() == {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "max_new_tokens": 512}
    assert make_params(DEFAULT_PARAMS, temperature=0.0).given() == {**DEFAULT_PARAMS.given(), "temperature": 0.0}
    with pytest.raises(ProtocolError) as caught:
        make_params(DEFAULT_PARAMS, temperature=2.5)
    assert caught.value.field == "temperature" and str(caught.value) == "temperature must be between 0 and 2, got 2.5"
    with pytest.raises(ProtocolError, match="must be a number"):
        make_params(temperature=True)  # strict: no booleans or strings for numbers


def test_client_checks_a_request_before_sending():
    client = ChatClient("tiny:student")  # never started: nothing could be sent anyway
    with pytest.raises(ProtocolError, match="params.temperature must be between 0 and 2"):
        client.generate([{"role": "user", "content": "hi"}], {"temperature": 3})
    with pytest.raises(ProtocolError, match="the last message must be the user's"):
        client.generate([{"role": "assistant", "content": "hi"}])
    assert client.pending == set() and client._outbox.empty()


def test_detokenizer_gives_whole_characters_and_the_same_text():
    from engine.chat.worker import Detokenizer

    pieces = {1: b"Hel", 2: b"lo ", 3: "é".encode()[:1], 4: "é".encode()[1:], 5: b"!", 6: b"", 7: "😀".encode()[:2]}

    class ByteTokenizer:  # a byte-level tokenizer: a character can span tokens; 6 is a special token
        def decode(self, ids, **kwargs):
            return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    detokenizer = Detokenizer(ByteTokenizer())
    out = [detokenizer.add([i]) for i in (1, 2, 3, 4, 6, 5)]
    assert out == ["Hel", "lo ", "", "é", "", "!"]
    assert detokenizer.add([7]) == "" and detokenizer.flush() == "\ufffd"  # a torn last character: said at the end


def test_token_stream_sends_the_first_piece_at_once_then_one_line_per_window():
    from engine.chat.wire import Channel
    from engine.chat.worker import TokenStream

    written: list[str] = []

    class Pipe:
        def write(self, data):
            written.append(bytes(data).decode())
            return len(data)

    stream = TokenStream(Channel(Pipe()), "r1", window=0.2)
    stream.push("a")
    assert written == [encode_token("r1", "a")]  # the first piece: at once
    stream.push("b")
    stream.push("c")
    assert len(written) == 1  # held back: the window is open
    time.sleep(0.25)
    stream.push("d")  # the first piece after the window takes what was held with it
    assert written[1] == encode_token("r1", "bcd")
    stream.push("e")
    stream.close()  # the end: what is held back goes now, before the `end` line
    assert [parse_reply(line).text for line in written] == ["a", "bcd", "e"]
    stream.close()
    assert len(written) == 3


def test_a_workers_stdin_stops_at_once_queues_the_rest_and_stops_all_at_eof(tmp_path: Path):
    """engine.chat.wire, what both workers serve their stdin with: lines longer than one read (64 KiB) arrive
    whole, blank lines are skipped, a malformed one is answered, a last line without its newline still counts."""
    from engine.chat.wire import Channel, read_requests

    long = _generate(id="r1", messages=[{"role": "user", "content": "x" * 100_000}])
    stdin = tmp_path / "stdin"
    stdin.write_text(f'{long}\n{{"op": "stop", "id": "r1"}}\n\nnot json\n{{"op": "load", "model": "tiny:student"}}')
    written: list[str] = []

    class Pipe:
        def write(self, data):
            written.append(bytes(data).decode())
            return len(data)

    stops, queued = [], []
    with open(stdin, "rb") as f:
        read_requests(f, Channel(Pipe()), stops.append, queued.append)
    assert stops == ["r1", None]  # None: EOF, the client is gone
    assert [type(r) for r in queued] == [GenerateRequest, LoadRequest] and len(queued[0].messages[0].content) == 100_000
    [error] = [parse_reply(line) for line in written]
    assert isinstance(error, ErrorReply) and error.message.startswith("bad request: not a JSON object")


def test_end_reply_figures():
    from engine.chat.wire import end_reply

    end = end_reply("r1", "length", tokens=5, prompt_tokens=7, began=10.0, first=10.5, last=11.5, ended=12.25)
    assert (end.ttft_s, end.tokens_per_s, end.elapsed_s, end.prompt_tokens) == (0.5, 4.0, 2.25, 7)
    assert not end.stopped and end.finish == "length"
    assert end_reply("r1", "stop", tokens=1, began=1.0, first=2.0, last=2.0, ended=2.0).tokens_per_s is None
    assert end_reply("r2") == EndReply(  # stopped while it waited
        id="r2", tokens=0, elapsed_s=0.0, prompt_tokens=0, stopped=True, finish="stopped"
    )


@pytest.mark.e2e
def test_generate_streams_tokens_then_end(worker):
    rid = worker.generate([SYSTEM, {"role": "user", "content": "Write a function that adds two numbers."}], GREEDY)
    tokens, end = collect(worker, rid)
    assert end.kind == "end", end
    # streamed in pieces (text that decodes within the worker's TOKEN_WINDOW_S travels in one line), not in
    # one block
    assert len(tokens) >= 2
    assert end.tokens == 12 and end.finish == "length" and end.stopped is False
    assert 0 < end.ttft_s < 30 and end.tokens_per_s > 0 and end.prompt_tokens > 5
    assert rid not in worker.pending
    # greedy is deterministic: the same conversation gives the same reply
    rid2 = worker.generate([SYSTEM, {"role": "user", "content": "Write a function that adds two numbers."}], GREEDY)
    tokens2, end2 = collect(worker, rid2)
    assert "".join(tokens2) == "".join(tokens) and end2.tokens == 12


@pytest.mark.e2e
def test_multi_turn_history(worker):
    first = [SYSTEM, {"role": "user", "content": "hello"}]
    _, end1 = collect(
        worker, worker.generate(first, {"max_new_tokens": 6, "temperature": 0.8, "top_p": 0.9, "top_k": 20})
    )
    history = first + [{"role": "assistant", "content": "Hi! What code?"}, {"role": "user", "content": "a sort"}]
    _, end2 = collect(worker, worker.generate(history, {"max_new_tokens": 6, "do_sample": False}))
    assert end1.kind == end2.kind == "end"
    assert end2.prompt_tokens > end1.prompt_tokens + 5  # the whole history went into the prompt
    assert end2.tokens == 6


@pytest.mark.e2e
def test_stop_mid_generation(worker):
    rid = worker.generate(
        [{"role": "user", "content": "Write a long story."}],
        {
            "max_new_tokens": 100_000,
            "min_new_tokens": 100_000,  # capped to the context (1024)
            "temperature": 1.0,
            "seed": 7,
        },
    )
    stopped_at = time.monotonic()

    def stop_after_three(count: int) -> None:
        nonlocal stopped_at
        if count == 3:
            worker.stop(rid)
            stopped_at = time.monotonic()

    _, end = collect(worker, rid, on_token=stop_after_three)
    assert end.kind == "end" and end.stopped is True and end.finish == "stopped"
    assert 3 <= end.tokens < 900
    assert time.monotonic() - stopped_at < 5
    # a stop for a request that already ended is ignored; the worker goes on serving
    worker.stop(rid)
    _, again = collect(worker, worker.generate([{"role": "user", "content": "hi"}], GREEDY))
    assert again.kind == "end" and again.stopped is False


@pytest.mark.e2e
def test_bad_requests_get_an_error_and_the_worker_keeps_serving(worker):
    worker.send_raw("this is not json")
    error = next_of(worker, "error")
    assert "not a JSON object" in error.message and error.id is None and not error.fatal
    worker.send_raw('{"op": "generate", "id": "bad1", "messages": "hello"}')
    error = next_of(worker, "error")
    assert error.id == "bad1" and "messages" in error.message
    worker.send_raw(
        '{"op": "generate", "id": "bad2", "messages": [{"role": "user", "content": "x"}],'
        ' "params": {"temperature": "hot"}}'
    )
    error = next_of(worker, "error")
    assert error.id == "bad2" and "temperature" in error.message
    long = [{"role": "user", "content": "def f(x): return x " * 400}]  # past the tiny model's 1024 positions
    _, error = collect(worker, worker.generate(long, GREEDY))
    assert error.kind == "error" and "context is 1024" in error.message and not error.fatal
    worker.send_raw('{"op": "fly"}')
    assert "unknown op" in next_of(worker, "error").message
    _, end = collect(worker, worker.generate([{"role": "user", "content": "hi"}], GREEDY))
    assert end.kind == "end" and end.tokens == 12


def _lora_adapter(base: str, out: Path) -> Path:
    """A LoRA adapter for `base`, saved the way the sft stage saves one (adapter + tokenizer)."""
    from peft import LoraConfig, get_peft_model

    from engine.models.loading import load_causal_lm, load_tokenizer

    model = get_peft_model(
        load_causal_lm(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    model.save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    return out


@pytest.mark.e2e
def test_load_with_a_lora_adapter(worker, tmp_path):
    adapter = _lora_adapter("tiny:assistant", tmp_path / "Assistant")
    worker.load("tiny:assistant", adapter=str(adapter))
    ready = next_of(worker, "ready")
    assert ready.model == "tiny:assistant" and ready.adapter == str(adapter)
    _, end = collect(worker, worker.generate([SYSTEM, {"role": "user", "content": "hi"}], GREEDY))
    assert end.kind == "end" and end.tokens == 12


@pytest.mark.e2e
def test_load_switches_model_and_a_bad_load_keeps_the_old_one(worker, tmp_path):
    worker.load("tiny:assistant")
    ready = next_of(worker, "ready")
    assert ready.model == "tiny:assistant" and worker.model == "tiny:assistant"
    _, end = collect(worker, worker.generate([{"role": "user", "content": "hi"}], GREEDY))
    assert end.kind == "end" and end.tokens == 12
    worker.load("tiny:assistant", adapter=str(tmp_path / "missing"))
    error = next_of(worker, "error")
    assert error.op == "load" and "no PEFT adapter" in error.message
    worker.load("/nonexistent/model")
    error = next_of(worker, "error")
    assert error.op == "load" and "no such model folder" in error.message and "tiny:assistant" in error.message
    worker.load("tiny:student")
    assert next_of(worker, "ready").model == "tiny:student"


@pytest.mark.e2e
def test_seed_makes_sampling_reproducible(worker):
    params = {"temperature": 1.0, "max_new_tokens": 40, "min_new_tokens": 40, "seed": 123}
    messages = [{"role": "user", "content": "Write a sort."}]
    first, end1 = collect(worker, worker.generate(messages, params))
    second, end2 = collect(worker, worker.generate(messages, params))
    assert "".join(first) == "".join(second) and end1.tokens == end2.tokens == 40


@pytest.mark.e2e
def test_client_reports_a_killed_worker(worker):
    """Last of the module: it kills the shared worker."""
    rid = worker.generate(
        [{"role": "user", "content": "Write a long story."}], {"max_new_tokens": 1000, "min_new_tokens": 1000}
    )
    collect_first = next_of(worker, "token")
    assert collect_first.id == rid
    os.kill(worker.process.pid, signal.SIGKILL)
    error = next_of(worker, "error", timeout=20)
    assert error.fatal is True and error.id == rid and error.exit_code == -signal.SIGKILL
    assert "exited unexpectedly" in error.message and "SIGKILL" in error.message
    assert str(worker.log_path) in error.message
    with pytest.raises(ChatWorkerGone):
        worker.generate([{"role": "user", "content": "still there?"}])


@pytest.mark.e2e
def test_bad_model_path_is_a_fatal_error_and_exit_code_2(tiny_cache, tmp_path):
    client = ChatClient("/nonexistent/model", device="cpu", log_path=tmp_path / "chat.log").start()
    error = client.next_reply(timeout=60)
    assert error.kind == "error" and error.fatal is True
    assert error.message.startswith("cannot load /nonexistent/model") and "no such model folder" in error.message
    client.process.wait(timeout=30)
    client._reader.join(timeout=10)
    assert client.returncode == 2
    with pytest.raises(queue.Empty):  # no second "crashed" error after the worker's own
        client.next_reply(timeout=0.3)
    client.close()
    # the raw process: exactly one JSON line on stdout, then exit code 2
    done = subprocess.run(
        [sys.executable, "-u", "-m", "engine.chat.worker", "--model", "tiny:nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and '"kind": "error"' in lines[0] and "unknown tiny model" in lines[0]


# ---------------------------------------------------------------------------------------------- targets


def test_chat_targets(project):
    config = load_config("configs/tiny.yaml")
    assert chat_targets(config) == [
        ChatTarget("Base assistant", "tiny:assistant", None),
        ChatTarget("Teacher", "tiny:teacher", None),
    ]
    with pytest.raises(ValueError, match="distill stage"):
        chat_target(config, "kd")
    out = Path(config.train.distillation.output_dir)
    for folder, proof in (
        (out, "config.json"),
        (Path(f"{out}_ce"), "config.json"),
        (Path(config.train.sft.save_path), "adapter_config.json"),
    ):
        folder.mkdir(parents=True)
        (folder / proof).write_text("{}")
    targets = chat_targets(config)
    assert [t.key for t in targets] == ["kd", "ce", "assistant", "base", "teacher"]
    assert targets[0] == ChatTarget("KD student", str(out), None)
    assert targets[1].model == f"{out}_ce"
    assert targets[2] == ChatTarget("Assistant + LoRA", "tiny:assistant", config.train.sft.save_path)
    assert chat_target(config, "assistant") == targets[2]
    # relative to another root: nothing there but the base assistant
    assert [t.key for t in chat_targets(config, root=project / "elsewhere")] == ["base", "teacher"]


def test_printable_drops_terminal_controls():
    assert printable("a\x1b[2Jb\x07c\rd\n\te\x9bf") == "a[2Jbcd\n\tef"


def test_format_stats():
    end = EndReply(
        id="r1", tokens=64, ttft_s=0.0512, tokens_per_s=512.34, elapsed_s=0.2, prompt_tokens=9, finish="length"
    )
    assert format_stats(end) == "64 tokens · ttft 0.05 s · 512.3 tok/s · max tokens"
    end = EndReply(id="r1", tokens=3, elapsed_s=0.1, prompt_tokens=9, stopped=True, finish="stopped")
    assert format_stats(end) == "3 tokens · stopped"


# ------------------------------------------------------------------------------------------------ tas chat


def _chat_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tas")
    sub = parser.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="config.yaml")
    add_chat_command(sub, common)
    return parser.parse_args(["chat", *argv])


def _tiny_student_chat_args(max_new_tokens: int, save: str) -> argparse.Namespace:
    """`tas chat` on configs/tiny.yaml's tiny student, greedy, `max_new_tokens` a reply, saving to `save`."""
    argv = ["--config", "configs/tiny.yaml", "--model", "tiny:student", "--temperature", "0", "--save", save]
    return _chat_args([*argv, "--max-new-tokens", str(max_new_tokens)])


class _Terminal(io.StringIO):
    """Typed input: a stdin that says it is a terminal (so `tas chat` runs its REPL)."""

    def isatty(self) -> bool:
        return True


ADD = 'def add(a, b):\n    """Add two numbers."""\n    return a + b'  # a docstring's indented quotes are text


@pytest.mark.e2e
def test_tas_chat_repl(project, monkeypatch, capsys):
    args = _tiny_student_chat_args(8, save="talk.md")
    assert args.func is cmd_chat and args.max_new_tokens == 8 and args.temperature == 0.0
    typed = (
        "Write a function that adds two numbers.\n/reset\n"
        f'"""Explain this:\n{ADD}\n"""\n/quit\n'
    )  # a block: one message of four lines
    monkeypatch.setattr(sys, "stdin", _Terminal(typed))
    assert cmd_chat(args) == 0
    out = capsys.readouterr().out
    assert "tiny:student" in out and "ready" in out
    assert 'a line starting with """ opens a block' in out  # the banner says how to send several lines
    assert "system: You are a senior Python developer." in out
    assert re.search(r"\[8 tokens · ttft \d+\.\d\d s · \d+\.\d tok/s · max tokens\]", out), out
    assert "(conversation cleared)" in out
    assert len(re.findall(r"\[8 tokens", out)) == 2  # two turns: the question, then the block
    # --save: written at exit, after /reset only the second turn
    assert "saved talk.md and talk.json" in out
    record = json.loads(Path("talk.json").read_text())
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
    assert record["messages"][1]["content"] == f"Explain this:\n{ADD}"
    assert record["target"] == {"label": "tiny:student", "model": "tiny:student", "adapter": None}
    assert record["params"]["max_new_tokens"] == 8 and record["params"]["temperature"] == 0.0
    assert f"```text\nExplain this:\n{ADD}\n```" in Path("talk.md").read_text()


@pytest.mark.e2e
def test_tas_chat_piped_stdin_is_one_message(project, monkeypatch, capsys):
    """`printf 'def add(a, b):\\n    return a + b\\n' | tas chat`: the whole of stdin is ONE turn; stdout holds the
    reply alone (the chrome goes to stderr); the command exits after it."""
    code = "def add(a, b):\n    return a + b\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(code))
    args = _tiny_student_chat_args(6, save="out/piped.json")
    assert cmd_chat(args) == 0
    captured = capsys.readouterr()
    assert len(re.findall(r"\[6 tokens", captured.err)) == 1, captured.err  # one reply
    assert "ready" in captured.err and "ready" not in captured.out and "tokens" not in captured.out
    record = json.loads(Path("out/piped.json").read_text())
    user = [m for m in record["messages"] if m["role"] == "user"]
    assert [m["content"] for m in user] == [code.rstrip("\n")]
    assert [m["role"] for m in record["messages"]][1:] == ["user", "assistant"]
    assert captured.out.strip() == printable(record["messages"][-1]["content"]).strip()
    assert record["messages"][-1]["stats"].startswith("6 tokens")
    markdown = Path("out/piped.md").read_text()  # FILE.json: the Markdown beside it
    assert f"## You\n\n```text\n{code.rstrip()}\n```" in markdown
    # nothing piped: refused before any worker starts
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n  \n"))
    monkeypatch.setattr(ChatClient, "start", lambda self: pytest.fail("no worker for an empty stdin"))
    assert cmd_chat(args) == 2
    assert "stdin is empty" in capsys.readouterr().err


def test_read_message_blocks():
    """The REPL's convention: a line is a message; a line starting with \"\"\" opens a block, \"\"\" alone ends it."""
    from engine.cli.chat import read_message

    def typed(*lines):
        pending = list(lines)

        def ask(prompt: str) -> str:
            if not pending:
                raise EOFError
            return pending.pop(0)

        return ask

    assert read_message(typed("  hello  ")) == "hello"
    assert read_message(typed('"""', *ADD.splitlines(), '"""', "next")) == ADD
    assert read_message(typed('"""Explain:', "def f():", "    pass", '"""  ')) == "Explain:\ndef f():\n    pass"
    assert read_message(typed('"""one line"""')) == "one line"
    assert read_message(typed('"""', "def f():", "    return 1")) == "def f():\n    return 1"  # Ctrl-D sends
    with pytest.raises(EOFError):
        read_message(typed())


def test_transcript_files(tmp_path):
    from engine.chat.transcript import chat_dir, make_record, message_text, paths_for, save, to_markdown

    assert message_text("\r\n\n  def f():\r\n      return 1  \n\n") == "  def f():\n      return 1"
    assert message_text("  hi  \n") == "hi"
    assert chat_dir(None, tmp_path) == tmp_path / ".chats" and chat_dir(tmp_path / "r1") == tmp_path / "r1" / "chat"
    assert paths_for("a/x.json") == (Path("a/x.md"), Path("a/x.json"))
    assert paths_for("x.md") == (Path("x.md"), Path("x.json")) and paths_for("x") == (Path("x"), Path("x.json"))
    fenced = "Look:\n```python\nprint(1)\n```"
    record = make_record(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": fenced},
            {"role": "assistant", "content": "Fine.\x1b[2J", "stats": "2 tokens", "model": "m"},
        ],
        label="KD student",
        model="m",
        params={"temperature": 0.5},
        run="r1",
        device="cpu",
    )
    markdown = to_markdown(record)
    assert f"## You\n\n````text\n{fenced}\n````" in markdown  # a longer fence than the one inside
    assert "## KD student\n\nFine.[2J\n\n*m · 2 tokens*" in markdown  # terminal controls dropped
    assert "- run: `r1`" in markdown and "- params: temperature 0.5" in markdown
    md_path, json_path = save(record, chat_dir(None, tmp_path) / "c.md")
    assert md_path.read_text() == markdown and json.loads(json_path.read_text()) == record
    assert (tmp_path / ".chats" / ".gitignore").read_text() == "*\n"  # loose chats stay out of git


def test_tas_chat_argument_errors(project, capsys):
    with pytest.raises(SystemExit):
        _chat_args(["--model", "x", "--target", "kd"])  # one or the other
    assert cmd_chat(_chat_args(["--config", "configs/tiny.yaml", "--target", "kd"])) == 2
    assert "no KD student yet" in capsys.readouterr().err
    assert cmd_chat(_chat_args(["--config", "missing.yaml"])) == 2
    assert "--model" in capsys.readouterr().err


def test_tas_chat_checks_params_with_the_protocol_bounds(project, capsys, monkeypatch):
    """Out-of-bounds options fail at once (exit 2, the option named), before any worker starts."""
    from engine.cli.main import main

    monkeypatch.setattr(ChatClient, "start", lambda self: pytest.fail("no worker for bad params"))
    assert main(["chat", "--model", "tiny:student", "--temperature", "5"]) == 2
    assert "--temperature: temperature must be between 0 and 2, got 5.0" in capsys.readouterr().err
    assert main(["chat", "--config", "configs/tiny.yaml", "--model", "tiny:student", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens: max_new_tokens must be between 1 and" in capsys.readouterr().err
    # the config (config.yaml, the default) gives max_new_tokens; the defaults the rest
    from engine.cli.chat import chat_params

    args = _chat_args(["--model", "tiny:student", "--temperature", "2"])
    params = chat_params(args, load_config("configs/tiny.yaml"))
    assert params.temperature == 2.0 and params.top_p == DEFAULT_PARAMS.top_p
    assert params.max_new_tokens == load_config("configs/tiny.yaml").assistant.inference.max_new_tokens


# ---------------------------------------------------------------------------------------------- Chat tab


def _set_assistant(config_path: Path, name: str) -> None:
    data = yaml.safe_load(config_path.read_text())
    data["assistant"]["model"]["name"] = name
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.e2e
async def test_chat_tab_bad_model_retry_stream_and_stop(project, tmp_path):
    from textual.widgets import Button, Input, Markdown, Select

    from tui.app import TASPanel
    from tui.tabs.chat import ChatTab, MessageInput

    config_path = project / "configs" / "tiny.yaml"
    _set_assistant(config_path, "/nonexistent/model")
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=tmp_path / "runs")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f4")
        await pilot.pause()
        tab = app.query_one(ChatTab)
        assert tab.client is None and "starts with the first message" in tab.status  # lazy
        assert app.focused is app.query_one("#chat-input", MessageInput)
        await pilot.press(*"hello", "enter")

        # the bad model: a clear message and a retry, never a frozen panel
        await wait_until(pilot, lambda: tab.state == "failed")
        assert "cannot load /nonexistent/model" in tab.status and "no such model folder" in tab.status
        assert tab.query_one("#chat-retry", Button).display
        assert tab.history == []  # the failed question is not kept

        # fix the config and "distill" a student; ctrl+r re-reads the targets and starts the worker with the
        # first one, the KD student
        _set_assistant(config_path, "tiny:assistant")
        from engine.models import tiny

        shutil.copytree(tiny.resolve("tiny:student"), project / ".model/tiny/student/Student")
        app.query_one("#chat-input", MessageInput).focus()
        await pilot.press("ctrl+r")
        assert [t.label for t in tab.targets] == ["KD student", "Base assistant", "Teacher"]
        await wait_until(pilot, lambda: tab.state == "ready", timeout=120)
        assert not tab.query_one("#chat-retry", Button).display
        assert ".model/tiny/student/Student on cpu" in tab.status

        # a long reply streams into the Markdown widget token by token
        max_input = app.query_one("#chat-max-new-tokens", Input)
        max_input.value = "1000"
        tab.extra_params = {"min_new_tokens": 1000}  # a random tiny model may say EOS at any point
        message_box = app.query_one("#chat-input", MessageInput)
        message_box.focus()
        await pilot.press(*"Write a function")
        # Enter, without pilot.press: it waits for an idle event loop, which comes only once the stream ends
        await message_box.action_submit()
        states: list[str] = []

        def seen_states() -> bool:
            box = tab.current_box
            source = box.source if box is not None else ""
            if source and (not states or states[-1] != source):
                states.append(source)
            return len(states) >= 4

        seen_states.debug = lambda: (len(states), tab.status, tab.current_id)
        await wait_until(pilot, seen_states, step=0.005, drain=False)
        assert all(later.startswith(earlier) for earlier, later in zip(states, states[1:]))
        assert tab.current_id is not None  # still streaming
        box = tab.current_box
        assert isinstance(box, Markdown)

        # Esc stops it; the status shows the reply's figures
        await pilot.press("escape")
        await wait_until(pilot, lambda: tab.current_id is None, timeout=20)
        assert "stopped" in tab.status and "ttft" in tab.status and "tok/s" in tab.status
        tokens = int(re.search(r"(\d+) tokens", tab.status).group(1))
        assert 1 <= tokens < 1000
        assert [m["role"] for m in tab.history] == ["user", "assistant"]
        assert printable(tab.history[1]["content"]) == box.source  # what was shown is what the next turn sends

        # a worker that dies between turns: said so, with a retry
        os.kill(tab.client.process.pid, signal.SIGKILL)
        await wait_until(pilot, lambda: tab.state == "failed", timeout=20)
        assert "exited unexpectedly" in tab.status and "SIGKILL" in tab.status
        assert tab.query_one("#chat-retry", Button).display
        assert tab.client is None

        # Retry (the button) starts a fresh worker; click it once it is laid out on screen
        retry = tab.query_one("#chat-retry", Button)
        await wait_until(pilot, lambda: retry.region.width > 0 and retry.region.height > 0)
        assert await pilot.click("#chat-retry"), "the click did not land on the Retry button"

        def ready_again() -> bool:
            return tab.state == "ready"

        ready_again.debug = lambda: (tab.state, tab.status)
        await wait_until(pilot, ready_again, timeout=120)
        client = tab.client

        # another target: the running worker switches models (op load); the history goes on
        tab.query_one("#chat-target", Select).value = 1
        await wait_until(pilot, lambda: tab.state == "ready" and "tiny:assistant on cpu" in tab.status, timeout=60)
        assert tab.client is client and tab.client_target.label == "Base assistant"
        assert "now chatting with Base assistant" in str(app.query(".chat-note").last().render())
        max_input.value = "5"
        tab.extra_params = {"min_new_tokens": 5}
        app.query_one("#chat-input", MessageInput).focus()
        await pilot.press(*"and now?", "enter")
        await wait_until(pilot, lambda: tab.current_id is None and len(tab.history) == 4, timeout=30)
        assert "5 tokens" in tab.status
    # leaving the app closes the worker
    await _wait_exit(client)


async def test_chat_tab_params_have_the_protocol_bounds(project, tmp_path, monkeypatch):
    """The tab refuses exactly what the worker refuses (one set of bounds), naming the param, and starts no
    worker for it."""
    from textual.widgets import Input

    from tui.app import TASPanel
    from tui.tabs.chat import ChatTab, MessageInput

    monkeypatch.setattr(ChatClient, "start", lambda self: pytest.fail("no worker for bad params"))
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=tmp_path / "runs", gpu_interval=3600)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f4")
        await pilot.pause()
        tab = app.query_one(ChatTab)
        inputs = {
            name: app.query_one(f"#chat-{name.replace('_', '-')}", Input)
            for name in ("temperature", "top_p", "max_new_tokens")
        }
        assert inputs["temperature"].value == str(DEFAULT_PARAMS.temperature)
        cases = {
            "temperature": ["-0.5", "0", "0.7", "2", "2.01", "10", "100"],
            "top_p": ["0", "0.01", "1", "1.5"],
            "max_new_tokens": ["0", "1", "512", str(1 << 20), str((1 << 20) + 1)],
        }
        for name, values in cases.items():
            for raw in values:
                for other, box in inputs.items():  # the others at their defaults
                    box.value = str(getattr(DEFAULT_PARAMS, other))
                inputs[name].value = raw
                value = int(raw) if name == "max_new_tokens" else float(raw)
                try:
                    tab._params()
                    panel_ok = True
                except ProtocolError as exc:
                    panel_ok = False
                    assert exc.field == name and str(param_bounds(name)).split("–")[0] in str(exc), str(exc)
                try:
                    parse_request(_generate(params={name: value}))
                    worker_ok = True
                except ProtocolError:
                    worker_ok = False
                assert panel_ok == worker_ok == (value in param_bounds(name)), (name, raw)
        # sending with a bad one: the status names it, nothing is sent or started
        for other, box in inputs.items():
            box.value = str(getattr(DEFAULT_PARAMS, other))
        inputs["temperature"].value = "2.5"
        app.query_one("#chat-input", MessageInput).focus()
        await pilot.press(*"hello", "enter")
        await pilot.pause()
        assert tab.status == "temperature must be between 0 and 2, got 2.5"
        assert tab.client is None and tab.history == [] and app.query_one("#chat-input", MessageInput).text == "hello"


FUNCTION = 'def add(a, b):\n    """Add two numbers."""\n    total = a + b\n    return total'  # 4 lines


class _FakeClient:
    """A ChatClient stand-in for the tab's key tests: ready at once, each reply one Markdown token + end."""

    REPLY = "Use `+`:\n\n```python\nreturn a + b\n```"

    def __init__(self, model, adapter=None, *, device="auto", on_reply=None, **_):
        self.model, self.adapter, self.on_reply = model, adapter, on_reply
        self.sent: list[list[dict[str, str]]] = []

    def start(self):
        self.on_reply(
            ReadyReply(model=self.model, device="cpu", dtype="float32", template="chat", load_s=0.1, threads=1, pid=1)
        )
        return self

    def generate(self, messages, params=None, request_id=None):
        self.sent.append([dict(m) for m in messages])
        self.on_reply(TokenReply(id=request_id, text=self.REPLY))
        self.on_reply(
            EndReply(
                id=request_id, tokens=9, ttft_s=0.01, tokens_per_s=90.0, elapsed_s=0.1, prompt_tokens=20, finish="stop"
            )
        )
        return request_id

    def stop(self, request_id=None):
        pass

    def close(self):
        pass

    def end(self):  # the tab ends a worker on the event loop, then reaps it in a thread
        pass

    def reap(self, timeout=5.0):
        pass


async def test_chat_tab_message_box_keys_paste_and_save(project, tmp_path, monkeypatch):
    """The message box takes code: a paste keeps every line, shift+enter and ctrl+j add a line, Enter sends the
    whole text as one user message; ctrl+s writes the conversation (.chats/ when no run's model is offered)."""
    from textual import events
    from textual.widgets import Static

    import tui.tabs.chat as chat_tab
    from tui.app import TASPanel
    from tui.tabs.chat import ChatTab, MessageInput

    clients: list[_FakeClient] = []
    monkeypatch.setattr(chat_tab, "ChatClient", lambda *a, **k: clients.append(_FakeClient(*a, **k)) or clients[-1])
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=tmp_path / "runs", gpu_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f4")
        await pilot.pause()
        tab = app.query_one(ChatTab)
        box = app.query_one("#chat-input", MessageInput)
        assert app.focused is box and box.size.height == 1
        assert "ctrl+j (or shift+enter): new line" in str(box.placeholder)  # says which keys add a line
        # the newline keys: shift+enter (terminals that report it) and ctrl+j (every terminal)
        await pilot.press("x", "shift+enter", "y", "ctrl+j", "z")
        assert box.text == "x\ny\nz" and tab.history == []
        box.clear()
        await pilot.press("ctrl+s")  # nothing to save yet: no file
        # a bracketed paste of a 4-line function: every line lands in the box, once; the box grows with it
        box.post_message(events.Paste(FUNCTION.replace("\n", "\r\n") + "\r\n"))  # terminals paste \r\n
        await pilot.pause()
        assert box.text.rstrip("\n") == FUNCTION
        assert box.size.height == 5  # four lines and the empty one after the pasted newline
        # Enter sends it all as one message
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(tab.history) == 2)
        assert tab.history[0] == {"role": "user", "content": FUNCTION}
        assert clients[0].sent[-1][-1] == {"role": "user", "content": FUNCTION}  # what went to the worker
        bubble = app.query(".chat-user").last(Static)
        assert str(bubble.render()).splitlines() == FUNCTION.splitlines()
        assert box.text == "" and box.size.height == 1
        assert tab.history[1]["content"] == _FakeClient.REPLY
        # ctrl+s: Markdown + JSON with both turns, the params and the model
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: tab.last_saved is not None)
        md_path, json_path = tab.last_saved
        assert (
            md_path.parent == Path(".chats") and md_path.suffix == ".md" and json_path == md_path.with_suffix(".json")
        )
        assert any(str(md_path) in n.message for n in app._notifications)  # the path is shown
        record = json.loads(json_path.read_text())
        assert record["run"] is None and record["target"]["label"] == "Base assistant"
        assert record["target"]["model"] == "tiny:assistant" and record["device"] == "cpu"
        assert record["params"] == {
            "temperature": DEFAULT_PARAMS.temperature,
            "top_p": DEFAULT_PARAMS.top_p,
            "top_k": DEFAULT_PARAMS.top_k,
            "max_new_tokens": load_config("configs/tiny.yaml").assistant.inference.max_new_tokens,
        }
        assert [(m["role"], m["content"]) for m in record["messages"]] == [
            ("system", "You are a senior Python developer."),
            ("user", FUNCTION),
            ("assistant", _FakeClient.REPLY),
        ]
        assert record["messages"][2]["stats"].startswith("9 tokens")
        markdown = md_path.read_text()
        assert f"## You\n\n```text\n{FUNCTION}\n```" in markdown
        assert f"## Base assistant\n\n{_FakeClient.REPLY}\n" in markdown
        # a second save of the same conversation replaces its files; ctrl+n starts new ones
        await pilot.press(*"and?", "enter")
        await wait_until(pilot, lambda: len(tab.history) == 4)
        tab.last_saved = None
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: tab.last_saved is not None)
        assert tab.last_saved == (md_path, json_path)
        assert len(json.loads(json_path.read_text())["messages"]) == 5
        assert sorted(p.name for p in Path(".chats").iterdir()) == [".gitignore", json_path.name, md_path.name]


@pytest.mark.e2e
async def test_chat_tab_pasted_code_reply_and_save_in_the_run(project, tmp_path):
    """With a real worker: a pasted function goes out as one turn, the reply streams back, and ctrl+s saves
    the conversation in the chat/ folder of the run whose student is offered."""
    from textual import events

    from engine.models import tiny
    from engine.store.runs import RunStore
    from tui.app import TASPanel
    from tui.tabs.chat import ChatTab, MessageInput

    run = RunStore(project / "runs").create(load_config("configs/tiny.yaml"), "configs/tiny.yaml")
    shutil.copytree(tiny.resolve("tiny:student"), run.path / ".model/tiny/student/Student")
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f4")
        await pilot.pause()
        tab = app.query_one(ChatTab)
        assert tab.run_id == run.id and tab._selected_target().label == "KD student"
        app.query_one("#chat-max-new-tokens").value = "6"
        tab.extra_params = {"min_new_tokens": 6}
        box = app.query_one("#chat-input", MessageInput)
        box.post_message(events.Paste(FUNCTION))
        await pilot.pause()
        assert box.text == FUNCTION
        await box.action_submit()
        await wait_until(pilot, lambda: len(tab.history) == 2, timeout=120)
        client = tab.client
        assert tab.history[0]["content"] == FUNCTION and "6 tokens" in tab.status
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: tab.last_saved is not None)
        md_path, json_path = tab.last_saved
        assert md_path.resolve().parent == (run.path / "chat").resolve()
        record = json.loads(json_path.read_text())
        assert record["run"] == run.id and record["target"]["label"] == "KD student"
        assert record["params"]["max_new_tokens"] == 6 and record["params"]["min_new_tokens"] == 6
        assert [m["content"] for m in record["messages"][1:]] == [FUNCTION, tab.history[1]["content"]]
        assert f"```text\n{FUNCTION}\n```" in md_path.read_text()
    await _wait_exit(client)


async def _wait_exit(client) -> None:
    import asyncio

    for _ in range(100):
        if client.process.poll() is not None:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the chat worker outlived the panel")


# ------------------------------------------------------------------------------------------- snapshots


@pytest.mark.e2e
@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_chat_tab_snapshot(project, tmp_path, snap_compare, size):
    from tui.app import TASPanel

    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=tmp_path / "runs", gpu_interval=3600)

    async def show_chat(pilot) -> None:
        await pilot.press("f4")
        app.query_one("#chat-input").cursor_blink = False  # a snapshot must not catch the cursor mid-blink

    assert snap_compare(app, terminal_size=size, run_before=show_chat)
