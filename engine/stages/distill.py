"""Stage `distill`: token-level knowledge distillation from the (fine-tuned) assistant into a student.

Recipe, top to bottom:
1. the KD teacher: the assistant (`assistant.model.name`, 4-bit when `assistant.quantization.load_in_4bit`)
   with the `sft` stage's LoRA adapter from `train.sft.save_path` (without one: the base assistant); the
   tokenizers of `student.base_model_name` and the assistant must match (checked before any training);
2. the student (`train.distillation.student_init`): `pretrained` loads `student.base_model_name`'s weights
   (a smaller model of the assistant's family); `random` builds a Qwen2 model from `student.*` with the
   assistant's vocab; `assistant_layers` copies a subset of the assistant's layers (SFT adapter merged,
   4-bit dequantized). With `train.distillation.peft`, only LoRA adapters on it are trained;
3. the teacher answers as chat examples, split exactly as `sft` split them, loss on the answer only;
4. HF Trainer with loss = (1 - w)·CE + w·T²·KL over answer tokens only, computed in chunks from the
   last hidden states (engine/train/kd_loss.py), so the logits of a whole batch never sit in memory at
   once; KD compares the tokenizer's columns, each model keeping its own (padded) embedding size. With
   `train.distillation.fsdp` (several GPUs) the Trainer shards the student with FSDP2 (each rank keeps 1/N
   of its weights, gradients and optimizer state; the KD teacher stays whole on every rank);
5. the student (+ tokenizer) saved to `train.distillation.output_dir` as a plain model folder (LoRA
   adapters merged in), which `eval` and the chat load like any checkpoint.

With `train.distillation.knowledgedistillation.teacher_cache.mode` topk or sampled the assistant is not loaded
to train: one pass of it over the answers writes its sparse distribution under the run (engine/train/
teacher_cache.py, reused on resume while its fingerprint holds) and the KD term reads that
(engine.train.kd_loss.sparse_kd_loss).

With `train.distillation.ce_only_control`, the same student (same init, data, steps) is then trained
with CE only into `<output_dir>_ce`: the control that says whether KD helped. Checkpoints live in
`<output_dir>/checkpoints`; re-running resumes (a stage stopped during the control keeps the KD student
it trained and resumes the control); SIGTERM saves and ends `cancelled`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from engine.models.device import pick_device, pick_dtype
from engine.models.loading import load_tokenizer, stop_token_ids
from engine.pipeline.models import STUDENT_CE, STUDENT_KD
from engine.runner.context import StageContext, StageError
from engine.train.arguments import one_gpu, save_trained, sharding, trainer_arguments
from engine.train.assistant import load_tuned_assistant
from engine.train.callbacks import COMPLETED, CancelCallback, EventsCallback, train_resumable
from engine.train.kd_loss import Divergence
from engine.train.kd_trainer import KDCollator, KDTrainer
from engine.train.on_policy import OnPolicy
from engine.train.pairs import load_split_pairs, tokenize_pair
from engine.train.student import (
    build_student,
    check_same_tokenizer,
    check_vocab_compatibility,
    embedding_rows,
    special_token_differences,
    token_columns,
    trained_student,
    with_lora,
)
from engine.train.teacher_cache import CachedKDCollator, TeacherCache, assistant_stand_in, prepare_cache


def run(ctx: StageContext) -> None:
    config = ctx.config
    kd = config.train.distillation
    device = pick_device(config)
    if kd.fsdp and device.type != "cuda":
        # accelerate shards on GPUs only: on CPU ranks it would silently keep a whole student on each
        raise StageError(f"train.distillation.fsdp shards the student over GPUs; this stage runs on {device.type}")

    # 3. data, split as sft split it; read first, so a missing answers file fails before any model loads
    train_pairs, eval_pairs, system = load_split_pairs(ctx)

    # 1. KD teacher (the fine-tuned assistant) and the tokenizer check; a cached teacher (teacher_cache.mode)
    # is read from a file made once per run, and the assistant is not loaded for training
    cached = kd.knowledgedistillation.teacher_cache.mode != "off"
    if cached:
        teacher = None
        tokenizer = load_tokenizer(config.assistant.model.name, key="assistant.model.name", padding_side="right")
    else:
        teacher, tokenizer = load_tuned_assistant(ctx, device)
    student_tokenizer = load_tokenizer(config.student.base_model_name, key="student.base_model_name")
    try:
        check_same_tokenizer(tokenizer, student_tokenizer)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    for difference in special_token_differences(tokenizer, student_tokenizer):
        ctx.events.log(f"the tokenizers' special tokens differ: {difference}", level="warning")

    # the data as token ids, now that the tokenizer is loaded
    max_length = min(kd.max_length, config.student.max_position_embeddings)
    train_set = [tokenize_pair(tokenizer, p, system, max_length) for p in train_pairs]
    eval_set = [tokenize_pair(tokenizer, p, system, max_length) for p in eval_pairs]
    tokens_per_step = (
        sum(len(e["input_ids"]) for e in train_set)
        / max(len(train_set), 1)
        * kd.per_device_train_batch_size
        * kd.gradient_accumulation_steps
    )

    cache = None
    if cached:
        cache = prepare_cache(ctx, tokenizer, train_set + eval_set, token_columns(tokenizer), device)
        for row, example in enumerate(train_set + eval_set):
            example["cache_row"] = row
    assistant = teacher if teacher is not None else assistant_stand_in(config.assistant.model.name)
    assistant_rows = embedding_rows(teacher) if teacher is not None else cache.assistant_rows

    runs = [(STUDENT_KD.title, STUDENT_KD.output(config), kd.knowledgedistillation.weight, "")]
    if STUDENT_CE.enabled(config):
        runs.append((STUDENT_CE.title, STUDENT_CE.output(config), 0.0, "control/"))
    # A stage stopped during the CE-only control resumes there: the KD student this run trained to the end is
    # kept (train_resumable would refuse it, or with overwrite_output_dir train it again from step 0). Only
    # once every student is trained to the end does a re-run mean training again.
    done = [finished_in_this_run(ctx, output_dir) for _, output_dir, _, _ in runs]
    for index, (label, output_dir, weight, prefix) in enumerate(runs):
        ctx.check_cancelled()
        if done[index] and not all(done):
            ctx.events.log(f"{label}: trained to the end in {output_dir} by this run; kept, not trained again")
            continue
        # 2. a fresh student, the same one for both runs
        try:
            student = build_student(config.student, assistant, tokenizer, init=kd.student_init)
            # each model's own embedding size: padded vocabularies differ across model sizes
            vocab = check_vocab_compatibility(tokenizer, student_tokenizer, assistant_rows, embedding_rows(student))
            if kd.peft is not None:
                student = with_lora(student, kd.peft.lora)
        except ValueError as exc:
            raise StageError(str(exc)) from None
        if not kd.fsdp:  # FSDP moves each rank's shards to its GPU: the whole student may not fit on one
            student.to(device)
        ctx.events.log(
            f"{label}: {describe(ctx, student)}, KD weight {weight}, "
            f"T={kd.knowledgedistillation.loss.temperature}, {kd.knowledgedistillation.loss.label}; {len(train_set)} train / {len(eval_set)} eval; "
            f"KD over {vocab} token columns"
        )
        train_one(
            ctx,
            label,
            student,
            teacher,
            tokenizer,
            train_set,
            eval_set,
            output_dir,
            weight,
            vocab,
            tokens_per_step,
            device,
            prefix,
            (index, len(runs)),
            cache,
        )


def finished_in_this_run(ctx: StageContext, output_dir: Path) -> bool:
    """Whether this run trained the model in output_dir to the end (the folder may hold an older run's)."""
    marker = output_dir / "checkpoints" / COMPLETED
    return marker.exists() and marker.stat().st_mtime >= ctx.run.created


def describe(ctx: StageContext, student) -> str:
    """Size, init and trainable share of a student, for the log."""
    kd, cfg = ctx.config.train.distillation, ctx.config.student
    total = sum(p.numel() for p in student.parameters())
    text = f"{total / 1e6:.2f}M parameters, init {kd.student_init}"
    if kd.student_init == "pretrained":
        text += f" ({cfg.base_model_name}; student.* sizes unused)"
    if kd.peft is not None:
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        text += f", LoRA r={kd.peft.lora.r}: {trainable / 1e6:.3f}M trainable"
    return text


def student_arguments(shared: dict[str, Any], kd) -> TrainingArguments:
    """The student's TrainingArguments: the shared ones, the collator's columns kept, FSDP and gradient
    checkpointing as configured (engine.train.arguments.sharding), on one GPU per process."""
    args = TrainingArguments(**shared, **sharding(kd.fsdp, kd.gradient_checkpointing), remove_unused_columns=False)
    one_gpu(args)
    return args


def on_policy_settings(kd, tokenizer, student) -> OnPolicy | None:
    """The on-policy settings (None when `on_policy.lmbda` is 0): a sampled answer ends where a chat reply
    would (engine.models.loading.stop_token_ids)."""
    config = kd.knowledgedistillation.on_policy
    if config.lmbda <= 0:
        return None
    return OnPolicy(
        lmbda=config.lmbda,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=kd.effective_seed,
        pad_id=tokenizer.pad_token_id,
        stop_ids=frozenset(stop_token_ids(tokenizer, student)),
    )


def train_one(
    ctx: StageContext,
    label: str,
    student,
    teacher,
    tokenizer,
    train_set: list[dict[str, Any]],
    eval_set: list[dict[str, Any]],
    output_dir: Path,
    weight: float,
    vocab: int,
    tokens_per_step: float,
    device: torch.device,
    prefix: str,
    part: tuple[int, int] = (0, 1),
    cache: TeacherCache | None = None,
) -> None:
    """4 + 5: train one student into output_dir, resuming from its newest checkpoint; with a `cache` the KD
    term reads the cached teacher (teacher is None) and the CE-only control runs as without one."""
    kd = ctx.config.train.distillation
    checkpoints = output_dir / "checkpoints"
    shared, tracking = trainer_arguments(
        ctx,
        kd,
        checkpoints,
        device,
        run_name=kd.run_name + ("-ce" if prefix else ""),
        logging_steps=kd.effective_logging_steps,
        seed=kd.effective_seed,
        bf16=kd.bf16,
        fp16=False,
    )
    args = student_arguments(shared, kd)
    cancel = CancelCallback(ctx)
    loss = kd.knowledgedistillation.loss
    trainer = KDTrainer(
        model=student,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set if kd.eval_strategy != "no" else None,
        data_collator=CachedKDCollator(tokenizer.pad_token_id, cache)
        if cache is not None and weight > 0
        else KDCollator(tokenizer.pad_token_id),
        callbacks=[EventsCallback(ctx, tokens_per_step, prefix, part), cancel, *tracking],
        kd_teacher=teacher,
        kd_weight=weight,
        temperature=kd.knowledgedistillation.loss.temperature,
        reduction=kd.knowledgedistillation.loss.reduction,
        chunk_size=kd.loss_chunk_size,
        vocab_size=vocab,
        on_policy=on_policy_settings(kd, tokenizer, student),
        divergence=Divergence(loss.divergence, loss.beta, loss.alpha),
    )
    train_resumable(
        ctx,
        trainer,
        cancel,
        checkpoints,
        "train.distillation.per_device_train_batch_size",
        kd.per_device_train_batch_size,
        kd.overwrite_output_dir,
        "train.distillation.overwrite_output_dir",
        label,
    )
    if trainer.on_policy is not None:
        ctx.events.log(f"{label}: {trainer.on_policy_seconds:.1f} s sampling on-policy answers")
    # LoRA merged in (a plain model folder), in the precision it trained in: bf16 training saves a bf16
    # model, so eval, chat and export load the model the run produced, at half the size of float32. Under
    # FSDP every rank takes part in gathering the shards; rank 0 alone writes the model.
    final = trained_student(trainer, pick_dtype(kd.bf16, device))
    if ctx.is_main:
        save_trained(ctx, final, tokenizer, output_dir, "train.distillation.output_dir", label)
