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
