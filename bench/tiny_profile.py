"""The offline tiny profile end to end: how long the pipeline takes on the shipped tiny models and what
the eval report says (pass@1 of the teacher, the assistant before and after SFT, the KD student and the
CE-only control on tiny-python's 87 held-out problems); with --build, also how long the tiny models take to
build (each model's pretraining, `python -m engine.models.tiny build`). Prints one JSON object.

    python bench/tiny_profile.py [--build] [--keep]

Runs `tas run all --config configs/tiny.yaml` in a temporary project made of this checkout's
configs/tiny.yaml and prompt.yaml (always on the shipped models; --build builds into a temporary folder, to
time it). The load average is printed alongside: on a shared machine it explains a slow figure.
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


def build_models(into: Path) -> dict[str, float]:
    """Seconds to build each tiny model, as the build command reports them."""
    done = subprocess.run(
        [sys.executable, "-m", "engine.models.tiny", "build", "--into", str(into)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    times = {}
    for line in done.stderr.splitlines():  # "tiny:teacher: built in 312s -> …"
        if ": built in " in line:
            name, rest = line.split(": built in ", 1)
            times[name] = float(rest.split("s", 1)[0])
    return times


def tiny_project(prefix: str) -> tuple[Path, Path]:
    """A temporary folder and, inside it, a project made of this checkout's configs/tiny.yaml and prompt.yaml."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    project = work / "project"
    (project / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "tiny.yaml", project / "configs" / "tiny.yaml")
    shutil.copy(ROOT / "prompt.yaml", project / "prompt.yaml")
    return work, project


def tas(project: Path, *args: str) -> None:
    """`tas ARGS` in `project`, quietly; a failure raises."""
    subprocess.run(
        [sys.executable, "-m", "engine.cli.main", *args],
        cwd=project,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def print_result(result: dict, work: Path, project: Path, keep: bool) -> None:
    """Print the bench's JSON, with the machine's CPUs and load (on a shared machine they explain a slow
    figure); the temporary project is kept (its path printed) or removed."""
    result = {**result, "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    if keep:
        result["project"] = str(project)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


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
    parser.add_argument("--build", action="store_true", help="build the tiny models first and run on those")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project (its path is printed)")
    args = parser.parse_args()

    work, project = tiny_project("tas-tiny-bench-")
    build = build_models(work / "built") if args.build else None
    began = time.perf_counter()
    tas(project, "run", "all", "--config", "configs/tiny.yaml")
    pipeline = round(time.perf_counter() - began, 1)
    run_dir = sorted((project / "runs").iterdir())[-1]
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    result = {
        "build_seconds": build,
        "pipeline_seconds": pipeline,
        "stage_seconds": stage_seconds(run_dir),
        "pass@1": {name: numbers.get("pass@1") for name, numbers in report["models"].items()},
        "kl_to_assistant": {
            name: numbers["kl_to_assistant"]
            for name, numbers in report["models"].items()
            if "kl_to_assistant" in numbers
        },
        "problems": report.get("code", {}).get("problems"),
    }
    print_result(result, work, project, args.keep)


if __name__ == "__main__":
    main()
