"""The CE-only control of `distill` after a death (issue 22, finding 11): the re-run keeps the KD student
this run trained to the end and resumes the control from its own newest complete checkpoint, instead of
training the KD student again from step 0 (overwrite_output_dir) or refusing to run (without it)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.runner.context import StageCancelled, StageContext
from engine.stages import distill
from engine.store.events import EventWriter, read_events

from .helpers import PROMPTS, TINY_CONFIG, make_context, write_teacher_answers
from .test_masking import RECORDS


class CancelDuringTheControl(threading.Event):
    """Reads as cancelled once the KD student is saved and the control has trained a step (the stage's own
    look before the control starts still reads as not cancelled)."""

    def __init__(self, kd_model: Path):
        super().__init__()
        self.kd_model = kd_model
        self.looks = 0

    def is_set(self) -> bool:
        if not self.kd_model.exists():
            return False
        self.looks += 1
        return self.looks > 1


def progress_and_logs(path: Path) -> tuple[list[int], list[str]]:
    events = read_events(path)
    return [e["done"] for e in events if e["kind"] == "progress"], [e["msg"] for e in events if e["kind"] == "log"]


@pytest.mark.train
@pytest.mark.parametrize("overwrite", [True, False])
def test_a_stage_stopped_during_the_control_resumes_the_control(tmp_path: Path, monkeypatch, overwrite):
    shutil.copy(PROMPTS, tmp_path / "prompt.yaml")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY_CONFIG)
    write_teacher_answers(cfg, tmp_path / "teacher.jsonl", RECORDS * 2)
    cfg.train.sft.save_path = str(tmp_path / "no-adapter")  # the base assistant as KD teacher: enough here
    kd = cfg.train.distillation
    kd.output_dir = str(tmp_path / "student")
    kd.max_steps, kd.per_device_train_batch_size, kd.eval_strategy = 3, 2, "no"
    kd.overwrite_output_dir = overwrite
    student, control = tmp_path / "student", tmp_path / "student_ce"

    ctx = make_context(cfg, "distill", tmp_path)
    ctx.cancel_event = CancelDuringTheControl(student / "model.safetensors")
    with pytest.raises(StageCancelled, match="checkpoint saved"):
        distill.run(ctx)
    assert (student / "model.safetensors").exists() and not (control / "model.safetensors").exists()
    assert (control / "checkpoints" / "checkpoint-1").exists()
    kd_saved = (student / "model.safetensors").stat().st_mtime_ns

    # the same run's stage again (the supervisor re-runs a stage that died), its events read apart
    again = StageContext("distill", ctx.run, ctx.run.config(), EventWriter(tmp_path / "again.jsonl"))
    distill.run(again)
    steps, logs = progress_and_logs(tmp_path / "again.jsonl")
    assert steps[0] == 3 + 1 and steps[-1] == 3 + 3  # the control's part of the stage, from its checkpoint
    assert any("kept, not trained again" in m for m in logs)
    assert any("resuming from" in m and "student_ce/checkpoints/checkpoint-1" in m for m in logs)
    assert (student / "model.safetensors").stat().st_mtime_ns == kd_saved
    assert (control / "model.safetensors").exists()
