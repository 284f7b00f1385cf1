"""Stage `teacher` as real processes: SIGKILL mid-run then resume; two torchrun ranks (gloo on CPU)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.runner import launcher
from engine.runner.worker import run_stage
from engine.store.runs import RunStore

from .helpers import lines_of, tas, wait_for


def run_with_prompts(project: Path, cfg):
    """A new run of `cfg` whose data stage ran (in-process); the run's own view of the config."""
    run = RunStore(project / "runs").create(cfg, "configs/tiny.yaml")
    assert run_stage("data", run) == 0
    return run.config(), run


def check_exactly_once(cfg) -> None:
    prompts = [json.loads(line)["id"] for line in lines_of(Path(cfg.data.output_path))]
    records = [json.loads(line) for line in lines_of(Path(cfg.teacher.base.output_path))]
    assert sorted(r["id"] for r in records) == sorted(prompts)
    assert all(r["output"].strip() for r in records)


@pytest.mark.e2e
def test_sigkill_mid_run_then_resume(project: Path):
    cfg = load_config(project / "configs" / "tiny.yaml")
    cfg.data.limit = 80  # 20 batches of 4: killed part-way, at a batch boundary or inside one
    cfg.teacher.open.pipeline.batch_size = 4
    cfg, run = run_with_prompts(project, cfg)
    output = Path(cfg.teacher.base.output_path)

    launcher.start(run, ["teacher"])
    wait_for(lambda: len(lines_of(output)) >= 20, timeout=120)
    os.kill(run.stages()[1].pid, signal.SIGKILL)
    wait_for(lambda: not run.is_live(), timeout=30)
    status = run.stages()[1]
    assert status.state == "failed" and "SIGKILL" in status.error
    partial = len(lines_of(output))
    assert 20 <= partial < 80

    result = tas("run", "teacher", "--run", run.id, cwd=project, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{partial} already answered" in result.stdout
    check_exactly_once(cfg)


@pytest.mark.e2e
def test_two_torchrun_ranks_merge_every_prompt_exactly_once(project: Path):
    cfg = load_config(project / "configs" / "tiny.yaml")
    cfg.data.limit = 60
    cfg.teacher.open.pipeline.batch_size = 8
    cfg.teacher.open.pipeline.max_new_tokens = 16
    cfg.launch.nproc_per_node = 2
    cfg, run = run_with_prompts(project, cfg)
    launcher.start(run, ["teacher"])
    wait_for(lambda: not run.is_live(), timeout=300, interval=0.5)
    status = run.stages()[1]
    log = (run.stage_dir("teacher") / "worker.log").read_text()
    assert status.state == "done", f"{status.error}\n{log[-3000:]}"
    check_exactly_once(cfg)
    assert not list(Path(cfg.teacher.base.output_path).parent.glob("*.rank*"))  # shards merged and removed
    rank1 = (run.stage_dir("teacher") / "events.rank1.jsonl").read_text()
    assert '"world_size": 2' in rank1 and '"rank": 1' in rank1
