"""The plan as text: the whole of it for `tas plan`, one line per stage for the panel's start confirmation,
each made for the GPUs given or, when none are given, the machine's."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from engine.config.errors import ConfigError
from engine.config.load import load_config
from engine.config.schema import TASConfig
from engine.plan.dims import PlanError, load_dims
from engine.plan.gpus import Gpus, detect_gpus
from engine.plan.memory import CUDA_RESERVE, Verdict, gib, plan


def fixes_text(fixes: list[tuple[str, object]]) -> str:
    """`key: value, key: value`, as they would be written in config.yaml."""
    return ", ".join(f"{key}: {str(value).lower() if isinstance(value, bool) else value}" for key, value in fixes)


def verdict_text(verdict: Verdict) -> str:
    """`fits`, `will not fit (…)`, or what is unknown, for one stage."""
    if not verdict.plan.gpu:
        return verdict.plan.note
    if verdict.fits is None:
        return "no GPU to compare with"
    if verdict.fits:
        return "fits"
    reason = verdict.problem or f"over by {gib(verdict.plan.peak - verdict.budget)}"
    if verdict.fixes:
        return f"will not fit ({reason}); set {fixes_text(verdict.fixes)}"
    return f"will not fit ({reason}); no single key fixes it: a larger GPU, or a smaller model"


def summary_line(verdict: Verdict) -> str:
    """One stage in one line: its peak per GPU against the budget, and the verdict."""
    if not verdict.plan.gpu:
        return verdict_text(verdict)
    budget = f" of {gib(verdict.budget)}" if verdict.budget is not None else ""
    return f"{gib(verdict.plan.peak)}{budget} per GPU: {verdict_text(verdict)}"


def render(verdicts: list[Verdict], gpus: Gpus | None, no_gpu_reason: str, ranks: int) -> str:
    """The full plan: the GPUs, then each stage's terms, its peak per GPU and the verdict."""
    lines = []
    if gpus is None:
        lines.append(f"GPUs: none found ({no_gpu_reason}); predicted peaks only (use --gpus 8x80GB to compare)")
    else:
        lines.append(
            f"GPUs: {gpus.source}, {gib(gpus.memory)} each; {gib(gpus.memory - CUDA_RESERVE)} usable "
            f"({gib(CUDA_RESERVE)} kept for the CUDA context and buffers)"
        )
    lines.append(
        f"Ranks: launch.nproc_per_node = {ranks}; every figure is per rank = per GPU (DDP gives each rank a "
        "whole copy of the model and its training states)"
    )
    for verdict in verdicts:
        plan = verdict.plan
        lines.append("")
        lines.append(f"{plan.stage:<8} {summary_line(verdict)}")
        if plan.note and plan.gpu:
            lines.append(f"  {plan.note}")
        width = max((len(term.what) for term in plan.terms), default=0)
        for term in plan.terms:
            lines.append(f"  {term.what:<{width}}  {gib(term.bytes):>9}  {term.why}")
    return "\n".join(lines)


def verdicts_for(config: TASConfig, stages: list[str], gpus: Gpus | None) -> list[Verdict]:
    return plan(config, stages, gpus.memory if gpus else None, gpus.count if gpus else None)


def plan_text(config: TASConfig, stages: list[str], gpus: Gpus | None = None) -> str:
    """`tas plan`'s output for `stages`, for `gpus` or else this machine's. PlanError when a model's
    config.json cannot be found."""
    reason = ""
    if gpus is None:
        gpus, reason = detect_gpus()
    return render(verdicts_for(config, stages, gpus), gpus, reason, config.launch.nproc_per_node)


@dataclass(frozen=True)
class Summary:
    """The plan in a few lines for a start confirmation: (stage, line) pairs and a warning ("" when all fit)."""

    lines: list[tuple[str, str]]
    warning: str = ""


def summary(config_path: str | Path, stages: list[str]) -> Summary:
    """The plan of `stages` of the config at `config_path`, for this machine's GPUs, without network access.
    Never raises: a start confirmation must show, plan or no plan."""
    try:
        config = load_config(config_path)
        gpus, reason = detect_gpus()
        verdicts = plan(
            config,
            stages,
            gpus.memory if gpus else None,
            gpus.count if gpus else None,
            functools.partial(load_dims, download=False),
        )
    except (ConfigError, PlanError) as exc:
        return Summary([("memory", f"no plan: {exc}")])
    lines = [(v.plan.stage, summary_line(v)) for v in verdicts if v.plan.gpu]
    if gpus is None and lines:
        lines.append(("GPUs", f"none found ({reason})"))
    failing = [v for v in verdicts if v.fits is False]
    warning = ""
    if failing:
        names = " and ".join(v.plan.stage for v in failing)
        warning = f"{names} will run out of GPU memory as configured: set the keys above first (details: tas plan)"
    return Summary(lines, warning)
