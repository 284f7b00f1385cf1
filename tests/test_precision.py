"""bf16 is honoured in the KD step: the student's forward goes through the Trainer's wrapped forward,
where autocast lives (calling the inner `model.model` ran in float32 whatever the config said)."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from engine.models.loading import load_causal_lm, load_tokenizer
from engine.train.kd_trainer import KDCollator, KDTrainer


@pytest.mark.parametrize("bf16", [True, False])
def test_kd_step_runs_the_student_in_the_configured_precision(tmp_path, bf16: bool):
    tokenizer = load_tokenizer("tiny:assistant", padding_side="right")
    student = load_causal_lm("tiny:assistant", dtype=torch.float32)
    teacher = load_causal_lm("tiny:assistant", dtype=torch.float32).eval().requires_grad_(False)
    seen: list[torch.dtype] = []
    # a matmul inside the student's forward: autocast decides its output dtype (norms upcast to float32
    # by design, so the final hidden state would not tell)
    projection = student.model.layers[0].mlp.down_proj
    projection.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    ids = tokenizer("def add(a, b):\n    return a + b")["input_ids"]
    examples = [{"input_ids": ids, "labels": [-100] * 4 + ids[4:]} for _ in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        use_cpu=True,
        bf16=bf16,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        remove_unused_columns=False,
        logging_steps=1,
    )
    trainer = KDTrainer(
        model=student,
        args=args,
        train_dataset=examples,
        data_collator=KDCollator(tokenizer.pad_token_id),
        kd_teacher=teacher,
        kd_weight=0.5,
        temperature=2.0,
        reduction="batchmean",
        chunk_size=64,
        vocab_size=teacher.config.vocab_size,
    )
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16 if bf16 else torch.float32}
    assert all(torch.isfinite(p).all() for p in student.parameters())
