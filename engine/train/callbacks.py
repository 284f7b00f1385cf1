"""What the training stages (`sft`, `distill`) share: HF Trainer callbacks that report events and
honour cancel, checkpoint discovery for resume, and precision / tracker settings that fit the machine.

Heavy module (transformers).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from engine.core.fsio import describe_os_error
from engine.models.device import any_rank, barrier, has_native_bf16, peak_memory
from engine.runner.context import StageContext
from engine.train.kd_trainer import balance_warning


class EventsCallback(TrainerCallback):
    """Trainer logs → `metric` events, steps → `progress`, and peak memory now and then."""

    def __init__(
        self, ctx: StageContext, tokens_per_step: float | None = None, prefix: str = "", part: tuple[int, int] = (0, 1)
    ):
        self.ctx = ctx
        self.tokens_per_step = tokens_per_step
        self.prefix = prefix  # tells apart the metrics of two trainings in one stage (e.g. "control/")
        # (index, count) of this training among the stage's trainings: distill trains the KD student,
        # then the CE-only control; the stage's progress runs over both instead of going back to 0
        self.part = part
        self._last_step_time: float | None = None
        self._last_memory = 0.0
        self._balance_warned = False  # the KD/CE balance warning is said once per training, not every log

    def _progress(self, state) -> None:
        index, count = self.part
        self.ctx.events.progress(index * state.max_steps + state.global_step, count * state.max_steps, "steps")

    def on_train_begin(self, args, state, control, **kwargs):
        if self.ctx.is_main:
            self._progress(state)
        self._last_step_time = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.ctx.is_main:
            self._progress(state)
            if self.tokens_per_step and self._last_step_time is not None:
                rate = self.tokens_per_step / max(now - self._last_step_time, 1e-9)
                if state.global_step % max(1, args.logging_steps) == 0:
                    self.ctx.events.metric(self.prefix + "tokens_per_s", round(rate, 1), step=state.global_step)
            if now - self._last_memory > 10:
                self.ctx.events.memory(peak_memory())
                self._last_memory = now
        self._last_step_time = now

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if not self.ctx.is_main or not logs:
            return
        for name, value in logs.items():
            if name in ("epoch", "total_flos") or name.endswith(("_runtime", "_per_second")):
                continue  # bookkeeping, not a metric anyone plots
            if isinstance(value, (int, float)):
                metric = {"learning_rate": "lr", "train_loss": "train_loss_avg"}.get(name, name)
                self.ctx.events.metric(self.prefix + metric, float(value), step=state.global_step)
        warning = balance_warning(logs["kd_ce_ratio"]) if "kd_ce_ratio" in logs else None
        if warning and not self._balance_warned:
            self._balance_warned = True
            self.ctx.events.log(f"{self.prefix}step {state.global_step}: {warning}", level="warning")

    def on_save(self, args, state, control, **kwargs):
        if self.ctx.is_main:
            self.ctx.events.log(f"checkpoint saved at step {state.global_step}")


class EvaluationAborted(Exception):
    """Raised inside an evaluation pass when a cancel arrives: the pass is dropped, the step's checkpoint kept."""


class CancelCallback(TrainerCallback):
    """After SIGTERM: save one checkpoint at the end of the current step, then stop, doing nothing else.

    The Trainer would otherwise evaluate on the way out (eval_strategy steps/epoch) and save again at the
    epoch end; with a real eval split that alone outlasts `launch.cancel_grace_s` and the stage is killed.
    An evaluation already running when the cancel arrives is aborted between batches.
    """

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.stopped = False
        self.saved_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(self.ctx.cancel_requested):  # all ranks stop at the same step
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False
            control.should_log = False
            self.stopped = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopped:
            self.saved_step = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped:  # the step's checkpoint is written; no epoch-end evaluation or second save
            control.should_evaluate = False
            control.should_save = False
        return control

    def on_prediction_step(self, args, state, control, **kwargs):
        if state.global_step > 0 and any_rank(self.ctx.cancel_requested):
            self.stopped = True
            raise EvaluationAborted()


TRAINER_STATE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME (a heavy module to import for it)


def is_complete(checkpoint: Path) -> bool:
    """True when the Trainer saved this checkpoint to the end.

    `Trainer._save_checkpoint` writes the weights (a LoRA adapter or the full model), then the optimizer,
    scheduler and RNG states, and `trainer_state.json` last, in place: a save cut by SIGKILL leaves no
    state file, or a torn one that does not read as JSON.
    """
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoints_by_step(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders in output_dir, highest step first."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    steps: dict[Path, int] = {}
    for folder in path.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = folder.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if step.isdigit() and folder.is_dir():
            steps[folder] = int(step)
    return sorted(steps, key=steps.__getitem__, reverse=True)


def last_checkpoint(output_dir: str | Path) -> str | None:
    """Newest complete `checkpoint-N` folder in output_dir, or None."""
    return next((str(folder) for folder in checkpoints_by_step(output_dir) if is_complete(folder)), None)


def remove_incomplete_checkpoints(ctx: StageContext, checkpoints: Path, prefix: str = "") -> None:
    """Delete the checkpoint folders a killed save left half-written, with a `log` event for each.

    Deleted, not kept aside: nothing can resume from them, a distill one can hold gigabytes, and left in
    place HF's rotation (`save_total_limit`) counts them: when it falls back to ordering by step number it
    keeps the half-written folder as "the most recent" and deletes the good checkpoints saved after it.
    """
    import shutil

    for folder in checkpoints_by_step(checkpoints):
        if not is_complete(folder):
            shutil.rmtree(folder)
            ctx.events.log(
                f"{prefix}skipped {folder}: its save was cut short (no readable {TRAINER_STATE}); removed it",
                level="warning",
            )


def report_to(ctx: StageContext, wanted: str | list[str]) -> list[str]:
    """The configured trackers that are installed; a missing one is a warning, not a failed stage."""
    names = [wanted] if isinstance(wanted, str) else list(wanted)
    usable = []
    for name in names:
        if name == "none":
            continue
        module = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}.get(name, name)
        if name == "all" or importlib.util.find_spec(module) is not None:
            usable.append(name)
        else:
            ctx.events.log(
                f"report_to: {name} is not installed (pip install {module}); not reporting to it", level="warning"
            )
    return usable or ["none"]


