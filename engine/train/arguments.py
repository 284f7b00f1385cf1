"""What both training stages (`sft`, `distill`) give their HF Trainer and do after it, in one place: the
TrainingArguments their shared config keys decide (engine.config.schema.TrainerSection), and the final save.

Each stage adds its own arguments (sft: max_length and the completion-only loss; distill: the columns its
collator needs) and its own model to save (sft: the LoRA adapter; distill: the student, LoRA merged in).

Heavy module (transformers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.config.schema import TrainerSection
from engine.runner.context import StageContext
from engine.train.callbacks import mark_completed, precision, report_to, saving
from engine.train.tracking import prepare_mlflow

SAME_NAMED = (
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "eval_strategy",
    "save_steps",
)
"""Keys of a trainer section that TrainingArguments takes as they are, under the same name."""


def trainer_arguments(
    ctx: StageContext,
    section: TrainerSection,
    checkpoints: Path,
    device: torch.device,
    *,
    run_name: str,
    logging_steps: int,
    seed: int,
    bf16: bool,
    fp16: bool,
) -> tuple[dict[str, Any], list]:
    """The TrainingArguments keywords both stages share, and the MLflow callbacks `report_to` asks for.

    Both stages evaluate at their training batch size, keep two checkpoints, load data in the stage's own
    process, and report progress through events instead of tqdm bars.
    """
    trackers = report_to(ctx, section.report_to)
    tracking = prepare_mlflow(ctx, section.experiment) if "mlflow" in trackers else []
    arguments = {name: getattr(section, name) for name in SAME_NAMED}
    arguments.update(
        output_dir=str(checkpoints),
        per_device_eval_batch_size=section.per_device_train_batch_size,
        logging_steps=logging_steps,
        save_total_limit=2,
        report_to=trackers,
        run_name=run_name,
        use_cpu=device.type == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=seed,
        # every trainable parameter takes part in each forward (LoRA, modules_to_save, the student); left
        # unset, HF asks DDP to search the autograd graph for unused ones after every forward
        ddp_find_unused_parameters=False,
        **precision(ctx, bf16, fp16, device.type),
    )
    return arguments, tracking


def one_gpu(args) -> None:
    """Keep the Trainer of `args` (TrainingArguments or a subclass) to one GPU per process.

    In one process that sees several GPUs, HF's Trainer takes them all: it wraps the model in
    `nn.DataParallel` and multiplies the batch by the GPU count (`n_gpu`, read from
    `torch.cuda.device_count()`), and TRL's SFTTrainer refuses to start. A stage here trains on the one GPU
    `select_device` picked (cuda:0 in one process, where the Trainer places the model); more GPUs are
    torchrun's, one process each (`launch.nproc_per_node`), where `n_gpu` is 1 already.
    """
    if args.n_gpu > 1:
        args._n_gpu = 1  # the Trainer's own lever: it does the same for a model split with device_map


def sharding(fsdp: bool, checkpointing: bool = False) -> dict[str, Any]:
    """The TrainingArguments that shard the student with FSDP2 (`train.distillation.fsdp`) and recompute
    its activations in backward (`train.distillation.gradient_checkpointing`).

    accelerate's FSDP2 gives each decoder layer (the model's `_no_split_modules`) a unit of its own, and the
    embeddings, final norm and lm head others: each rank keeps 1/N of every weight, gradient and optimizer
    state and gathers a unit's weights only while it computes. Checkpoints hold the full state dict.
    Under FSDP checkpointing is FSDP's own (`fsdp_config.activation_checkpointing`: the Trainer refuses the
    plain argument beside it); otherwise the Trainer's, non-reentrant (the inputs need not require grad,
    and it composes with DDP and LoRA).
    """
    if fsdp:
        return {"fsdp": True, "fsdp_config": {"version": 2, "activation_checkpointing": checkpointing}}
    if checkpointing:
        # transformers 5's name of gradient checkpointing
        return {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}
    return {}


def save_trained(ctx: StageContext, model, tokenizer, out: Path, key: str, label: str) -> None:
    """Rank 0's last step: model and tokenizer into `out` (a failed write names `key`), its checkpoints
    marked completed so that a re-run trains anew, and the artifact reported."""
    with saving(out, key):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    mark_completed(out / "checkpoints")
    ctx.events.artifact(out, label)
