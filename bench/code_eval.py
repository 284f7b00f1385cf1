"""HumanEval scoring time: seconds to run the 164 canonical solutions in the sandbox, with 1 worker and
with N workers (default: the CPU count). Prints one JSON object.

    python bench/code_eval.py [--workers N] [--limit 164] [--timeout 10] [--sandbox auto|bwrap|builtin]

Every program is a fresh sandboxed interpreter (engine.evals.sandbox), so this is mostly interpreter
start-up, namespace set-up and the tests themselves. The load average is printed alongside: on a shared
machine it explains a slow figure. Asserts nothing beyond "the canonical solutions pass" being reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.evals.code import load_humaneval, score_completions  # light: standard library only
from engine.evals.sandbox import BACKENDS


def one_pass(problems: dict, workers: int, timeout_s: float, sandbox: str) -> dict:
    records = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    began = time.perf_counter()
    _, summary = score_completions(records, problems, workers=workers, timeout_s=timeout_s, sandbox=sandbox)
    seconds = time.perf_counter() - began
    return {
        "workers": workers,
        "seconds": round(seconds, 2),
        "ms_per_program": round(seconds / len(records) * 1000, 1),
        "pass@1": summary["pass@1"],
        "statuses": summary["statuses"],
        "sandbox": summary["sandbox"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--limit", type=int, default=None, help="first N problems only (default: all 164)")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--sandbox", choices=BACKENDS, default="auto", help="the sandbox backend (default: auto)")
    args = parser.parse_args()
    problems = load_humaneval(args.limit)
    one_pass(dict(list(problems.items())[:5]), 1, args.timeout, args.sandbox)  # warm the file cache; not counted
    load_before = os.getloadavg()[0]
    runs = [one_pass(problems, n, args.timeout, args.sandbox) for n in (1, args.workers)]
    print(
        json.dumps(
            {
                "problems": len(problems),
                "cpu_count": os.cpu_count(),
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "euid": os.geteuid(),
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
