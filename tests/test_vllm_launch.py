"""A run set for several GPUs (`launch.nproc_per_node: 2`) with `teacher.source: vllm`: the teacher stage
runs as one process that serves the teacher with a real vLLM server, not under torchrun, whose ranks it
refused (issue 22, finding 3). sft and distill of such a run go under torchrun (tests/test_launch.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.runner import launcher

from .helpers import lines_of, wait_for
from .test_vllm_teacher import STARTUP_S, teacher_state, vllm_project, vllm_run, worker_log

pytestmark = pytest.mark.vllm

__all__ = ["vllm_project"]  # the fixture, imported for pytest to find


def test_a_vllm_teacher_answers_in_a_run_set_for_two_gpus(vllm_project: Path):
    cfg, run = vllm_run(vllm_project, **{"launch.nproc_per_node": 2})
    launcher.start(run, ["teacher"])
    wait_for(lambda: not run.is_live(), timeout=STARTUP_S + 120, interval=0.5)
    assert teacher_state(run).state == "done", worker_log(run)
    assert len(lines_of(Path(cfg.teacher.base.output_path))) == len(lines_of(Path(cfg.data.output_path)))
