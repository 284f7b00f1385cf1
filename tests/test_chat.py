"""Chat: the worker protocol end to end (real subprocess, tiny:student), the client, `tas chat`, the Chat tab.

Spawning a worker that loads a model costs seconds here, so the protocol tests share one worker
(module fixture) and the Pilot test walks a whole session (bad model, retry, stream, stop) in one app.
"""

from __future__ import annotations

import argparse
import io
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

from engine.chat.client import (
    ChatClient,
    ChatTarget,
    ChatWorkerGone,
    add_chat_command,
    chat_target,
    chat_targets,
    cmd_chat,
    format_stats,
    printable,
)
from engine.core.config import load_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e

SYSTEM = {"role": "system", "content": "You are a senior Python developer."}
GREEDY = {"temperature": 0, "max_new_tokens": 12}


def collect(client: ChatClient, rid: str, timeout: float = 60.0, on_token=None) -> tuple[list[str], dict]:
    """Token texts and the end (or error) reply of request `rid`."""
    tokens: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        reply = client.next_reply(timeout=max(0.1, deadline - time.monotonic()))
        if reply.get("id") != rid and not reply.get("fatal"):
            continue
        if reply["kind"] == "token":
            tokens.append(reply["text"])
            if on_token:
                on_token(len(tokens))
        else:
            return tokens, reply


