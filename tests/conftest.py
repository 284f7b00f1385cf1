"""Shared fixtures. Tests use the shipped tiny models; nothing builds them unless a test asks.

Tests never read the checkout's user-editable `config.yaml`, `configs/tiny.yaml` or `prompt.yaml`: the
`project` fixture lays out pristine copies from `tests/data/`. Plain helpers live in `tests/helpers.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .helpers import DATA, PROJECT_CONFIG, PROMPTS, ROOT, SEED_CONFIG, TINY_CONFIG, make_context

__all__ = ["DATA", "ROOT", "make_context"]  # ROOT and make_context: older imports `from .conftest import ...`


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty tiny cache for the session (and every worker it spawns), never the user's: tests load the
    shipped tiny models (engine/assets/tiny), and the few that build one build it here, on a short recipe."""
    cache = tmp_path_factory.mktemp("tiny-cache")
    os.environ["TAS_TINY_CACHE"] = str(cache)
    os.environ.pop("TAS_RUNS_DIR", None)
    return cache


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory laid out like a checkout (config.yaml, configs/tiny.yaml, prompt.yaml), made
    from the pristine copies in tests/data/, never from the user's files; the test runs inside it.

    Afterwards any run still live in its `runs/` is cancelled: a test that failed or timed out while a
    detached supervisor worked must not leave it running for the rest of the session."""
    (tmp_path / "configs").mkdir()
    shutil.copy(TINY_CONFIG, tmp_path / "configs" / "tiny.yaml")
    shutil.copy(PROJECT_CONFIG, tmp_path / "config.yaml")
    shutil.copy(PROMPTS, tmp_path / "prompt.yaml")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    if (tmp_path / "runs").is_dir():
        from engine.runner import launcher
        from engine.store.runs import RunStore

        for run in RunStore(tmp_path / "runs").list():
            supervisor, _ = run.supervisor()  # some tests record this very process as a run's supervisor
            if supervisor is not None and supervisor.pid != os.getpid() and supervisor.is_alive():
                launcher.cancel(run, grace_s=5)


@pytest.fixture(scope="session")
def seed_config_path() -> Path:
    """A byte-identical copy of the original TAS config.yaml (tests/data/seed/config.yaml); read only."""
    return SEED_CONFIG


@pytest.fixture(scope="session")
def big_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1M records, 1% short enough to keep: the data stage needs a few seconds for it. Built once a session."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    long_line = json.dumps({"instruction": "word " * 50}) + "\n"
    with open(path, "w") as f:
        for i in range(1_000_000):
            f.write(long_line if i % 100 else json.dumps({"instruction": f"Write function {i}"}) + "\n")
    return path


@pytest.fixture
def slow_config(project: Path, big_dataset: Path) -> Path:
    """configs/slow.yaml in the project: the tiny profile over `big_dataset`, so stage `data` runs a while."""
    data = yaml.safe_load((project / "configs" / "tiny.yaml").read_text())
    data["datasets"][0]["external_local_path"] = str(big_dataset)
    data["launch"]["cancel_grace_s"] = 5
    path = project / "configs" / "slow.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
