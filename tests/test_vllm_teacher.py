"""`teacher.source: vllm` end to end: the teacher stage serves the tiny teacher with a real vLLM server.

No fakes: the server is the venv of `scripts/build-vllm-env.sh` (`TAS_VLLM_PYTHON`, else
`.venv-vllm/bin/python`); without it these tests FAIL rather than skip. A server start costs ~1-2 min
on 2 cores, so the file starts four: two for a run whose worker is SIGKILLed mid-answers and resumed,
one for a run cancelled mid-answers, one that fails (a folder that is no model).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.runner import launcher
from engine.runner.worker import run_stage
from engine.store.events import read_events
from engine.teacher.vllm_server import group_members

from .helpers import DATA, lines_of, make_run, wait_for

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
STARTUP_S = 600


@pytest.fixture
def vllm_project(project: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    python = os.environ.get("TAS_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(python).is_file():
        pytest.fail(
            f"no vLLM venv at {python}: run `scripts/build-vllm-env.sh` (or set TAS_VLLM_PYTHON)", pytrace=False
        )
    monkeypatch.setenv("TAS_VLLM_PYTHON", python)  # the project dir has no .venv-vllm; workers inherit it
    shutil.copy(DATA / "tiny-vllm.yaml", project / "configs" / "tiny-vllm.yaml")  # a pristine copy
    return project


def vllm_run(project: Path, **overrides):
    """A run of configs/tiny-vllm.yaml (dotted-key overrides) whose data stage has run."""
    run = make_run(project, "configs/tiny-vllm.yaml", {"teacher.vllm.startup_timeout_s": STARTUP_S, **overrides})
    assert run_stage("data", run) == 0
    return run.config(), run


def teacher_state(run):
    return next(s for s in run.stages() if s.name == "teacher")


def statuses(run) -> list[dict]:
    return [e for e in read_events(run.stage_dir("teacher") / "events.jsonl") if e["kind"] == "status"]


def server_pgid(run) -> int | None:
    try:
        return json.loads((run.stage_dir("teacher") / "vllm.pid").read_text())["pid"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def worker_log(run) -> str:
    parts = []
    for name in ("worker.log", "vllm.log"):
        path = run.stage_dir("teacher") / name
        if path.exists():
            parts.append(f"--- {name} ---\n" + path.read_text(errors="replace")[-3000:])
    return "\n".join(parts)


def test_answers_every_prompt_once_and_resumes_after_sigkill_without_orphan(vllm_project: Path):
    # one request in flight, waves of 4: answers reach the file a few at a time, so the kill lands mid-run
    cfg, run = vllm_run(vllm_project, **{"teacher.vllm.max_concurrency": 1, "teacher.closed.pipeline.batch_size": 4})
    output = Path(cfg.teacher.base.output_path)
    prompt_ids = [json.loads(line)["id"] for line in lines_of(Path(cfg.data.output_path))]
    assert len(prompt_ids) == 24

    began = time.monotonic()
    launcher.start(run, ["teacher"])
    worker = wait_for(lambda: (s := teacher_state(run)).state == "running" and s.pid, timeout=60, interval=0.05)
    wait_for(lambda: len(lines_of(output)) >= 4 or not run.is_live(), timeout=STARTUP_S + 60, interval=0.05)
    first_start_s = time.monotonic() - began
    assert run.is_live(), worker_log(run)
    pgid = server_pgid(run)
    assert pgid and group_members(pgid)
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not run.is_live(), timeout=30)
    assert teacher_state(run).state == "failed"
    answered_before = len(lines_of(output))
    assert 4 <= answered_before < 24, "the kill should land between the first and the last answer"
    # the kernel SIGTERMs the server when its worker dies (PR_SET_PDEATHSIG): no orphan holds the GPUs
    wait_for(lambda: not group_members(pgid), timeout=60, what="the server outlived its SIGKILLed worker")

    launcher.start(run, ["teacher"])
    wait_for(lambda: not run.is_live(), timeout=STARTUP_S + 120, interval=0.5)
    assert teacher_state(run).state == "done", worker_log(run)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(prompt_ids)  # every prompt exactly once
    assert all(r["output"].strip() and r["model"] == "tiny:teacher" for r in records)
    logs = " ".join(e["msg"] for e in read_events(run.stage_dir("teacher") / "events.jsonl") if e["kind"] == "log")
    assert f"{answered_before} already answered, {24 - answered_before} to go" in logs
    second = server_pgid(run)
    assert second is None  # removed by a clean stop
    assert "vLLM server stopped" in logs
    assert not (run.stage_dir("teacher") / "failures.jsonl").exists()
    print(f"first start to 4 answers: {first_start_s:.1f}s, whole test {time.monotonic() - began:.1f}s")


def test_cancel_stops_the_server_within_the_grace_period(vllm_project: Path):
    # long answers, one at a time: the stage is still answering when the cancel arrives
    cfg, run = vllm_run(
        vllm_project, **{"teacher.vllm.max_concurrency": 1, "teacher.open.pipeline.max_new_tokens": 400}
    )
    launcher.start(run, ["teacher"])
    events = run.stage_dir("teacher") / "events.jsonl"
    wait_for(
        lambda: any("vLLM server ready" in e.get("msg", "") for e in read_events(events)) or not run.is_live(),
        timeout=STARTUP_S + 60,
        interval=0.2,
    )
    assert run.is_live(), worker_log(run)
    pgid = server_pgid(run)
    assert pgid and group_members(pgid)
    grace = cfg.launch.cancel_grace_s
    started = time.monotonic()
    assert launcher.cancel(run)
    took = time.monotonic() - started
    assert not group_members(pgid)
    assert took < grace + 2, f"cancel took {took:.1f}s (grace {grace}s)"
    assert statuses(run)[-1]["state"] == "cancelled", worker_log(run)
    assert server_pgid(run) is None
    print(f"cancel took {took:.1f}s")


def test_bad_model_fails_quoting_the_servers_error(vllm_project: Path):
    not_a_model = vllm_project / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    _, run = vllm_run(vllm_project, **{"teacher.open.model.name": str(not_a_model)})
    started = time.monotonic()
    assert run_stage("teacher", run) != 0  # the worker's own entry point, in this process
    status = statuses(run)[-1]
    assert status["state"] == "failed"
    message = status.get("error") or status.get("message") or ""
    headline = message.splitlines()[0]
    assert "exited with exit code" in headline, message
    log_lines = (run.stage_dir("teacher") / "vllm.log").read_text().splitlines()
    errors = [line.strip() for line in log_lines if "Error: " in line]
    assert errors and any(error in headline for error in errors), (headline, errors[-3:])
    assert "no-such-architecture" in headline
    assert time.monotonic() - started < STARTUP_S / 2
    assert server_pgid(run) is None


def test_chat_with_the_teacher_through_its_own_vllm_server(vllm_project: Path):
    """The Chat tab's / `tas chat --target teacher`'s path for teacher.source: vllm: the API chat worker
    starts the teacher's server from the config, streams a reply from it, and ends the server with itself."""
    import psutil

    from engine.chat.client import ChatClient
    from engine.chat.protocol import EndReply, TokenReply
    from engine.chat.targets import VLLM, chat_target

    config_path = vllm_project / "configs" / "tiny-vllm.yaml"
    target = chat_target(load_config(config_path), "teacher")
    assert target.endpoint == VLLM
    client = ChatClient(
        target.model,
        endpoint=target.endpoint,
        config_path=config_path,
        cwd=vllm_project,
        log_path=vllm_project / "chat.log",
    ).start()
    try:
        ready = client.wait_ready(timeout=STARTUP_S)
        port = ready.device.rsplit(":", 1)[1]
        servers = [
            p
            for p in psutil.process_iter(["cmdline"])
            if "--port" in (p.info["cmdline"] or []) and port in (p.info["cmdline"] or [])
        ]
        assert servers, "no vLLM server process for the chat"
        rid = client.generate(
            [{"role": "user", "content": "Write a function that adds two numbers."}],
            {"temperature": 0, "max_new_tokens": 8, "min_new_tokens": 8},
        )
        pieces, end = [], None
        while end is None:
            reply = client.next_reply(timeout=120)
            if isinstance(reply, TokenReply) and reply.id == rid:
                pieces.append(reply.text)
            elif reply.id == rid:
                end = reply
        assert isinstance(end, EndReply), end
        assert end.tokens == 8 and end.finish == "length" and "".join(pieces)
    finally:
        client.close(timeout=60)
    wait_for(
        lambda: not [p for p in servers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
        timeout=60,
        what="the chat's vLLM server to end with the chat worker",
    )


def test_greedy_answers_from_the_real_server_when_do_sample_is_false(vllm_project: Path):
    """The request fields the stage sends (top_k, stop ids, the template and decoding flags) are accepted by
    vLLM itself, and `do_sample: false` decodes greedily: the same prompt twice gives the same answer (the
    tiny teacher's untrained weights make sampled answers differ every time)."""
    from engine.teacher.output import TeacherOutput
    from engine.teacher.vllm import ask_server, server_settings, teacher_stop_ids
    from engine.teacher.vllm_server import VllmServer

    from .helpers import make_context

    config = load_config(vllm_project / "configs" / "tiny-vllm.yaml")
    pipeline = config.teacher.open.pipeline
    pipeline.do_sample, pipeline.temperature, pipeline.top_k, pipeline.max_new_tokens = False, 0.8, 0, 24
    config.teacher.base.output_path = str(vllm_project / "out" / "teacher.jsonl")
    ctx = make_context(config, "teacher", vllm_project)
    output = TeacherOutput(config.teacher.base.output_path)
    texts = ["Write a function that adds two numbers.", "Reverse a list in place."]
    prompts = [{"id": f"p{i}", "instruction": texts[i % 2]} for i in range(4)]
    settings = server_settings(config, vllm_project)
    with VllmServer(settings).start(vllm_project / "vllm.log") as server:
        server.wait_healthy(STARTUP_S)
        summary = ask_server(
            ctx, server.base_url, teacher_stop_ids(config, settings.model), prompts, output, "Be brief."
        )
    assert summary["answered"] == 4 and summary["failed"] == 0, (vllm_project / "vllm.log").read_text()[-2000:]
    answers = {r["id"]: r["output"] for r in output.records()}
    assert answers["p0"] == answers["p2"] and answers["p1"] == answers["p3"]
