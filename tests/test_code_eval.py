"""HumanEval scoring (engine.evals.code) and the sandbox it runs completions in (engine.evals.sandbox).

Tests marked e2e start real sandboxes (one interpreter per program). The hostile ones write
completions a model could write, by mistake or not, and check that each is contained and counted as a
failure within bounded time. A few protections exist only when we run as root (the program then runs
as `nobody`) or when the kernel grants namespaces: those tests say so and skip otherwise.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from engine.evals.code import (
    HUMANEVAL_STOP,
    build_program,
    chat_messages,
    eval_code_main,
    extract_code,
    load_humaneval,
    pass_at_k,
    score_completions,
    truncate_completion,
)
from engine.evals.sandbox import SandboxUnavailable, run_program

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="only as root does the program run as another user")


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    return load_humaneval()


def first(problems: dict, n: int) -> dict:
    return dict(list(problems.items())[:n])


def run_completion(problems: dict, completion: str, timeout_s: float = 10.0, task_id: str = "HumanEval/0"):
    return run_program(build_program(problems[task_id], completion), timeout_s=timeout_s)


def leftovers(session: int) -> list[psutil.Process]:
    """Live processes of a finished sandbox: in its session, or still running its child script."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            mine = any("sandbox_child.py" in part for part in proc.info["cmdline"] or [])
            if mine or os.getsid(proc.pid) == session:
                found.append(proc)
        except (psutil.Error, ProcessLookupError):
            pass
    return found


