"""The pipeline's stages, by name. Light: names only; a stage module is imported inside its worker."""

from __future__ import annotations

import importlib
from types import ModuleType

PIPELINE = ("data", "teacher", "sft", "distill", "eval")
"""Every stage in pipeline order; the panel and `tas status` show all of them."""

STAGE_MODULES = {
    "data": "engine.stages.data",
    "teacher": "engine.stages.teacher",
    "sft": "engine.stages.sft",
    "distill": "engine.stages.distill",
    "eval": "engine.stages.eval",
}
"""The stages that can run. Each module has `run(ctx: StageContext) -> None`."""

MULTI_PROCESS_STAGES: frozenset[str] = frozenset({"teacher"})
"""Stages that run under torchrun when launch.nproc_per_node > 1."""


class UnknownStage(ValueError):
    pass


def check_stage_names(names: list[str]) -> list[str]:
    """Expand `all`, reject unknown or not-yet-available stages, and order them as in the pipeline."""
    if "all" in names:
        names = [n for n in PIPELINE if n in STAGE_MODULES]
    for name in names:
        if name not in PIPELINE:
            raise UnknownStage(f"unknown stage {name!r}; stages are: {', '.join(PIPELINE)} (or all)")
        if name not in STAGE_MODULES:
            available = ", ".join(n for n in PIPELINE if n in STAGE_MODULES)
            raise UnknownStage(f"stage {name!r} is not available in this version; available: {available}")
    return sorted(dict.fromkeys(names), key=PIPELINE.index)


def load_stage(name: str) -> ModuleType:
    return importlib.import_module(STAGE_MODULES[name])
