"""Real processes: `tas run` end to end, detached workers, cancel, hard kills, busy runs.

These spawn the CLI, the supervisor and workers as a user would (each test is marked `e2e`); the data
stage keeps them light. A big local dataset (`slow_config`, conftest.py) makes the stage run for a few
seconds so there is time to act on it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.runner import launcher
from engine.store.events import read_events
from engine.store.runs import RunStore

from .helpers import make_run, python, tas, wait_for


def stage_events(project: Path, stage: str = "data") -> list[dict]:
    paths = list((project / "runs").glob(f"*/{stage}/events.jsonl"))
    assert len(paths) == 1
    return read_events(paths[0])


@pytest.fixture
def slow_run(project: Path, slow_config: Path):
    """A run whose data stage has started on `slow_config`: it goes on for a few seconds, time to act on it."""
    run = make_run(project, slow_config)
    launcher.start(run, ["data"])
    return run


@pytest.mark.e2e
def test_tas_run_data_on_the_tiny_profile(project: Path):
    result = tas("run", "data", "--config", "configs/tiny.yaml", cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✓ done" in result.stdout
    run = RunStore(project / "runs").get("last")
    prompts = Path(run.config().data.output_path).read_text().splitlines()  # where the run keeps it
    assert len(prompts) == 348 and all(json.loads(p)["id"] for p in prompts)  # tiny-python's prompts split
    events = stage_events(project)
    assert events[0]["kind"] == "status" and events[0]["state"] == "running"
    assert events[-1]["kind"] == "status" and events[-1]["state"] == "done"

    status = tas("status", "--config", "configs/tiny.yaml", cwd=project)
    assert status.returncode == 0
    lines = status.stdout.splitlines()
    assert lines[0].split()[1] == "configs/tiny.yaml" and "finished" in lines[0]
    data_line = next(line for line in lines if line.strip().startswith("data"))
    assert "done" in data_line and f"prompts={len(prompts)}" in data_line
    assert all(len(line) <= 80 for line in lines)
    assert [line.split()[0] for line in lines[1:]] == ["data", "teacher", "sft", "distill", "eval"]

    logs = tas("logs", "last", "data", "--events", cwd=project)
    assert "done" in logs.stdout and "kept" in logs.stdout

    cancel = tas("cancel", "last", cwd=project)  # a finished run: said at once, not an error
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert f"run {run.id} has nothing running (finished): nothing to cancel" in cancel.stdout
    assert "cancelling" not in cancel.stdout and not (run.path / "cancel_request.json").exists()


@pytest.mark.e2e
def test_worker_logs_hold_no_progress_bars_and_no_warning_of_our_own_config(project: Path):
    """The teacher loads two models and decodes (transformers drew a `Loading weights` bar and warned about
    teacher.open.tokenizer.clean_up_tokenization_spaces there): worker.log is for people, progress is in events."""
    data = yaml.safe_load((project / "configs" / "tiny.yaml").read_text())
    data["data"]["limit"] = 16
    data["teacher"]["open"]["pipeline"]["max_new_tokens"] = 8
    (project / "configs" / "quick.yaml").write_text(yaml.safe_dump(data))
    result = tas("run", "data", "teacher", "--config", "configs/quick.yaml", cwd=project, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    run = RunStore(project / "runs").get("last")
    for stage in ("data", "teacher"):
        log = (run.stage_dir(stage) / "worker.log").read_text()
        assert "it/s]" not in log and "\r" not in log, log[-2000:]  # no tqdm bar, drawn or redrawn
        assert "clean_up_tokenization_spaces" not in log, log[-2000:]
    assert any(e["kind"] == "progress" for e in read_events(run.stage_dir("teacher") / "events.jsonl"))


def test_worker_env_turns_progress_bars_off_unless_the_user_asks(monkeypatch: pytest.MonkeyPatch):
    from engine.config.load import load_config as load
    from engine.runner.supervisor import worker_env
    from tests.helpers import TINY_CONFIG

    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    env = worker_env(load(TINY_CONFIG))
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == env["HF_DATASETS_DISABLE_PROGRESS_BARS"] == env["TQDM_DISABLE"] == "1"
    monkeypatch.setenv("TQDM_DISABLE", "")  # tqdm reads any non-empty value as true: empty keeps its bars
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    env = worker_env(load(TINY_CONFIG))
    assert env["TQDM_DISABLE"] == "" and env["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"


def test_worker_env_makes_the_tiny_profile_repeatable_whatever_the_users_env(monkeypatch: pytest.MonkeyPatch):
    """device.cpu_threads and device.cpu_isa: avx2 (the tiny profile) fix the threads and cap every CPU math
    library at AVX2, over the user's own settings: measured here, the KD student's pass@1 moved by a problem
    when only MKL/oneDNN kept AVX-512. Unset (the root config), the user's environment stays as it is."""
    import platform

    from engine.config.load import load_config as load
    from engine.runner.supervisor import worker_env
    from tests.helpers import PROJECT_CONFIG, TINY_CONFIG

    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    monkeypatch.delenv("MKL_CBWR", raising=False)
    env = worker_env(load(TINY_CONFIG))
    assert env["OMP_NUM_THREADS"] == "2"
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert (env["ATEN_CPU_CAPABILITY"], env["MKL_CBWR"], env["ONEDNN_MAX_CPU_ISA"]) == ("avx2", "AVX2", "AVX2")
    env = worker_env(load(PROJECT_CONFIG))
    assert env["OMP_NUM_THREADS"] == "7" and env["ATEN_CPU_CAPABILITY"] == "avx512" and "MKL_CBWR" not in env


