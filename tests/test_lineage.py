"""Runs own their outputs: per-run paths, teacher fingerprints, explicit reuse, names, notes, rm, compare."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config.keys import get_key
from engine.config.load import load_config
from engine.core.process import ProcessRecord, write_pid_file
from engine.runner.context import StageContext
from engine.stages import data, teacher
from engine.store.events import EventWriter
from engine.store.lineage import RUN_OUTPUT_KEYS, ReuseRefused, resolve_outputs, reuse_teacher
from engine.store.runs import RunIsLive, RunStore, remove_run
from engine.train.pairs import load_split_pairs

from .helpers import make_run


def stage(run, name: str) -> StageContext:
    """A stage of `run` in-process, with the run's own (resolved) config, as its worker would see it."""
    return StageContext(name, run, run.config(), EventWriter(run.stage_dir(name) / "events.jsonl"))


def new_run(project: Path, name: str, **changes):
    return make_run(project, "configs/tiny.yaml", {"teacher.open.pipeline.max_new_tokens": 8, **changes}, name=name)


def answers(run) -> list[dict]:
    path = Path(run.config().teacher.base.output_path)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_relative_outputs_live_under_the_run_absolute_ones_stay(project: Path, tmp_path: Path):
    cfg = load_config(project / "configs" / "tiny.yaml")
    cfg.train.sft.save_path = str(tmp_path / "shared-adapter")
    resolved = resolve_outputs(cfg, project / "runs" / "R")
    assert resolved.data.output_path == str((project / "runs" / "R" / cfg.data.output_path).resolve())
    assert resolved.train.distillation.output_dir.startswith(str((project / "runs" / "R").resolve()))
    assert resolved.train.sft.save_path == str(tmp_path / "shared-adapter")
    assert cfg.data.output_path == ".data/tiny/prompts.jsonl"  # the config itself is untouched


def test_two_runs_never_share_outputs_or_checkpoints(project: Path):
    first, second = new_run(project, "a"), new_run(project, "b")
    a, b = first.config(), second.config()
    for key in RUN_OUTPUT_KEYS:
        path_a, path_b = get_key(a, key), get_key(b, key)
        assert path_a != path_b and path_a.startswith(str(first.path.resolve())), key


def test_each_run_gets_answers_from_its_own_teacher(project: Path):
    """The issue's case: a second run with other teacher settings must not resume the first run's answers."""
    first = new_run(project, "a", **{"data.limit": 12})
    data.run(stage(first, "data"))
    teacher.run(stage(first, "teacher"))
    second = new_run(project, "b", **{"data.limit": 12, "teacher.open.pipeline.temperature": 0.9})
    data.run(stage(second, "data"))
    ctx = stage(second, "teacher")
    teacher.run(ctx)
    logs = [json.loads(line).get("msg", "") for line in (ctx.stage_dir / "events.jsonl").read_text().splitlines()]
    assert "12 prompts: 0 already answered, 12 to go" in logs
    first_fp = {r["fp"] for r in answers(first)}
    second_fp = {r["fp"] for r in answers(second)}
    assert len(first_fp) == len(second_fp) == 1 and first_fp != second_fp
    assert len(answers(second)) == 12


def test_reuse_works_when_fingerprints_match_and_is_refused_otherwise(project: Path):
    source = new_run(project, "source", **{"data.limit": 16})
    data.run(stage(source, "data"))
    teacher.run(stage(source, "teacher"))

    same = new_run(project, "same", **{"data.limit": 8})
    summary = reuse_teacher(same.config(), same.path, same.workdir, source.config(), source.path, source.id)
    assert "reused 16 teacher answers" in summary
    data.run(stage(same, "data"))
    ctx = stage(same, "teacher")
    teacher.run(ctx)
    logs = [json.loads(line) for line in (ctx.stage_dir / "events.jsonl").read_text().splitlines()]
    assert any("8 prompts: 8 already answered, 0 to go" in e.get("msg", "") for e in logs)
    # data.limit 8 → training sees at most 8 prompts, though the reused file answers 16
    train, held_out, _ = load_split_pairs(stage(same, "sft"))
    assert len(train) + len(held_out) == 8

    other = new_run(project, "other", **{"teacher.open.pipeline.temperature": 0.1})
    with pytest.raises(ReuseRefused, match=r"teacher\.open\.pipeline\.temperature: 0\.3 vs 0\.1"):
        reuse_teacher(other.config(), other.path, other.workdir, source.config(), source.path, source.id)
    never_ran = new_run(project, "never")
    with pytest.raises(ReuseRefused, match="never ran"):
        reuse_teacher(other.config(), other.path, other.workdir, never_ran.config(), never_ran.path, never_ran.id)


def test_resume_skips_only_answers_with_this_runs_fingerprint(project: Path):
    run = new_run(project, "r", **{"data.limit": 6})
    data.run(stage(run, "data"))
    output = Path(run.config().teacher.base.output_path)
    prompts = [json.loads(line) for line in Path(run.config().data.output_path).read_text().splitlines()]
    output.parent.mkdir(parents=True, exist_ok=True)
    foreign = {
        "id": prompts[0]["id"],
        "instruction": prompts[0]["instruction"],
        "output": "from elsewhere",
        "fp": "another-teacher",
    }
    output.write_text(json.dumps(foreign) + "\n")
    teacher.run(stage(run, "teacher"))
    records = answers(run)
    assert sorted(r["id"] for r in records) == sorted(p["id"] for p in prompts)
    assert all(r["output"] != "from elsewhere" for r in records)
    assert "from elsewhere" in output.with_name(output.name + ".other-settings.jsonl").read_text()


def test_names_notes_lookup_and_rm(project: Path):
    store = RunStore(project / "runs")
    run = new_run(project, "baseline")
    assert store.get("baseline").id == run.id
    assert store.get(run.id[4:12]).id == run.id  # any unique part of the id
    run.update_meta(note="lr 2e-4, KD weight 0.5")
    assert store.get(run.id).note == "lr 2e-4, KD weight 0.5"

    archived = remove_run(store.get(run.id), archive=True)
    assert archived is not None and archived.exists() and not run.path.exists()
    assert [r.id for r in store.list()] == []


def test_rm_refuses_a_live_run(project: Path):
    run = new_run(project, "live")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        write_pid_file(run.path / "supervisor.json", ProcessRecord.of(sleeper.pid), stages=["data"])
        with pytest.raises(RunIsLive, match="cancel it first"):
            remove_run(RunStore(project / "runs").get(run.id))
        assert run.path.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
