"""The Slurm path: scripts/slurm-multinode.sbatch starts one node agent per node (engine.runner.node), and the
run store follows it like a supervisor's run: its stage reads running on every host, a second start is
refused, `tas cancel` stops every node and the stage ends with one final status."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine.core.process import ProcessRecord, write_pid_file
from engine.runner import launcher, node
from engine.store import runs as runs_module
from engine.store.events import FINAL_STATES, EventWriter, read_events
from engine.store.runs import HEARTBEAT_STALE_S, stage_processes

from .helpers import ROOT, make_run, wait_for

SBATCH = ROOT / "scripts" / "slurm-multinode.sbatch"


def fake_slurm(bin_dir: Path, srun: str) -> Path:
    """`scontrol` naming 127.0.0.1 as the head node and an `srun` with the body `srun`, first on PATH."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text("#!/bin/bash\n" + srun)
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def slurm_env(project: Path, bin_dir: Path, **extra: str) -> dict[str, str]:
    """What sbatch gives the batch script (a 2-node job), our Python first on PATH after the fake tools."""
    env = launcher.python_env()
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(SLURM_SUBMIT_DIR=str(project), SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="n[1-2]")
    env.update(extra)
    return env


def final_statuses(run, stage: str) -> list[dict]:
    """The final statuses written after the stage's last `running`."""
    events = [e for e in read_events(run.stage_dir(stage) / "events.jsonl") if e["kind"] == "status"]
    last_start = max(i for i, e in enumerate(events) if e["state"] == "running")
    return [e for e in events[last_start:] if e["state"] in FINAL_STATES]


def steps_done(run, stage: str) -> int:
    progress = [e for e in read_events(run.stage_dir(stage) / "events.jsonl") if e["kind"] == "progress"]
    return progress[-1]["done"] if progress else 0


def module_of(cmdline: list[str]) -> str | None:
    """The module a `python [-u] -m MODULE ...` command line runs."""
    return cmdline[cmdline.index("-m") + 1] if "-m" in cmdline[:-1] else None


def state_of(run, stage: str) -> str:
    return next(s.state for s in run.stages() if s.name == stage)


# ------------------------------------------------------------------------------------------ the script


