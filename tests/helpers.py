"""Helpers shared by test modules (fixtures live in conftest.py; this module holds plain functions).

Paths: tests read configs only from `tests/data/`, never the user-editable `config.yaml`,
`configs/tiny.yaml` and `prompt.yaml` of the checkout, and nothing outside the repository.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from engine.config.keys import set_key
from engine.config.load import load_config
from engine.store.runs import Run, RunStore

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


async def wait_until(
    pilot, predicate: Callable[[], object], timeout: float = 60.0, step: float = 0.05, drain: bool = True
) -> None:
    """Let a Textual app under test (driven by `pilot`) run until `predicate()` holds; fail after `timeout` s.

    drain=False polls between messages (asyncio.sleep) instead of after the app has handled every queued
    one (pilot.pause), so the intermediate states of a stream can be seen. A predicate may carry a `debug`
    function: what it returns is shown when the wait fails.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            debug = getattr(predicate, "debug", None)
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {getattr(predicate, '__name__', predicate)}"
                + (f": {debug()}" if debug else "")
            )
        await (pilot.pause(step) if drain else asyncio.sleep(step))


def python(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """A fresh Python process (`-c SCRIPT`, `-m MODULE ...`) in `cwd` (else ours), its output captured as text: for what
    must be seen from a process of its own (which modules an import pulls in, a command's exit code)."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def tas(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """The `tas` command line, as a user runs it, in `cwd`."""
    return python("-m", "engine.cli.main", *args, cwd=cwd, timeout=timeout)


def lines_of(path: Path) -> list[str]:
    """The lines of a file that may not exist yet."""
    return path.read_text().splitlines() if path.exists() else []


def make_run(project: Path, config_path: str | Path, overrides: Mapping[str, Any] = {}, name: str = "") -> Run:
    """A new run in `project/runs` of the config file at `config_path` (relative to `project`), with
    `overrides` applied first: dotted config keys, as a user reads them (`{"train.sft.max_steps": 3}`)."""
    config = load_config(project / config_path)
    for key, value in overrides.items():
        set_key(config, key, value)
    return RunStore(project / "runs").create(config, str(config_path), workdir=str(project), name=name)


def write_teacher_answers(config, path: Path, records: list[tuple[str, str]]) -> None:
    """(question, answer) records as the teacher stage writes them, at `path`, which `config` then reads."""
    config.teacher.base.output_path = str(path)
    path.write_text(
        "".join(json.dumps({"id": f"p{i}", "instruction": q, "output": a}) + "\n" for i, (q, a) in enumerate(records))
    )


def make_context(config, stage: str, root: Path):
    """An in-process StageContext over a fresh run: stages are tested without spawning workers."""
    from engine.runner.context import StageContext
    from engine.store.events import EventWriter
    from engine.store.runs import RunStore

    run = RunStore(root / "runs").create(config, "test.yaml", workdir=str(root))
    return StageContext(stage, run, config, EventWriter(run.stage_dir(stage) / "events.jsonl"))


def kd_examples(tokenizer, answers, prompt: str = "def f(xs):\n    ") -> list[dict[str, list[int]]]:
    """Tokenized KD examples as the collator takes them: `prompt` then each answer, the answer labelled."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    examples = []
    for answer in answers:
        ids = prompt_ids + tokenizer(answer)["input_ids"]
        examples.append({"input_ids": ids, "labels": [-100] * len(prompt_ids) + ids[len(prompt_ids) :]})
    return examples


def tiny_kd_trainer(output_dir: Path, examples: list[dict], student, teacher, pad_token_id: int, **options: Any):
    """A KDTrainer over `examples` on CPU that saves and reports nothing: the in-process KD step tests build.

    `options` go to TrainingArguments (saving nothing unless they say `save_strategy`), except the KD ones
    (`kd_weight`, `chunk_size`, `vocab_size`; `divergence`, an engine.train.kd_loss.Divergence, and `on_policy`,
    an engine.train.on_policy.OnPolicy, when given)."""
    from transformers import TrainingArguments

    from engine.train.kd_trainer import KDCollator, KDTrainer

    keys = ("kd_weight", "chunk_size", "vocab_size", "divergence", "on_policy")
    kd = {key: options.pop(key) for key in keys if key in options}
    args = TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        logging_steps=1,
        **{"save_strategy": "no", **options},
    )
    return KDTrainer(
        model=student,
        args=args,
        train_dataset=examples,
        data_collator=KDCollator(pad_token_id),
        kd_teacher=teacher,
        temperature=2.0,
        reduction="batchmean",
        **kd,
    )