def assert_no_leftovers(session: int, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while (alive := leftovers(session)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, [(p.pid, p.info) for p in alive]


# --- pure functions --------------------------------------------------------------------------------


def reference_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize(
    "n, c, k",
    [
        (1, 0, 1),
        (1, 1, 1),
        (10, 0, 1),
        (10, 0, 10),
        (10, 3, 1),
        (10, 3, 5),
        (10, 7, 5),
        (10, 10, 10),
        (20, 1, 10),
        (200, 13, 1),
        (200, 13, 10),
        (200, 13, 100),
        (200, 199, 100),
        (5, 4, 2),
    ],
)
def test_pass_at_k_matches_the_combinatorial_definition(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(reference_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0  # nothing passed
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every draw of 3 contains a pass
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the pass rate
    for bad in [(5, 6, 1), (5, 1, 6), (5, 1, 0), (5, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_humaneval_loads_with_a_limit(problems):
    assert len(problems) == 164
    assert list(problems)[:2] == ["HumanEval/0", "HumanEval/1"]
    assert set(problems["HumanEval/0"]) >= {"prompt", "canonical_solution", "test", "entry_point"}
    assert list(load_humaneval(limit=3)) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert load_humaneval(limit=0) == {}


def test_truncate_completion_stops_at_the_next_top_level_statement():
    body = "    return a + b\n"
    for tail in [
        "\ndef other():\n    pass\n",
        "\nif __name__ == '__main__':\n    main()\n",
        "\nprint(add(1, 2))\n",
        "\n# tests\n",
        "\nclass X:\n    pass\n",
    ]:
        assert truncate_completion(body + tail) == body
    assert truncate_completion(body) == body
    assert HUMANEVAL_STOP == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def test_chat_messages_carry_the_prompt(problems):
    problem = problems["HumanEval/0"]
    messages = chat_messages(problem, system="You are a careful programmer.")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert problem["prompt"].strip() in messages[1]["content"]
    assert "```python" in messages[1]["content"]
    assert [m["role"] for m in chat_messages(problem)] == ["user"]


def chat_replies(problem: dict) -> dict[str, str]:
    """Ways a chat model answers with a correct solution."""
    prompt, body = problem["prompt"], problem["canonical_solution"]
    whole = prompt + body
    return {
        "fenced whole function": f"Sure! Here it is:\n\n```python\n{whole}```\n\nIt checks every pair.",
        "fenced, main guard": f'```python\n{whole}\n\nif __name__ == "__main__":\n    print(input())\n```',
        "unlabelled fence": f"```\n{whole}```",
        "fenced body only": f"The body:\n```python\n{body}```",
        "bare whole function": whole,
        "unterminated fence": f"```python\n{whole}",
        "two blocks": f"```python\nimport math\n```\nthen\n```python\n{whole}```",
    }


def test_extract_code_shapes(problems):
    problem = problems["HumanEval/0"]
    replies = chat_replies(problem)
    # the prompt itself, echoed: the completion is what follows it
    assert extract_code(replies["fenced whole function"], problem["prompt"], "has_close_elements").startswith(
        "    for idx, elem in enumerate(numbers):"
    )
    # a body without indentation is indented under the signature
    flat = "for x in numbers:\n    pass\nreturn False"
    assert extract_code(flat, problem["prompt"], "has_close_elements") == (
        "    for x in numbers:\n        pass\n    return False\n"
    )
    assert "__main__" not in extract_code(replies["fenced, main guard"], problem["prompt"], "has_close_elements")


# --- sandboxed runs ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_canonical_solutions_all_pass(problems):
    records = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    results, summary = score_completions(records, problems, workers=2, ks=(1, 10))
    failed = [(r["task_id"], r["status"], r["error"][-300:]) for r in results if not r["passed"]]
    assert not failed
    assert summary["pass@1"] == 1.0
    assert "pass@10" not in summary and summary["k_left_out"] == [10]  # one sample per problem
    assert (summary["n_problems"], summary["n_samples"], summary["n_passed"]) == (164, 164, 164)
    assert summary["statuses"] == {"passed": 164}


@pytest.mark.e2e
def test_empty_and_wrong_completions_score_zero(problems):
    subset = first(problems, 20)
    records = [{"task_id": t, "completion": c} for t in subset for c in ("", "    return None\n", "    retrun 1\n")]
    results, summary = score_completions(records, subset, workers=2, ks=(1, 3))
    assert summary["pass@1"] == 0.0 and summary["pass@3"] == 0.0
    assert summary["n_samples"] == 60 and summary["n_problems"] == 20
    assert {r["status"] for r in results} == {"failed"}
    assert all(r["error"] for r in results)
    assert any("SyntaxError" in r["error"] for r in results)


@pytest.mark.e2e
def test_pass_at_k_over_mixed_samples(problems):
    subset = first(problems, 2)
    right = {t: p["canonical_solution"] for t, p in subset.items()}
    # HumanEval/0: 1 of 3 samples right; HumanEval/1: 3 of 3
    records = [{"task_id": "HumanEval/0", "completion": c} for c in (right["HumanEval/0"], "", "")]
    records += [{"task_id": "HumanEval/1", "completion": right["HumanEval/1"]}] * 3
    _, summary = score_completions(records, subset, workers=2, ks=(1, 2, 3, 4))
    assert summary["pass@1"] == pytest.approx((1 / 3 + 1) / 2)
    assert summary["pass@2"] == pytest.approx((reference_pass_at_k(3, 1, 2) + 1) / 2)
    assert summary["pass@3"] == 1.0
    assert "pass@4" not in summary


@pytest.mark.e2e
def test_chat_replies_extract_to_passing_code(problems):
    for task_id in ("HumanEval/0", "HumanEval/10", "HumanEval/32"):  # 10 and 32 have helper functions
        problem = problems[task_id]
        for shape, reply in chat_replies(problem).items():
            completion = extract_code(reply, problem["prompt"], problem["entry_point"])
            result = run_program(build_program(problem, completion))
            assert result.passed, (task_id, shape, completion, result.error)


# --- hostile completions -----------------------------------------------------------------------------


@pytest.mark.e2e
def test_infinite_loop_times_out(problems):
    started = time.monotonic()
    result = run_completion(problems, "    while True:\n        pass\n", timeout_s=2)
    assert (result.passed, result.status) == (False, "timeout")
    assert time.monotonic() - started < 6
    assert_no_leftovers(result.pid)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "completion",
    [
        "    x = bytearray(10**11)\n",
        "    hog = []\n    while True:\n        hog.append(bytearray(10**7))\n",
    ],
)
def test_memory_bombs_fail_fast(problems, completion):
    started = time.monotonic()
    result = run_completion(problems, completion, timeout_s=10)
    assert (result.passed, result.status) == (False, "failed")
    assert "MemoryError" in result.error
    assert time.monotonic() - started < 8


@pytest.mark.e2e
def test_output_bomb_is_cut_by_the_file_size_limit(problems):
    completion = "    import sys\n    while True:\n        sys.stderr.write('x' * 10**6)\n"
    started = time.monotonic()
    result = run_completion(problems, completion, timeout_s=20)
    assert (result.passed, result.status) == (False, "failed")  # EFBIG or SIGXFSZ at 10 MiB, not the timeout
    assert time.monotonic() - started < 15
    assert len(result.error) <= 2000


@pytest.mark.e2e
def test_fork_bomb_is_contained_and_leaves_nothing(problems):
    completion = (
        "    import os\n"
        "    while True:\n"
        "        try:\n"
        "            os.fork()\n"
        "        except OSError:\n"
        "            pass\n"
    )
    started = time.monotonic()
    result = run_completion(problems, completion, timeout_s=3)
    assert (result.passed, result.status) == (False, "timeout")
    assert time.monotonic() - started < 10
    assert_no_leftovers(result.pid)


@pytest.mark.e2e
@pytest.mark.parametrize("escape", [False, True], ids=["same-group", "setsid"])
def test_processes_left_behind_are_killed(problems, escape):
    """The program starts a sleeper and returns at once: nothing may outlive the run."""
    completion = (
        "    import os, time\n"
        "    if os.fork() == 0:\n"
        f"        {'os.setsid()' if escape else 'pass'}\n"
        "        time.sleep(120)\n"
        "        os._exit(0)\n"
        "    return None\n"
    )
    result = run_completion(problems, completion)
    assert (result.passed, result.status) == (False, "failed")
    if escape and not result.pid_namespace:
        pytest.skip("no PID namespace here: a process that calls setsid() escapes the group kill")
    assert_no_leftovers(result.pid)


@pytest.fixture
def outside_dir():
    """A root-owned 0755 directory holding a 0644 file: what the sandbox's user may read but not change.

    Under /usr/local, which the sandbox shows read-only (the host's /tmp and pytest's tmp_path are not
    in its file system at all).
    """
    folder = Path(tempfile.mkdtemp(prefix="tas-sentinel-", dir="/usr/local"))
    folder.chmod(0o755)
    sentinel = folder / "sentinel.txt"
    sentinel.write_text("original")
    sentinel.chmod(0o644)
    yield sentinel
    shutil.rmtree(folder, ignore_errors=True)


@needs_root
@pytest.mark.e2e
def test_files_outside_the_work_dir_cannot_be_changed(problems, outside_dir):
    completion = (
        "    import os\n"
        f"    path = {str(outside_dir)!r}\n"
        "    seen = open(path).read()\n"
        "    attempts = [\n"
        "        lambda: open(path, 'w').write('changed'),\n"
        "        lambda: open(path, 'a').write('appended'),\n"
        "        lambda: os.remove(path),\n"
        "        lambda: os.rename(path, path + '.moved'),\n"
        "        lambda: os.chmod(path, 0o666),\n"
        "        lambda: open(os.path.join(os.path.dirname(path), 'new.txt'), 'w').write('new'),\n"
        "    ]\n"
        "    for attempt in attempts:\n"
        "        try:\n"
        "            attempt()\n"
        "        except OSError:\n"
        "            pass\n"
        "    raise AssertionError('read ' + seen)\n"
    )
    before = outside_dir.stat()
    result = run_completion(problems, completion)
    assert (result.passed, result.status) == (False, "failed")
    assert "read original" in result.error  # it ran, and reading was allowed
    assert outside_dir.read_text() == "original"
    after = outside_dir.stat()
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (before.st_mode, before.st_uid, before.st_mtime_ns)
    assert sorted(p.name for p in outside_dir.parent.iterdir()) == ["sentinel.txt"]


@pytest.mark.e2e
def test_secrets_in_our_environment_do_not_reach_the_program(problems, monkeypatch):
    secret = "sk-tasplanted" + secrets.token_hex(16)
    monkeypatch.setenv("TAS_PLANTED_SECRET", secret)
    completion = (
        "    import os, glob\n"
        "    texts = [repr(dict(os.environ))]\n"
        "    readable = 0\n"
        f"    paths = ['/proc/%d/environ' % os.getppid(), '/proc/{os.getpid()}/environ']\n"
        "    for path in paths + glob.glob('/proc/[0-9]*/environ'):\n"
        "        try:\n"
        "            texts.append(open(path, 'rb').read().decode(errors='replace'))\n"
        "            readable += 1\n"
        "        except OSError:\n"
        "            pass\n"
        "    found = [t for t in texts if 'TAS_PLANTED' in t]\n"
        "    raise AssertionError(f'readable={readable} found={found} env={sorted(os.environ)}')\n"
    )
    result = run_completion(problems, completion)
    assert (result.passed, result.status) == (False, "failed")
    assert "found=[]" in result.error, result.error  # the search ran and found nothing
    assert "env=['HOME', 'LANG', 'PATH', 'TMPDIR']" in result.error
    assert secret not in json.dumps(result.__dict__)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "completion",
    [
        "    import sys\n    sys.exit(0)\n",  # when the tests call the function
        "    import os\n    os._exit(0)\n",
        "    pass\nimport sys\nsys.exit(0)\n",  # at top level, before the tests are even defined
        "    pass\nimport os\nos._exit(0)\n",
        "    pass\nraise SystemExit\n",
        "    pass\nprint('passed')\nimport sys\nsys.exit()\n",
    ],
    ids=[
        "sys.exit-in-function",
        "os._exit-in-function",
        "sys.exit-top",
        "os._exit-top",
        "SystemExit-top",
        "print-passed",
    ],
)
def test_early_exit_with_status_0_is_not_a_pass(problems, completion):
    result = run_completion(problems, completion)
    assert (result.passed, result.status, result.exit_code) == (False, "failed", 0)
    assert "before its tests ran to the end" in result.error


@pytest.mark.e2e
@pytest.mark.parametrize("exit_call", ["sys.exit(0)", "os._exit(0)"])
def test_closing_stdout_and_stderr_then_exiting_0_is_not_a_pass(problems, exit_call):
    completion = f"    pass\nimport os, sys\nos.close(1)\nos.close(2)\n{exit_call}\n"
    result = run_completion(problems, completion)
    assert (result.passed, result.status) == (False, "failed")


@pytest.mark.e2e
def test_a_correct_solution_that_closes_its_output_still_passes(problems):
    problem = problems["HumanEval/0"]
    completion = problem["canonical_solution"] + "import os\nos.close(1)\nos.close(2)\n"
    result = run_completion(problems, completion)
    assert result.passed, result.error


@pytest.mark.e2e
def test_the_program_cannot_kill_the_stage(problems):
    """Our process must survive. As root the program may aim at our PID too: it is `nobody` in its own
    PID namespace. As another user that would kill pytest if the kernel grants no namespaces, so then
    only the parent (the sandbox's child script) is aimed at."""
    targets = "[os.getppid()" + (f", {os.getpid()}, -1]" if IS_ROOT else "]")
    completion = (
        "    import os, signal\n"
        f"    for pid in {targets}:\n"
        "        for kill in (os.kill, os.killpg):\n"
        "            try:\n"
        "                kill(pid, signal.SIGKILL)\n"
        "            except OSError:\n"
        "                pass\n"
        "    return None\n"
    )
    result = run_completion(problems, completion)
    assert not result.passed and result.status in ("failed", "error")
    assert psutil.Process().is_running()
    assert_no_leftovers(result.pid)
    # the stage still works
    assert run_completion(problems, problems["HumanEval/0"]["canonical_solution"]).passed


@pytest.mark.e2e
def test_no_network(problems):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    completion = (
        "    import socket\n"
        "    try:\n"
        f"        socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "        raise AssertionError('connected')\n"
        "    except OSError as exc:\n"
        "        raise AssertionError(f'no network: {exc}')\n"
    )
    try:
        result = run_completion(problems, completion)
        if not result.network_isolated:
            pytest.skip("no network namespace on this machine: the program can reach the network")
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    assert "no network:" in result.error


# --- command line ------------------------------------------------------------------------------------


def write_completions(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.e2e
def test_cli_scores_a_completions_file(problems, tmp_path, capsys):
    records = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in first(problems, 5).items()]
    completions = write_completions(tmp_path / "samples.jsonl", records)
    out = tmp_path / "results" / "model.jsonl"
    code = eval_code_main([str(completions), "--workers", "2", "--k", "1,10", "--out", str(out)])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["pass@1"] == 1.0 and summary["n_problems"] == 5 and summary["n_samples"] == 5
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [r["task_id"] for r in records]
    assert all(r["passed"] and r["status"] == "passed" and r["error"] == "" for r in rows)
    assert set(rows[0]) >= {"task_id", "completion", "passed", "status", "error"}


@pytest.mark.e2e
def test_cli_limit_and_module_entry_point(problems, tmp_path):
    records = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in first(problems, 3).items()]
    completions = write_completions(tmp_path / "samples.jsonl", records)
    done = subprocess.run(
        [sys.executable, "-m", "engine.evals.code", str(completions), "--limit", "2", "--workers", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["pass@1"], summary["n_samples"]) == (1.0, 2)
    assert "skipping 1 records" in done.stderr


@pytest.mark.parametrize(
    "lines, where, message",
    [
        (['{"task_id": "HumanEval/0", "completion": ""}', '{"task_id": "HumanEval/1", '], ":2:", "not valid JSON"),
        (
            ['{"task_id": "HumanEval/0", "completion": ""}', "", '{"task_id": "HumanEval/999", "completion": ""}'],
            ":3:",
            "unknown task_id 'HumanEval/999'",
        ),
        (['["HumanEval/0", ""]'], ":1:", '"task_id" and "completion"'),
        (['{"task_id": "HumanEval/0"}'], ":1:", '"task_id" and "completion"'),
    ],
)
def test_cli_bad_lines_exit_2_naming_file_and_line(tmp_path, capsys, lines, where, message):
    completions = tmp_path / "samples.jsonl"
    completions.write_text("\n".join(lines) + "\n")
    assert eval_code_main([str(completions)]) == 2
    err = capsys.readouterr().err
    assert f"{completions}{where}" in err and message in err
    assert "Traceback" not in err


def test_cli_missing_file_and_bad_options(tmp_path, capsys):
    assert eval_code_main([str(tmp_path / "nope.jsonl")]) == 2
    assert f"{tmp_path / 'nope.jsonl'}: no such file" in capsys.readouterr().err
    completions = write_completions(tmp_path / "samples.jsonl", [])
    assert eval_code_main([str(completions)]) == 2
    assert "no completions" in capsys.readouterr().err
    for bad in (["--k", "1,x"], ["--k", "0"], ["--workers", "0"], ["--timeout", "-1"]):
        assert eval_code_main([str(completions), *bad]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_the_light_modules_import_no_heavy_libraries():
    code = (
        "import sys, engine.evals.code, engine.evals.sandbox\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# --- no isolation on this host ----------------------------------------------------------------------------


def test_without_isolation_scoring_refuses_unless_allowed(problems, monkeypatch, tmp_path, capsys):
    import engine.evals.code as code

    monkeypatch.setattr(code, "isolation_problem", lambda sandbox="auto": "no user namespaces here")
    records = [{"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]["canonical_solution"]}]
    with pytest.raises(SandboxUnavailable, match="no user namespaces here.*allow_unsandboxed"):
        score_completions(records, first(problems, 1))
    completions = write_completions(tmp_path / "samples.jsonl", records)
    assert eval_code_main([str(completions), "--limit", "1"]) == 2
    assert "--allow-unsandboxed" in capsys.readouterr().err
    results, summary = score_completions(records, first(problems, 1), allow_unsandboxed=True)
    assert results[0]["isolation"] == "none" and summary["sandbox"]["isolation"] == "none"
    stdlib = Path(os.__file__).parent
    readable_by_all = all(p.stat().st_mode & 0o001 for p in [stdlib, *stdlib.parents]) and stdlib.stat().st_mode & 0o004
    if IS_ROOT and not readable_by_all:  # the sample's uid cannot import anything: said, not a crash
        assert results[0]["status"] == "error" and "not readable by uid" in results[0]["error"]
    else:
        assert results[0]["passed"], results[0]["error"]


def test_the_eval_stage_refuses_before_loading_a_model_without_isolation(monkeypatch):
    pytest.importorskip("torch")
    from types import SimpleNamespace

    import engine.stages.eval as eval_stage
    from engine.config.schema import CodeEvalConfig
    from engine.runner.context import StageError

    logged = []
    code = CodeEvalConfig(benchmark="humaneval", limit=2, sandbox="builtin")
    ctx = SimpleNamespace(
        config=SimpleNamespace(eval=SimpleNamespace(code=code)),
        events=SimpleNamespace(log=lambda msg, level="info": logged.append((level, msg))),
    )
    assert eval_stage.code_isolation(ctx) == "namespaces" or not IS_ROOT
    monkeypatch.setattr(eval_stage, "isolation_problem", lambda sandbox="auto": "no user namespaces here")
    with pytest.raises(StageError, match="no user namespaces here.*eval.code.allow_unsandboxed: true"):
        eval_stage.code_problems(ctx)
    code.allow_unsandboxed = True
    assert len(eval_stage.code_problems(ctx)) == 2
    assert (
        "warning",
        "code sandbox: NOT isolated (allowed by eval.code.allow_unsandboxed): no user namespaces here",
    ) in logged
    assert "sandbox isolation: none" in logged[-1][1]


def test_plain_data_crosses_between_program_and_checker_exactly():
    from engine.evals.sandbox_child import decode, encode

    values = [None, True, False, 0, -5, 10**50, 1.5, float("inf"), "héllo", b"\x00;", "", [[[]]]]
    values += [[1, (2, 3), {4, 5}, frozenset([6])], {"a": [1.0], (1, 2): None}]
    for value in values:
        back = decode(b"".join(encode(value)))
        assert repr(back) == repr(value) and type(back) is type(value)
    assert math.isnan(decode(b"".join(encode(float("nan")))))

    class Anything(int):
        def __eq__(self, other):
            return True

    for foreign in (Anything(1), object(), [iter([])], {"k": Anything(0)}):
        with pytest.raises(TypeError, match="plain data only"):
            encode(foreign)
    for bad in (b"", b"i12", b"s5;ab", b"x", b"l2;N", b"NN", b"s-1;", b"l1;" * 200 + b"N"):
        with pytest.raises(ValueError):
            decode(bad)


@pytest.mark.e2e
def test_the_error_text_is_redacted(problems, monkeypatch):
    secret = "tas-redact-" + secrets.token_hex(12)
    monkeypatch.setenv("TAS_PLANTED_TOKEN", secret)  # a name redact() treats as secret
    completion = f"    raise AssertionError({secret!r} + ' sk-' + 'x' * 30)\n"
    result = run_completion(problems, completion)
    assert not result.passed and "AssertionError" in result.error
    assert secret not in result.error and "sk-xxxx" not in result.error and "***" in result.error


# --- sandbox backends ---------------------------------------------------------------------------------------


def test_the_sandbox_backend_is_a_checked_config_key():
    import yaml

    from engine.config.errors import ConfigError
    from engine.config.load import parse_config
    from tests.helpers import SEED_CONFIG

    config = yaml.safe_load(SEED_CONFIG.read_text())
    config.setdefault("eval", {}).setdefault("code", {})["sandbox"] = "nsjail"
    with pytest.raises(ConfigError, match=r"eval\.code\.sandbox: Input should be 'auto', 'bwrap' or 'builtin'"):
        parse_config(yaml.safe_dump(config), source="cfg.yaml")
    config["eval"]["code"]["sandbox"] = "bwrap"
    assert parse_config(yaml.safe_dump(config), source="cfg.yaml").eval.code.sandbox == "bwrap"


def test_the_panel_names_the_backend_that_isolated_the_code():
    from tui.screens.code_results import isolation_note

    assert isolation_note([{"isolation": "bwrap"}] * 2).plain == "sandboxed (bwrap) · "
    assert isolation_note([{"isolation": "namespaces"}]).plain == "sandboxed (namespaces) · "
    assert "NOT sandboxed" in isolation_note([{"isolation": "bwrap"}, {"isolation": "none"}]).plain


@pytest.fixture
def fresh_probes():
    """Backend probes are cached per process: start and end these tests without them."""
    from engine.evals import sandbox

    sandbox._probe.cache_clear()
    yield sandbox
    sandbox._probe.cache_clear()


@pytest.mark.e2e
def test_auto_prefers_bwrap_and_falls_back_to_builtin(fresh_probes, monkeypatch):
    sandbox = fresh_probes
    if shutil.which("bwrap"):
        assert sandbox.choose_backend("auto") == ("bwrap", None)
        assert sandbox.isolation_level("auto") == "bwrap"
    sandbox._probe.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)  # no bwrap on PATH
    backend, problem = sandbox.choose_backend("bwrap")
    assert backend == "none" and "bwrap is not installed (apt-get install bubblewrap)" in problem
    if IS_ROOT:
        assert sandbox.choose_backend("auto") == ("builtin", None)
        assert sandbox.isolation_level("auto") == "namespaces"
    with pytest.raises(ValueError, match="unknown sandbox backend 'nsjail'"):
        sandbox.choose_backend("nsjail")


@pytest.mark.e2e
def test_cli_sandbox_flag_names_the_backend_in_every_row(problems, tmp_path, capsys):
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")
    records = [{"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]["canonical_solution"]}]
    completions = write_completions(tmp_path / "samples.jsonl", records)
    for backend, level in (("bwrap", "bwrap"), ("builtin", "namespaces")):
        out = tmp_path / f"{backend}.jsonl"
        assert eval_code_main([str(completions), "--limit", "1", "--sandbox", backend, "--out", str(out)]) == 0
        assert json.loads(capsys.readouterr().out)["sandbox"]["isolation"] == level
        row = json.loads(out.read_text())
        assert row["passed"] and row["isolation"] == level


def test_out_must_be_a_file_of_ours(tmp_path):
    """A directory (or, as root, another user's file) planted at --out is refused before the run, not
    found by the final rename after every program has run."""
    from engine.evals.code import InputError, check_out_path

    (tmp_path / "planted.jsonl").mkdir()
    with pytest.raises(InputError, match="not a file of yours"):
        check_out_path(tmp_path / "planted.jsonl")
    if IS_ROOT:
        theirs = tmp_path / "theirs.jsonl"
        theirs.write_text("")
        os.chown(theirs, 12345, 12345)
        with pytest.raises(InputError, match="not a file of yours"):
            check_out_path(theirs)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("old\n")
    os.close(check_out_path(mine))  # an earlier run's results: replaced


def test_results_survive_a_path_taken_during_the_run(tmp_path, monkeypatch):
    """When `--out` turns into a directory after the check, the results stay in the temporary file,
    which the error names."""
    from engine.evals import code

    checked = code.check_out_path

    def then_planted(path):
        folder = checked(path)
        os.mkdir(path)
        return folder

    monkeypatch.setattr(code, "check_out_path", then_planted)
    out = tmp_path / "out.jsonl"
    with pytest.raises(code.InputError, match="the results are in") as caught:
        code.write_results(out, [{"task_id": "t", "passed": True}])
    kept = Path(str(caught.value).split("the results are in ")[1])
    assert kept.parent == tmp_path and json.loads(kept.read_text()) == {"task_id": "t", "passed": True}
