"""`python -m engine.runner.worker STAGE --run DIR`: runs one stage of a run and reports it as events.

The worker reads the run's frozen config, writes `status: running`, calls the stage's `run(ctx)`, and
ends with exactly one final status: `done`, `failed` (with a message naming the cause) or `cancelled`
(after SIGTERM). Tracebacks go to stdout, which the supervisor sends to `worker.log`.

Under torchrun every rank runs this module; rank 0 owns `events.jsonl`, other ranks write their own
`events.rank<N>.jsonl`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time
import traceback
import warnings

from engine.core.fsio import describe_os_error
from engine.core.secrets import RedactingStream, load_dotenv_secrets
from engine.pipeline.stages import stage_module
from engine.runner.context import EXPECTED_FAILURES, StageCancelled, StageContext
from engine.store.events import EventWriter
from engine.store.runs import Run


def install_cancel_handler(events: EventWriter, cancel_event: threading.Event) -> None:
    """SIGTERM / SIGINT set `cancel_event` (stages stop at their next safe point); SIGHUP is ignored."""

    def on_sigterm(signum: int, frame: object) -> None:
        # Only set the flag: the handler runs in the main thread, which may be inside EventWriter.emit
        # holding its lock; logging from here would wait on that lock forever.
        if not cancel_event.is_set():
            cancel_event.set()
            threading.Thread(
                target=events.log,
                args=("cancel requested (SIGTERM): stopping at the next safe point", "warning"),
                daemon=True,
            ).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def quiet_warnings() -> None:
    """Python warnings in worker.log: each distinct one once per process, on one line (where it was raised
    and what it says, without the source line under it). A library that warns on every call, or from
    several places, or sets its own "always" filter, writes it once. PYTHONWARNINGS / -W (the user's own
    rules) turn this off."""
    if sys.warnoptions:
        return
    seen: set[tuple[type, str]] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message).strip()
        if (category, text) in seen:
            return
        seen.add((category, text))
        where = str(filename).rpartition("site-packages/")[2]
        try:
            print(f"{category.__name__} ({where}:{lineno}): {text}", file=file or sys.stderr, flush=True)
        except (OSError, ValueError):
            pass  # the log is gone: a warning is not worth failing the stage for

    warnings.showwarning = show


def run_stage(stage: str, run: Run) -> int:
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    events_name = "events.jsonl" if rank == 0 else f"events.rank{rank}.jsonl"
    events = EventWriter(run.stage_dir(stage) / events_name)
    cancel_event = threading.Event()
    install_cancel_handler(events, cancel_event)

    started = time.monotonic()
    events.status("running", pid=os.getpid(), rank=rank, world_size=world_size)
    try:
        config = run.config()
        load_dotenv_secrets(run.workdir)
        module = importlib.import_module(stage_module(stage))
        ctx = StageContext(stage, run, config, events, rank, world_size, cancel_event)
        module.run(ctx)
        ctx.check_cancelled()
    except StageCancelled as exc:
        events.status("cancelled", message=str(exc))
        return 130
    except EXPECTED_FAILURES as exc:
        events.status("failed", error=str(exc))
        print(f"stage {stage} failed: {exc}", flush=True)
        return 1
    except OSError as exc:  # disk full, permissions, ...: say what and where, keep the traceback in the log
        traceback.print_exc()
        sys.stdout.flush()
        events.status("failed", error=str(describe_os_error(exc)))
        return 1
    except BaseException as exc:
        traceback.print_exc()
        sys.stdout.flush()
        events.status("failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    events.status("done", seconds=round(time.monotonic() - started, 3))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.runner.worker")
    parser.add_argument("stage")
    parser.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory")
    args = parser.parse_args(argv)
    # everything printed goes to worker.log: redacted line by line, whoever prints it
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    quiet_warnings()
    return run_stage(args.stage, Run.open(args.run))


if __name__ == "__main__":
    sys.exit(main())
