"""Chatting with the teacher: a target for it in every config, and the API chat worker (engine.chat.api_worker)
streaming from an OpenAI-compatible server over real HTTP (tests/fake_openai.py), with the same protocol as the
local worker: ready, token pieces, end with figures, stop, errors that never show the key."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.chat.client import ChatClient, ChatWorkerGone
from engine.chat.protocol import EndReply, ErrorReply, TokenReply
from engine.chat.targets import VLLM, chat_target, chat_targets
from engine.config.load import load_config

from .fake_openai import FakeOpenAI
from .helpers import TINY_CONFIG, wait_for

KEY = "sk-test-teacher-chat-0123456789abcdef"


def collect(client: ChatClient, rid: str, timeout: float = 60.0) -> tuple[list[str], EndReply | ErrorReply]:
    pieces: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        reply = client.next_reply(timeout=max(0.1, deadline - time.monotonic()))
        if reply.id != rid:
            continue
        if isinstance(reply, TokenReply):
            pieces.append(reply.text)
        else:
            return pieces, reply


def test_every_config_offers_the_teacher_as_it_runs_it():
    config = load_config(TINY_CONFIG)
    assert chat_targets(config)[-1].label == "Teacher"
    open_teacher = chat_target(config, "teacher")
    assert (open_teacher.model, open_teacher.endpoint) == ("tiny:teacher", None)  # loaded by the local worker
    config.teacher.source = "vllm"
    assert chat_target(config, "teacher").endpoint == VLLM
    config.teacher.source = "closed"
    config.teacher.closed.base_url = "http://gpu-node:8000/v1"
    closed = chat_target(config, "teacher")
    assert (closed.model, closed.endpoint) == (config.teacher.closed.model.name, "http://gpu-node:8000/v1")


@pytest.fixture
def server():
    with FakeOpenAI(api_key=KEY) as fake:
        yield fake


@pytest.mark.e2e
def test_api_worker_streams_stops_and_never_shows_the_key(server, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    log = tmp_path / "chat.log"
    client = ChatClient("gpt-fake", endpoint=server.url, log_path=log).start()
    try:
        ready = client.wait_ready(timeout=60)
        assert ready.device == f"server {server.url.rsplit('/v1', 1)[0]}" and ready.template == "chat"

        rid = client.generate([{"role": "user", "content": "add two numbers"}], {"max_new_tokens": 50})
        pieces, end = collect(client, rid)
        assert isinstance(end, EndReply), end
        assert "".join(pieces) == "ANSWER to: add two numbers"  # word by word, as the server sent it
        assert len(pieces) == 5 and end.tokens == 5 and end.prompt_tokens == 7 and end.finish == "stop"
        assert end.ttft_s is not None and not end.stopped

        # max_new_tokens is the API's max_tokens: the reply is cut and says so
        _, end = collect(client, client.generate([{"role": "user", "content": "[[long]]"}], {"max_new_tokens": 3}))
        assert (end.tokens, end.finish) == (3, "length")

        # stop mid-stream: the end says stopped, and the HTTP stream is closed (the server stops generating)
        server.stream_delay_s = 0.02
        rid = client.generate([{"role": "user", "content": "[[long]] story"}], {"max_new_tokens": 1000})
        first = client.next_reply(timeout=30)
        assert isinstance(first, TokenReply)
        client.stop(rid)
        pieces, end = collect(client, rid)
        assert isinstance(end, EndReply) and end.stopped and end.finish == "stopped" and end.tokens < 400
        wait_for(lambda: server.streams_closed_early >= 1, timeout=30, what="the server to see the stream closed")
    finally:
        client.close()
    assert KEY not in log.read_text()
    assert all(request["headers"].get("authorization") == f"Bearer {KEY}" for request in server.requests)


@pytest.mark.e2e
def test_a_refused_key_is_a_fatal_error_that_does_not_echo_it(server, tmp_path: Path, monkeypatch):
    wrong = "sk-wrong-key-for-the-teacher-chat-9876543210"
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    client = ChatClient("gpt-fake", endpoint=server.url, log_path=tmp_path / "chat.log").start()
    try:
        with pytest.raises(ChatWorkerGone) as failure:
            client.wait_ready(timeout=60)
    finally:
        client.close()
    message = str(failure.value)
    assert "refused the API key" in message and "OPENAI_API_KEY" in message
    assert wrong not in message and wrong not in (tmp_path / "chat.log").read_text()


# ------------------------------------------------------------------------------ where the model runs


@pytest.mark.e2e
def test_the_worker_loads_4bit_on_the_configured_gpus(tmp_path: Path):
    """launch.cuda_visible_devices reaches the worker (it must not land on the GPU training runs on), and a
    4-bit load (QLoRA's NF4) serves replies; on this CPU machine the GPU list is only an environment value."""
    import psutil

    client = ChatClient(
        "tiny:assistant",
        device="cpu",
        load_in_4bit=True,
        visible_devices="3",
        key="assistant.model.name",
        log_path=tmp_path / "chat.log",
    ).start()
    try:
        ready = client.wait_ready(timeout=120)
        assert ready.dtype == "nf4 (4-bit)" and ready.device == "cpu"
        assert psutil.Process(client.process.pid).environ().get("CUDA_VISIBLE_DEVICES") == "3"
        _, end = collect(
            client,
            client.generate(
                [{"role": "user", "content": "hi"}], {"temperature": 0, "max_new_tokens": 4, "min_new_tokens": 4}
            ),
        )
        assert isinstance(end, EndReply) and end.tokens == 4
    finally:
        client.close()


@pytest.mark.e2e
def test_a_gpu_that_is_not_there_and_an_uncached_teacher_are_named(tmp_path: Path, monkeypatch):
    client = ChatClient("tiny:student", device="cuda:1", log_path=tmp_path / "gpu.log").start()
    with pytest.raises(ChatWorkerGone, match=r"cuda:1 was asked for but no CUDA GPU is visible"):
        client.wait_ready(timeout=120)
    client.close()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client = ChatClient(
        "some-org/not-cached-teacher-3b", key="teacher.open.model.name", log_path=tmp_path / "hub.log"
    ).start()
    with pytest.raises(ChatWorkerGone, match=r"teacher\.open\.model\.name"):
        client.wait_ready(timeout=60)
    client.close()
