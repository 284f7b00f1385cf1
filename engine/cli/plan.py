"""`tas plan [STAGE...] [--config F] [--gpus 8x80GB]`: each stage's predicted peak memory per GPU, term by
term, against the GPUs given or found, and the config keys that would make a stage fit (engine.plan)."""

from __future__ import annotations

import argparse

from engine.cli.common import console, fail
from engine.config.load import load_config
from engine.pipeline.stages import PIPELINE, check_stage_names
from engine.plan.dims import PlanError
from engine.plan.gpus import parse_gpus
from engine.plan.render import plan_text


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "plan",
        parents=[common],
        help="predicted peak GPU memory of each stage, and the keys that make it fit",
        description="From the config and each model's config.json (no weights are read), the peak memory each "
        "stage will need per GPU, term by term, against this machine's GPUs (or --gpus), and for a stage that "
        "will not fit the config keys, with values, that would make it fit.",
    )
    parser.add_argument("stages", nargs="*", metavar="STAGE", help=f"{', '.join(PIPELINE)} or all (default: all)")
    parser.add_argument("--gpus", metavar="NxMEM", help="plan for these GPUs instead of this machine's, e.g. 8x80GB")
    parser.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    stages = check_stage_names(args.stages or ["all"])
    try:
        gpus = parse_gpus(args.gpus) if args.gpus else None
    except ValueError as exc:
        return fail(str(exc))
    config = load_config(args.config)
    try:
        console.print(plan_text(config, stages, gpus), markup=False)
    except PlanError as exc:
        return fail(str(exc))
    return 0
