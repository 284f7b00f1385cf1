"""`tas cancel RUN [--grace S]`: stop a run; stages save and end `cancelled`, SIGKILL after the grace."""

from __future__ import annotations

import argparse

from engine.cli.common import console
from engine.core import launcher
from engine.core.render import run_block
from engine.core.runs import RunStore, runs_root


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    cancel = sub.add_parser("cancel", parents=[common], help="stop a run's stages (they save first)")
    cancel.add_argument("run", help="run id, prefix or 'last'")
    cancel.add_argument("--grace", type=float, default=None, help="seconds before SIGKILL (default: config)")
    cancel.set_defaults(func=cmd_cancel)


def cmd_cancel(args: argparse.Namespace) -> int:
    run = RunStore(runs_root(args.config)).get(args.run)
    console.print(f"cancelling run {run.id} (stages save and stop; grace period applies)…")
    if not launcher.cancel(run, grace_s=args.grace):
        console.print("nothing was running")
        return 0
    console.print(run_block(run))
    return 0
