"""The KD training step: a collator for tokenized pairs and a Trainer whose loss is the chunked KD loss.

Shared by `distill` (training) and `eval` (scoring held-out answers with the same masking and padding).
"""

from __future__ import annotations

import torch
from transformers import Trainer

from engine.train.kd_loss import chunked_kd_loss, sparse_kd_loss


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


def whole_head_weight(model) -> torch.Tensor:
    """The student's lm-head weight for the loss, which multiplies by it outside the model's forward: whole,
    also when FSDP2 shards the model (`train.distillation.fsdp`).

    Outside its unit's forward an FSDP2 parameter is this rank's shard (a DTensor), unless the unit keeps it
    gathered: accelerate 1.16 happens to keep its [final norm, (embeddings,) lm_head] unit gathered after the
    forward; releases before it resharded the head with the rest of the root, and the loss failed ("got
    mixed torch.Tensor and DTensor"). `unshard()` on the unit that owns the head (its own, else the root's)
    gathers it, a no-op when it is already gathered; the gradient the loss gives the gathered weight is
    reduce-scattered into the shards by FSDP's post-backward, like the forward's own.
    """
    from torch.distributed.fsdp import FSDPModule

    head = model.get_output_embeddings()
    owner = head if isinstance(head, FSDPModule) else model
    if isinstance(owner, FSDPModule):
        owner.unshard()
    return head.weight


class KDTrainer(Trainer):
    """Trainer whose loss is the chunked, answer-only KD loss; logs ce_loss and kd_loss beside loss.

    Gradient accumulation: in training the Trainer passes `num_items_in_batch`, the response tokens of the
    whole accumulated batch (all micro-batches of the optimizer step, summed over the ranks), and takes the
    loss it gets back as already scaled for accumulation (`model_accepts_loss_kwargs`). So each
    micro-batch returns its CE and KL *sums* divided by that count (by 1 with reduction `sum`): summed over
    the micro-batches (and averaged over the ranks by DDP, hence the rank factor) this is the token mean of
    the whole step, for both terms, exactly what one micro-batch of the whole step would give. A
    per-micro-batch mean was counted `gradient_accumulation_steps` times over (issue 22): 2x gradients,
    clipping at half the norm.
    """

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
        # compute_loss below takes num_items_in_batch, whatever the student's forward signature says
        self.model_accepts_loss_kwargs = True
        self.kd_teacher = kd_teacher
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.vocab_size = vocab_size
        self._sums = self._no_sums()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        # through the wrapped model's own forward: DDP's gradient sync, DataParallel's scatter and the
        # autocast of bf16/fp16 training live there, not in the inner `model.model`
        student_hidden = last_hidden_state(model, inputs)
        student_head = whole_head_weight(self.accelerator.unwrap_model(model))
        teacher_hidden = teacher_head = None
        if "teacher_ids" in inputs:  # a cached teacher (engine/train/teacher_cache.py): its sparse rows
            out = sparse_kd_loss(
                student_hidden,
                student_head,
                inputs["teacher_ids"],
                inputs["teacher_logprobs"],
                inputs["teacher_weights"],
                labels,
                weight=self.kd_weight,
                temperature=self.temperature,
                reduction=self.reduction if num_items_in_batch is None else "sum",
                chunk_size=self.chunk_size,
            )
            return self._reported(model, out, num_items_in_batch, return_outputs)
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
            reduction=self.reduction if num_items_in_batch is None else "sum",
            chunk_size=self.chunk_size,
            vocab_size=self.vocab_size,
        )
        return self._reported(model, out, num_items_in_batch, return_outputs)

    def _reported(self, model, out, num_items_in_batch, return_outputs):
        """This micro-batch's share of the step's loss; its parts summed for the next log."""
        scale = self._share_of_step(num_items_in_batch)
        loss = out.loss * scale
        if model.training:
            if self._sums["since"] is None:
                self._sums["since"] = self.state.global_step
            self._sums["ce_loss"] += float((out.ce_loss * scale).detach().mean())
            self._sums["kd_loss"] += float((out.kd_loss * scale).detach().mean())
        return (loss, {"loss": loss}) if return_outputs else loss

    def _share_of_step(self, num_items_in_batch) -> float | torch.Tensor:
        """The factor from this micro-batch's sums to its share of the step's loss (see the class docstring).

        Without `num_items_in_batch` (a direct call) the loss is already this batch's own reduction: 1.
        """
        if num_items_in_batch is None:
            return 1.0
        ranks = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        if self.reduction == "sum":
            return float(ranks)
        return ranks / num_items_in_batch

    @staticmethod
    def _no_sums() -> dict:
        """The logged parts since the last log, and the optimizer step they started at."""
        return {"ce_loss": 0.0, "kd_loss": 0.0, "since": None}

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._sums["since"] is not None:
            # each step's parts add up to that step's loss: average them per optimizer step, as `loss` is
            steps = max(self.state.global_step - self._sums["since"], 1)
            logs["ce_loss"] = round(self._sums["ce_loss"] / steps, 6)
            logs["kd_loss"] = round(self._sums["kd_loss"] / steps, 6)
            self._sums = self._no_sums()
        super().log(logs, *args, **kwargs)
