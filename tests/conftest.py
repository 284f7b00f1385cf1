"""Shared fixtures. Tiny models are built once per session into a temporary cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SEED_DIR = ROOT.parent / "shared" / "seed"


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test (and every worker it spawns) builds tiny models into one session cache."""
    cache = tmp_path_factory.mktemp("tiny-cache")
    os.environ["TAS_TINY_CACHE"] = str(cache)
    os.environ.pop("TAS_RUNS_DIR", None)
    return cache


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory laid out like a checkout: config.yaml, configs/tiny.yaml, prompt.yaml."""
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "tiny.yaml", tmp_path / "configs" / "tiny.yaml")
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    shutil.copy(ROOT / "prompt.yaml", tmp_path / "prompt.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def seed_config_path() -> Path:
    """A byte-identical copy of the original TAS config.yaml (shared/seed/config.yaml)."""
    return ROOT / "tests" / "data" / "seed_config.yaml"


def make_context(config, stage: str, root: Path):
    """An in-process StageContext over a fresh run: stages are tested without spawning workers."""
    from engine.core.events import EventWriter
    from engine.core.runs import RunStore
    from engine.runner.context import StageContext

    run = RunStore(root / "runs").create(config, "test.yaml", workdir=str(root))
    return StageContext(stage, run, config, EventWriter(run.stage_dir(stage) / "events.jsonl"))
