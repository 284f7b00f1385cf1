"""Cancel is honest: a training stage stops at the end of the current step, saves one checkpoint and ends
`cancelled`, with no evaluation on the way out, even with eval_strategy epoch and a large eval split."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from transformers import TrainerCallback

from engine.config.load import load_config
from engine.runner.context import StageCancelled
from engine.stages import data, sft, teacher
from tests.helpers import make_context

CANCEL_AT_STEP = 2


class Recorder(TrainerCallback):
    """Requests the cancel at a chosen point and records what the Trainer did afterwards."""

    def __init__(self, ctx, when: str):
        self.ctx, self.when = ctx, when
        self.requested_at: float | None = None
        self.predictions_after = 0
        self.evaluations_after = 0

    def _request(self):
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            self.ctx.cancel_event.set()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.when == "during step" and state.global_step == CANCEL_AT_STEP - 1:
            self._request()

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.requested_at is not None:
            self.predictions_after += 1
        elif self.when == "during evaluation" and state.global_step >= CANCEL_AT_STEP:
            self._request()

    def on_evaluate(self, args, state, control, **kwargs):
        if self.requested_at is not None:
            self.evaluations_after += 1


@pytest.fixture(scope="module")
def answered(tmp_path_factory):
    root = tmp_path_factory.mktemp("cancel")
    import shutil

    from tests.helpers import PROMPTS, TINY_CONFIG

    shutil.copy(PROMPTS, root / "prompt.yaml")
    cfg = load_config(TINY_CONFIG)
    cfg.data.output_path = str(root / "prompts.jsonl")
    cfg.teacher.base.output_path = str(root / "teacher.jsonl")
    cfg.prompts.path = str(root / "prompt.yaml")
    cfg.data.limit = 48
    cfg.teacher.open.pipeline.max_new_tokens = 16
    data.run(make_context(cfg, "data", root))
    teacher.run(make_context(cfg, "teacher", root))
    return cfg, root


@pytest.mark.parametrize("when", ["during step", "during evaluation"])
def test_cancel_saves_one_checkpoint_and_skips_evaluation(answered, tmp_path: Path, when: str):
    cfg, root = answered
    cfg = cfg.model_copy(deep=True)
    cfg.train.sft.save_path = str(tmp_path / "adapter")
    cfg.train.sft.eval_strategy = "steps" if when == "during evaluation" else "epoch"
    cfg.train.sft.dataset.test_size = 0.5  # 24 held-out answers: an evaluation pass is real work
    cfg.train.sft.per_device_train_batch_size = 4
    cfg.train.sft.save_steps = 1000
    cfg.train.sft.logging_steps = CANCEL_AT_STEP  # with eval_strategy steps, eval_steps follows logging_steps
    ctx = make_context(cfg, "sft", root)
    setup = sft.prepare(ctx)
    recorder = Recorder(ctx, when)
    setup.trainer.add_callback(recorder)
    with pytest.raises(StageCancelled, match=f"cancelled at step {CANCEL_AT_STEP}"):
        sft.train(ctx, setup)
    seconds = time.monotonic() - recorder.requested_at
    checkpoints = sorted(p.name for p in (tmp_path / "adapter" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{CANCEL_AT_STEP}"]
    assert recorder.evaluations_after == 0
    assert recorder.predictions_after <= 1  # an evaluation in progress stops at its next batch
    assert seconds < cfg.launch.cancel_grace_s


class ResumeRecorder:
    """Stands in for the Trainer: records the checkpoint `train_resumable` resumes from."""

    def __init__(self):
        self.resumed_from = "never trained"

    def train(self, resume_from_checkpoint=None):
        self.resumed_from = resume_from_checkpoint


def checkpoint(folder: Path, weights: str, state: str | None) -> Path:
    """A checkpoint folder as HF's Trainer leaves it: weights and optimizer first, trainer_state.json last."""
    folder.mkdir(parents=True)
    (folder / weights).write_bytes(b"\0" * 64)
    (folder / "optimizer.pt").write_bytes(b"\0" * 64)
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    return folder


def resume(tmp_path: Path, checkpoints: Path) -> tuple[ResumeRecorder, list[dict]]:
    from engine.store.events import read_events
    from engine.train.callbacks import CancelCallback, train_resumable
    from tests.helpers import TINY_CONFIG

    ctx = make_context(load_config(TINY_CONFIG), "distill", tmp_path)
    trainer = ResumeRecorder()
    train_resumable(ctx, trainer, CancelCallback(ctx), checkpoints, "batch", 4, False, "train.distillation.overwrite")
    return trainer, read_events(ctx.stage_dir / "events.jsonl")


@pytest.mark.parametrize("weights", ["adapter_model.safetensors", "model.safetensors"], ids=["lora", "full"])
@pytest.mark.parametrize("state", [None, '{"global_step": 4, "log_hi'], ids=["no state", "torn state"])
def test_resume_skips_a_checkpoint_whose_save_was_cut(tmp_path: Path, weights: str, state: str | None):
    """A save killed mid-way (SIGKILL after the grace) leaves weights without a readable trainer_state.json:
    the next run resumes from the newest complete checkpoint, says which folder it skipped, and removes it."""
    checkpoints = tmp_path / "out" / "checkpoints"
    good = checkpoint(checkpoints / "checkpoint-2", weights, '{"global_step": 2}')
    cut = checkpoint(checkpoints / "checkpoint-4", weights, state)
    trainer, events = resume(tmp_path, checkpoints)
    assert trainer.resumed_from == str(good)
    skipped = [e for e in events if e["kind"] == "log" and str(cut) in e["msg"]]
    assert skipped and "skipped" in skipped[0]["msg"], events
    assert not cut.exists() and good.exists()


def test_resume_with_only_cut_checkpoints_trains_from_the_start(tmp_path: Path):
    checkpoints = tmp_path / "out" / "checkpoints"
    checkpoint(checkpoints / "checkpoint-2", "model.safetensors", None)
    checkpoint(checkpoints / "checkpoint-4", "model.safetensors", "")
    trainer, events = resume(tmp_path, checkpoints)
    assert trainer.resumed_from is None
    assert sum("skipped" in e.get("msg", "") for e in events) == 2
    assert list(checkpoints.iterdir()) == []
