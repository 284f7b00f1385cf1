"""`tas cancel RUN [--grace S]`: stop a run; stages save and end `cancelled`, SIGKILL after the grace.

A run with nothing running (finished, failed, cancelled, new) is left as it is: that is said at once, and
the exit code is 0 (the run is not running, which is what was asked for); an unknown run is an error (2).
"""

from __future__ import annotations

import argparse

from engine.cli.common import console
from engine.runner import launcher
from engine.store.render import run_block
from engine.store.runs import RunStore, runs_root


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    cancel = sub.add_parser("cancel", parents=[common], help="stop a run's stages (they save first)")
    cancel.add_argument("run", help="run id, prefix or 'last'")
    cancel.add_argument("--grace", type=float, default=None, help="seconds before SIGKILL (default: config)")
    cancel.set_defaults(func=cmd_cancel)


def cmd_cancel(args: argparse.Namespace) -> int:
    run = RunStore(runs_root(args.config)).get(args.run)
    state = run.overall_state()
    if state != "live":
        console.print(f"run {run.id} has nothing running ({state}): nothing to cancel")
        return 0
    console.print(f"cancelling run {run.id} (stages save and stop; grace period applies)…")
    if not launcher.cancel(run, grace_s=args.grace):
        console.print(f"run {run.id} ended meanwhile: nothing to cancel")
        return 0
    console.print(run_block(run))
    return 0
