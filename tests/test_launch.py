"""How the supervisor launches each stage: as one process or under torchrun, and torchrun's cancel deadline.

* `launch.nproc_per_node > 1` runs sft and distill under torchrun, and the teacher only when it is the open
  (HF) teacher; a vLLM teacher spreads itself over the GPUs from one process and refuses torchrun, so
  "vLLM teacher, then DDP training" could not run from one config (issue 22, finding 3).
* The grace of a cancel is the supervisor's to enforce: `tas cancel --grace G` above
  `launch.cancel_grace_s` was cut short by torchrun's own `--shutdown-timeout` (issue 22, finding 5).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.runner.supervisor import worker_command
from engine.store.runs import RunStore

from .helpers import TINY_CONFIG, wait_for


def command_for(tmp_path: Path, stage: str, **launch) -> list[str]:
    """The supervisor's command for `stage` of a tiny run with `teacher.source` and `launch.*` set."""
    config = load_config(TINY_CONFIG)
    config.teacher.source = launch.pop("source", config.teacher.source)
    for key, value in launch.items():
        setattr(config.launch, key, value)
    run = RunStore(tmp_path / "runs").create(config, "tiny.yaml", workdir=str(tmp_path))
    return worker_command(stage, run, config)


def under_torchrun(command: list[str]) -> bool:
    return command[1:3] == ["-m", "torch.distributed.run"]


@pytest.mark.parametrize("source", ["vllm", "closed", "download"])
def test_a_teacher_other_than_the_open_one_runs_as_one_process_beside_ddp_training(tmp_path: Path, source: str):
    teacher = command_for(tmp_path, "teacher", source=source, nproc_per_node=2)
    assert teacher[1:] == ["-u", "-m", "engine.runner.worker", "teacher", "--run", teacher[-1]]
    for stage in ("sft", "distill"):
        assert under_torchrun(command_for(tmp_path, stage, source=source, nproc_per_node=2))


def test_the_open_teacher_answers_a_shard_per_gpu_under_torchrun(tmp_path: Path):
    command = command_for(tmp_path, "teacher", source="open", nproc_per_node=2)
    assert under_torchrun(command) and "--nproc_per_node=2" in command
    assert not under_torchrun(command_for(tmp_path, "teacher", source="open", nproc_per_node=1))


def test_on_several_nodes_a_vllm_teacher_still_runs_as_one_process(tmp_path: Path):
    launch = {"source": "vllm", "nnodes": 2, "rdzv_endpoint": "node0:29500"}
    assert not under_torchrun(command_for(tmp_path, "teacher", **launch))
    assert under_torchrun(command_for(tmp_path, "distill", **launch))


def shutdown_timeout(command: list[str]) -> int:
    options = command[: command.index("engine.runner.worker")]
    (flag,) = [option for option in options if option.startswith("--shutdown-timeout=")]
    return int(flag.split("=", 1)[1])


def test_torchrun_leaves_the_deadline_of_a_cancel_to_the_supervisor(tmp_path: Path):
    """`tas cancel --grace 600` on a config with the default 30 s: torchrun must not kill the ranks first."""
    command = command_for(tmp_path, "distill", nproc_per_node=2, cancel_grace_s=30.0)
    assert shutdown_timeout(command) >= 600


RANK = """
import os, pathlib, signal, sys, time
out, save_s = pathlib.Path(sys.argv[1]), float(sys.argv[2])
rank = os.environ["RANK"]
def save_and_stop(signum, frame):
    time.sleep(save_s)  # a slow checkpoint save
    (out / f"saved{rank}").write_text("whole")
    sys.exit(0)
signal.signal(signal.SIGTERM, save_and_stop)
(out / f"ready{rank}").write_text("")
while True:
    time.sleep(0.1)
"""


@pytest.mark.e2e
def test_torchrun_ranks_save_for_longer_than_the_configured_grace(tmp_path: Path):
    """torchrun as the supervisor starts it, two ranks that take 3 s to save after SIGTERM, and a config
    grace of 1 s: the agent passes the cancel on and waits for them (the supervisor would kill the tree at
    the end of the cancel's own grace). Before, it SIGKILLed them after 1 s, mid-save."""
    command = command_for(tmp_path, "distill", nproc_per_node=2, cancel_grace_s=1.0)
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    torchrun = [*command[: command.index("engine.runner.worker") - 1], str(script), str(tmp_path), "3"]
    agent = subprocess.Popen(torchrun, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: all((tmp_path / f"ready{r}").exists() for r in (0, 1)) or agent.poll() is not None, 120)
        assert agent.poll() is None, agent.stdout.read().decode(errors="replace")
        started = time.monotonic()
        os.kill(agent.pid, signal.SIGTERM)  # what the supervisor passes on
        log = agent.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert [(tmp_path / f"saved{r}").exists() for r in (0, 1)] == [True, True], log
    assert time.monotonic() - started >= 3


AGENT = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # an agent still waiting for its ranks to save
rank = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]
print(subprocess.Popen(rank, start_new_session=True).pid, flush=True)  # torchrun starts each rank so
time.sleep(600)
"""


@pytest.mark.e2e
def test_the_cancel_backstop_kills_torchrun_ranks_in_their_own_sessions(tmp_path: Path):
    """With no supervisor left to enforce the grace (and torchrun no longer killing at its own deadline),
    `launcher.cancel`'s backstop kills the ranks too, not only the agent's process group."""
    from engine.core.process import ProcessRecord, write_pid_file
    from engine.runner import launcher

    run = RunStore(tmp_path / "runs").create(load_config(TINY_CONFIG), "tiny.yaml", workdir=str(tmp_path))
    # the command line of a torchrun agent of this run (only those are signalled): extra words in sys.argv
    ours = ["-m", "engine.runner.worker", "distill", "--run-dir", str(run.path)]
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, *ours], start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    started = [ProcessRecord.of(agent.pid), ProcessRecord.of(int(agent.stdout.readline()))]
    try:
        run.stage_dir("distill").mkdir(parents=True, exist_ok=True)
        write_pid_file(run.stage_dir("distill") / "pid", started[0])
        assert launcher.cancel(run, grace_s=0.5)
        agent.wait(timeout=10)
        assert wait_for(lambda: not started[1].is_alive(), timeout=10, what="the rank outlived the cancel")
    finally:
        for record in started:
            if record.is_alive():
                os.kill(record.pid, signal.SIGKILL)
        agent.wait(timeout=10)
