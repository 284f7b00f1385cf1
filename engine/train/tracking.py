"""Experiment tracking with MLflow, as TAS did: each training stage is an MLflow run in the experiment of
`train.<stage>.experiment.name`, with the run's frozen config as params, the Trainer's metrics, and (for
eval) the report as an artifact.

The Trainer's own MLflowCallback (report_to: mlflow) logs metrics and TrainingArguments; this module
points it at the right store and experiment through its environment variables, and adds what it does not
log: the frozen config and the tags that tie an MLflow run to our run and stage.

Where runs are stored: `$MLFLOW_TRACKING_URI` when set, else `experiment.set_tracking_uri`. A `file:`
folder (what TAS configs name) becomes an SQLite store inside that folder (`sqlite:///<folder>/mlflow.db`):
MLflow 3 refuses new file stores. Relative folders are relative to the run's working directory.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from engine.config.keys import flatten
from engine.config.schema import ExperimentConfig
from engine.core.secrets import redact_data
from engine.runner.context import StageCancelled, StageContext
from engine.store.runs import FROZEN_CONFIG


def tracking_uri(experiment: ExperimentConfig, workdir: str | Path) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    uri = experiment.set_tracking_uri or experiment.path
    if uri.startswith("file:") or "://" not in uri:
        folder = Path(uri.removeprefix("file:"))
        folder = folder if folder.is_absolute() else Path(workdir) / folder
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder.resolve() / 'mlflow.db'}"
    return uri


def tags(ctx: StageContext) -> dict[str, str]:
    return {"tas.run": ctx.run.id, "tas.stage": ctx.stage, "tas.run_name": ctx.run.name or ""}


def prepare_mlflow(ctx: StageContext, experiment: ExperimentConfig) -> list[TrainerCallback]:
    """Environment for the Trainer's MLflowCallback, and our callback that logs the frozen config."""
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(experiment, ctx.run.workdir)
    os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment.name
    os.environ["MLFLOW_TAGS"] = json.dumps(tags(ctx))
    os.environ.setdefault("HF_MLFLOW_LOG_ARTIFACTS", "0")  # checkpoints stay on disk, not copied into MLflow
    ctx.events.log(f"tracking to MLflow: experiment {experiment.name!r} at {os.environ['MLFLOW_TRACKING_URI']}")
    return [FrozenConfigToMlflow(ctx)]


class FrozenConfigToMlflow(TrainerCallback):
    """Logs the run's frozen config, secrets redacted, to the active run: flattened as params (keys
    prefixed `tas.`) and as the artifact `tas/config.yaml`."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx

    def on_train_begin(self, args, state, control, **kwargs):
        import mlflow

        if not state.is_world_process_zero or mlflow.active_run() is None:
            return
        import yaml

        # secrets redacted: a base URL's password, api_key, --api-key in extra_args, the vLLM env's HF_TOKEN
        config = redact_data(yaml.safe_load((self.ctx.run.path / FROZEN_CONFIG).read_text()))
        params = {f"tas.{param_key(k)}"[:250]: str(v)[:6000] for k, v in flatten(config).items()}
        mlflow.log_params(params)
        with tempfile.TemporaryDirectory(prefix="tas-mlflow-") as folder:
            copy = Path(folder) / FROZEN_CONFIG
            copy.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
            mlflow.log_artifact(str(copy), artifact_path="tas")


@contextmanager
def training_run(trainer) -> Iterator[None]:
    """Keep the MLflow run of one training open from before `train()` until after the stage's last evaluation.

    Left to itself, the Trainer's MLflowCallback starts its run when training begins and ends it when
    training ends; the evaluation after training then logs into a new run of a random name
    (`angry-snake-916` beside `tiny-sft`). Started here, the callback finds the run active, logs into it
    and leaves it open. Does nothing without MLflow or off rank 0 (which alone logs)."""
    from transformers.integrations import MLflowCallback

    if not trainer.is_world_process_zero() or not any(
        isinstance(c, MLflowCallback) for c in trainer.callback_handler.callbacks
    ):
        yield
        return
    import mlflow

    if os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
    mlflow.start_run(run_name=trainer.args.run_name, tags=json.loads(os.environ.get("MLFLOW_TAGS") or "{}"))
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except StageCancelled:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)


def log_report(ctx: StageContext, experiment: ExperimentConfig, report_path: Path, metrics: dict[str, float]) -> None:
    """The eval stage's report as its own MLflow run (metrics + the report file)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(experiment, ctx.run.workdir))
    mlflow.set_experiment(experiment.name)
    with mlflow.start_run(run_name=f"{ctx.run.id}-eval", tags=tags(ctx)):
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(report_path), artifact_path="tas")


def param_key(key: str) -> str:
    """A dotted config key as MLflow accepts it (no brackets): `datasets[0].name` -> `datasets.0.name`."""
    return re.sub(r"\[(\d+)\]", r".\1", key)
