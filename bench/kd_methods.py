"""Which distillation method helps, on the tiny profile, over seeds: each method's distill + eval, a run per
(method, seed), and pass@1 on tiny-python's held-out problems and KL to the assistant as mean ± sd. Prints
one JSON object.

    python bench/kd_methods.py [--seeds 0 1 2] [--methods ce_only forward_kl ...] [--keep]

One base run makes the data, the teacher's answers and the assistant (`tas run data teacher sft`, shipped
tiny models, configs/tiny.yaml); each (method, seed) then runs `distill` and `eval` again in that run, with
the run's frozen config changed to the method's keys and `train.distillation.seed` (batch order, dropout,
the on-policy draws and samples). Teacher, data and assistant are the same for every method, so the spread
is the students' own. `ce_only` is the control (KD weight 0); the CE-only control student of each run is
switched off, the method's KD student is the one measured.

What it does not show: these are ~1M-parameter models on a toy language; a method's rank here says little
about a 7B teacher (README "KD methods").
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tiny_profile import print_result, tas, tiny_project  # noqa: E402  (after the path)

KD = "train.distillation.knowledgedistillation"
METHODS: dict[str, dict[str, object]] = {
    "ce_only": {f"{KD}.weight": 0.0},
    "forward_kl": {},
    "reverse_kl": {f"{KD}.loss.divergence": "reverse_kl"},
    "jsd_0.5": {f"{KD}.loss.divergence": "jsd", f"{KD}.loss.beta": 0.5},
    "on_policy_0.5": {f"{KD}.on_policy.lmbda": 0.5},
    "cached_topk": {f"{KD}.teacher_cache.mode": "topk"},
}


def last_attempt(events_file: Path) -> list[dict]:
    """The events of the stage's last attempt (from its last `running`)."""
    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    starts = [i for i, e in enumerate(events) if e.get("kind") == "status" and e.get("state") == "running"]
    return events[starts[-1] :] if starts else events


def distill_figures(run_dir: Path) -> dict[str, float]:
    events = last_attempt(run_dir / "distill" / "events.jsonl")
    done = [e for e in events if e.get("kind") == "status" and e.get("state") == "done"]
    if not done:
        raise RuntimeError(f"distill did not end done: {run_dir / 'distill' / 'worker.log'}")
    peaks = [e for e in events if e.get("kind") == "memory"]
    rss = max((e.get("devices", e).get("cpu_rss", 0) for e in peaks), default=0)
    return {"seconds": round(done[-1].get("seconds", 0.0), 1), "peak_rss_mib": round(rss / 2**20)}


def one(project: Path, run_dir: Path, base: Path, method: str, seed: int) -> dict[str, float]:
    """distill + eval of `method` at `seed` in the base run (its config: `base`, the run's as the base run
    froze it, plus the method's keys); its KD student's figures."""
    from engine.config.keys import set_key
    from engine.config.load import load_config
    from engine.pipeline.models import STUDENT_KD

    frozen = run_dir / "config.yaml"
    config = load_config(base)  # never the previous method's: its keys would carry over
    set_key(config, "train.distillation.ce_only_control", False)
    set_key(config, "eval.include_base_assistant", False)  # the same for every method: scored once, by the base run
    set_key(config, "eval.code.include_teacher", False)
    set_key(config, "train.distillation.seed", seed)
    for key, value in METHODS[method].items():
        set_key(config, key, value)
    frozen.write_text(config.to_yaml())
    tas(project, "run", "distill", "eval", "--run", run_dir.name)
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    student = report["models"][STUDENT_KD.name]
    return {
        "pass@1": student.get("pass@1"),
        "kl_to_assistant": student.get("kl_to_assistant"),
        **distill_figures(run_dir),
    }


def spread(values: list[float | None]) -> dict[str, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None}
    return {
        "mean": round(statistics.fmean(values), 4),
        "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--keep", action="store_true", help="keep the temporary project (its path is printed)")
    args = parser.parse_args()

    work, project = tiny_project("tas-kd-methods-")
    began = time.perf_counter()
    tas(project, "run", "data", "teacher", "sft", "--config", "configs/tiny.yaml", "--name", "kd-methods")
    run_dir = sorted((project / "runs").iterdir())[-1]
    base = work / "base-config.yaml"
    shutil.copy(run_dir / "config.yaml", base)
    runs: dict[str, list[dict]] = {}
    for method in args.methods:
        for seed in args.seeds:
            runs.setdefault(method, []).append({"seed": seed, **one(project, run_dir, base, method, seed)})
    table = {
        method: {
            "pass@1": spread([r["pass@1"] for r in rows]),
            "kl_to_assistant": spread([r["kl_to_assistant"] for r in rows]),
            "distill_seconds": spread([r["seconds"] for r in rows]),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rows),
        }
        for method, rows in runs.items()
    }
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    result = {
        "seeds": args.seeds,
        "methods": table,
        "runs": runs,
        "reference_pass@1": {name: numbers.get("pass@1") for name, numbers in report["models"].items()},
        "problems": report.get("code", {}).get("problems"),
        "bench_seconds": round(time.perf_counter() - began, 1),
    }
    print_result(result, work, project, args.keep)


if __name__ == "__main__":
    main()
