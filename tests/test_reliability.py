"""Reliability promises, each a test that fails if the promise breaks:

* runs survive the panel and SSH (SIGKILL / SIGHUP of the panel);
* a teacher killed with SIGKILL again and again loses nothing and duplicates nothing;
* SIGTERM makes a training stage save and end `cancelled` within a bound;
* disk, model and environment faults end `failed` with the cause named, and earlier output survives;
* secrets never appear in anything a run writes or the CLI prints;
* two runs at once.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.config.load import load_config
from engine.runner import launcher
from engine.runner.worker import run_stage
from engine.store.events import read_events
from engine.store.runs import RunStore
from engine.teacher.output import TeacherOutput

from .fake_openai import FakeOpenAI
from .helpers import lines_of, make_run, tas, wait_for

KILL_ROUNDS = int(os.environ.get("TAS_KILL_ROUNDS", "8"))


def tiny_run(project: Path, **overrides):
    """A run of the tiny profile with its prompts extracted; overrides are dotted keys."""
    run = make_run(project, "configs/tiny.yaml", overrides)
    assert run_stage("data", run) == 0  # in-process, into the run: its later stages find the prompts
    return run.config(), run  # the run's own view of the config: where its stages read and write


def final_status(run, stage: str) -> dict:
    return [e for e in read_events(run.stage_dir(stage) / "events.jsonl") if e["kind"] == "status"][-1]


# ------------------------------------------------------------------------------------ panel and SSH

PANEL_SCRIPT = """
import asyncio, sys, time
from pathlib import Path
from tui.app import TASPanel
from tui.tabs.stages import StagesTab

async def until(pilot, condition):
    deadline = time.monotonic() + 30
    while not condition() and time.monotonic() < deadline:
        await pilot.pause(0.05)

async def main():
    app = TASPanel(config_path=sys.argv[1], runs_dir="runs", gpu_interval=3600)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.query_one(StagesTab).ready)  # the stages tab shows the store
        await pilot.press("s")          # start the selected stage (data) in a new run ...
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen")
        await pilot.press("y")          # ... once confirmed
        await until(pilot, lambda: list(Path("runs").glob("*/run.json")))  # the run exists on disk
        print("STARTED", flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP], ids=["SIGKILL", "SIGHUP"])
