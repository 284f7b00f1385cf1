"""`tas run STAGE... [--config F] [--run RUN] [--detach]`: start stages in the background and follow them.

Stages run in the background whatever happens to this process; `tas run` only follows them, and Ctrl-C
detaches instead of stopping the run.
"""

from __future__ import annotations

import argparse
import time

from rich.markup import escape

from engine.cli.common import console, errors
from engine.config.load import load_config
from engine.pipeline.stages import PIPELINE, check_stage_names
from engine.runner import launcher
from engine.store.events import FINAL_STATES, EventTail
from engine.store.lineage import REUSABLE_STAGES, ReuseRefused, reuse_teacher
from engine.store.render import event_line, number
from engine.store.runs import Run, RunStore, config_secret_warning, remove_run, runs_root


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    run = sub.add_parser("run", parents=[common], help="run stages in the background and follow them")
    run.add_argument("stages", nargs="+", metavar="STAGE", help=f"{', '.join(PIPELINE)} or all")
    run.add_argument("--run", help="add the stages to (or resume them in) an existing run")
    run.add_argument("-d", "--detach", action="store_true", help="start and return at once")
    run.add_argument("--name", default="", help="a name for the new run (shown everywhere; `tas status NAME`)")
    run.add_argument("--note", default="", help="a note for the new run (change it later with `tas note`)")
    run.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="STAGE=RUN",
        help="reuse another run's outputs of STAGE (teacher) when they were made the same way",
    )
    run.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    stages = check_stage_names(args.stages)
    store = RunStore(runs_root(args.config))
    reuse = parse_reuse(args.reuse)
    if args.run:
        run = store.get(args.run)
        if reuse:
            raise ReuseRefused("--reuse applies to a new run only; start one without --run")
    else:
        config = load_config(args.config)
        run = store.create(config, args.config, name=args.name, note=args.note)
        if warning := config_secret_warning(config, args.config):
            console.print(f"[yellow]warning:[/] {escape(warning)}")
        for stage, source_ref in reuse.items():
            source = store.get(source_ref)
            try:
                summary = reuse_teacher(run.config(), run.path, run.workdir, source.config(), source.path, source.id)
            except ReuseRefused:
                remove_run(run)  # nothing was started: leave no empty run behind
                raise
            run.update_meta(reused={**run.reused, stage: source.id})
            console.print(summary)
    tails = {stage: EventTail(run.stage_dir(stage) / "events.jsonl") for stage in stages}
    for tail in tails.values():
        tail.poll()  # skip events of earlier attempts: follow only this one
    launcher.start(run, stages)
    console.print(f"run [bold]{escape(run.label)}[/]: {', '.join(stages)}  (dir {run.path})")
    if args.detach:
        console.print(f"running in the background; follow with `tas logs {run.id} -f`, see `tas status`")
        return 0
    return follow_run(run, stages, tails)


def parse_reuse(values: list[str]) -> dict[str, str]:
    """`--reuse teacher=RUN` → {"teacher": "RUN"}."""
    reuse = {}
    for value in values:
        stage, _, ref = value.partition("=")
        if stage not in REUSABLE_STAGES or not ref:
            raise ReuseRefused(f"--reuse {value}: expected STAGE=RUN with STAGE one of {', '.join(REUSABLE_STAGES)}")
        reuse[stage] = ref
    return reuse


def follow_run(run: Run, stages: list[str], tails: dict[str, EventTail]) -> int:
    """Print the events of `stages` as they come, until the supervisor has ended and no stage runs."""
    finals: dict[str, str] = {}
    printer = FollowPrinter()
    try:
        while True:
            alive = run.is_live() or any(s.state == "running" for s in run.stages() if s.name in stages)
            for stage, tail in tails.items():
                for event in tail.poll():
                    if event.get("kind") == "status" and event.get("state") in FINAL_STATES:
                        finals[stage] = event["state"]
                    printer.show(stage, event)
            printer.flush_due()
            if not alive:
                break
            time.sleep(0.25)
    except KeyboardInterrupt:
        console.print(f"\ndetached: run {run.id} goes on in the background. Stop it with `tas cancel {run.id}`.")
        return 0
    missing = [s for s in stages if s not in finals]
    if missing and all(state == "done" for state in finals.values()):
        errors.print(
            f"[red]the run ended before {', '.join(missing)} reported a result[/]; see {run.path / 'supervisor.log'}"
        )
    return 0 if not missing and all(state == "done" for state in finals.values()) else 1


class FollowPrinter:
    """What `tas run` prints while following: every status, log and artifact event at once; progress,
    metrics and memory folded into one line per stage at most every few seconds (a training stage
    logs a dozen metrics per step, which would scroll everything else away)."""

    EVERY_S = 5.0

    def __init__(self):
        self.latest: dict[str, dict[str, dict]] = {}  # stage -> kind/name -> latest event
        self.last_flush: dict[str, float] = {}

    def show(self, stage: str, event: dict) -> None:
        kind = event.get("kind")
        if kind in ("progress", "metric", "memory"):
            key = f"metric:{event.get('name')}" if kind == "metric" else kind
            self.latest.setdefault(stage, {})[key] = event
            return
        if kind == "status" and event.get("state") in FINAL_STATES:
            self.flush(stage)  # the last figures before the final word
        line = event_line(stage, event)
        if line:
            console.print(line)

    def flush_due(self) -> None:
        now = time.monotonic()
        for stage in list(self.latest):
            if now - self.last_flush.get(stage, 0) >= self.EVERY_S:
                self.flush(stage)

    def flush(self, stage: str) -> None:
        pending = self.latest.pop(stage, {})
        self.last_flush[stage] = time.monotonic()
        if not pending:
            return
        parts = []
        progress = pending.get("progress")
        if progress:
            total = f"/{number(progress.get('total'))}" if progress.get("total") else ""
            parts.append(f"{number(progress.get('done'))}{total} {progress.get('unit', '')}".strip())
        metrics = [e for k, e in pending.items() if k.startswith("metric:")]
        metrics.sort(key=lambda e: (KEY_METRICS.index(e["name"]) if e["name"] in KEY_METRICS else 99, e["name"]))
        parts += [f"{e['name']}={number(e.get('value'))}" for e in metrics[:6]]
        stamp = time.strftime("%H:%M:%S")
        console.print(f"[dim]{stamp}[/] [bold]{stage:<7}[/] " + escape("  ".join(parts)))


KEY_METRICS = ("loss", "eval_loss", "ce_loss", "kd_loss", "lr", "tokens_per_s", "control/loss", "prompts", "tokens")
