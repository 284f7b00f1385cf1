"""Stopping one of *our* processes from the GPU tab: a stage worker (or a child of one) is stopped the way
`tas cancel` stops its run (`engine.runner.launcher.cancel`: the cancel is recorded, the stage saves what it
can and ends `cancelled`, the supervisor enforces the grace period); a vLLM teacher server gets SIGTERM.

Kept apart from the tab so that the rules (only processes labelled as ours, never a reused pid) are tested
without a screen. Run it off the event loop: it reads the run store and takes the run's lock.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from engine.core.process import ProcessRecord, current, send_signal
from engine.gpu.labels import label_processes
from engine.gpu.model import GpuProcess


class NotOurs(Exception):
    """The process may not be signalled from here; the message says why."""


def describe(process: GpuProcess) -> tuple[str, list[tuple[str, str]]]:
    """The confirmation's question and details for stopping `process` (raises NotOurs for a foreign one)."""
    if not process.is_ours:
        raise NotOurs(
            f"pid {process.pid} ({process.name or '?'}) is not one of our workers: only processes of our runs "
            "can be stopped here"
        )
    question = f"Send SIGTERM to pid {process.pid} ({process.label})?"
    if process.role == "vllm":
        what = "SIGTERM to this vLLM server process only (the teacher stage that uses it loses its server)"
    else:
        what = (
            f"cancel run {process.run_id} as `tas cancel` does: SIGTERM to its supervisor and the "
            f"{process.stage} worker; the stage stops at its next safe point and ends cancelled "
            "(killed after launch.cancel_grace_s)"
        )
    details = [
        ("process", f"{process.pid} · {process.name or '?'}"),
        ("run", str(process.run_id)),
        ("stage", str(process.stage)),
        ("what", what),
    ]
    return question, details


def terminate(process: GpuProcess, runs_root: str | os.PathLike[str]) -> str:
    """Stop `process` if it is still the same process and still ours; returns what was done.

    Raises NotOurs when it is foreign, gone, or its pid now belongs to another process."""
    running = current(process.pid)
    if running is None:
        raise NotOurs(f"pid {process.pid} has ended: nothing to stop")
    shown = ProcessRecord(process.pid, process.create_time)  # the start the tab sampled
    if process.create_time is not None and not shown.same_start(running):
        raise NotOurs(f"pid {process.pid} is now another process: not signalled")
    (now,) = label_processes([GpuProcess(process.gpu_index, process.pid)], runs_root)
    if not now.is_ours:
        raise NotOurs(f"pid {process.pid} is not one of our workers (any more): not signalled")
    if now.role != "vllm" and now.run_id is not None:
        from engine.runner import launcher
        from engine.store.runs import RunStore

        run = RunStore(Path(runs_root)).get(now.run_id)
        if launcher.cancel(run, wait=False):
            return f"cancelling run {now.run_id} ({now.stage}): SIGTERM sent, the cancel is recorded"
    # a vLLM server, or a worker whose run records show nothing running: this pid alone, through a pidfd,
    # if it is still the process labelled ours above
    still_ours = lambda p: label_processes([GpuProcess(process.gpu_index, p.pid)], runs_root)[0].is_ours  # noqa: E731
    if not send_signal(running, signal.SIGTERM, still_ours):
        raise NotOurs(f"pid {process.pid} has ended or is not ours to signal: not signalled")
    return f"SIGTERM sent to pid {process.pid} ({now.label})"
