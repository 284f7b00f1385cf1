"""The KD training step: a collator for tokenized pairs and a Trainer whose loss is the chunked KD loss.

Shared by `distill` (training) and `eval` (scoring held-out answers with the same masking and padding).
"""

from __future__ import annotations

import torch
from transformers import Trainer

from engine.train.kd_loss import chunked_kd_loss


class KDCollator:
    """Right-pads input_ids, masks padding in labels (-100) and attention."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def last_hidden_state(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final (normed) hidden states from a causal LM's top-level forward, without full-vocab logits.

    `logits_to_keep=1` makes the model compute the logits of the last position only; the loss computes
    the rest in chunks from these hidden states (engine.train.kd_loss).
    """
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    return out.hidden_states[-1]


class KDTrainer(Trainer):
    """Trainer whose loss is the chunked, answer-only KD loss; logs ce_loss and kd_loss beside loss."""

    def __init__(
        self,
        *args,
        kd_teacher,
        kd_weight: float,
        temperature: float,
        reduction: str,
        chunk_size: int,
        vocab_size: int,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.kd_teacher = kd_teacher
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.vocab_size = vocab_size
        self._sums = {"ce_loss": 0.0, "kd_loss": 0.0, "n": 0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        # through the wrapped model's own forward: DDP's gradient sync, DataParallel's scatter and the
        # autocast of bf16/fp16 training live there, not in the inner `model.model`
        student_hidden = last_hidden_state(model, inputs)
        student_head = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        teacher_hidden = teacher_head = None
        if self.kd_weight > 0:
            with torch.no_grad():
                teacher_hidden = last_hidden_state(self.kd_teacher, inputs)
            teacher_head = self.kd_teacher.get_output_embeddings().weight
        out = chunked_kd_loss(
            student_hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            labels,
            weight=self.kd_weight,
            temperature=self.temperature,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
            vocab_size=self.vocab_size,
        )
        if model.training:
            self._sums["ce_loss"] += float(out.ce_loss.detach())
            self._sums["kd_loss"] += float(out.kd_loss.detach())
            self._sums["n"] += 1
        return (out.loss, {"loss": out.loss}) if return_outputs else out.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._sums["n"]:
            logs["ce_loss"] = round(self._sums["ce_loss"] / self._sums["n"], 6)
            logs["kd_loss"] = round(self._sums["kd_loss"] / self._sums["n"], 6)
            self._sums = {"ce_loss": 0.0, "kd_loss": 0.0, "n": 0}
        super().log(logs, *args, **kwargs)
