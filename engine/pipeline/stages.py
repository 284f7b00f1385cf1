"""The pipeline's stages by name, in order. Light: names only; a stage module is imported by its worker."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the panel imports this module for its first frame; pydantic's schema can wait
    from engine.config.schema import TASConfig

PIPELINE = ("data", "teacher", "sft", "distill", "eval")
"""Every stage in pipeline order; each is a module `engine.stages.<name>` with `run(ctx: StageContext)`."""

MULTI_PROCESS_STAGES: frozenset[str] = frozenset({"teacher", "sft", "distill"})
"""Stages that can run under torchrun, one process per GPU; `runs_under_torchrun` says when they do."""


def runs_under_torchrun(stage: str, config: TASConfig) -> bool:
    """Whether `stage` runs as one process per GPU (torchrun) in a run of `config`: with
    launch.nproc_per_node > 1 (or launch.nnodes > 1), sft and distill always, and the teacher when it is
    the open (HF) teacher, each rank answering a shard of the prompts. Other teachers run as one process:
    vLLM spreads itself over the GPUs (teacher.vllm tensor / data parallel), the closed (API) and download
    teachers use none. So "vLLM teacher, then DDP training" runs from one config."""
    launch = config.launch
    if stage not in MULTI_PROCESS_STAGES or (launch.nproc_per_node == 1 and launch.nnodes == 1):
        return False
    return stage != "teacher" or config.teacher.source == "open"


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