def test_torchrun_waits_the_cancel_grace_before_killing_its_workers(tmp_path: Path):
    """torchrun's agent SIGKILLs its workers 30 s after passing on a cancel unless told otherwise: a longer
    launch.cancel_grace_s would be cut short, and a slow checkpoint save with it."""
    from engine.config.load import load_config as load
    from engine.runner.supervisor import worker_command
    from tests.helpers import TINY_CONFIG

    config = load(TINY_CONFIG)
    config.launch.nproc_per_node, config.launch.cancel_grace_s = 2, 120.0
    run = RunStore(tmp_path / "runs").create(config, "tiny.yaml", workdir=str(tmp_path))
    command = worker_command("distill", run, config)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    (timeout,) = [o for o in command[: command.index("engine.runner.worker")] if o.startswith("--shutdown-timeout=")]
    assert int(timeout.split("=", 1)[1]) >= 120  # at least the grace; the supervisor enforces the deadline


def test_a_repeated_warning_is_written_once(tmp_path: Path):
    """In a worker, the same warning from a library that warns on every call (and from two places, and
    under an "always" filter) is one line in worker.log."""
    script = (
        "import sys, warnings\n"
        "from engine.runner.worker import quiet_warnings\n"
        "quiet_warnings()\n"
        "warnings.simplefilter('always')\n"
        "def noisy():\n"
        "    warnings.warn('`x` is deprecated, use `y`', FutureWarning)\n"
        "for _ in range(5):\n"
        "    noisy()\n"
        "warnings.warn('`x` is deprecated, use `y`', FutureWarning)\n"
        "warnings.warn('another one', UserWarning)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": ""},
        cwd=Path(__file__).resolve().parents[1],
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 0, result.stderr
    assert len(lines) == 2, lines
    assert lines[0].startswith("FutureWarning (<string>:6): `x` is deprecated") and "another one" in lines[1]


def test_tas_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]):
    from importlib.metadata import version

    from engine.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"tas {version('tas-panel')}\n"


@pytest.mark.e2e
def test_worker_keeps_running_after_its_starter_exits(project: Path, slow_config: Path):
    starter = tas("run", "data", "--config", str(slow_config), "--detach", cwd=project)
    assert starter.returncode == 0, starter.stderr
    run = RunStore(project / "runs").get("last")
    # the process that started it is gone; the stage still runs and then finishes on its own
    assert wait_for(lambda: run.stages()[0].state == "running", timeout=10)
    assert run.is_live()
    wait_for(lambda: not run.is_live(), timeout=120)
    assert run.stages()[0].state == "done"
    assert stage_events(project)[-1]["state"] == "done"


@pytest.mark.e2e
def test_cancel_ends_a_running_stage_with_cancelled(project: Path, slow_config: Path):
    starter = tas("run", "data", "--config", str(slow_config), "--detach", cwd=project)
    assert starter.returncode == 0, starter.stderr
    run = RunStore(project / "runs").get("last")
    events_path = run.stage_dir("data") / "events.jsonl"
    wait_for(lambda: any(e["kind"] == "progress" for e in read_events(events_path)), timeout=30)
    result = tas("cancel", run.id, cwd=project)
    assert result.returncode == 0, result.stderr
    assert not run.is_live()
    status = run.stages()[0]
    assert status.state == "cancelled"
    events = stage_events(project)
    assert [e["state"] for e in events if e["kind"] == "status"] == ["running", "cancelled"]
    assert not Path(run.config().data.output_path).exists()  # nothing half-written


