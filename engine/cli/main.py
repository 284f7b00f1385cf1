"""The `tas` command.

    tas                          open the panel
    tas run STAGE... [--config F] [--run RUN] [--detach]
    tas status [RUN] [--all]
    tas logs RUN [STAGE] [-f] [--events]
    tas cancel RUN [--grace S]
    tas gpu [--watch] [--interval S]
    tas chat [--target kd|ce|assistant|base] [--model NAME]

Light: argparse + the run store; never imports the ML stack, so every command answers at once.
Stages run in the background whatever happens to this process; `tas run` only follows them, and
Ctrl-C there detaches instead of stopping the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from engine.core import launcher
from engine.core.config import ConfigError, load_config
from engine.core.events import FINAL_STATES, EventTail
from engine.core.render import event_line, number, run_block
from engine.core.runs import Run, RunNotFound, RunStore
from engine.core.secrets import redact
from engine.stages import PIPELINE, UnknownStage, check_stage_names

DEFAULT_CONFIG = "config.yaml"

console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> int:
    errors.print(f"[bold red]error:[/] {message}", markup=True)
    return code


def runs_root(config_path: str | None) -> Path:
    """The run store: $TAS_RUNS_DIR, else panel.runs_dir of the config, else ./runs."""
    if os.environ.get("TAS_RUNS_DIR"):
        return Path(os.environ["TAS_RUNS_DIR"])
    path = Path(config_path or DEFAULT_CONFIG)
    if path.exists():
        try:
            return Path(load_config(path).panel.runs_dir)
        except ConfigError:
            pass
    return Path("runs")


# ------------------------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    stages = check_stage_names(args.stages)
    store = RunStore(runs_root(args.config))
    if args.run:
        run = store.get(args.run)
    else:
        run = store.create(load_config(args.config), args.config)
    tails = {stage: EventTail(run.stage_dir(stage) / "events.jsonl") for stage in stages}
    for tail in tails.values():
        tail.poll()  # skip events of earlier attempts: follow only this one
    launcher.start(run, stages)
    console.print(f"run [bold]{run.id}[/]: {', '.join(stages)}  (dir {run.path})")
    if args.detach:
        console.print(f"running in the background; follow with `tas logs {run.id} -f`, see `tas status`")
        return 0
    return follow_run(run, stages, tails)


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
        errors.print(f"[red]the run ended before {', '.join(missing)} reported a result[/]; "
                     f"see {run.path / 'supervisor.log'}")
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
        show = lambda: [console.print(line) for e in tail.poll() if (line := event_line(stage, e))]  # noqa: E731
    else:
        log = _LogTail(stage_dir / "worker.log")
        show = lambda: log.print_new()  # noqa: E731
    show()
    if not args.follow:
        if not (stage_dir / "worker.log").exists() and not (stage_dir / "events.jsonl").exists():
            errors.print(f"stage {stage} of run {run.id} has not started")
        return 0
    try:
        while True:
            status = next(s for s in run.stages() if s.name == stage)
            show()
            if status.is_final or (status.state == "pending" and not run.is_live()):
                show()
                return 0
            time.sleep(0.3)
    except KeyboardInterrupt:
        return 0


class _LogTail:
    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def print_new(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        if chunk:
            self.offset += len(chunk)
            sys.stdout.write(redact(chunk.decode("utf-8", errors="replace")))
            sys.stdout.flush()


def cmd_cancel(args: argparse.Namespace) -> int:
    run = RunStore(runs_root(args.config)).get(args.run)
    console.print(f"cancelling run {run.id} (stages save and stop; grace period applies)…")
    if not launcher.cancel(run, grace_s=args.grace):
        console.print("nothing was running")
        return 0
    console.print(run_block(run))
    return 0


def cmd_panel(args: argparse.Namespace) -> int:
    from tui.app import main as panel_main

    return panel_main(config_path=args.config or DEFAULT_CONFIG)


# ----------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tas", description="TAS Panel: Teacher → Assistant → Student distillation. No command opens the panel."
    )
    parser.add_argument("--config", default=None, help=f"config file (default: {DEFAULT_CONFIG})")
    sub = parser.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=f"config file (default: {DEFAULT_CONFIG})")

    run = sub.add_parser("run", parents=[common], help="run stages in the background and follow them")
    run.add_argument("stages", nargs="+", metavar="STAGE", help=f"{', '.join(PIPELINE)} or all")
    run.add_argument("--run", help="add the stages to (or resume them in) an existing run")
    run.add_argument("-d", "--detach", action="store_true", help="start and return at once")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", parents=[common], help="stages of recent runs with state and progress")
    status.add_argument("run", nargs="?", help="one run (id, prefix or 'last')")
    status.add_argument("--all", action="store_true", help="every run, not only the recent ones")
    status.add_argument("--last", type=int, default=5, help="how many recent runs (default 5)")
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", parents=[common], help="a stage's worker log (or its events)")
    logs.add_argument("run", help="run id, prefix or 'last'")
    logs.add_argument("stage", nargs="?", help="stage (default: the running or latest one)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the stage ends")
    logs.add_argument("--events", action="store_true", help="show the event stream instead of the log")
    logs.set_defaults(func=cmd_logs)

    cancel = sub.add_parser("cancel", parents=[common], help="stop a run's stages (they save first)")
    cancel.add_argument("run", help="run id, prefix or 'last'")
    cancel.add_argument("--grace", type=float, default=None, help="seconds before SIGKILL (default: config)")
    cancel.set_defaults(func=cmd_cancel)

    from engine.chat.client import add_chat_command
    from engine.gpu.monitor import add_gpu_command

    add_gpu_command(sub, common)
    add_chat_command(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = DEFAULT_CONFIG
    if args.command is None:
        return cmd_panel(args)
    try:
        return args.func(args)
    except (ConfigError, RunNotFound, UnknownStage, launcher.CannotStart) as exc:
        return fail(str(exc))  # the user's input is wrong: say so, no traceback


if __name__ == "__main__":
    sys.exit(main())
