"""MLflow tracking: a tiny sft run with report_to mlflow is found through mlflow.search_runs, with the
frozen config as params, the Trainer's metrics, and the tags that name our run and stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.runner.context import StageContext
from engine.stages import sft
from engine.store.events import EventWriter
from engine.store.runs import RunStore
from tests.helpers import PROMPTS, TINY_CONFIG, write_teacher_answers
from tests.test_masking import RECORDS


@pytest.fixture
def tracked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """mlflow, the URI of an SQLite store in tmp_path, and a tiny config whose sft reports to it."""
    mlflow = pytest.importorskip("mlflow")  # an optional extra; `.ci/run` installs it
    shutil.copy(PROMPTS, tmp_path / "prompt.yaml")
    monkeypatch.chdir(tmp_path)
    store_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(TINY_CONFIG)
    write_teacher_answers(cfg, tmp_path / "teacher.jsonl", RECORDS)
    cfg.train.sft.report_to = "mlflow"
    return mlflow, store_uri, cfg


def test_sft_run_is_tracked_in_mlflow(tmp_path: Path, tracked):
    mlflow, store_uri, cfg = tracked
    cfg.train.sft.max_steps = 3
    cfg.train.sft.logging_steps = 1
    cfg.train.sft.experiment.name = "tas-test-experiment"
    run = RunStore(tmp_path / "runs").create(cfg, "tiny.yaml", workdir=str(tmp_path), name="tracked")
    ctx = StageContext("sft", run, run.config(), EventWriter(run.stage_dir("sft") / "events.jsonl"))
    sft.train(ctx, sft.prepare(ctx))

    mlflow.set_tracking_uri(store_uri)
    found = mlflow.search_runs(experiment_names=["tas-test-experiment"], filter_string=f"tags.`tas.run` = '{run.id}'")
    assert len(found) == 1
    row = found.iloc[0]
    assert row["tags.tas.stage"] == "sft" and row["tags.tas.run_name"] == "tracked"
    assert float(row["params.tas.train.sft.learning_rate"]) == cfg.train.sft.learning_rate
    assert row["params.tas.teacher.open.model.name"] == "tiny:teacher"
    assert row["params.tas.datasets.0.name"] == cfg.datasets[0].name  # `datasets[0].name`: MLflow allows no brackets
    assert row["metrics.loss"] > 0
    artifacts = mlflow.artifacts.list_artifacts(run_id=row["run_id"], artifact_path="tas")
    assert any(a.path.endswith("config.yaml") for a in artifacts)


def test_sft_final_evaluation_is_logged_on_the_training_run(tmp_path: Path, tracked):
    """The evaluation after training logs eval_loss into the training's MLflow run, not into a second run
    with a random name (the Trainer's callback ends its run when training ends)."""
    mlflow, store_uri, cfg = tracked
    cfg.train.sft.max_steps = 2
    cfg.train.sft.logging_steps = 1
    cfg.train.sft.eval_strategy = "no"  # the only evaluation is the one after training
    cfg.train.sft.experiment.name = "tas-eval-experiment"
    run = RunStore(tmp_path / "runs").create(cfg, "tiny.yaml", workdir=str(tmp_path), name="tracked")
    ctx = StageContext("sft", run, run.config(), EventWriter(run.stage_dir("sft") / "events.jsonl"))
    setup = sft.prepare(ctx)
    assert setup.eval_set is not None
    sft.train(ctx, setup)

    client = mlflow.MlflowClient(tracking_uri=store_uri)
    experiment = client.get_experiment_by_name("tas-eval-experiment")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == [cfg.train.sft.experiment.run_name]
    (only,) = runs
    assert only.data.tags["tas.run"] == run.id and only.info.status == "FINISHED"
    assert "loss" in only.data.metrics and "eval_loss" in only.data.metrics
