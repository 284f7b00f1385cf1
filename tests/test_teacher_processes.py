"""Stage `teacher` as real processes: SIGKILL mid-run then resume; two torchrun ranks (gloo on CPU)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from engine.core import launcher
from engine.core.config import load_config
from engine.core.runs import RunStore
from engine.stages import data

from .conftest import make_context
from .test_processes import tas, wait_for

pytestmark = pytest.mark.e2e


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def check_exactly_once(cfg) -> None:
    prompts = [json.loads(line)["id"] for line in lines_of(Path(cfg.data.output_path))]
    records = [json.loads(line) for line in lines_of(Path(cfg.teacher.base.output_path))]
    assert sorted(r["id"] for r in records) == sorted(prompts)
    assert all(r["output"].strip() for r in records)


def test_sigkill_mid_run_then_resume(project: Path):
    cfg = load_config(project / "configs" / "tiny.yaml")
    cfg.teacher.open.pipeline.batch_size = 4
    data.run(make_context(cfg, "data", project))
    run = RunStore(project / "runs").create(cfg, "configs/tiny.yaml")
    output = Path(cfg.teacher.base.output_path)

    launcher.start(run, ["teacher"])
    wait_for(lambda: len(lines_of(output)) >= 20, timeout=120)
    os.kill(run.stages()[1].pid, signal.SIGKILL)
    wait_for(lambda: not run.is_live(), timeout=30)
    status = run.stages()[1]
    assert status.state == "failed" and "SIGKILL" in status.error
    partial = len(lines_of(output))
    assert 20 <= partial < 315

    result = tas("run", "teacher", "--run", run.id, cwd=project, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{partial} already answered" in result.stdout
    check_exactly_once(cfg)


def test_two_torchrun_ranks_merge_every_prompt_exactly_once(project: Path):
    cfg = load_config(project / "configs" / "tiny.yaml")
    cfg.data.limit = 60
    cfg.teacher.open.pipeline.batch_size = 8
    cfg.teacher.open.pipeline.max_new_tokens = 16
    cfg.launch.nproc_per_node = 2
    data.run(make_context(cfg, "data", project))
    run = RunStore(project / "runs").create(cfg, "configs/tiny.yaml")
    launcher.start(run, ["teacher"])
    wait_for(lambda: not run.is_live(), timeout=300, interval=0.5)
    status = run.stages()[1]
    log = (run.stage_dir("teacher") / "worker.log").read_text()
    assert status.state == "done", f"{status.error}\n{log[-3000:]}"
    check_exactly_once(cfg)
    assert not list(Path(cfg.teacher.base.output_path).parent.glob("*.rank*"))  # shards merged and removed
    rank1 = (run.stage_dir("teacher") / "events.rank1.jsonl").read_text()
    assert '"world_size": 2' in rank1 and '"rank": 1' in rank1
