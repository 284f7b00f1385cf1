"""The managed vLLM server (engine/teacher/vllm_server.py) against a real vLLM serving the tiny teacher.

No fakes: each test starts the vLLM OpenAI server from the venv that `scripts/build-vllm-env.sh`
builds (`TAS_VLLM_PYTHON`, else `.venv-vllm/bin/python`). Without that venv these tests FAIL rather
than skip, so a CI that forgot to build it cannot pass them silently. A start takes ~45-60 s on 2
cores (the very first on a machine ~2 min: torch compiles the model once into ~/.cache/vllm), so the
tests start as few servers as they can: two that become healthy, one that fails, two stopped at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.teacher.vllm_server import (
    VllmError,
    VllmServer,
    VllmSettings,
    group_members,
    stop_leftover,
)

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
STARTUP_S = 600  # generous: a cold compile on a loaded 2-core machine


def vllm_python() -> str:
    python = os.environ.get("TAS_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(python).is_file():
        pytest.fail(
            f"no vLLM venv at {python}: run `scripts/build-vllm-env.sh` (or set TAS_VLLM_PYTHON). "
            "The vllm-marked tests fail instead of skipping so that they cannot pass without vLLM.",
            pytrace=False,
        )
    return python


@pytest.fixture(scope="module")
def teacher_dir(tiny_cache: Path) -> Path:
    """The tiny teacher as a Hugging Face folder (Qwen2 + ChatML tokenizer), built in this venv."""
    from engine.models.tiny import resolve

    return resolve("tiny:teacher")


def tiny_settings(model: Path | str, **overrides) -> VllmSettings:
    settings = VllmSettings(
        model=str(model),
        python=vllm_python(),
        served_model_name="tiny-teacher",
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,  # skips the torch.compile warm-up: ~30-90 s less per start on 2 cores
        # 1 GiB of KV cache is plenty for a 4-layer model; offline: a bad path must not reach for the hub
        env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
    )
    return dataclasses.replace(settings, **overrides)


def test_serves_chat_completions_then_stops_its_whole_group(tmp_path: Path, teacher_dir: Path):
    from openai import OpenAI

    log, pid_file = tmp_path / "vllm.log", tmp_path / "vllm.pid"
    with VllmServer(tiny_settings(teacher_dir)).start(log, pid_file) as server:
        server.wait_healthy(STARTUP_S)
        assert server.is_healthy()
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        assert json.loads(pid_file.read_text())["pid"] == server.pid
        assert len(group_members(server.pid)) >= 2  # API server + engine core (+ worker)

        client = OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="tiny-teacher",
            messages=[{"role": "user", "content": "Write a function that adds two numbers."}],
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert reply.choices[0].message.content  # untrained weights: some text, not sensible text
        assert reply.usage.completion_tokens == 16
        # the server applied the tokenizer's ChatML template (a raw prompt would be ~9 tokens)
        assert reply.usage.prompt_tokens > 10
        pgid = server.pid
    assert group_members(pgid) == []
    assert not pid_file.exists()
    assert "GET /health" in log.read_text()


def test_bad_model_path_fails_fast_quoting_the_servers_error(tmp_path: Path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    started = time.monotonic()
    with VllmServer(tiny_settings(not_a_model)).start(tmp_path / "vllm.log") as server:
        with pytest.raises(VllmError) as failure:
            server.wait_healthy(STARTUP_S)
        pgid = server.pid
    headline, *rest = str(failure.value).splitlines()
    assert "exited with exit code" in headline
    # the server's own words in the headline (vLLM: "Invalid repository ID or local directory
    # specified: '<path>'"), not just "it failed"; then the end of its log
    log_lines = (tmp_path / "vllm.log").read_text().splitlines()
    exception = [line for line in log_lines if re.match(r"^[\w.]*Error: ", line)][-1]
    assert exception.strip() in headline
    assert str(not_a_model) in headline
    assert rest[-1].strip() == [line for line in log_lines if line.strip()][-1].strip()
    assert time.monotonic() - started < STARTUP_S / 2  # noticed when the process died, not at the timeout
    assert group_members(pgid) == []


# -------------------------------------------------------------------------- a worker that dies


WORKER = """
import dataclasses, json, sys, time
sys.path.insert(0, {root!r})
from engine.teacher.vllm_server import VllmServer, VllmSettings
settings = VllmSettings(**json.loads(sys.argv[1]))
server = VllmServer(settings).start(sys.argv[2], sys.argv[3])
if sys.argv[4] == "healthy":
    server.wait_healthy({startup})
