"""The pipeline's stages by name, in order. Light: names only; a stage module is imported by its worker."""

from __future__ import annotations

PIPELINE = ("data", "teacher", "sft", "distill", "eval")
"""Every stage in pipeline order; each is a module `engine.stages.<name>` with `run(ctx: StageContext)`."""

MULTI_PROCESS_STAGES: frozenset[str] = frozenset({"teacher", "sft", "distill"})
"""Stages that run under torchrun when launch.nproc_per_node > 1 (or launch.nnodes > 1)."""


class UnknownStage(ValueError):
    pass


def stage_module(name: str) -> str:
    """The module a worker imports to run stage `name`."""
    return f"engine.stages.{name}"


def check_stage_names(names: list[str]) -> list[str]:
    """Expand `all`, reject unknown stages, and order them as in the pipeline."""
    if "all" in names:
        names = list(PIPELINE)
    for name in names:
        if name not in PIPELINE:
            raise UnknownStage(f"unknown stage {name!r}; stages are: {', '.join(PIPELINE)} (or all)")
    return sorted(dict.fromkeys(names), key=PIPELINE.index)
