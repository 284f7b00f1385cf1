"""Panel cold start: seconds from launching a fresh Python process to the panel's first painted frame,
and the panel process's resident memory at that moment. Prints one JSON object.

    python bench/panel_startup.py [--runs 5] [--config configs/tiny.yaml]

Each run is a new interpreter (cold imports, warm OS file cache), in headless mode at 120x40.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import resource, sys, time
from tui.app import TASPanel

class Timed(TASPanel):
    def on_mount(self) -> None:
        self.call_after_refresh(self.first_frame)

    def first_frame(self) -> None:
        heavy = [m for m in ('torch', 'transformers', 'datasets', 'peft', 'trl') if m in sys.modules]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print("FRAME", rss, ",".join(heavy) or "-", flush=True)
        self.exit()

Timed(config_path=sys.argv[1], gpu_interval=3600).run(headless=True, size=(120, 40))
"""


def one_start(config: str) -> tuple[float, int, str]:
    began = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, config], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        if line.startswith("FRAME"):
            elapsed = time.perf_counter() - began
            _, rss, heavy = line.split()
            child.wait(timeout=30)
            return elapsed, int(rss), heavy
    raise RuntimeError("the panel exited before its first frame")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config", default="configs/tiny.yaml")
    args = parser.parse_args()
    one_start(args.config)  # warm the OS file cache; not counted
    results = [one_start(args.config) for _ in range(args.runs)]
    seconds = [r[0] for r in results]
    rss = [r[1] for r in results]
    print(json.dumps({
        "runs": args.runs,
        "first_frame_s": {"median": round(statistics.median(seconds), 3), "min": round(min(seconds), 3),
                          "max": round(max(seconds), 3)},
        "rss_mib_median": round(statistics.median(rss) / 2**20, 1),
        "ml_modules_imported": sorted({r[2] for r in results}),
    }, indent=2))


if __name__ == "__main__":
    main()