print("ready", server.pid, flush=True)
time.sleep(3600)
"""


def start_worker(tmp_path: Path, settings: VllmSettings, wait: str) -> tuple[subprocess.Popen, int]:
    """A stand-in for the teacher's worker process: starts the server, says "ready <pid>", then sleeps."""
    out = tmp_path / "worker.out"
    with open(out, "wb") as handle:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER.format(root=str(ROOT), startup=STARTUP_S),
                json.dumps(dataclasses.asdict(settings)),
                str(tmp_path / "vllm.log"),
                str(tmp_path / "vllm.pid"),
                wait,
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + STARTUP_S + 60
    while time.monotonic() < deadline:
        text = out.read_text()
        if text.startswith("ready"):
            return worker, int(text.split()[1])
        if worker.poll() is not None:
            pytest.fail(f"the worker exited with {worker.returncode}:\n{text}")
        time.sleep(0.5)
    worker.kill()
    pytest.fail("the worker did not report ready")


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_leftover_server_of_a_sigkilled_worker_is_found_and_ended(tmp_path: Path, teacher_dir: Path):
    # die_with_worker off: the case the death signal does not cover (it reached the leader only, or the
    # leader ignored it), where the next worker of the run has only the pid file to go by.
    worker, pgid = start_worker(tmp_path, tiny_settings(teacher_dir, die_with_worker=False), wait="healthy")
    try:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        time.sleep(2)
        assert group_members(pgid), "the server should have outlived its SIGKILLed worker"

        assert stop_leftover(tmp_path / "vllm.pid") is True
        assert group_members(pgid) == []
        assert not (tmp_path / "vllm.pid").exists()
        assert stop_leftover(tmp_path / "vllm.pid") is False  # nothing left, no pid file: a no-op
    finally:
        worker.kill()
        stop_leftover(tmp_path / "vllm.pid", grace_s=0)


def test_server_gets_sigterm_when_its_worker_is_sigkilled(tmp_path: Path, teacher_dir: Path):
    # PR_SET_PDEATHSIG: killed right after start(), while vLLM is still importing, so this costs
    # seconds, not a whole server start; vLLM's own SIGTERM handling is covered by stop() above.
    worker, pgid = start_worker(tmp_path, tiny_settings(teacher_dir), wait="started")
    try:
        assert group_members(pgid)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert wait_until(lambda: not group_members(pgid), 60), "the server outlived its worker"
    finally:
        worker.kill()
        stop_leftover(tmp_path / "vllm.pid", grace_s=0)


def test_wait_healthy_returns_false_at_once_on_cancel(tmp_path: Path, teacher_dir: Path):
    # the teacher stage passes its cancel event: a SIGTERM during the minute-long start-up is not
    # kept waiting until the server is healthy. Stopped while vLLM still imports: seconds, not a start.
    import threading

    cancel = threading.Event()
    with VllmServer(tiny_settings(teacher_dir)).start(tmp_path / "vllm.log") as server:
        threading.Timer(1.0, cancel.set).start()
        started = time.monotonic()
        assert server.wait_healthy(STARTUP_S, cancel=cancel) is False
        assert time.monotonic() - started < 5
        pgid = server.pid
    assert group_members(pgid) == []
