"""How the supervisor launches each stage: as one process or under torchrun.

* `launch.nproc_per_node > 1` runs sft and distill under torchrun, and the teacher only when it is the open
  (HF) teacher; a vLLM teacher spreads itself over the GPUs from one process and refuses torchrun, so
  "vLLM teacher, then DDP training" could not run from one config (issue 22, finding 3).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.runner.supervisor import worker_command
from engine.store.runs import RunStore

from .helpers import TINY_CONFIG


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
