"""Comparing runs: eval reports side by side, what differs in their frozen configs, their final metrics.

Light module, shared by `tas compare` and the panel. Everything is read from the runs' files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from engine.config.keys import flatten
from engine.core.fsio import read_json
from engine.core.secrets import redact_data
from engine.pipeline.models import order_key
from engine.pipeline.stages import PIPELINE
from engine.store.events import read_events
from engine.store.runs import FROZEN_CONFIG, Run

REPORT_METRICS = ("loss", "perplexity", "kl_to_assistant", "pass@1")


@dataclass
class Comparison:
    runs: list[Run]
    eval_rows: list[tuple[str, str, list[Any]]] = field(default_factory=list)  # (model, metric, value per run)
    config_diff: list[tuple[str, list[Any]]] = field(default_factory=list)  # (key path, value per run)
    final_metrics: list[tuple[str, list[Any]]] = field(default_factory=list)  # ("stage/name", value per run)


def compare_runs(runs: list[Run]) -> Comparison:
    result = Comparison(runs)
    reports = [read_json(run.stage_dir("eval") / "report.json") or {} for run in runs]
    models = sorted({m for report in reports for m in (report.get("models") or {})}, key=order_key)
    for model in models:
        for metric in REPORT_METRICS:
            values = [(report.get("models") or {}).get(model, {}).get(metric) for report in reports]
            if any(v is not None for v in values):
                result.eval_rows.append((model, metric, values))
    flat = [flatten(_frozen(run)) for run in runs]
    for key in sorted(set().union(*flat)):
        values = [f.get(key) for f in flat]
        if any(v != values[0] for v in values):
            result.config_diff.append((key, values))
    finals = [_final_metrics(run) for run in runs]
    for key in sorted(set().union(*finals), key=lambda k: (PIPELINE.index(k.split("/")[0]), k)):
        result.final_metrics.append((key, [f.get(key) for f in finals]))
    return result


def _frozen(run: Run) -> dict[str, Any]:
    """The run's frozen config, secrets redacted: `tas compare` prints it."""
    try:
        return redact_data(yaml.safe_load((run.path / FROZEN_CONFIG).read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError):
        return {}


def _final_metrics(run: Run) -> dict[str, Any]:
    """The last value of every metric each stage logged ("sft/eval_loss": 3.21, ...)."""
    finals: dict[str, Any] = {}
    for stage in PIPELINE:
        for event in read_events(run.stage_dir(stage) / "events.jsonl"):
            if event.get("kind") == "metric" and isinstance(event.get("name"), str):
                finals[f"{stage}/{event['name']}"] = event.get("value")
    return finals
