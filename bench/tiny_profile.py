"""The offline tiny profile end to end: how long the tiny cache takes to build (each model's pretraining)
and the pipeline to run, and what the eval report says (pass@1 of the teacher, the assistant before and
after SFT, the KD student and the CE-only control on tiny-python's 87 held-out problems). Prints one JSON
object.

    python bench/tiny_profile.py [--cache DIR] [--keep]

Builds into a fresh temporary cache (or --cache DIR: an existing build is then reused and its build
times are reported as 0) and runs `tas run all --config configs/tiny.yaml` in a temporary project made
of this checkout's configs/tiny.yaml and prompt.yaml. The load average is printed alongside: on a shared
machine it explains a slow figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_cache(cache: Path) -> dict[str, float]:
    """Seconds to build each tiny model (a separate process, as a worker builds it on first use)."""
    times = {}
    for name in ("teacher", "assistant", "student"):  # the assistant's build includes the shared tokenizer
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"from engine.models import tiny; tiny.resolve('tiny:{name}')"],
                       cwd=ROOT, env={**os.environ, "TAS_TINY_CACHE": str(cache)}, check=True,
                       stderr=subprocess.DEVNULL)
        times[name] = round(time.perf_counter() - began, 1)
    return times


def stage_seconds(run_dir: Path) -> dict[str, float]:
    seconds = {}
    for stage in ("data", "teacher", "sft", "distill", "eval"):
        for line in (run_dir / stage / "events.jsonl").read_text().splitlines():
            event = json.loads(line)
            if event.get("kind") == "status" and event.get("state") == "done" and "seconds" in event:
                seconds[stage] = round(event["seconds"], 1)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="tiny cache folder (default: a fresh temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project (its path is printed)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tas-tiny-bench-"))
    cache = args.cache or work / "cache"
    build = build_cache(cache)
    project = work / "project"
    (project / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "tiny.yaml", project / "configs" / "tiny.yaml")
    shutil.copy(ROOT / "prompt.yaml", project / "prompt.yaml")
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engine.cli.main", "run", "all", "--config", "configs/tiny.yaml"],
                   cwd=project, env={**os.environ, "TAS_TINY_CACHE": str(cache)}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pipeline = round(time.perf_counter() - began, 1)
    run_dir = sorted((project / "runs").iterdir())[-1]
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    result = {
        "build_seconds": build,
        "pipeline_seconds": pipeline,
        "stage_seconds": stage_seconds(run_dir),
        "pass@1": {name: numbers.get("pass@1") for name, numbers in report["models"].items()},
        "kl_to_assistant": {name: numbers["kl_to_assistant"] for name, numbers in report["models"].items()
                            if "kl_to_assistant" in numbers},
        "problems": report.get("code", {}).get("problems"),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if args.keep:
        result["project"] = str(project)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
