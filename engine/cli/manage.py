"""`tas note RUN TEXT` and `tas rm RUN [--archive] [--yes]`: keep the run store tidy and readable."""

from __future__ import annotations

import argparse
import sys

from engine.cli.common import console, fail
from engine.store.runs import RunIsLive, RunStore, remove_run, runs_root


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    note = sub.add_parser("note", parents=[common], help="set a run's note (and --name)")
    note.add_argument("run", help="run id, name, unique part of the id, or 'last'")
    note.add_argument("text", nargs="?", default=None, help="the note (omit to show it)")
    note.add_argument("--name", default=None, help="also (re)name the run")
    note.set_defaults(func=cmd_note)

    rm = sub.add_parser("rm", parents=[common], help="delete (or --archive) runs that are not running")
    rm.add_argument("runs", nargs="+", metavar="RUN", help="run id, name, unique part of the id, or 'last'")
    rm.add_argument("--archive", action="store_true", help="move to <runs>/.archive/ instead of deleting")
    rm.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    rm.set_defaults(func=cmd_rm)


def cmd_note(args: argparse.Namespace) -> int:
    run = RunStore(runs_root(args.config)).get(args.run)
    if args.text is None and args.name is None:
        console.print(run.note or "(no note)", markup=False)
        return 0
    fields = {}
    if args.text is not None:
        fields["note"] = args.text
    if args.name is not None:
        fields["name"] = args.name
    run.update_meta(**fields)
    console.print(f"run {run.label}: note {run.note!r}", markup=False)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = RunStore(runs_root(args.config))
    runs = [store.get(ref) for ref in args.runs]
    verb = "archive" if args.archive else "delete"
    if not args.yes:
        if not sys.stdin.isatty():
            return fail(f"{verb} {len(runs)} run(s)? add --yes to confirm (no terminal to ask on)")
        names = ", ".join(r.label for r in runs)
        answer = input(f"{verb} {names}? This cannot be undone{' (archive can)' if args.archive else ''}. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            console.print("nothing changed")
            return 1
    for run in runs:
        try:
            where = remove_run(run, archive=args.archive)
        except RunIsLive as exc:
            return fail(str(exc))
        console.print(f"{verb}d {run.label}" + (f" → {where}" if where else ""), markup=False)
    return 0
