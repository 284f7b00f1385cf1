"""`tas gpu`: the host line and the GPU table once, or refreshed with --watch/--count (the library is `engine.gpu`)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from engine.gpu.fake import FAKE_ENV
from engine.gpu.format import render_snapshot
from engine.gpu.sampler import MIN_INTERVAL_S, Sampler
from engine.store.runs import runs_root


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < MIN_INTERVAL_S:
        raise argparse.ArgumentTypeError(f"the interval must be at least {MIN_INTERVAL_S} s")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("the count must be at least 1")
    return value


def add_parser(subparsers: Any, common_parent: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Register `tas gpu` on an argparse subparsers object; returns its parser."""
    gpu = subparsers.add_parser(
        "gpu",
        parents=[common_parent] if common_parent is not None else [],
        help="host CPU/RAM, GPU memory, utilization, temperature, power and processes (ours labelled)",
        description="Host CPU, load, RAM and swap; GPU memory, utilization, temperature, power and the "
        "processes on each GPU with their CPU % and RSS; processes of our stage workers are labelled with "
        "their run and stage (our workers are listed even when they use no GPU). "
        f"Set {FAKE_ENV}=2 to try it without a GPU.",
    )
    gpu.add_argument("-w", "--watch", action="store_true", help="keep refreshing (Ctrl-C to stop)")
    gpu.add_argument(
        "--interval",
        type=_interval,
        default=1.0,
        metavar="S",
        help=f"seconds between samples when watching (default 1.0, at least {MIN_INTERVAL_S})",
    )
    gpu.add_argument(
        "--count", type=_count, default=None, metavar="N", help="watch for N samples, then exit (implies --watch)"
    )
    gpu.set_defaults(func=cmd_gpu)
    return gpu


def cmd_gpu(args: argparse.Namespace) -> int:
    """Print the host line and the GPU table once, or repeatedly with --watch/--count. Exit 1 when no GPU
    can be read (the message on stderr; the host line and our workers' CPU and RSS still on stdout)."""
    root = runs_root(getattr(args, "config", None))
    sampler = Sampler(root)
    watch = bool(getattr(args, "watch", False)) or getattr(args, "count", None) is not None
    count = getattr(args, "count", None)
    interval = max(MIN_INTERVAL_S, float(getattr(args, "interval", 1.0) or 1.0))
    tty = sys.stdout.isatty()
    shown = 0
    try:
        sampler.sample()  # CPU % is measured between two samples: prime, so the first table has it
        time.sleep(MIN_INTERVAL_S)
        while True:
            snapshot = sampler.sample()
            if snapshot.error and shown == 0:
                print(f"error: {snapshot.error}", file=sys.stderr)
                # the host and our workers are still worth seeing on a machine without a GPU
                print("\n".join(render_snapshot(snapshot).splitlines()[2:]))
                return 1
            text = render_snapshot(snapshot)
            if watch and tty:
                sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
            else:
                sys.stdout.write(("\n" if shown else "") + text + "\n")
            sys.stdout.flush()
            shown += 1
            if not watch or (count is not None and shown >= count):
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    finally:
        sampler.close()
