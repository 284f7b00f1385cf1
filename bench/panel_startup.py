"""Panel cold start against a bare Textual app: seconds from launching a fresh Python process to the first
painted frame, the CPU seconds the process had used by then (less sensitive to a busy machine than the
wall clock), and its resident memory at that moment. Prints one JSON object.

    python bench/panel_startup.py [--runs 5] [--config configs/tiny.yaml]

Both apps are timed the same way, in the same run, alternately (so a busy machine weighs on both alike):
a new interpreter each time (cold imports; warm OS file cache and bytecode cache: compiled modules go to
a private PYTHONPYCACHEPREFIX, even where PYTHONDONTWRITEBYTECODE is set, as an installed panel has its
.pyc files and site-packages have theirs), headless at 120x40; the app's on_mount
schedules a callback for after the first screen refresh, which notes the time and exits. The bare app is
a Header, one Static and a Footer: what any Textual app pays. `ratio` is panel median / bare median
(wall clock); `cpu_ratio` the same for CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import resource, sys, time

def first_frame(app):
    at, cpu = time.monotonic(), time.process_time()
    heavy = [m for m in ('torch', 'transformers', 'datasets', 'peft', 'trl') if m in sys.modules]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("FRAME", repr(at), repr(cpu), rss, ",".join(heavy) or "-", flush=True)
    app.exit()

if sys.argv[1] == "panel":
    from tui.app import TASPanel

    class Timed(TASPanel):
        def on_mount(self) -> None:
            self.call_after_refresh(first_frame, self)

    app = Timed(config_path=sys.argv[2], gpu_interval=3600)
else:
    from textual.app import App
    from textual.widgets import Footer, Header, Static

    class Timed(App):
        def compose(self):
            yield Header()
            yield Static("hello")
            yield Footer()

        def on_mount(self) -> None:
            self.call_after_refresh(first_frame, self)

    app = Timed()
app.run(headless=True, size=(120, 40))
"""


def one_start(kind: str, config: str, env: dict[str, str]) -> tuple[float, float, int, str]:
    """(seconds to the first frame, CPU seconds by then, max RSS in bytes, ML modules imported) of one
    fresh process."""
    began = time.monotonic()  # CLOCK_MONOTONIC: the same clock in the child
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, kind, config], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    for line in child.stdout:
        if line.startswith("FRAME"):
            _, at, cpu, rss, heavy = line.split()
            child.wait(timeout=30)
            return float(at) - began, float(cpu), int(rss), heavy
    raise RuntimeError(f"the {kind} app exited before its first frame")


def summary(results: list[tuple[float, float, int, str]]) -> dict:
    seconds = [r[0] for r in results]
    return {
        "first_frame_s": {
            "median": round(statistics.median(seconds), 3),
            "min": round(min(seconds), 3),
            "max": round(max(seconds), 3),
        },
        "cpu_s_median": round(statistics.median(r[1] for r in results), 3),
        "rss_mib_median": round(statistics.median(r[2] for r in results) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config", default="configs/tiny.yaml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="panel-startup-pyc-") as pycache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = pycache
        one_start("panel", args.config, env)  # warm the OS file cache and write the .pyc files; not counted
        one_start("bare", args.config, env)
        panel, bare = [], []
        for _ in range(args.runs):
            panel.append(one_start("panel", args.config, env))
            bare.append(one_start("bare", args.config, env))
    panel_s, bare_s = summary(panel), summary(bare)
    print(
        json.dumps(
            {
                "runs": args.runs,
                "panel": panel_s,
                "bare_textual": bare_s,
                "ratio": round(panel_s["first_frame_s"]["median"] / bare_s["first_frame_s"]["median"], 2),
                "cpu_ratio": round(panel_s["cpu_s_median"] / bare_s["cpu_s_median"], 2),
                "ml_modules_imported": sorted({r[3] for r in panel}),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
