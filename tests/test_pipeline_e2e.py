"""The whole pipeline from the command line, as the README's second command runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.core.runs import RunStore

from .helpers import tas


@pytest.mark.e2e
def test_tas_run_all_on_the_tiny_profile(project: Path):
    result = tas("run", "all", "--config", "configs/tiny.yaml", cwd=project, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = RunStore(project / "runs").get("last")
    assert [s.state for s in run.stages()] == ["done"] * 5
    report = json.loads((run.stage_dir("eval") / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "assistant", "student_kd", "student_ce"}  # teacher: code eval only
    status = tas("status", cwd=project)
    assert status.stdout.count("✓ done") == 5