def test_the_sbatch_script_calls_the_node_agent_with_arguments_it_accepts(project: Path, tmp_path: Path, monkeypatch):
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    argv_file = tmp_path / "srun.argv"
    bin_dir = fake_slurm(tmp_path / "bin", f'printf "%s\\n" "$@" > {argv_file}\n')
    env = slurm_env(project, bin_dir, RUN="big", STAGE="distill")
    result = subprocess.run(["bash", str(SBATCH)], cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argv = argv_file.read_text().splitlines()
    assert "--kill-on-bad-exit=1" in argv[: argv.index("python")]
    assert argv[argv.index("python") : argv.index("python") + 3] == ["python", "-m", "engine.runner.node"]
    for name, value in {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242"}.items():
        monkeypatch.setenv(name, value)  # what srun gives the task on the second node
    args = node.build_parser().parse_args(argv[argv.index("engine.runner.node") + 1 :])
    assert (args.run, args.stage, args.nnodes, args.node_rank, args.job) == ("big", "distill", 2, 1, "4242")
    assert args.rdzv_endpoint == f"127.0.0.1:{20000 + 4242 % 20000}"


# ------------------------------------------------------------------------- pid files of other hosts


def node_pid_file(
    run, stage: str, node_rank: int, host: str, heartbeat: float | None, job: str = "7", pid: int | None = None
) -> None:
    """A node agent's pid file as engine.runner.node writes it, for process `pid` (this one) of `host`."""
    name = "pid" if node_rank == 0 else f"pid.node{node_rank}"
    record = ProcessRecord.of(pid or os.getpid())
    write_pid_file(run.stage_dir(stage) / name, record, host=host, node_rank=node_rank, job=job, heartbeat=heartbeat)


@pytest.fixture
def bystander():
    """A process of this host in a session of its own: the pid in pid files of other hosts (a pid means
    nothing there), so whatever signals it by mistake never reaches pytest."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield process.pid
    process.kill()
    process.wait()


def test_a_stage_on_other_hosts_runs_while_their_heartbeats_are_fresh(project: Path, bystander: int):
    run = make_run(project, "configs/tiny.yaml")
    EventWriter(run.stage_dir("sft") / "events.jsonl").status("running", pid=1, rank=0, world_size=16)
    node_pid_file(run, "sft", 0, "gpu-a", heartbeat=time.time(), pid=bystander)
    node_pid_file(run, "sft", 1, "gpu-b", heartbeat=time.time(), pid=bystander)
    assert [p.path.name for p in stage_processes(run.stage_dir("sft"))] == ["pid", "pid.node1"]
    assert state_of(run, "sft") == "running" and run.overall_state() == "live"
    with pytest.raises(launcher.RunBusy):
        launcher.start(run, ["eval"])
    with pytest.raises(launcher.RunBusy):  # a node of another job
        launcher.check_idle(run, job="8")
    launcher.check_idle(run, job="7")  # the nodes of one job register one after another

    assert launcher.cancel(run, grace_s=1, wait=False)  # nothing here to signal: the request reaches the nodes
    assert (run.path / "cancel_request.json").exists()

    assert psutil.Process(bystander).status() != psutil.STATUS_ZOMBIE  # not signalled
    node_pid_file(run, "sft", 0, "gpu-a", heartbeat=time.time() - HEARTBEAT_STALE_S - 1, pid=bystander)
    assert state_of(run, "sft") == "running"  # node 1 still beats
    node_pid_file(run, "sft", 1, "gpu-b", heartbeat=None, pid=bystander)  # ended
    assert state_of(run, "sft") == "died"


def test_on_its_own_host_a_node_agent_is_checked_by_pid_not_heartbeat(project: Path):
    run = make_run(project, "configs/tiny.yaml")
    EventWriter(run.stage_dir("sft") / "events.jsonl").status("running", pid=1, rank=0, world_size=2)
    node_pid_file(run, "sft", 1, socket.gethostname(), heartbeat=time.time() - 3600)
    assert state_of(run, "sft") == "running"  # this very process, alive whatever the heartbeat says
    record = ProcessRecord(os.getpid(), 1.0, 1, time.time())  # our pid with another start: ours has ended
    write_pid_file(run.stage_dir("sft") / "pid.node1", record, host=socket.gethostname(), heartbeat=time.time())
    assert state_of(run, "sft") == "died"


# --------------------------------------------------------------------------- one node: the supervisor's duties


@pytest.mark.e2e
def test_a_node_agent_refuses_a_busy_run_and_reports_a_worker_that_died(project: Path, slow_config: Path):
    run = make_run(project, slow_config)
    launcher.start(run, ["data"])
    wait_for(lambda: state_of(run, "data") == "running", timeout=60, what="the supervisor's data stage")
    refused = subprocess.run(
        [sys.executable, "-m", "engine.runner.node", "--run", str(run.path), "--nnodes", "1", "data"],
        cwd=project,
        env=launcher.python_env(),
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "busy" in refused.stderr, refused.stderr
    launcher.cancel(run, grace_s=5)

    agent = subprocess.Popen(
        [sys.executable, "-m", "engine.runner.node", "--run", str(run.path), "--nnodes", "1", "data"],
        cwd=project,
        env=launcher.python_env(),
        start_new_session=True,
    )
    worker = wait_for(lambda: psutil.Process(agent.pid).children(), timeout=30, what="the worker")[0]
    wait_for(lambda: len(final_statuses(run, "data")) == 0 and state_of(run, "data") == "running", timeout=60)
    with pytest.raises(launcher.RunBusy):
        launcher.start(run, ["data"])
    worker.send_signal(signal.SIGKILL)
    assert agent.wait(timeout=60) == 1
    finals = final_statuses(run, "data")
    assert len(finals) == 1 and finals[0]["state"] == "failed" and "SIGKILL" in finals[0]["error"], finals
    assert state_of(run, "data") == "failed"
    assert read_pid_file_heartbeat(run, "data") is None  # ended: other hosts see it at once


def read_pid_file_heartbeat(run, stage: str):
    return next(p for p in stage_processes(run.stage_dir(stage)) if p.path.name == "pid").heartbeat


# ------------------------------------------------------------------ two nodes on localhost, started by the sbatch


TWO_NODES = {
    "data.limit": 32,
    "teacher.open.pipeline.max_new_tokens": 8,
    "device.cpu_threads": 1,  # two ranks on two cores
    "train.sft.max_steps": 400,
    "train.sft.save_steps": 1000,
    "train.sft.eval_strategy": "no",
    "launch.cancel_grace_s": 60,
}

FAKE_SRUN = """# every "node" runs the command here, in a session of its own as slurmstepd gives each task
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i setsid -w "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


@pytest.mark.train
def test_two_nodes_from_the_sbatch_run_busy_and_cancel_as_one_stage(project: Path, tmp_path: Path, monkeypatch):
    run = make_run(project, "configs/tiny.yaml", TWO_NODES, name="slurm")
    launcher.start(run, ["data", "teacher"])
    wait_for(lambda: not run.is_live(), timeout=600, interval=1, what="data and teacher")
    assert state_of(run, "teacher") == "done"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = fake_slurm(tmp_path / "bin", FAKE_SRUN)
    env = slurm_env(project, bin_dir, RUN="slurm", STAGE="sft", RDZV_PORT=str(port))
    job = subprocess.Popen(["bash", str(SBATCH)], cwd=project, env=env, start_new_session=True)
    try:
        wait_for(lambda: steps_done(run, "sft") >= 1, timeout=600, interval=1, what="sft to take a step")
        processes = stage_processes(run.stage_dir("sft"))
        assert [(p.path.name, p.job) for p in processes] == [("pid", "4242"), ("pid.node1", "4242")]
        assert all(p.is_alive() for p in processes)
        workers = [c for p in processes for c in psutil.Process(p.record.pid).children(recursive=True)]
        ranks = [w for w in workers if module_of(w.cmdline()) == "engine.runner.worker"]
        assert len(ranks) == 2  # one per node, under its node's torchrun
        assert state_of(run, "sft") == "running"
        with pytest.raises(launcher.RunBusy):
            launcher.start(run, ["sft"])

        monkeypatch.setattr(runs_module, "this_host", lambda: "login-node")  # what the login node sees
        assert not any(p.is_local for p in stage_processes(run.stage_dir("sft")))
        assert state_of(run, "sft") == "running"
        with pytest.raises(launcher.RunBusy):
            launcher.start(run, ["sft"])
        assert launcher.cancel(run)  # signals nothing here: each agent reads the request
        assert job.wait(timeout=120) == 0  # a cancel asked for: no node's exit makes srun kill the others
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), timeout=30)
    finals = final_statuses(run, "sft")
    assert len(finals) == 1 and finals[0]["state"] == "cancelled", finals
    assert "checkpoint saved" in finals[0].get("message", ""), finals
    assert state_of(run, "sft") == "cancelled"
    monkeypatch.undo()
    assert state_of(run, "sft") == "cancelled"
    assert (run.stage_dir("sft") / "worker.node1.log").exists()
