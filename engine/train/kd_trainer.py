"""The KD training step: a collator for tokenized pairs and a Trainer whose loss is the chunked KD loss.

Shared by `distill` (training) and `eval` (scoring held-out answers with the same masking and padding).
"""

from __future__ import annotations

import torch
from transformers import Trainer

from engine.train.kd_loss import FORWARD_KL, Divergence, chunked_kd_loss, sparse_kd_loss
from engine.train.on_policy import OnPolicy, generate_answers, response_tokens

BALANCE_FLOOR = 0.01
"""Below this share of the other, a weighted loss term is noise: `balance_warning` says so."""
WEIGHT_KEY = "train.distillation.knowledgedistillation.weight"


def kd_ce_ratio(ce_loss: float, kd_loss: float, weight: float) -> float | None:
    """w·T²·D / ((1 - w)·CE): the two terms as the loss weighs them (`kd_loss` already holds T²).

    None when one term is not in the loss at all (w = 0: the CE-only control; w = 1: KD only) or CE is 0.
    """
    ce_term = (1.0 - weight) * ce_loss
    if not 0.0 < weight < 1.0 or ce_term <= 0:
        return None
    return weight * kd_loss / ce_term


def balance_warning(ratio: float) -> str | None:
    """The warning for a KD/CE ratio where one weighted term is < 1 % of the other, naming the key to change:
    users' most common KD complaint is a weight that does nothing because the terms differ 100-1000x."""
    if ratio < BALANCE_FLOOR:
        return (
            f"the KD term w·T²·D is {ratio:.2%} of the CE term (1 - w)·CE: distillation barely changes the "
            f"student; raise {WEIGHT_KEY} (or knowledgedistillation.loss.temperature)"
        )
    if ratio > 1 / BALANCE_FLOOR:
        return (
            f"the CE term (1 - w)·CE is {1 / ratio:.2%} of the KD term w·T²·D: the answers' own tokens barely "
            f"count; lower {WEIGHT_KEY} (or knowledgedistillation.loss.temperature)"
        )
    return None


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
    """Trainer whose loss is the chunked, answer-only KD loss; logs ce_loss and kd_loss beside loss, and
    kd_ce_ratio, their ratio at the weight in use (`kd_ce_ratio`; EventsCallback warns once when it is off).

    Gradient accumulation: in training the Trainer passes `num_items_in_batch`, the response tokens of the
    whole accumulated batch (all micro-batches of the optimizer step, summed over the ranks), and takes the
    loss it gets back as already scaled for accumulation (`model_accepts_loss_kwargs`). So each
    micro-batch returns its CE and KL *sums* divided by that count (by 1 with reduction `sum`): summed over
    the micro-batches (and averaged over the ranks by DDP, hence the rank factor) this is the token mean of
    the whole step, for both terms, exactly what one micro-batch of the whole step would give. A
    per-micro-batch mean was counted `gradient_accumulation_steps` times over (issue 22): 2x gradients,
    clipping at half the norm.

    On-policy micro-batches (`on_policy`, engine.train.on_policy) swap the teacher's answers for the
    student's own samples and take the KD term alone. They keep the share of the step their original batch
    had: their KD sum is divided by their own response tokens and multiplied by the original's. `ce_loss`
    is logged over the batches that have a CE term (not at all in a window without one), `kd_loss` over
    all, `on_policy_share` (of the micro-batches) and `on_policy_gen_s` (seconds sampling) beside them;
    with on-policy batches in a step, `loss` is no longer `(1 - w)·ce_loss + w·kd_loss`.
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
        on_policy: OnPolicy | None = None,
        divergence: Divergence = FORWARD_KL,
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
        self.on_policy = on_policy if kd_weight > 0 else None  # the CE-only control has no teacher to score with
        self.on_policy_seconds = 0.0  # all sampling of this trainer, for the stage's log
        self._micro = (-1, 0)  # (optimizer step, micro-batches seen in it): which draw of on_policy.chooses
        self.divergence = divergence
        self._sums = self._no_sums()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight, share = self.kd_weight, 1.0
        if model.training and self._on_policy_now():
            original_tokens = response_tokens(inputs["labels"])
            generated = generate_answers(self.accelerator.unwrap_model(model), inputs, self.on_policy)
            device = inputs["labels"].device
            inputs = {key: value.to(device) for key, value in self.data_collator(generated.examples).items()}
            weight, share = 1.0, original_tokens / max(response_tokens(inputs["labels"]), 1)
            self.on_policy_seconds += generated.seconds
            self._sums["on_policy"] += 1
            self._sums["gen_s"] += generated.seconds
        labels = inputs["labels"]
        # through the wrapped model's own forward: DDP's gradient sync, DataParallel's scatter and the
        # autocast of bf16/fp16 training live there, not in the inner `model.model`
        student_hidden = last_hidden_state(model, inputs)
        student_head = whole_head_weight(self.accelerator.unwrap_model(model))
        reduction = self.reduction if num_items_in_batch is None else "sum"  # sums: see the class docstring
        if "teacher_ids" in inputs:  # a cached teacher (engine/train/teacher_cache.py): its sparse rows
            out = sparse_kd_loss(
                student_hidden,
                student_head,
                inputs["teacher_ids"],
                inputs["teacher_logprobs"],
                inputs["teacher_weights"],
                labels,
                weight=weight,
                temperature=self.temperature,
                reduction=reduction,
                chunk_size=self.chunk_size,
            )
        else:
            teacher_hidden = teacher_head = None
            if weight > 0:
                with torch.no_grad():
                    teacher_hidden = last_hidden_state(self.kd_teacher, inputs)
                teacher_head = self.kd_teacher.get_output_embeddings().weight
            out = chunked_kd_loss(
                student_hidden,
                student_head,
                teacher_hidden,
                teacher_head,
                labels,
                weight=weight,
                temperature=self.temperature,
                reduction=reduction,
                chunk_size=self.chunk_size,
                vocab_size=self.vocab_size,
                divergence=self.divergence,
            )
        step_share = self._share_of_step(num_items_in_batch)
        scale = step_share * (share if num_items_in_batch is not None else 1.0)
        loss = out.loss * scale
        if model.training:
            if self._sums["since"] is None:
                self._sums["since"] = self.state.global_step
            self._sums["kd_loss"] += float((out.kd_loss * scale).detach().mean())
            # this micro-batch's part of its step, to scale ce_loss up to the batches that had a CE term
            part = float(step_share * out.tokens * share) if num_items_in_batch is not None else 1.0
            self._sums["micro"] += 1
            self._sums["part"] += part
            if weight < 1:
                self._sums["ce_loss"] += float((out.ce_loss * scale).detach().mean())
                self._sums["ce_part"] += part
        return (loss, {"loss": loss}) if return_outputs else loss

    def _on_policy_now(self) -> bool:
        """Whether this training micro-batch is on-policy (the same draw on every rank, see OnPolicy.chooses)."""
        if self.on_policy is None:
            return False
        step, seen = self._micro
        self._micro = (self.state.global_step, seen + 1 if step == self.state.global_step else 0)
        return self.on_policy.chooses(*self._micro)

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
        parts = {"ce_loss": 0.0, "kd_loss": 0.0, "part": 0.0, "ce_part": 0.0}
        return {**parts, "since": None, "micro": 0, "on_policy": 0, "gen_s": 0.0}

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._sums["since"] is not None:
            # each step's parts add up to that step's loss: average them per optimizer step, as `loss` is
            steps = max(self.state.global_step - self._sums["since"], 1)
            logs["ce_loss"] = round(self._sums["ce_loss"] / steps, 6)
            logs["kd_loss"] = round(self._sums["kd_loss"] / steps, 6)
            if self.on_policy is not None:
                # ce_loss over the off-policy batches only (none in this window: not logged)
                if self._sums["ce_part"] > 0:
                    logs["ce_loss"] = round(logs["ce_loss"] * self._sums["part"] / self._sums["ce_part"], 6)
                else:
                    del logs["ce_loss"]
                logs["on_policy_share"] = round(self._sums["on_policy"] / max(self._sums["micro"], 1), 4)
                logs["on_policy_gen_s"] = round(self._sums["gen_s"], 3)
            ratio = kd_ce_ratio(logs.get("ce_loss", 0.0), logs["kd_loss"], self.kd_weight)
            if ratio is not None:
                logs["kd_ce_ratio"] = round(ratio, 6)
            self._sums = self._no_sums()
        super().log(logs, *args, **kwargs)
