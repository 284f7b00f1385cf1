"""Helpers shared by test modules (fixtures live in conftest.py; this module holds plain functions).

Paths: tests read configs only from `tests/data/`, never the user-editable `config.yaml`,
`configs/tiny.yaml` and `prompt.yaml` of the checkout, and nothing outside the repository.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
TINY_CONFIG = DATA / "tiny.yaml"  # pristine copy of configs/tiny.yaml
PROJECT_CONFIG = DATA / "config.yaml"  # pristine copy of config.yaml
PROMPTS = DATA / "prompt.yaml"  # pristine copy of prompt.yaml
SEED_CONFIG = DATA / "seed" / "config.yaml"  # byte-identical copy of the original TAS config.yaml

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 60, interval: float = 0.1, what: str = "") -> T:
    """Poll `predicate` until it returns something truthy and return that; fail the test after `timeout` s.

    Use this instead of a fixed `time.sleep(n)` whenever a test waits for something to happen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what or getattr(predicate, '__name__', 'a condition')}"
            )
        time.sleep(interval)


def tas(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """The `tas` command line, as a user runs it, in `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def lines_of(path: Path) -> list[str]:
    """The lines of a file that may not exist yet."""
    return path.read_text().splitlines() if path.exists() else []


def make_context(config, stage: str, root: Path):
    """An in-process StageContext over a fresh run: stages are tested without spawning workers."""
    from engine.runner.context import StageContext
    from engine.store.events import EventWriter
    from engine.store.runs import RunStore

    run = RunStore(root / "runs").create(config, "test.yaml", workdir=str(root))
    return StageContext(stage, run, config, EventWriter(run.stage_dir(stage) / "events.jsonl"))
