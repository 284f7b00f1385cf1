"""Diagnostics of a KD training: the CE/KD balance logged at the weight in use, its warning (once), and the
tokenizers' special tokens compared before training."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.train.callbacks import EventsCallback
from engine.train.kd_trainer import WEIGHT_KEY, balance_warning, kd_ce_ratio


def test_ratio_is_the_weighted_kd_term_over_the_weighted_ce_term():
    assert kd_ce_ratio(ce_loss=2.0, kd_loss=0.5, weight=0.2) == pytest.approx(0.2 * 0.5 / (0.8 * 2.0))
    assert kd_ce_ratio(2.0, 0.5, 0.0) is None  # the CE-only control: no KD term
    assert kd_ce_ratio(2.0, 0.5, 1.0) is None  # KD only: no CE term
    assert kd_ce_ratio(0.0, 0.5, 0.5) is None


def test_balance_warning_names_the_key_when_one_term_is_under_one_percent():
    assert balance_warning(0.02) is None and balance_warning(1.0) is None and balance_warning(60.0) is None
    small = balance_warning(0.004)
    assert "0.40% of the CE term" in small and f"raise {WEIGHT_KEY}" in small
    large = balance_warning(500.0)
    assert "0.20% of the KD term" in large and f"lower {WEIGHT_KEY}" in large


class Events:
    def __init__(self):
        self.logs: list[tuple[str, str]] = []
        self.metrics: dict[str, float] = {}

    def metric(self, name, value, step=None):
        self.metrics[name] = value

    def log(self, msg, level="info"):
        self.logs.append((level, msg))


def test_events_callback_logs_the_ratio_and_warns_once():
    events = Events()
    callback = EventsCallback(SimpleNamespace(is_main=True, events=events))
    for step, ratio in enumerate([0.5, 0.003, 0.002, 0.5], start=1):
        callback.on_log(None, SimpleNamespace(global_step=step), None, logs={"loss": 1.0, "kd_ce_ratio": ratio})
    assert events.metrics["kd_ce_ratio"] == 0.5
    warnings = [msg for level, msg in events.logs if level == "warning"]
    assert len(warnings) == 1 and warnings[0].startswith("step 2: the KD term") and WEIGHT_KEY in warnings[0]


def test_special_token_differences_name_the_role_and_both_ids():
    from engine.models.loading import load_tokenizer
    from engine.train.student import special_token_differences

    assistant = load_tokenizer("tiny:assistant")
    assert special_token_differences(assistant, load_tokenizer("tiny:assistant")) == []
    student = load_tokenizer("tiny:assistant")
    student.eos_token = "<|endoftext|>"
    student.chat_template = None
    eos, template = special_token_differences(assistant, student)
    assert eos.startswith("eos_token: assistant.model.name ") and "'<|im_end|>'" in eos and "'<|endoftext|>'" in eos
    assert template == (
        "chat-template special tokens: assistant.model.name ['<|im_end|>', '<|im_start|>'], student.base_model_name []"
    )


@pytest.mark.train
def test_a_kd_step_with_a_chosen_divergence_logs_its_terms_and_their_ratio(tmp_path):
    """The divergence reaches the trainer's loss (jsd differs from forward KL) and the ratio is logged."""
    import torch

    from engine.models.loading import load_causal_lm, load_tokenizer
    from engine.train.kd_loss import Divergence
    from tests.helpers import kd_examples, tiny_kd_trainer

    tokenizer = load_tokenizer("tiny:assistant", padding_side="right")
    teacher = load_causal_lm("tiny:assistant", dtype=torch.float32).eval().requires_grad_(False)
    examples = kd_examples(tokenizer, ("return sorted(xs)", "return xs[::-1]", "return max(xs)", "return len(xs)"))
    logs = {}
    for name in ("forward_kl", "jsd"):
        torch.manual_seed(0)
        student = load_causal_lm("tiny:student", dtype=torch.float32)
        trainer = tiny_kd_trainer(
            tmp_path / name,
            examples,
            student,
            teacher,
            tokenizer.pad_token_id,
            max_steps=1,
            per_device_train_batch_size=4,
            seed=0,
            kd_weight=0.5,
            chunk_size=16,
            vocab_size=len(tokenizer),
            divergence=Divergence(name, beta=0.5),
        )
        trainer.train()
        logs[name] = next(log for log in trainer.state.log_history if "kd_ce_ratio" in log)
    for log in logs.values():
        assert log["kd_ce_ratio"] == pytest.approx(log["kd_loss"] / log["ce_loss"], rel=1e-4)  # w = 0.5
    assert logs["jsd"]["ce_loss"] == pytest.approx(logs["forward_kl"]["ce_loss"])
    assert logs["jsd"]["kd_loss"] < logs["forward_kl"]["kd_loss"]  # JSD(0.5) is bounded by log 2 · T²
