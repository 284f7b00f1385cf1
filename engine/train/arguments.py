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


def save_trained(ctx: StageContext, model, tokenizer, out: Path, key: str, label: str) -> None:
    """Rank 0's last step: model and tokenizer into `out` (a failed write names `key`), its checkpoints
    marked completed so that a re-run trains anew, and the artifact reported."""
    with saving(out, key):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    mark_completed(out / "checkpoints")
    ctx.events.artifact(out, label)
