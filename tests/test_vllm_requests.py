"""What the vLLM teacher sends, and how: against a fake OpenAI-compatible server, no vLLM needed.

The stage's request loop (engine.teacher.vllm.ask_server) is the one a real server gets; the fake records
every request body and how many requests were in flight at once. The server's command line (ports,
`--max-num-seqs`) is read from servers started with a stand-in command instead of vLLM.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.config.load import load_config
from engine.teacher.output import TeacherOutput
from engine.teacher.vllm import ask_server, in_flight
from engine.teacher.vllm_server import VllmServer, VllmSettings

from .fake_openai import FakeOpenAI
from .helpers import DATA, make_context

STOPS = [7, 9]


class RecordingOpenAI(FakeOpenAI):
    """The fake server, keeping each chat request's body and, per answer, how many requests it had received."""

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.bodies: list[dict[str, Any]] = []
        self.received_when_answered: dict[str, int] = {}

    def completion(self, body: dict[str, Any], attempt: int, for_batch: bool = False) -> tuple[int, Any]:
        with self._lock:
            self.bodies.append(body)
            self.received_when_answered[self._user_of(body)] = self.chat_requests
        return super().completion(body, attempt, for_batch)


@pytest.fixture
def server():
    with RecordingOpenAI(delay_s=0.05, slow_s=1.5) as fake:
        yield fake


def vllm_context(project: Path, **vllm: Any):
    shutil.copy(DATA / "tiny-vllm.yaml", project / "configs" / "tiny-vllm.yaml")
    config = load_config(project / "configs" / "tiny-vllm.yaml")
    config.teacher.base.output_path = str(project / "out" / "teacher.jsonl")
    config.teacher.closed.pipeline.batch_size = 4
    for name, value in vllm.items():
        setattr(config.teacher.vllm, name, value)
    return make_context(config, "teacher", project), TeacherOutput(config.teacher.base.output_path)


def make_prompts(texts: list[str]) -> list[dict]:
    return [{"id": f"p{i:03d}", "instruction": text} for i, text in enumerate(texts)]


def plain(n: int) -> list[str]:
    return [f"Write function number {i}." for i in range(n)]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_keeps_exactly_the_set_number_of_requests_in_flight(project: Path, server: RecordingOpenAI, concurrency):
    ctx, output = vllm_context(project, max_concurrency=concurrency)
    prompts = make_prompts(plain(12))

    summary = ask_server(ctx, server.url, STOPS, prompts, output, "Be brief.")

    assert summary["answered"] == 12
    assert sorted(r["id"] for r in output.records()) == [p["id"] for p in prompts]  # each exactly once
    assert server.max_in_flight == concurrency
    assert server.chat_requests == 12


def test_a_new_request_starts_as_soon_as_one_ends_not_after_a_wave(project: Path, server: RecordingOpenAI):
    # waves of batch_size 4: a slow first answer held back the 8 prompts of the next waves until it came
    ctx, output = vllm_context(project, max_concurrency=4)
    prompts = make_prompts(["[[slow]] the slow one", *plain(11)])

    summary = ask_server(ctx, server.url, STOPS, prompts, output, None)

    assert summary["answered"] == 12
    assert server.received_when_answered["[[slow]] the slow one"] == 12
    assert sorted(r["id"] for r in output.records()) == [p["id"] for p in prompts]


def test_in_flight_defaults_to_what_the_server_runs_at_once(project: Path, server: RecordingOpenAI):
    ctx, output = vllm_context(project, max_concurrency=None, max_num_seqs=3, data_parallel_size=2)
    assert in_flight(ctx.config) == 6

    ask_server(ctx, server.url, STOPS, make_prompts(plain(20)), output, None)

    assert server.max_in_flight == 6


@pytest.mark.parametrize("do_sample", [True, False])
def test_sends_the_open_teachers_sampling(project: Path, server: RecordingOpenAI, do_sample: bool):
    ctx, output = vllm_context(project)
    pipeline = ctx.config.teacher.open.pipeline
    pipeline.do_sample, pipeline.temperature, pipeline.top_p, pipeline.top_k = do_sample, 0.8, 0.9, 40
    pipeline.max_new_tokens = 33

    ask_server(ctx, server.url, STOPS, make_prompts(plain(2)), output, None)

    body = server.bodies[0]
    assert body["temperature"] == (0.8 if do_sample else 0)  # do_sample: false is greedy, as in the open teacher
    assert body["top_p"] == 0.9 and body["top_k"] == 40 and body["max_tokens"] == 33
    assert body["stop_token_ids"] == STOPS
    assert body["add_generation_prompt"] is True and body["skip_special_tokens"] is True
    assert body["model"] == "tiny:teacher"


def test_top_k_zero_means_no_cut_off(project: Path, server: RecordingOpenAI):
    ctx, output = vllm_context(project)
    ctx.config.teacher.open.pipeline.top_k = 0
    ask_server(ctx, server.url, STOPS, make_prompts(plain(1)), output, None)
    assert server.bodies[0]["top_k"] == -1  # vLLM's "no cut-off" in every version (0 is only since 0.8)


# ------------------------------------------------------------------------------------ command line


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def stand_in(tmp_path: Path, **overrides: Any) -> VllmSettings:
    """Settings whose `command` is a python that sleeps: start() builds the real argv, no vLLM runs."""
    return VllmSettings(model=str(tmp_path), command=[sys.executable, "-c", "import time; time.sleep(60)"], **overrides)


def test_two_servers_started_at_once_get_their_own_ports(tmp_path: Path):
    servers = [VllmServer(stand_in(tmp_path, data_parallel_size=2, max_num_seqs=64)) for _ in range(2)]
    try:
        for number, server in enumerate(servers):
            server.start(tmp_path / f"vllm{number}.log")
        ports = [int(flag(s.argv, "--port")) for s in servers]
        rpc_ports = [int(flag(s.argv, "--data-parallel-rpc-port")) for s in servers]
        assert rpc_ports == [s.rpc_port for s in servers] and ports == [s.port for s in servers]
        assert len(set(ports + rpc_ports)) == 4  # vLLM's fixed default (29550) would be shared
        assert all(flag(s.argv, "--max-num-seqs") == "64" for s in servers)
    finally:
        for server in servers:
            server.stop(grace_s=5)


def test_one_replica_needs_no_rpc_port_and_a_set_port_is_kept(tmp_path: Path):
    single = VllmServer(stand_in(tmp_path)).start(tmp_path / "a.log")
    fixed = VllmServer(stand_in(tmp_path, data_parallel_size=2, data_parallel_rpc_port=40123)).start(tmp_path / "b.log")
    try:
        assert single.rpc_port is None and "--data-parallel-rpc-port" not in single.argv
        assert "--max-num-seqs" not in single.argv  # unset: vLLM's own default
        assert flag(fixed.argv, "--data-parallel-rpc-port") == "40123"
    finally:
        single.stop(grace_s=5)
        fixed.stop(grace_s=5)
