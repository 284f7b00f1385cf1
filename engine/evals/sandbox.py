"""Run one untrusted Python program (a model's completion plus its tests) and say whether it passed.

Light module: standard library only. One program = one fresh interpreter, started as
`python -I -S -B engine/evals/sandbox_child.py ...` (the trusted "child" half: read it first), in
its own session and process group, in its own temporary directory, with an environment of five
harmless variables. `run_programs` runs many of them, a few at a time, from a thread pool.

What it protects against (what the tests in tests/test_code_eval.py check):

* Hanging or slow programs: a wall-clock timeout SIGKILLs the whole process group; RLIMIT_CPU backs it.
* Memory bombs: RLIMIT_AS (1 GiB by default) turns them into MemoryError.
* Output and file bombs: RLIMIT_FSIZE (10 MiB) on every file the program writes, stderr included
  (stderr goes to an unnamed temporary file, so nothing is held in our memory); stdout is /dev/null.
* Fork bombs and stray processes: the program runs as PID 1 of a new PID namespace when the kernel
  allows it, so every process it started dies with it, even one that called setsid(); the process
  group is killed after every run anyway. As root, RLIMIT_NPROC also bounds the number of processes
  (it has no effect on root itself, which is why it is set only after dropping to `nobody`).
* Faked passes: a pass needs exit status 0 *and* a random per-run token that the child writes to a
  private pipe only after the program, its tests and `check(...)` ran to the end. sys.exit(0),
  os._exit(0), closing stdout/stderr, or printing "passed" before that all count as failures.
* Secrets: the environment is never inherited (HOME and TMPDIR point into the work dir). With a
  mount namespace the program gets a private /proc listing only its own processes, so it cannot read
  /proc/<pid>/environ of the stage.
* Network: a new network namespace (no interface but a loopback that is down) where the OS allows it.
  Whether it was applied is recorded in every result (`network_isolated`).
* Harming the stage (as root): the program runs as uid/gid 65534 ("nobody"), so it cannot signal our
  processes, read /proc/<pid>/environ of root processes, or change root's files; the PID namespace
  also hides our PIDs from it. As root we also expose the standard library to it read-only through a
  bind mount, because the interpreter may live where `nobody` cannot read (here: /root/.pyenv).

What it does not protect against -- it is not a security boundary like a VM, a container or seccomp:

* Kernel exploits, and anything the unprivileged user may do: read world-readable files (keep `.env`
  and token files mode 0600), write to world-writable places such as /tmp and /dev/shm (bounded by
  RLIMIT_FSIZE per file, not cleaned up), use CPU until the timeout.
* As a non-root user nothing can change our uid: the program runs as the same user as the stage.
  With an unprivileged user namespace (most Linux distributions allow one) it still gets the network,
  PID and mount namespaces, hence no network, no view of our PIDs or of /proc/<pid>/environ. Without
  one, it can signal and ptrace every process of that user, read their /proc/<pid>/environ, write
  everywhere that user can, and escape the group kill with setsid(); RLIMIT_NPROC is then not set at
  all, since it would count every process and thread of the user (the panel, training workers...).
* A program written against this harness: the token sits in the child's memory (e.g. gc.get_objects()),
  so code that goes looking for it can forge a pass. The token stops accidental early exits, not an
  adversary.
* Only the standard library is importable (-S: no site-packages), which is all HumanEval needs.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CHILD_SCRIPT = Path(__file__).with_name("sandbox_child.py")
ERROR_CHARS = 2000  # how much of the end of stderr a result keeps
NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    """Per-program limits. `uid`/`gid` are used only when we run as root."""

    memory_bytes: int = 1 << 30
    file_bytes: int = 10 << 20
    processes: int = 64
    uid: int = NOBODY
    gid: int = NOBODY


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error" (the sandbox itself could not run the program)
    error: str  # the end of stderr, or why it failed; "" when passed
    duration_s: float
    exit_code: int | None = None  # of the program; negative: killed by that signal
    network_isolated: bool = False
    pid_namespace: bool = False
    uid: int | None = None  # the program ran as this user
    pid: int | None = None  # of the child interpreter: also the session and process group id of the run


def clean_env(workdir: str) -> dict[str, str]:
    """Everything the program sees of the environment: nothing of ours, so no API keys.

    No PYTHONHASHSEED: `-I` makes the interpreter ignore every PYTHON* variable anyway.
    """
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}


def run_program(source: str, timeout_s: float = 10.0, limits: Limits = Limits()) -> SandboxResult:
    """Run `source` in a fresh sandbox; passed only if it exits 0 after running to its very end."""
    started = time.monotonic()
    root = os.geteuid() == 0
    token = secrets.token_hex(16).encode()
    workdir = tempfile.mkdtemp(prefix="tas-sandbox-")
    try:
        program = os.path.join(workdir, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        if root:
            os.chown(workdir, limits.uid, limits.gid)  # the program may write only here (and in /tmp)
        args = {
            "program": program,
            "workdir": workdir,
            "uid": limits.uid,
            "gid": limits.gid,
            "cpu_s": int(timeout_s) + 1,
            "memory": limits.memory_bytes,
            "file_size": limits.file_bytes,
            "processes": limits.processes,
        }
        command = [sys.executable, "-I", "-S", "-B", str(CHILD_SCRIPT), *(f"{k}={v}" for k, v in args.items())]
        # stdout carries the child's report; stderr the program's traceback. Both are unnamed files,
        # not pipes: a chatty program cannot fill our memory, and no pipe can keep us waiting.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                # No preexec_fn (unsafe with threads, and we launch from a pool): the child script
                # sets its own limits.
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=err,
                    cwd=workdir,
                    env=clean_env(workdir),
                    start_new_session=True,
                )
            except OSError as exc:
                return SandboxResult(False, "error", f"could not start the sandbox: {exc}", time.monotonic() - started)
            try:
                proc.stdin.write(token)  # 32 bytes: fits in the pipe, never blocks
                proc.stdin.close()
            except BrokenPipeError:
                pass
            finished = _wait_for_exit(proc, timeout_s)
            _kill_group(proc.pid)  # the leader is dead or dying: take every process left in its group
            proc.wait()
            report = _read_report(out)
            stderr_tail = _tail(err)
        return _result(report, finished, stderr_tail, proc, timeout_s, time.monotonic() - started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(
    sources: Iterable[str],
    workers: int = 2,
    timeout_s: float = 10.0,
    limits: Limits = Limits(),
    on_result: Callable[[int, SandboxResult], None] | None = None,
) -> list[SandboxResult]:
    """Run many programs, `workers` at a time; results in the order of `sources`.

    `on_result(index, result)` is called as each one finishes (from a pool thread), e.g. for progress.
    """

    def one(item: tuple[int, str]) -> SandboxResult:
        index, source = item
        result = run_program(source, timeout_s, limits)
        if on_result is not None:
            on_result(index, result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sandbox") as pool:
        return list(pool.map(one, enumerate(sources)))


def _wait_for_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until the child exits, without reaping it: while it is an unreaped zombie its process group
    id cannot be reused, so the killpg that follows cannot hit an unrelated group."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # kernel older than 5.3: reap (a tiny reuse race, accepted)
        try:
            proc.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout_s * 1000))
    finally:
        os.close(pidfd)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_report(out) -> dict[str, str]:
    out.seek(0)
    text = out.read(65536).decode(errors="replace")
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _tail(err) -> str:
    err.seek(0, os.SEEK_END)
    size = err.tell()
    err.seek(max(0, size - 4 * ERROR_CHARS))
    return err.read().decode(errors="replace")[-ERROR_CHARS:].strip()


def _result(report: dict, finished: bool, stderr: str, proc, timeout_s: float, duration: float) -> SandboxResult:
    """Turn the child's report (empty if it was killed) into a result."""
    flag = lambda key: report.get(key) == "1"  # noqa: E731
    exit_code = int(report["exit"]) if "exit" in report else None
    common = dict(
        duration_s=round(duration, 4),
        exit_code=exit_code,
        network_isolated=flag("network_isolated"),
        pid_namespace=flag("pid_namespace"),
        uid=int(report["uid"]) if "uid" in report else None,
        pid=proc.pid,
    )
    if not finished:
        return SandboxResult(False, "timeout", _join(f"timed out after {timeout_s:g} s", stderr), **common)
    if "setup_error" in report:
        return SandboxResult(False, "error", _join(f"sandbox setup failed: {report['setup_error']}", stderr), **common)
    if exit_code is None:
        why = f"the sandbox exited with status {proc.returncode} without a report"
        return SandboxResult(False, "error", _join(why, stderr), **common)
    if exit_code == 0 and flag("completed"):
        return SandboxResult(True, "passed", "", **common)
    if exit_code == 0:
        why = "the program exited with status 0 before its tests ran to the end"
    elif exit_code < 0:
        why = f"the program was killed by {_signal_name(-exit_code)}"
    else:
        why = ""
    return SandboxResult(False, "failed", _join(why, stderr), **common)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _join(why: str, stderr: str) -> str:
    return "\n".join(part for part in (stderr, why) if part)[-ERROR_CHARS:]
