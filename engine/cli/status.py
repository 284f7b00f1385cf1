"""`tas status [RUN] [--all]`: the stages of recent runs with state, progress, ETA and latest metrics."""

from __future__ import annotations

import argparse

from engine.cli.common import console
from engine.store.render import run_block
from engine.store.runs import RunStore, runs_root


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    status = sub.add_parser("status", parents=[common], help="stages of recent runs with state and progress")
    status.add_argument("run", nargs="?", help="one run (id, prefix or 'last')")
    status.add_argument("--all", action="store_true", help="every run, not only the recent ones")
    status.add_argument("--last", type=int, default=5, help="how many recent runs (default 5)")
    status.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    store = RunStore(runs_root(args.config))
    if args.run:
        runs = [store.get(args.run)]
    else:
        runs = store.list()
        if not runs:
            console.print(f"no runs in {store.root}/ yet; start one with `tas run data --config configs/tiny.yaml`")
            return 0
        if not args.all:
            runs = runs[: args.last]
    console.print("\n\n".join(run_block(run) for run in runs))
    return 0
