"""Data-parallel scaling of the distill stage: 1 rank vs N ranks (torchrun), same tiny run, same global batch.

    python bench/ddp_scaling.py                    # tiny profile, CPU (gloo), 1 vs 2 ranks, 12 steps
    python bench/ddp_scaling.py --ranks 8 --steps 50 --config config.yaml    # on a GPU node (NCCL)

For each rank count it creates a run of the config in a scratch project, runs data + teacher + sft once
(1 process), then `distill` under `launch.nproc_per_node = ranks` with `per_device_train_batch_size`
scaled so the global batch (per-device x ranks x accumulation) is the same for every rank count: equal
work per step, so steps/s compares directly and `speedup` is the data-parallel gain. Figures come from
the stage's own events (progress timestamps and the `tokens_per_s` metric of rank 0), after the first
step (start-up and the first step's compile/allocation are not counted).

On CPU the ranks share the machine's cores, so this proves the path runs and shows its overhead; the
scaling figure that matters is a GPU node's. Prints one JSON object; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config.load import load_config  # noqa: E402
from engine.runner import launcher  # noqa: E402  (light: no ML imports in this process)
from engine.store.events import read_events  # noqa: E402
from engine.store.runs import RunStore  # noqa: E402


def wait(run, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while run.is_live():
        if time.monotonic() > deadline:
            launcher.cancel(run)
            raise SystemExit(f"run {run.id} did not finish in {timeout_s:.0f} s")
        time.sleep(1)


def stage_state(run, stage: str) -> str:
    states = [e for e in read_events(run.stage_dir(stage) / "events.jsonl") if e["kind"] == "status"]
    return states[-1]["state"] if states else "pending"


def distill_figures(run) -> dict:
    events = read_events(run.stage_dir("distill") / "events.jsonl")
    progress = [e for e in events if e["kind"] == "progress"]
    rates = [e["value"] for e in events if e["kind"] == "metric" and e["name"] == "tokens_per_s"]
    if len(progress) < 3:
        return {"error": "fewer than 3 progress events"}
    first, last = progress[1], progress[-1]  # from the end of step 1: start-up not counted
    steps = last["done"] - first["done"]
    seconds = last["ts"] - first["ts"]
    return {
        "steps": last["done"],
        "timed_steps": steps,
        "seconds": round(seconds, 2),
        "steps_per_s": round(steps / seconds, 3) if seconds > 0 else None,
        "tokens_per_s_median": round(statistics.median(rates[1:] or rates), 1) if rates else None,
    }


def one(project: Path, config_path: Path, ranks: int, steps: int, global_batch: int, timeout_s: float) -> dict:
    config = load_config(config_path)
    kd = config.train.distillation
    per_device, remainder = divmod(global_batch, ranks * kd.gradient_accumulation_steps)
    if per_device < 1 or remainder:
        return {
            "ranks": ranks,
            "error": f"global batch {global_batch} does not split over {ranks} ranks x "
            f"{kd.gradient_accumulation_steps} accumulation steps",
        }
    kd.per_device_train_batch_size = per_device
    kd.max_steps = steps
    kd.save_steps = steps * 10  # no checkpoint in the timed window
    kd.ce_only_control = False
    kd.eval_strategy = "no"
    config.launch.nproc_per_node = ranks
    run = RunStore(project / "runs").create(config, str(config_path), workdir=str(project), name=f"ddp-{ranks}")
    launcher.start(run, ["data", "teacher", "sft", "distill"])
    wait(run, timeout_s)
    state = stage_state(run, "distill")
    result = {"ranks": ranks, "per_device_train_batch_size": per_device, "run": run.id, "state": state}
    if state == "done":
        result.update(distill_figures(run))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--ranks", type=int, default=2, help="compared with 1 rank")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="examples per optimizer step (default: the config's per-device batch x ranks)",
    )
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep", action="store_true", help="keep the scratch project")
    args = parser.parse_args()

    config = load_config(args.config)
    kd = config.train.distillation
    global_batch = args.global_batch or kd.per_device_train_batch_size * args.ranks * kd.gradient_accumulation_steps
    project = Path(tempfile.mkdtemp(prefix="tas-ddp-bench-"))
    (project / "configs").mkdir()
    config_path = project / "configs" / Path(args.config).name
    shutil.copy(args.config, config_path)
    os.chdir(project)  # relative paths in the config resolve under each run (runs own their outputs)
    try:
        results = [
            one(project, config_path, ranks, args.steps, global_batch, args.timeout) for ranks in (1, args.ranks)
        ]
    finally:
        if not args.keep:
            shutil.rmtree(project, ignore_errors=True)
    single, multi = results
    speedup = None
    if single.get("steps_per_s") and multi.get("steps_per_s"):
        speedup = round(multi["steps_per_s"] / single["steps_per_s"], 2)
    print(
        json.dumps(
            {
                "config": args.config,
                "cpu_count": os.cpu_count(),
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "global_batch": global_batch,
                "results": results,
                "speedup_steps_per_s": speedup,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