def test_a_stage_outlives_the_panel_that_started_it(project: Path, slow_config: Path, sig):
    panel = subprocess.Popen(
        [sys.executable, "-c", PANEL_SCRIPT, str(slow_config)],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert panel.stdout.readline().strip() == "STARTED", panel.stderr.read()
        store = RunStore(project / "runs")
        run = store.get("last")
        wait_for(lambda: run.stages()[0].state == "running", timeout=15)
        panel.send_signal(sig)
        panel.wait(timeout=10)
    finally:
        panel.kill()
    assert run.stages()[0].state == "running"  # the panel is gone, the stage is not
    wait_for(lambda: not run.is_live(), timeout=120)
    assert run.stages()[0].state == "done"
    states = [e["state"] for e in read_events(run.stage_dir("data") / "events.jsonl") if e["kind"] == "status"]
    assert states == ["running", "done"]
    status = tas("status", run.id, cwd=project)
    assert "✓ done" in status.stdout and run.id in status.stdout


# --------------------------------------------------------------------------------- worker SIGKILLs


@pytest.mark.e2e
def test_teacher_killed_again_and_again_loses_and_duplicates_nothing(project: Path):
    cfg, run = tiny_run(
        project,
        **{"teacher.open.pipeline.batch_size": 2, "data.limit": 120, "teacher.open.pipeline.max_new_tokens": 16},
    )
    output = Path(cfg.teacher.base.output_path)
    rng = random.Random(7)
    previous_worker = None
    kills = 0
    for _ in range(KILL_ROUNDS):
        before = len(lines_of(output))
        launcher.start(run, ["teacher"])
        worker = wait_for(
            lambda previous=previous_worker: (s := run.stages()[1]).state == "running" and s.pid != previous and s.pid,
            timeout=30,
            interval=0.02,
        )
        previous_worker = worker
        # kill at a different point each round: after 0-3 new answers, plus up to 0.3 s
        wanted = rng.randint(0, 3)
        wait_for(
            lambda goal=before + wanted: len(lines_of(output)) >= goal or not run.is_live(), timeout=120, interval=0.02
        )
        time.sleep(rng.uniform(0, 0.3))
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            break  # it finished before the kill: nothing left to interrupt
        kills += 1
        wait_for(lambda: not run.is_live(), timeout=30)
        assert run.stages()[1].state == "failed"
    assert kills >= KILL_ROUNDS // 2
    launcher.start(run, ["teacher"])
    wait_for(lambda: not run.is_live(), timeout=300, interval=0.5)
    assert run.stages()[1].state == "done", (run.stage_dir("teacher") / "worker.log").read_text()[-2000:]
    raw = output.read_bytes()
    assert raw.endswith(b"\n")
    records = [json.loads(line) for line in raw.decode().splitlines()]  # no torn line anywhere
    prompt_ids = [json.loads(line)["id"] for line in lines_of(Path(cfg.data.output_path))]
    assert sorted(r["id"] for r in records) == sorted(prompt_ids)  # every prompt exactly once
    assert all(r["output"].strip() for r in records)


# ----------------------------------------------------------------------------------------- cancel


@pytest.mark.e2e
def test_sigterm_makes_training_save_and_end_cancelled(project: Path):
    cfg, run = tiny_run(project, **{"data.limit": 60, "teacher.open.pipeline.max_new_tokens": 16})
    run_stage("teacher", run)  # in-process: only the stage under test runs as a real process
    frozen = yaml.safe_load((run.path / "config.yaml").read_text())
    frozen["train"]["sft"]["max_steps"] = 10_000
    frozen["train"]["sft"]["per_device_train_batch_size"] = 2
    (run.path / "config.yaml").write_text(yaml.safe_dump(frozen))
    launcher.start(run, ["sft"])
    wait_for(lambda: (run.stages()[2].progress or {}).get("done", 0) >= 2, timeout=120, interval=0.2)
    started = time.monotonic()
    assert launcher.cancel(run, grace_s=60)
    assert time.monotonic() - started < 30  # it saved and stopped well inside the grace period
    status = final_status(run, "sft")
    assert status["state"] == "cancelled" and "checkpoint saved" in status["message"], status
    checkpoints = list(Path(cfg.train.sft.save_path, "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "no checkpoint was saved on cancel"


# --------------------------------------------------------------------------- disk and environment


def run_teacher_in_process(run) -> dict:
    """The worker's own entry point, in this process: the same failure handling as a real worker."""
    run_stage("teacher", run)
    return final_status(run, "teacher")


def test_disk_full_fails_with_the_cause_and_keeps_earlier_answers(project: Path, monkeypatch):
    cfg, run = tiny_run(
        project, **{"data.limit": 40, "teacher.open.pipeline.batch_size": 8, "teacher.open.pipeline.max_new_tokens": 8}
    )
    real_append = TeacherOutput.append
    calls = {"n": 0}

    def append_until_disk_full(self, records):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_append(self, records)

    monkeypatch.setattr(TeacherOutput, "append", append_until_disk_full)
    status = run_teacher_in_process(run)
    assert status["state"] == "failed"
    assert "No space left on device" in status["error"] and "teacher.jsonl" in status["error"]
    assert "free some disk space" in status["error"]
    kept = lines_of(Path(cfg.teacher.base.output_path))
    assert len(kept) == 16 and all(json.loads(line)["output"] for line in kept)
    monkeypatch.setattr(TeacherOutput, "append", real_append)
    assert run_teacher_in_process(run)["state"] == "done"
    assert len(lines_of(Path(cfg.teacher.base.output_path))) == 40


def test_output_path_that_cannot_be_written(project: Path):
    (project / "blocker").write_text("a file where a folder should be")
    cfg, run = tiny_run(project, **{"data.limit": 8})
    frozen = yaml.safe_load((run.path / "config.yaml").read_text())
    frozen["teacher"]["base"]["output_path"] = str(project / "blocker" / "teacher.jsonl")
    (run.path / "config.yaml").write_text(yaml.safe_dump(frozen))
    status = run_teacher_in_process(run)
    assert status["state"] == "failed"
    assert "blocker is a file where a folder is needed" in status["error"]


def test_missing_model_path_names_the_config_key(project: Path):
    _, run = tiny_run(project, **{"data.limit": 8, "teacher.open.model.name": "./models/not-there"})
    status = run_teacher_in_process(run)
    assert status["state"] == "failed"
    assert status["error"] == "teacher.open.model.name: ./models/not-there: no such model folder"


def test_out_of_memory_that_no_batch_size_fixes_names_what_to_lower(project: Path, monkeypatch):
    """The teacher halves its batch on out-of-memory (tests/test_teacher_open.py); when even one prompt does
    not fit, the stage fails naming max_new_tokens, after logging each halving."""
    import torch

    _, run = tiny_run(project, **{"data.limit": 8})

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("transformers.generation.utils.GenerationMixin.generate", oom)
    status = run_teacher_in_process(run)
    assert status["state"] == "failed"
    assert "out of memory" in status["error"] and "single prompt" in status["error"]
    assert "teacher.open.pipeline.max_new_tokens=" in status["error"]
    logs = [e["msg"] for e in read_events(run.stage_dir("teacher") / "events.jsonl") if e["kind"] == "log"]
    assert any("going on with batches of 1" in m for m in logs), logs


def test_openai_auth_failure_is_named(project: Path, monkeypatch):
    key = "sk-tas-test-auth-" + "Q" * 24
    monkeypatch.setenv("OPENAI_API_KEY", key)
    with FakeOpenAI(api_key="sk-the-right-one-" + "R" * 24) as server:
        _, run = tiny_run(
            project, **{"data.limit": 8, "teacher.source": "closed", "teacher.closed.base_url": server.url}
        )
        status = run_teacher_in_process(run)
    assert status["state"] == "failed" and "401" in status["error"] and "OPENAI_API_KEY" in status["error"]
    assert key not in json.dumps(status)


# -------------------------------------------------------------------------------------------- secrets


@pytest.mark.e2e
def test_planted_secrets_appear_nowhere(project: Path, monkeypatch):
    """A unique key in the environment and another in .env; run a closed teacher through the CLI."""
    env_key = "sk-tas-planted-env-" + "K" * 24
    dotenv_key = "sk-tas-planted-dotenv-" + "D" * 24
    hf_token = "hf_tasplanted" + "H" * 24
    (project / ".env").write_text(f"OPENAI_API_KEY={dotenv_key}\nHF_TOKEN={hf_token}\n")
    monkeypatch.setenv("OPENAI_API_KEY", env_key)
    with FakeOpenAI(api_key=env_key) as server:
        config = yaml.safe_load((project / "configs" / "tiny.yaml").read_text())
        config["teacher"]["source"] = "closed"
        config["teacher"]["closed"]["base_url"] = server.url
        config["data"]["limit"] = 12
        (project / "configs" / "closed.yaml").write_text(yaml.safe_dump(config))
        result = tas("run", "data", "teacher", "--config", "configs/closed.yaml", cwd=project)
        assert result.returncode == 0, result.stdout + result.stderr
        assert any(r["headers"].get("authorization") == f"Bearer {env_key}" for r in server.requests)
    printed = result.stdout + result.stderr
    for command in (("status",), ("logs", "last", "teacher"), ("logs", "last", "teacher", "--events")):
        out = tas(*command, cwd=project)
        printed += out.stdout + out.stderr
    written = b""
    for path in project.rglob("*"):
        if path.is_file() and path.name != ".env":
            written += path.read_bytes()
    for secret in (env_key, dotenv_key, hf_token):
        assert secret.encode() not in written, f"{secret[:12]}… was written to disk"
        assert secret not in printed, f"{secret[:12]}… was printed"


# ------------------------------------------------------------------------------------- concurrency


@pytest.mark.e2e
def test_two_runs_at_once(project: Path, slow_config: Path):
    store = RunStore(project / "runs")
    config = load_config(slow_config)
    runs = [store.create(config, str(slow_config)) for _ in range(2)]
    for run in runs:
        launcher.start(run, ["data"])
    wait_for(lambda: all(r.stages()[0].state == "running" for r in runs), timeout=20)
    wait_for(lambda: not any(r.is_live() for r in runs), timeout=180, interval=0.5)
    assert [r.stages()[0].state for r in runs] == ["done", "done"]