def next_of(client: ChatClient, kind: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        reply = client.next_reply(timeout=max(0.1, deadline - time.monotonic()))
        if reply["kind"] == kind:
            return reply


@pytest.fixture(scope="module")
def worker(tiny_cache, tmp_path_factory):
    client = ChatClient("tiny:student", device="cpu", log_path=tmp_path_factory.mktemp("chat") / "worker.log")
    client.start()
    ready = client.wait_ready(timeout=120)
    assert ready["model"] == "tiny:student" and ready["device"] == "cpu" and ready["template"] == "chat"
    yield client
    client.close()


# ------------------------------------------------------------------------------------------- protocol


def test_generate_streams_tokens_then_end(worker):
    rid = worker.generate([SYSTEM, {"role": "user", "content": "Write a function that adds two numbers."}], GREEDY)
    tokens, end = collect(worker, rid)
    assert end["kind"] == "end", end
    assert len(tokens) >= 5  # streamed piece by piece, not in one block
    assert end["tokens"] == 12 and end["finish"] == "length" and end["stopped"] is False
    assert 0 < end["ttft_s"] < 30 and end["tokens_per_s"] > 0 and end["prompt_tokens"] > 5
    assert rid not in worker.pending
    # greedy is deterministic: the same conversation gives the same reply
    rid2 = worker.generate([SYSTEM, {"role": "user", "content": "Write a function that adds two numbers."}], GREEDY)
    tokens2, end2 = collect(worker, rid2)
    assert "".join(tokens2) == "".join(tokens) and end2["tokens"] == 12


def test_multi_turn_history(worker):
    first = [SYSTEM, {"role": "user", "content": "hello"}]
    _, end1 = collect(worker, worker.generate(first, {"max_new_tokens": 6, "temperature": 0.8, "top_p": 0.9,
                                                        "top_k": 20}))
    history = first + [{"role": "assistant", "content": "Hi! What code?"}, {"role": "user", "content": "a sort"}]
    _, end2 = collect(worker, worker.generate(history, {"max_new_tokens": 6, "do_sample": False}))
    assert end1["kind"] == end2["kind"] == "end"
    assert end2["prompt_tokens"] > end1["prompt_tokens"] + 5  # the whole history went into the prompt
    assert end2["tokens"] == 6


def test_stop_mid_generation(worker):
    rid = worker.generate([{"role": "user", "content": "Write a long story."}],
                          {"max_new_tokens": 100_000, "min_new_tokens": 100_000,  # capped to the context (1024)
                           "temperature": 1.0, "seed": 7})
    stopped_at = time.monotonic()

    def stop_after_three(count: int) -> None:
        nonlocal stopped_at
        if count == 3:
            worker.stop(rid)
            stopped_at = time.monotonic()

    _, end = collect(worker, rid, on_token=stop_after_three)
    assert end["kind"] == "end" and end["stopped"] is True and end["finish"] == "stopped"
    assert 3 <= end["tokens"] < 900
    assert time.monotonic() - stopped_at < 5
    # a stop for a request that already ended is ignored; the worker goes on serving
    worker.stop(rid)
    _, again = collect(worker, worker.generate([{"role": "user", "content": "hi"}], GREEDY))
    assert again["kind"] == "end" and again["stopped"] is False


def test_bad_requests_get_an_error_and_the_worker_keeps_serving(worker):
    worker.send_raw("this is not json")
    error = next_of(worker, "error")
    assert "not a JSON object" in error["message"] and "id" not in error and not error.get("fatal")
    worker.send_raw('{"op": "generate", "id": "bad1", "messages": "hello"}')
    error = next_of(worker, "error")
    assert error["id"] == "bad1" and "messages" in error["message"]
    worker.send_raw('{"op": "generate", "id": "bad2", "messages": [{"role": "user", "content": "x"}],'
                    ' "params": {"temperature": "hot"}}')
    error = next_of(worker, "error")
    assert error["id"] == "bad2" and "temperature" in error["message"]
    long = [{"role": "user", "content": "def f(x): return x " * 400}]  # past the tiny model's 1024 positions
    _, error = collect(worker, worker.generate(long, GREEDY))
    assert error["kind"] == "error" and "context is 1024" in error["message"] and not error.get("fatal")
    worker.send_raw('{"op": "fly"}')
    assert "unknown op" in next_of(worker, "error")["message"]
    _, end = collect(worker, worker.generate([{"role": "user", "content": "hi"}], GREEDY))
    assert end["kind"] == "end" and end["tokens"] == 12


def _lora_adapter(base: str, out: Path) -> Path:
    """A LoRA adapter for `base`, saved the way the sft stage saves one (adapter + tokenizer)."""
    from peft import LoraConfig, get_peft_model

    from engine.models.loading import load_causal_lm, load_tokenizer

    model = get_peft_model(load_causal_lm(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            task_type="CAUSAL_LM"))
    model.save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    return out


def test_load_with_a_lora_adapter(worker, tmp_path):
    adapter = _lora_adapter("tiny:assistant", tmp_path / "Assistant")
    worker.load("tiny:assistant", adapter=str(adapter))
    ready = next_of(worker, "ready")
    assert ready["model"] == "tiny:assistant" and ready["adapter"] == str(adapter)
    _, end = collect(worker, worker.generate([SYSTEM, {"role": "user", "content": "hi"}], GREEDY))
    assert end["kind"] == "end" and end["tokens"] == 12


def test_load_switches_model_and_a_bad_load_keeps_the_old_one(worker, tmp_path):
    worker.load("tiny:assistant")
    ready = next_of(worker, "ready")
    assert ready["model"] == "tiny:assistant" and worker.model == "tiny:assistant"
    _, end = collect(worker, worker.generate([{"role": "user", "content": "hi"}], GREEDY))
    assert end["kind"] == "end" and end["tokens"] == 12
    worker.load("tiny:assistant", adapter=str(tmp_path / "missing"))
    error = next_of(worker, "error")
    assert error["op"] == "load" and "no PEFT adapter" in error["message"]
    worker.load("/nonexistent/model")
    error = next_of(worker, "error")
    assert error["op"] == "load" and "no such model folder" in error["message"] and "tiny:assistant" in error["message"]
    worker.load("tiny:student")
    assert next_of(worker, "ready")["model"] == "tiny:student"


def test_seed_makes_sampling_reproducible(worker):
    params = {"temperature": 1.0, "max_new_tokens": 40, "min_new_tokens": 40, "seed": 123}
    messages = [{"role": "user", "content": "Write a sort."}]
    first, end1 = collect(worker, worker.generate(messages, params))
    second, end2 = collect(worker, worker.generate(messages, params))
    assert "".join(first) == "".join(second) and end1["tokens"] == end2["tokens"] == 40


def test_client_reports_a_killed_worker(worker):
    """Last of the module: it kills the shared worker."""
    rid = worker.generate([{"role": "user", "content": "Write a long story."}],
                          {"max_new_tokens": 1000, "min_new_tokens": 1000})
    collect_first = next_of(worker, "token")
    assert collect_first["id"] == rid
    os.kill(worker.process.pid, signal.SIGKILL)
    error = next_of(worker, "error", timeout=20)
    assert error["fatal"] is True and error["id"] == rid and error["exit_code"] == -signal.SIGKILL
    assert "exited unexpectedly" in error["message"] and "SIGKILL" in error["message"]
    assert str(worker.log_path) in error["message"]
    with pytest.raises(ChatWorkerGone):
        worker.generate([{"role": "user", "content": "still there?"}])


def test_bad_model_path_is_a_fatal_error_and_exit_code_2(tiny_cache, tmp_path):
    client = ChatClient("/nonexistent/model", device="cpu", log_path=tmp_path / "chat.log").start()
    error = client.next_reply(timeout=60)
    assert error["kind"] == "error" and error["fatal"] is True
    assert error["message"].startswith("cannot load /nonexistent/model") and "no such model folder" in error["message"]
    client.process.wait(timeout=30)
    client._reader.join(timeout=10)
    assert client.returncode == 2
    with pytest.raises(queue.Empty):  # no second "crashed" error after the worker's own
        client.next_reply(timeout=0.3)
    client.close()
    # the raw process: exactly one JSON line on stdout, then exit code 2
    done = subprocess.run([sys.executable, "-u", "-m", "engine.chat.worker", "--model", "tiny:nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and '"kind": "error"' in lines[0] and "unknown tiny model" in lines[0]


# ---------------------------------------------------------------------------------------------- targets


def test_chat_targets(project):
    config = load_config("configs/tiny.yaml")
    assert chat_targets(config) == [ChatTarget("Base assistant", "tiny:assistant", None)]
    with pytest.raises(ValueError, match="distill stage"):
        chat_target(config, "kd")
    out = Path(config.train.distillation.output_dir)
    for folder, proof in ((out, "config.json"), (Path(f"{out}_ce"), "config.json"),
                          (Path(config.train.sft.save_path), "adapter_config.json")):
        folder.mkdir(parents=True)
        (folder / proof).write_text("{}")
    targets = chat_targets(config)
    assert [t.key for t in targets] == ["kd", "ce", "assistant", "base"]
    assert targets[0] == ChatTarget("KD student", str(out), None)
    assert targets[1].model == f"{out}_ce"
    assert targets[2] == ChatTarget("Assistant + LoRA", "tiny:assistant", config.train.sft.save_path)
    assert chat_target(config, "assistant") == targets[2]
    # relative to another root: nothing there but the base assistant
    assert [t.key for t in chat_targets(config, root=project / "elsewhere")] == ["base"]


def test_printable_drops_terminal_controls():
    assert printable("a\x1b[2Jb\x07c\rd\n\te\x9bf") == "a[2Jbcd\n\tef"


def test_format_stats():
    assert format_stats({"tokens": 64, "ttft_s": 0.0512, "tokens_per_s": 512.34, "finish": "length"}) == \
        "64 tokens · ttft 0.05 s · 512.3 tok/s · max tokens"
    assert format_stats({"tokens": 3, "ttft_s": None, "tokens_per_s": None, "stopped": True}) == "3 tokens · stopped"


# ------------------------------------------------------------------------------------------------ tas chat


def _chat_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tas")
    sub = parser.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="config.yaml")
    add_chat_command(sub, common)
    return parser.parse_args(["chat", *argv])


def test_tas_chat_repl(project, monkeypatch, capsys):
    args = _chat_args(["--config", "configs/tiny.yaml", "--model", "tiny:student", "--max-new-tokens", "8",
                       "--temperature", "0"])
    assert args.func is cmd_chat and args.max_new_tokens == 8 and args.temperature == 0.0
    monkeypatch.setattr(sys, "stdin", io.StringIO("Write a function that adds two numbers.\n/reset\n/quit\n"))
    assert cmd_chat(args) == 0
    out = capsys.readouterr().out
    assert "tiny:student" in out and "ready" in out
    assert "system: You are a senior Python developer." in out
    assert re.search(r"\[8 tokens · ttft \d+\.\d\d s · \d+\.\d tok/s · max tokens\]", out), out
    assert "(conversation cleared)" in out


def test_tas_chat_argument_errors(project, capsys):
    with pytest.raises(SystemExit):
        _chat_args(["--model", "x", "--target", "kd"])  # one or the other
    assert cmd_chat(_chat_args(["--config", "configs/tiny.yaml", "--target", "kd"])) == 2
    assert "no KD student yet" in capsys.readouterr().err
    assert cmd_chat(_chat_args(["--config", "missing.yaml"])) == 2
    assert "--model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- Chat tab


def _set_assistant(config_path: Path, name: str) -> None:
    data = yaml.safe_load(config_path.read_text())
    data["assistant"]["model"]["name"] = name
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))


