"""On-policy distillation: a share of the training batches uses answers the student samples itself.

Heavy module (torch): import it only in worker processes and tests.

Why: off-policy KD teaches the student on the teacher's text only, but at inference the student continues
its *own* tokens, and one early mistake takes it where it never saw the teacher (exposure bias). On a
sequence the student sampled, the KD teacher's distribution at every position says how to go on from where
the student actually went (GKD, Agarwal et al. 2024, TRL's `lmbda`; Thinking Machines' on-policy
distillation).

What happens to a chosen micro-batch (`train.distillation.knowledgedistillation.on_policy`):
1. each row's prompt is its tokens before the first answer label (the KD collator labels answers only);
2. the student samples up to `max_new_tokens` from the prompts (left-padded, at `temperature`), in eval
   mode and without gradients;
3. each row becomes prompt + sampled answer, cut after the first end-of-turn token, answer tokens
   labelled, laid out by the KD collator as a teacher answer would be;
4. the loss of that batch is the KD term alone (`engine.train.kd_trainer`): CE on the student's own sample
   would only teach it to repeat itself.

Which micro-batches: a seeded draw per (optimizer step, micro-batch), so every rank makes the same choice
(DDP and FSDP ranks stay in step) and a resumed run makes the choices the interrupted one would have.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OnPolicy:
    """The on-policy settings of one training run."""

    lmbda: float  # the share of micro-batches the student generates
    max_new_tokens: int
    temperature: float
    seed: int
    pad_id: int
    stop_ids: frozenset[int]  # end-of-turn tokens: an answer ends after the first

    def chooses(self, step: int, micro: int) -> bool:
        """Whether micro-batch `micro` of optimizer step `step` is on-policy: the same on every rank."""
        if self.lmbda <= 0:
            return False
        if self.lmbda >= 1:
            return True
        return random.Random(f"{self.seed}:{step}:{micro}").random() < self.lmbda


def prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Each row's prompt: its tokens before the first labelled one (a row without labels: all its tokens),
    without the collator's right padding."""
    rows = []
    for ids, mask, row_labels in zip(input_ids.tolist(), attention_mask.tolist(), labels.tolist()):
        length = sum(mask)
        first = next((i for i, label in enumerate(row_labels[:length]) if label != -100), length)
        rows.append(ids[:first])
    return rows


def answer_tokens(sampled: list[int], stop_ids: frozenset[int]) -> list[int]:
    """The sampled answer up to and including the first stop token (what follows is generate's padding)."""
    for i, token in enumerate(sampled):
        if token in stop_ids:
            return sampled[: i + 1]
    return sampled


@dataclass
class GeneratedBatch:
    examples: list[dict[str, list[int]]]  # prompt + sampled answer, answer labelled: the collator's input
    seconds: float  # time spent sampling


@torch.no_grad()
def generate_answers(model, inputs: dict[str, torch.Tensor], settings: OnPolicy) -> GeneratedBatch:
    """Steps 1-3 above with `model`, the unwrapped student (under DDP its module; under FSDP2 the sharded
    model itself, whose forward gathers each unit: every rank must then run the same number of forwards,
    hence `synced_gpus`)."""
    started = time.monotonic()
    rows = prompts(inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    width = max(len(row) for row in rows)
    device = inputs["input_ids"].device
    batch = torch.full((len(rows), width), settings.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):  # left-padded: generation continues each row at the same column
        if row:
            batch[i, width - len(row) :] = torch.tensor(row, device=device)
            mask[i, width - len(row) :] = 1
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    was_training = model.training
    model.eval()  # no dropout while sampling; gradient checkpointing (training-only) off, the KV cache on
    try:
        out = model.generate(
            input_ids=batch,
            attention_mask=mask,
            do_sample=True,
            temperature=settings.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=settings.pad_id,
            eos_token_id=sorted(settings.stop_ids),
            synced_gpus=distributed and torch.distributed.get_world_size() > 1,
            use_cache=True,
        )
    finally:
        model.train(was_training)
    examples = []
    for row, sampled in zip(rows, out[:, width:].tolist()):
        answer = answer_tokens(sampled, settings.stop_ids)
        examples.append({"input_ids": row + answer, "labels": [-100] * len(row) + answer})
    return GeneratedBatch(examples, time.monotonic() - started)


def response_tokens(labels: torch.Tensor) -> int:
    """The positions the KD loss counts: those whose next-token label is an answer token."""
    return int((labels[:, 1:] != -100).sum())
