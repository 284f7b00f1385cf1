"""`tas logs RUN [STAGE] [-f] [--events]`: a stage's worker log (or its event stream), redacted."""

from __future__ import annotations

import argparse
import sys
import time

from engine.cli.common import console, errors, fail
from engine.core.fsio import LineTail
from engine.core.secrets import redact
from engine.pipeline.stages import PIPELINE
from engine.store.events import EventTail
from engine.store.render import event_line
from engine.store.runs import Run, RunStore, runs_root


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    logs = sub.add_parser("logs", parents=[common], help="a stage's worker log (or its events)")
    logs.add_argument("run", help="run id, prefix or 'last'")
    logs.add_argument("stage", nargs="?", help="stage (default: the running or latest one)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the stage ends")
    logs.add_argument("--events", action="store_true", help="show the event stream instead of the log")
    logs.set_defaults(func=cmd_logs)


def _default_stage(run: Run) -> str:
    """The stage someone asking for logs most likely means: the running one, else the latest started."""
    statuses = [s for s in run.stages() if s.state != "pending"]
    running = [s for s in statuses if s.state in ("running", "queued")]
    if running:
        return running[0].name
    if statuses:
        return max(statuses, key=lambda s: s.started_at or 0).name
    return PIPELINE[0]


def cmd_logs(args: argparse.Namespace) -> int:
    run = RunStore(runs_root(args.config)).get(args.run)
    stage = args.stage or _default_stage(run)
    if stage not in PIPELINE:
        return fail(f"unknown stage {stage!r}; stages are: {', '.join(PIPELINE)}")
    stage_dir = run.stage_dir(stage)
    if args.events:
        tail = EventTail(stage_dir / "events.jsonl")

        def show(final: bool = False) -> None:
            for event in tail.poll():
                if line := event_line(stage, event):
                    console.print(line)
    else:
        show = _LogTail(stage_dir / "worker.log").print_new
    show(final=not args.follow)
    if not args.follow:
        if not (stage_dir / "worker.log").exists() and not (stage_dir / "events.jsonl").exists():
            errors.print(f"stage {stage} of run {run.id} has not started")
        return 0
    try:
        while True:
            status = next(s for s in run.stages() if s.name == stage)
            show()
            if status.is_final or (status.state == "pending" and not run.is_live()):
                show(final=True)
                return 0
            time.sleep(0.3)
    except KeyboardInterrupt:
        return 0


class _LogTail(LineTail):
    """Prints whole lines only, so a key split across two reads is still redacted as one."""

    def print_new(self, final: bool = False) -> None:
        lines = self.poll_text()
        if final and self._pending:
            lines.append(self._pending.decode("utf-8", errors="replace"))
            self._pending = b""
        if lines:
            sys.stdout.write("".join(redact(line) + "\n" for line in lines))
            sys.stdout.flush()