async def _until(pilot, predicate, timeout: float = 60.0, step: float = 0.05, drain: bool = True) -> None:
    """Poll `predicate`. With drain=False, poll between messages instead of after the app has handled every
    queued one (pilot.pause), so intermediate states of a stream can be seen."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting: {getattr(predicate, 'debug', lambda: '')()}")
        if drain:
            await pilot.pause(step)
        else:
            await asyncio.sleep(step)


async def test_chat_tab_bad_model_retry_stream_and_stop(project, tmp_path):
    from textual.widgets import Button, Input, Markdown, Select

    from tui.app import TASPanel
    from tui.tabs.chat import ChatTab

    config_path = project / "configs" / "tiny.yaml"
    _set_assistant(config_path, "/nonexistent/model")
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=tmp_path / "runs")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f4")
        await pilot.pause()
        tab = app.query_one(ChatTab)
        assert tab.client is None and "starts with the first message" in tab.status  # lazy
        assert app.focused is app.query_one("#chat-input", Input)
        await pilot.press(*"hello", "enter")

        # the bad model: a clear message and a retry, never a frozen panel
        await _until(pilot, lambda: tab.state == "failed")
        assert "cannot load /nonexistent/model" in tab.status and "no such model folder" in tab.status
        assert tab.query_one("#chat-retry", Button).display
        assert tab.history == []  # the failed question is not kept

        # fix the config and "distill" a student; ctrl+r re-reads the targets and starts the worker with the
        # first one, the KD student
        _set_assistant(config_path, "tiny:assistant")
        from engine.models import tiny

        shutil.copytree(tiny.resolve("tiny:student"), project / ".model/tiny/student/Student")
        app.query_one("#chat-input", Input).focus()
        await pilot.press("ctrl+r")
        assert [t.label for t in tab.targets] == ["KD student", "Base assistant"]
        await _until(pilot, lambda: tab.state == "ready", timeout=120)
        assert not tab.query_one("#chat-retry", Button).display
        assert ".model/tiny/student/Student on cpu" in tab.status

        # a long reply streams into the Markdown widget token by token
        max_input = app.query_one("#chat-max-new-tokens", Input)
        max_input.value = "1000"
        tab.extra_params = {"min_new_tokens": 1000}  # a random tiny model may say EOS at any point
        message_box = app.query_one("#chat-input", Input)
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
        await _until(pilot, seen_states, step=0.005, drain=False)
        assert all(later.startswith(earlier) for earlier, later in zip(states, states[1:]))
        assert tab.current_id is not None  # still streaming
        box = tab.current_box
        assert isinstance(box, Markdown)

        # Esc stops it; the status shows the reply's figures
        await pilot.press("escape")
        await _until(pilot, lambda: tab.current_id is None, timeout=20)
        assert "stopped" in tab.status and "ttft" in tab.status and "tok/s" in tab.status
        tokens = int(re.search(r"(\d+) tokens", tab.status).group(1))
        assert 1 <= tokens < 1000
        assert [m["role"] for m in tab.history] == ["user", "assistant"]
        assert printable(tab.history[1]["content"]) == box.source  # what was shown is what the next turn sends

        # a worker that dies between turns: said so, with a retry
        os.kill(tab.client.process.pid, signal.SIGKILL)
        await _until(pilot, lambda: tab.state == "failed", timeout=20)
        assert "exited unexpectedly" in tab.status and "SIGKILL" in tab.status
        assert tab.query_one("#chat-retry", Button).display
        assert tab.client is None

        # Retry (the button) starts a fresh worker
        await pilot.click("#chat-retry")
        await _until(pilot, lambda: tab.state == "ready", timeout=120)
        client = tab.client

        # another target: the running worker switches models (op load); the history goes on
        tab.query_one("#chat-target", Select).value = 1
        await _until(pilot, lambda: tab.state == "ready" and "tiny:assistant on cpu" in tab.status, timeout=60)
        assert tab.client is client and tab.client_target.label == "Base assistant"
        assert "now chatting with Base assistant" in str(app.query(".chat-note").last().render())
        max_input.value = "5"
        tab.extra_params = {"min_new_tokens": 5}
        app.query_one("#chat-input", Input).focus()
        await pilot.press(*"and now?", "enter")
        await _until(pilot, lambda: tab.current_id is None and len(tab.history) == 4, timeout=30)
        assert "5 tokens" in tab.status
    # leaving the app closes the worker
    await _wait_exit(client)


async def _wait_exit(client) -> None:
    import asyncio

    for _ in range(100):
        if client.process.poll() is not None:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the chat worker outlived the panel")


# ------------------------------------------------------------------------------------------- snapshots


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_chat_tab_snapshot(project, tmp_path, snap_compare, size):
    from tui.app import TASPanel

    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=tmp_path / "runs", gpu_interval=3600)
    assert snap_compare(app, terminal_size=size, press=["f4"])
