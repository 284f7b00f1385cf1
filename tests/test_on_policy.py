"""On-policy distillation (train.distillation.knowledgedistillation.on_policy): which micro-batches, what the
student's sampled batch looks like, that the loss of such a batch is the KD term on the student's own
answer as the teacher scores it, and that it runs under 2 gloo ranks, DDP and FSDP."""

from __future__ import annotations

import pytest
import torch

from engine.config.load import load_config
from engine.train import kd_trainer
from engine.train.on_policy import OnPolicy, answer_tokens, prompts, response_tokens

from .helpers import TINY_CONFIG, kd_examples, tiny_kd_trainer
from .test_fsdp import kd_steps


def settings(lmbda: float, seed: int = 0) -> OnPolicy:
    return OnPolicy(lmbda, max_new_tokens=8, temperature=1.0, seed=seed, pad_id=0, stop_ids=frozenset({2}))


def test_the_choice_is_a_seeded_share_the_same_on_every_rank():
    draws = [settings(0.3).chooses(step, micro) for step in range(500) for micro in range(2)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    # another process (another rank, or the run resumed) draws the same
    assert draws == [settings(0.3).chooses(step, micro) for step in range(500) for micro in range(2)]
    assert draws != [settings(0.3, seed=1).chooses(step, micro) for step in range(500) for micro in range(2)]
    assert not any(settings(0.0).chooses(s, 0) for s in range(50))
    assert all(settings(1.0).chooses(s, 0) for s in range(50))


def test_prompts_are_the_tokens_before_the_first_answer_label_without_padding():
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [5, 9, 10, 11, 12, 13], [5, 6, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, -100, -100], [-100, -100, -100, 11, 12, 13], [-100] * 6])
    assert prompts(ids, mask, labels) == [[5, 6], [5, 9, 10], [5, 6]]
    assert response_tokens(labels) == 5


def test_a_sampled_answer_ends_after_its_first_stop_token():
    assert answer_tokens([4, 5, 2, 0, 0], frozenset({2, 3})) == [4, 5, 2]
    assert answer_tokens([4, 3, 2], frozenset({2, 3})) == [4, 3]
    assert answer_tokens([4, 5, 6], frozenset({2})) == [4, 5, 6]  # cut by max_new_tokens


def test_the_config_key_validates_and_names_itself():
    from engine.config.errors import ConfigError
    from engine.config.keys import set_key

    config = load_config(TINY_CONFIG)
    assert config.train.distillation.knowledgedistillation.on_policy.lmbda == 0  # off by default: today's KD
    set_key(config, "train.distillation.knowledgedistillation.on_policy.lmbda", "0.5")
    assert config.train.distillation.knowledgedistillation.on_policy.lmbda == 0.5
    with pytest.raises((ConfigError, ValueError), match="lmbda"):
        set_key(config, "train.distillation.knowledgedistillation.on_policy.lmbda", "1.5")


