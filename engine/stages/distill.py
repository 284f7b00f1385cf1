"""Stage `distill`: token-level knowledge distillation from the (fine-tuned) assistant into a student.

Recipe, top to bottom:
1. the KD teacher: the assistant (`assistant.model.name`, 4-bit when `assistant.quantization.load_in_4bit`)
   with the `sft` stage's LoRA adapter from `train.sft.save_path` (without one: the base assistant);
2. the student: a Qwen2 model built from `student.*` with the assistant's tokenizer and vocab
   (`train.distillation.student_init`: random, or a subset of the assistant's layers); the tokenizers of
   `student.base_model_name` and the assistant must match (checked before any training);
3. the teacher answers as chat examples, split exactly as `sft` split them, loss on the answer only;
4. HF Trainer with loss = (1 - w)·CE + w·T²·KL over answer tokens only, computed in chunks from the
   last hidden states (engine/kd_loss.py), so the logits of a whole batch never sit in memory at once;
5. the student (+ tokenizer) saved to `train.distillation.output_dir`.

With `train.distillation.ce_only_control`, the same student (same init, data, steps) is then trained
with CE only into `<output_dir>_ce`: the control that says whether KD helped. Checkpoints live in
`<output_dir>/checkpoints`; re-running resumes; SIGTERM saves and ends `cancelled`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from engine.train.pairs import ChatDataError, load_pairs, split_pairs, tokenize_pair
from engine.train.kd_loss import chunked_kd_loss
from engine.models.loading import load_causal_lm, load_tokenizer
from engine.models.device import pick_device
from engine.stages.sft import quantization_config
from engine.train.student import build_student, check_vocab_compatibility
from engine.train.callbacks import CancelCallback, EventsCallback, mark_completed, precision, report_to, train_resumable
from engine.runner.context import StageContext, StageError


def load_kd_teacher(ctx: StageContext, device: torch.device):
    """The assistant with its SFT adapter, frozen, in eval mode; plus its tokenizer."""
    config = ctx.config
    name = config.assistant.model.name
    quant = quantization_config(ctx)
    model = load_causal_lm(
        name,
        key="assistant.model.name",
        quantization_config=quant,
        dtype=None if quant else torch.float32,
        device_map={"": device} if quant else None,
    )
    adapter = Path(config.train.sft.save_path)
    if (adapter / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).get_base_model()  # LoRA layers stay injected
        ctx.events.log(f"KD teacher: {name} + SFT adapter {adapter}")
    else:
        ctx.events.log(f"no SFT adapter in {adapter} (train.sft.save_path): distilling from the base assistant",
                       level="warning")
    if not quant:
        model = model.to(device)
    model.eval().requires_grad_(False)
    return model, load_tokenizer(name, key="assistant.model.name", padding_side="right")


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


class KDTrainer(Trainer):
    """Trainer whose loss is the chunked, answer-only KD loss; logs ce_loss and kd_loss beside loss."""

    def __init__(self, *args, kd_teacher, kd_weight: float, temperature: float, reduction: str,
                 chunk_size: int, vocab_size: int, **kwargs):
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
        student_hidden = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        teacher_hidden = teacher_head = None
        if self.kd_weight > 0:
            with torch.no_grad():
                teacher_hidden = self.kd_teacher.model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).last_hidden_state
            teacher_head = self.kd_teacher.get_output_embeddings().weight
        out = chunked_kd_loss(
            student_hidden, model.lm_head.weight, teacher_hidden, teacher_head, labels,
            weight=self.kd_weight, temperature=self.temperature, reduction=self.reduction,
            chunk_size=self.chunk_size, vocab_size=self.vocab_size,
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


def run(ctx: StageContext) -> None:
    config = ctx.config
    kd = config.train.distillation
    device = pick_device(config)

    # 1. KD teacher (the fine-tuned assistant) and the tokenizer check
    teacher, tokenizer = load_kd_teacher(ctx, device)
    student_tokenizer = load_tokenizer(config.student.base_model_name, key="student.base_model_name")
    try:
        vocab = check_vocab_compatibility(tokenizer, student_tokenizer, teacher.config.vocab_size, teacher.config.vocab_size)
    except ValueError as exc:
        raise StageError(str(exc)) from None

    # 3. data, split as sft split it
    try:
        pairs = load_pairs(config.teacher.base.output_path)
    except ChatDataError as exc:
        raise StageError(str(exc)) from None
    system = ctx.system_prompt("Assistant")
    split = config.train.sft.dataset
    train_pairs, eval_pairs = split_pairs(pairs, split.test_size, split.seed)
    max_length = min(kd.max_length, config.student.max_position_embeddings)
    train_set = [tokenize_pair(tokenizer, p, system, max_length) for p in train_pairs]
    eval_set = [tokenize_pair(tokenizer, p, system, max_length) for p in eval_pairs]
    tokens_per_step = (sum(len(e["input_ids"]) for e in train_set) / max(len(train_set), 1)
                       * kd.per_device_train_batch_size * kd.gradient_accumulation_steps)

    runs = [("KD student", Path(kd.output_dir), kd.knowledgedistillation.weight, "")]
    if kd.ce_only_control:
        runs.append(("CE-only control student", Path(f"{kd.output_dir}_ce"), 0.0, "control/"))
    for label, output_dir, weight, prefix in runs:
        ctx.check_cancelled()
        # 2. a fresh student, the same one for both runs
        try:
            student = build_student(config.student, teacher, tokenizer, init=kd.student_init)
        except ValueError as exc:
            raise StageError(str(exc)) from None
        student.to(device)
        params = sum(p.numel() for p in student.parameters())
        ctx.events.log(f"{label}: {params / 1e6:.2f}M parameters, init {kd.student_init}, KD weight {weight}, "
                       f"T={kd.knowledgedistillation.loss.temperature}; {len(train_set)} train / {len(eval_set)} eval")
        train_one(ctx, label, student, teacher, tokenizer, train_set, eval_set, output_dir, weight, vocab,
                  tokens_per_step, device, prefix)


def train_one(ctx: StageContext, label: str, student, teacher, tokenizer, train_set: list[dict[str, Any]],
              eval_set: list[dict[str, Any]], output_dir: Path, weight: float, vocab: int,
              tokens_per_step: float, device: torch.device, prefix: str) -> None:
    """4 + 5: train one student into output_dir, resuming from its newest checkpoint."""
    kd = ctx.config.train.distillation
    checkpoints = output_dir / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=kd.num_train_epochs,
        max_steps=kd.max_steps,
        per_device_train_batch_size=kd.per_device_train_batch_size,
        per_device_eval_batch_size=kd.per_device_train_batch_size,
        gradient_accumulation_steps=kd.gradient_accumulation_steps,
        learning_rate=kd.learning_rate,
        eval_strategy=kd.eval_strategy,
        logging_steps=max(1, min(ctx.config.train.sft.logging_steps, 50)),
        save_steps=kd.save_steps,
        save_total_limit=2,
        report_to=report_to(ctx, kd.report_to),
        run_name=kd.run_name,
        use_cpu=device.type == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=ctx.config.train.sft.dataset.seed,
        **precision(ctx, kd.bf16, False, device.type),
    )
    cancel = CancelCallback(ctx)
    trainer = KDTrainer(
        model=student,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set if kd.eval_strategy != "no" else None,
        data_collator=KDCollator(tokenizer.pad_token_id),
        callbacks=[EventsCallback(ctx, tokens_per_step, prefix), cancel],
        kd_teacher=teacher,
        kd_weight=weight,
        temperature=kd.knowledgedistillation.loss.temperature,
        reduction=kd.knowledgedistillation.loss.reduction,
        chunk_size=kd.loss_chunk_size,
        vocab_size=vocab,
    )
    train_resumable(ctx, trainer, cancel, checkpoints, "train.distillation.per_device_train_batch_size",
                    kd.per_device_train_batch_size, kd.overwrite_output_dir, "train.distillation.overwrite_output_dir",
                    label)
    student.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    mark_completed(checkpoints)
    ctx.events.artifact(output_dir, label)
