"""`tas eval-code [--benchmark humaneval|tiny-python] COMPLETIONS.jsonl`: score completions made anywhere with our
sandbox."""

from __future__ import annotations

import argparse

from engine.evals.code import add_arguments, run_from_args


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "eval-code",
        parents=[common],
        help="score HumanEval or tiny-python completions (pass@k) in a sandbox",
        description="Run HumanEval (or, with --benchmark tiny-python, tiny-python) "
        "completions in a sandbox and report pass@k as JSON.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)
