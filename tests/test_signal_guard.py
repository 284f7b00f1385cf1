"""A pid file is only a claim: anyone who can write `runs/` can write one naming any process, with its real
start ticks. `tas cancel`, the GPU tab's `k` and the vLLM leftover check signal only a process whose
command line (or, for a vLLM server, its environment) is ours for that run, in the recorded group,
through a pidfd where there is one; an innocent process named by a forged pid file survives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.core.process import ProcessRecord, send_signal, write_pid_file
from engine.gpu.control import NotOurs, terminate
from engine.gpu.labels import label_processes
from engine.gpu.model import GpuProcess
from engine.runner import launcher
from engine.store.events import EventWriter
from engine.store.runs import SUPERVISOR_FILE, Run, RunStore
from tests.helpers import TINY_CONFIG


@pytest.fixture
def innocent():
    """Someone else's process (the same user's: signalling it would work), in a group of its own."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def forged_run(root: Path, pid: int) -> Run:
    """A run whose supervisor.json and running teacher stage both name `pid`, with its real start."""
    run = RunStore(root / "runs").create(load_config(TINY_CONFIG), "configs/tiny.yaml", workdir=str(root))
    write_pid_file(run.path / SUPERVISOR_FILE, ProcessRecord.of(pid), stages=["teacher"], started=time.time())
    return mark_running(run, "teacher", pid)


def mark_running(run: Run, stage: str, pid: int) -> Run:
    """`stage` of `run` is running as `pid`: its pid file and a `running` status."""
    run.stage_dir(stage).mkdir(parents=True, exist_ok=True)
    write_pid_file(run.stage_dir(stage) / "pid", ProcessRecord.of(pid))
    events = EventWriter(run.stage_dir(stage) / "events.jsonl")
    events.status("running", pid=pid)
    events.close()
    return run


def survives(process: subprocess.Popen) -> bool:
    time.sleep(0.3)
    return process.poll() is None


def test_tas_cancel_refuses_a_forged_pid_file(tmp_path: Path, innocent: subprocess.Popen):
    run = forged_run(tmp_path, innocent.pid)
    assert run.supervisor()[0].is_alive()  # the claim checks out by pid and start alone
    assert launcher.cancel(run, grace_s=1) is False
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", "cancel", run.id, "--grace", "1"],
        cwd=tmp_path,
        env={**os.environ, "TAS_RUNS_DIR": str(tmp_path / "runs")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert survives(innocent)


def test_the_gpu_tab_refuses_a_forged_pid_file(tmp_path: Path, innocent: subprocess.Popen):
    run = forged_run(tmp_path, innocent.pid)
    (labelled,) = label_processes([GpuProcess(0, innocent.pid, 1 << 30)], run.path.parent)
    assert not labelled.is_ours
    with pytest.raises(NotOurs):
        terminate(labelled, run.path.parent)
    forged = GpuProcess(0, innocent.pid, 1 << 30, "sleep", f"run {run.id} · teacher", run_id=run.id, stage="teacher")
    with pytest.raises(NotOurs):  # a row the tab took for ours (a stale label) is checked again
        terminate(forged, run.path.parent)
    assert survives(innocent)


def test_a_forged_vllm_pid_file_names_no_server(tmp_path: Path, innocent: subprocess.Popen):
    from engine.teacher.vllm_server import server_processes, stop_leftover

    pid_file = tmp_path / "vllm.pid"
    write_pid_file(pid_file, ProcessRecord.of(innocent.pid), port=8000, argv=["sleep", "60"])
    assert server_processes(pid_file) == []
    assert stop_leftover(pid_file, grace_s=1) is False
    assert survives(innocent)


def test_our_own_worker_is_still_cancelled(tmp_path: Path):
    """The positive side: a process whose command line is this run's worker is signalled, group and all."""
    run = RunStore(tmp_path / "runs").create(load_config(TINY_CONFIG), "configs/tiny.yaml", workdir=str(tmp_path))
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            "engine.runner.worker",
            "teacher",
            "--run",
            str(run.path),
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while (
            time.monotonic() < deadline
            and "engine.runner.worker" not in Path(f"/proc/{worker.pid}/cmdline").read_text()
        ):
            time.sleep(0.05)
        forged_run_files = forged_run(tmp_path, worker.pid)  # a second run naming our worker: not its run
        assert launcher.cancel(forged_run_files, grace_s=1) is False and survives(worker)
        mark_running(run, "teacher", worker.pid)
        assert launcher.cancel(run, grace_s=1, wait=False) is True
        assert worker.wait(timeout=10) == -signal.SIGTERM
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_send_signal_checks_the_group_and_goes_through_a_pidfd(innocent: subprocess.Popen, monkeypatch):
    record = ProcessRecord.of(innocent.pid)
    assert record.pgid == innocent.pid
    anything = lambda process: True  # noqa: E731
    elsewhere = ProcessRecord(record.pid, record.create_time, record.start_ticks, record.recorded_at, os.getpgid(0))
    assert send_signal(elsewhere, signal.SIGTERM, anything, group=True) is False  # not the recorded group
    assert send_signal(record, signal.SIGTERM, lambda process: False) is False  # not ours by its command line
    assert survives(innocent)
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd on this platform")
    sent = []
    real = signal.pidfd_send_signal
    monkeypatch.setattr(signal, "pidfd_send_signal", lambda fd, sig: sent.append(sig) or real(fd, sig))
    assert send_signal(record, signal.SIGTERM, anything) is True
    assert sent == [signal.SIGTERM] and innocent.wait(timeout=10) == -signal.SIGTERM
