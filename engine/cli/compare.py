"""`tas compare RUN RUN...`: eval reports side by side, the frozen-config diff, and final metrics."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from engine.cli.common import console, fail
from engine.store.compare import compare_runs
from engine.store.render import number
from engine.store.runs import RunStore, runs_root


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    compare = sub.add_parser("compare", parents=[common], help="eval reports, config diff and final metrics of runs")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="two or more runs (id, name, unique part, 'last')")
    compare.add_argument("--all-metrics", action="store_true", help="every final metric, not only the key ones")
    compare.set_defaults(func=cmd_compare)


KEY_FINALS = ("loss", "eval_loss", "ce_loss", "kd_loss", "control/loss", "control/eval_loss", "tokens_per_s", "prompts")


def _cell(value: Any) -> str:
    return "—" if value is None else number(value) if isinstance(value, (int, float)) else str(value)


def _table(title: str, runs, first: str) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, expand=False)
    table.add_column(first, overflow="fold")
    for run in runs:
        table.add_column(run.name or run.id, overflow="fold", justify="right")
    return table


def cmd_compare(args: argparse.Namespace) -> int:
    store = RunStore(runs_root(args.config))
    runs = [store.get(ref) for ref in args.runs]
    if len({run.id for run in runs}) < 2:
        return fail("name at least two different runs")
    result = compare_runs(runs)
    for index, run in enumerate(runs, start=1):
        console.print(
            f"[bold]{index}.[/] {run.id}"
            + (f"  ({run.name})" if run.name else "")
            + (f"  [dim]{run.note}[/]" if run.note else "")
        )
    if result.eval_rows:
        table = _table("eval report", runs, "model / metric")
        for model, metric, values in result.eval_rows:
            table.add_row(f"{model} {metric}", *map(_cell, values))
        console.print(table)
    else:
        console.print("no eval report in these runs (run the eval stage)")
    finals = [(k, v) for k, v in result.final_metrics if args.all_metrics or k.split("/", 1)[1] in KEY_FINALS]
    if finals:
        table = _table("final metrics", runs, "stage/metric")
        for key, values in finals:
            table.add_row(key, *map(_cell, values))
        console.print(table)
    if result.config_diff:
        table = _table("config differences (frozen configs)", runs, "key")
        for key, values in result.config_diff:
            table.add_row(key, *map(_cell, values))
        console.print(table)
    else:
        console.print("the frozen configs are identical")
    return 0