@pytest.mark.e2e
def test_stuck_worker_is_killed_after_the_grace_period(slow_run):
    events_path = slow_run.stage_dir("data") / "events.jsonl"
    wait_for(lambda: any(e["kind"] == "progress" for e in read_events(events_path)), timeout=30)
    worker = slow_run.stages()[0].pid
    os.kill(worker, signal.SIGSTOP)  # a worker that cannot react to SIGTERM
    try:
        started = time.monotonic()
        assert launcher.cancel(slow_run, grace_s=1.0)
        assert time.monotonic() - started < 15
    finally:
        try:
            os.kill(worker, signal.SIGCONT)
        except ProcessLookupError:
            pass
    status = slow_run.stages()[0]
    assert status.state == "cancelled"
    assert "killed after the grace period of 1s" in status.message


@pytest.mark.e2e
def test_a_hard_killed_worker_is_reported_failed(slow_run):
    wait_for(lambda: slow_run.stages()[0].state == "running" and slow_run.stages()[0].pid, timeout=10)
    os.kill(slow_run.stages()[0].pid, signal.SIGKILL)
    wait_for(lambda: not slow_run.is_live(), timeout=20)
    status = slow_run.stages()[0]
    assert status.state == "failed"
    assert "stopped by SIGKILL" in status.error


@pytest.mark.e2e
def test_starting_a_running_stage_again_is_refused(project: Path, slow_run):
    try:
        with pytest.raises(launcher.RunBusy, match=f"run {slow_run.id} is busy"):
            launcher.start(slow_run, ["data"])
        result = tas("run", "data", "--run", slow_run.id, cwd=project)
        assert result.returncode == 2 and "is busy" in result.stderr
    finally:
        launcher.cancel(slow_run, grace_s=5)


@pytest.mark.e2e
def test_bad_config_is_refused_before_anything_starts(project: Path):
    (project / "configs" / "bad.yaml").write_text(
        (project / "configs" / "tiny.yaml").read_text().replace("batch_size: 32", "batch_size: -3")
    )
    result = tas("run", "data", "--config", "configs/bad.yaml", cwd=project)
    assert result.returncode == 2
    assert "teacher.open.pipeline.batch_size" in result.stderr and "line " in result.stderr
    assert not (project / "runs").exists()


@pytest.mark.e2e
def test_unknown_stage_is_refused(project: Path):
    result = tas("run", "trian", "--config", "configs/tiny.yaml", cwd=project)
    assert result.returncode == 2 and "unknown stage 'trian'" in result.stderr


@pytest.mark.e2e
def test_panel_and_cli_never_import_the_ml_stack():
    code = (
        "import sys, tui.app, engine.cli.main, engine.runner.launcher, engine.store.runs, engine.store.render\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets', 'bitsandbytes', 'accelerate')"
        " if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = python("-c", code, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.e2e
def test_logs_follow_of_a_stage_that_never_started_returns(project: Path):
    make_run(project, "configs/tiny.yaml")
    result = tas("logs", "last", "sft", "-f", cwd=project, timeout=20)
    assert result.returncode == 0


@pytest.mark.e2e
def test_a_frozen_config_that_no_longer_validates_is_refused(project: Path):
    run = make_run(project, "configs/tiny.yaml")
    frozen = run.path / "config.yaml"
    frozen.write_text(frozen.read_text() + "\nobsolete_section: {}\n")
    result = tas("run", "data", "--run", run.id, cwd=project)
    assert result.returncode == 2
    assert "obsolete_section" in result.stderr and "unknown key" in result.stderr


@pytest.mark.e2e
def test_the_starter_reaps_its_supervisor(project: Path, monkeypatch: pytest.MonkeyPatch):
    """The panel starts runs in-process (launcher.start) and lives on: a finished supervisor must not stay
    behind as its zombie child."""
    import psutil

    monkeypatch.chdir(project)
    run = make_run(project, "configs/tiny.yaml")
    record = launcher.start(run, ["data"])
    wait_for(lambda: not run.is_live(), timeout=120, what="the data stage to end")

    def reaped() -> bool:
        try:
            return psutil.Process(record.pid).status() != psutil.STATUS_ZOMBIE and record.pid not in [
                child.pid for child in psutil.Process().children()
            ]
        except psutil.NoSuchProcess:
            return True

    wait_for(reaped, timeout=30, what="the supervisor to be reaped")
    assert run.stages()[0].state == "done"
