"""Gradient accumulation does not change the KD step: one optimizer step over the same 8 answers gives the
same gradient norm and logged loss as 4 x accumulation 2 and as 8 x accumulation 1.

The Trainer takes a loss normalised by `num_items_in_batch` (the response tokens of the whole accumulated
batch) as already scaled for accumulation; a per-micro-batch mean summed over two micro-batches was twice
too large (issue 22, finding 2). The answers have different lengths, so a mean of micro-batch token means
would also differ from the whole-batch token mean: the tight tolerance checks the whole-batch mean."""

from __future__ import annotations

import pytest
import torch

from engine.models.loading import load_causal_lm, load_tokenizer
from tests.helpers import kd_examples, tiny_kd_trainer

ANSWERS = [
    "return a + b",
    "return sorted(xs)",
    "return [x * x for x in xs if x % 2 == 0]",
    "return s[::-1]",
    "return max(xs) - min(xs)",
    "return {k: v for k, v in pairs}",
    "return len(set(xs)) == len(xs)",
    "return ' '.join(word.capitalize() for word in text.split())",
]


def one_step(tmp_path, per_device: int, accumulation: int, kd_weight: float) -> dict[str, float]:
    """The log of one optimizer step over ANSWERS, from the same student and teacher weights."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer("tiny:assistant", padding_side="right")
    student = load_causal_lm("tiny:student", dtype=torch.float32)
    teacher = load_causal_lm("tiny:assistant", dtype=torch.float32).eval().requires_grad_(False)
    examples = kd_examples(tokenizer, ANSWERS)
    trainer = tiny_kd_trainer(
        tmp_path / f"{per_device}x{accumulation}",
        examples,
        student,
        teacher,
        tokenizer.pad_token_id,
        max_steps=1,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        seed=0,
        kd_weight=kd_weight,
        chunk_size=16,
        vocab_size=len(tokenizer),
    )
    trainer.train()
    return next(log for log in trainer.state.log_history if "grad_norm" in log)


@pytest.mark.train
@pytest.mark.parametrize("kd_weight", [0.5, 0.0], ids=["kd", "ce-only"])
def test_gradient_accumulation_gives_the_step_of_the_whole_batch(tmp_path, kd_weight: float):
    split = one_step(tmp_path, per_device=4, accumulation=2, kd_weight=kd_weight)
    whole = one_step(tmp_path, per_device=8, accumulation=1, kd_weight=kd_weight)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-3)
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-3)
    for log in (split, whole):  # the logged parts add up to the logged loss
        parts = (1 - kd_weight) * log["ce_loss"] + kd_weight * log["kd_loss"]
        assert log["loss"] == pytest.approx(parts, rel=1e-3)