@pytest.mark.train
def test_an_on_policy_step_is_the_kd_term_on_the_students_own_answers(tmp_path, monkeypatch):
    """λ = 1: the logged loss of the one step is T²·KL(teacher ‖ student) over the answers the student
    sampled (recorded as they are made), from the prompts of the teacher's answers: not the CE mix of them."""
    from engine.models.loading import load_causal_lm, load_tokenizer, stop_token_ids
    from engine.stages.distill import on_policy_settings
    from engine.train.kd_loss import kd_loss_reference

    from .test_kd_accumulation import ANSWERS

    torch.manual_seed(0)
    tokenizer = load_tokenizer("tiny:assistant", padding_side="right")
    student = load_causal_lm("tiny:student", dtype=torch.float32)
    teacher = load_causal_lm("tiny:assistant", dtype=torch.float32).eval().requires_grad_(False)
    config = load_config(TINY_CONFIG).train.distillation
    config.knowledgedistillation.on_policy.lmbda = 1.0
    config.knowledgedistillation.on_policy.max_new_tokens = 10
    on_policy = on_policy_settings(config, tokenizer, student)
    assert on_policy.stop_ids == frozenset(stop_token_ids(tokenizer, student))
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in on_policy.stop_ids  # ends where a chat reply does

    prompt = tokenizer("def f(xs):\n    ")["input_ids"]
    examples = kd_examples(tokenizer, ANSWERS[:4])

    sampled = []

    def recorded(model, inputs, settings):
        batch = generate(model, inputs, settings)
        sampled.append(batch)
        return batch

    generate = kd_trainer.generate_answers
    monkeypatch.setattr(kd_trainer, "generate_answers", recorded)
    before = {name: p.detach().clone() for name, p in student.state_dict().items()}
    trainer = tiny_kd_trainer(
        tmp_path,
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
        on_policy=on_policy,
    )
    trainer.train()
    log = next(log for log in trainer.state.log_history if "grad_norm" in log)
    assert log["on_policy_share"] == 1.0 and log["on_policy_gen_s"] > 0 and "ce_loss" not in log

    [batch] = sampled
    for example in batch.examples:  # the teacher answers' prompt, then the student's own answer
        assert example["input_ids"][: len(prompt)] == prompt
        answer = example["input_ids"][len(prompt) :]
        assert example["labels"] == [-100] * len(prompt) + answer and 0 < len(answer) <= 10
        assert not any(token in on_policy.stop_ids for token in answer[:-1])
    assert [e["input_ids"][len(prompt) :] for e in batch.examples] != [e["input_ids"][len(prompt) :] for e in examples]

    student.load_state_dict(before)  # the weights the step's loss was computed with
    inputs = trainer.data_collator(batch.examples)
    with torch.no_grad():
        want = kd_loss_reference(
            student(**{k: inputs[k] for k in ("input_ids", "attention_mask")}).logits,
            teacher(**{k: inputs[k] for k in ("input_ids", "attention_mask")}).logits,
            inputs["labels"],
            weight=1.0,
            temperature=2.0,
            reduction="batchmean",
            vocab_size=len(tokenizer),
        )
    assert log["loss"] == pytest.approx(float(want.loss), rel=1e-3)
    assert log["kd_loss"] == pytest.approx(float(want.kd_loss), rel=1e-3)


@pytest.mark.e2e
@pytest.mark.parametrize("flags", [(), ("--fsdp",)], ids=["ddp", "fsdp"])
def test_on_policy_steps_run_on_two_gloo_ranks(tmp_path, flags):
    """Ranks sample answers of different lengths: under FSDP every rank must still run the same number of
    forwards (synced generation), or the step hangs; the draw of on-policy batches is the same on each."""
    steps = kd_steps(tmp_path, *flags, "--on-policy", "1.0", ranks=2)["steps"]
    assert len(steps) == 2
    for step in steps:
        assert step["on_policy_share"] == 1.0 and step["on_policy_gen_s"] > 0
        assert step["loss"] == step["loss"] and step["loss"] > 0


def test_on_policy_batches_and_a_cached_teacher_refuse_each_other():
    """The student's own samples need the live assistant to score them; a cache holds the teacher answers'."""
    import yaml

    from engine.config.errors import ConfigError
    from engine.config.load import parse_config

    data = yaml.safe_load(TINY_CONFIG.read_text())
    kd = data["train"]["distillation"]["knowledgedistillation"]
    kd["on_policy"] = {"lmbda": 0.5}
    kd["teacher_cache"] = {"mode": "topk"}
    with pytest.raises(ConfigError, match=r"teacher_cache\.mode 'topk' and on_policy\.lmbda 0\.5 do not go together"):
        parse_config(yaml.safe_dump(data), source="tiny.yaml")
    kd["teacher_cache"] = {"mode": "off"}
    assert (
        parse_config(yaml.safe_dump(data), source="tiny.yaml").train.distillation.knowledgedistillation.on_policy.lmbda
        == 0.5
    )