def precision(ctx: StageContext, bf16: bool, fp16: bool, device_type: str) -> dict[str, bool]:
    """The Trainer's bf16 / fp16 flags for a config's precision keys on this device.

    On a GPU either key asks for half precision: bfloat16 where the GPU has it natively, float16 only where
    it does not (V100, T4). TAS's sft asks for `fp16: true`, but Qwen2/2.5 activations overflow float16,
    so a GPU that can train in bfloat16 does. CPUs cannot train in float16: float32 there.
    """
    if device_type != "cuda":
        if fp16:
            ctx.events.log("fp16 training needs a GPU; training in float32 on CPU", level="warning")
        return {"bf16": bool(bf16), "fp16": False}
    if not (bf16 or fp16):
        return {"bf16": False, "fp16": False}
    if has_native_bf16():
        if fp16 and not bf16:
            ctx.events.log("fp16: true trains in bfloat16 on this GPU (float16 overflows Qwen2 activations)")
        return {"bf16": True, "fp16": False}
    ctx.events.log("this GPU has no native bfloat16; training in fp16", level="warning")
    return {"bf16": False, "fp16": True}


@contextmanager
def saving(path: str | Path, key: str):
    """Turn a failed save into an error naming the path, the config key and what to do.

    safetensors reports a full disk as `SafetensorError: ... (os error 28)`: no path, no key, no hint.
    """
    try:
        yield
    except OSError as exc:
        raise describe_os_error(exc, path, key) from None
    except Exception as exc:
        text = str(exc)
        if "os error 28" in text or "No space left" in text:
            raise describe_os_error(OSError(errno.ENOSPC, "No space left on device"), path, key) from None
        if "os error 13" in text or "Permission denied" in text:
            raise describe_os_error(OSError(errno.EACCES, "Permission denied"), path, key) from None
        raise


COMPLETED = "COMPLETED"


def mark_completed(checkpoints: Path) -> None:
    """Written after the final model is saved: the next run trains anew instead of resuming."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / COMPLETED).write_text("the model in the parent folder was trained to the end\n")


def train_resumable(
    ctx: StageContext,
    trainer,
    cancel: CancelCallback,
    checkpoints: Path,
    batch_key: str,
    batch_size: int,
    overwrite: bool,
    overwrite_key: str,
    label: str = "",
) -> None:
    """Train from the newest checkpoint in `checkpoints`; OOM and cancel become the stage's own endings.

    Checkpoints of an interrupted run are resumed. After a run that finished, running the stage again
    means training again: with `overwrite_output_dir` the old checkpoints are removed, without it the
    stage refuses rather than overwrite a finished model.
    """
    import shutil

    from engine.models.device import is_out_of_memory
    from engine.runner.context import StageCancelled, StageError

    prefix = f"{label}: " if label else ""
    section = overwrite_key.rsplit(".", 1)[0]
    output_key = "train.sft.save_path" if section == "train.sft" else f"{section}.output_dir"
    if (checkpoints / COMPLETED).exists():
        if not overwrite:
            raise StageError(
                f"{prefix}already trained to the end in {checkpoints.parent}; set {overwrite_key}: true "
                "to train again, or change the output path"
            )
        if ctx.is_main:
            shutil.rmtree(checkpoints)
            ctx.events.log(f"{prefix}the previous training finished; training again ({overwrite_key})")
    if ctx.is_main:
        remove_incomplete_checkpoints(ctx, checkpoints, prefix)
    barrier()  # under torchrun: no rank looks for checkpoints while rank 0 removes them
    resume = last_checkpoint(checkpoints)
    if resume:
        ctx.events.log(f"{prefix}resuming from {resume}")
    try:
        with saving(checkpoints, output_key):
            trainer.train(resume_from_checkpoint=resume)
    except EvaluationAborted:
        # the cancel came during an evaluation pass: keep the step that was reached, then stop
        if cancel.saved_step != trainer.state.global_step:
            trainer._save_checkpoint(trainer.model, trial=None)  # the Trainer's own checkpoint writer
        raise StageCancelled(
            f"{prefix}cancelled at step {trainer.state.global_step} during an evaluation; "
            "checkpoint saved, re-run to resume"
        ) from None
    except Exception as exc:
        if is_out_of_memory(exc):
            raise StageError(
                f"out of memory at {batch_key}={batch_size}; lower it "
                "(and raise gradient_accumulation_steps to keep the effective batch)"
            ) from None
        raise
    ctx.events.memory(peak_memory())
    if cancel.stopped:
        raise StageCancelled(
            f"{prefix}cancelled at step {trainer.state.global_step}; checkpoint saved, re-run to resume"
        )
