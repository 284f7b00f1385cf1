"""Run one untrusted Python program (a model's completion) against its tests and say whether it passed.

Light module: standard library only. One program = one fresh interpreter, started as
`python -I -S -B engine/evals/sandbox_child.py ...` (the trusted "child" half: read it first for the how),
in its own session and process group, with an environment of four harmless variables. The program and
its tests travel over that interpreter's stdin, never through a file. `run_programs` runs many of them,
a few at a time, from a thread pool.

Isolation (`isolation` in every result, and in the summaries built from them) names the backend that
gave it. `choose_backend("auto")` prefers bubblewrap when it is installed and works here, else our own:

* "bwrap" (backend `bwrap`, `_bwrap_command`): bubblewrap (`bwrap` on PATH, >= 0.5) makes the
  namespaces and the same read-only file system view as the builtin backend below. As an ordinary
  user it needs a user namespace, unless bwrap is installed setuid root: then it isolates even where
  unprivileged user namespaces are switched off, which the builtin backend cannot. As root it makes
  no user namespace and keeps only CAP_SETUID/CAP_SETGID, so that the child can take the sample's own
  uid. The writable places are one tmpfs of `Limits.tmpfs_bytes` on /tmp, with /var/tmp, /dev/shm and
  /work links into it. bwrap starts the child script (bound read-only, alone, at /sandbox_child.py)
  as PID 1 of the new PID namespace; it does all the rest as below: limits, seccomp, checker, report.
  A setuid bwrap refuses --size, so there the tmpfs is bounded only by RLIMIT_FSIZE per file and the
  timeout; and without a user namespace RLIMIT_NPROC counts all of the user's processes (a sample may
  fork less, never more).
* "namespaces" (backend `builtin`): the program runs in new user (unless we are root), mount, network,
  PID, IPC and UTS namespaces, on a private root file system that is read-only as a whole (/usr, /lib*
  and the standard library are read-only binds, the mounts below them too; the folders and links between
  them sit on a tmpfs remounted read-only; the standard library's site-packages is covered by an empty
  one), with one fresh tmpfs (64 MiB, 16384 inodes) for /tmp, /var/tmp, /dev/shm and its folder /work,
  nothing of $HOME, the project or the host's /tmp; the checker runs in / and imports only the standard
  library; no network
  (not even a unix socket of the host); a /proc of its own; no capabilities; a seccomp filter denying
  unshare, clone with namespace flags, mount, pivot_root, ptrace, process_vm_*, bpf, keyctl,
  perf_event_open, userfaultfd, io_uring, SysV IPC, POSIX message queues, memfds (memory no process is
  charged for), inotify (a per-user quota of the host), setsid and setpgid (all of a sample stays in one
  session, so one autogroup: one CPU share), and sockets of any family but unix and IP (AF_VSOCK would
  reach the hypervisor's host past the network namespace). As root it also runs under a uid of
  its own (one per concurrent sample, from SANDBOX_UID_BASE), so samples cannot signal each other and
  each has its own RLIMIT_NPROC; as an ordinary user its user namespace gives it the same (Linux >= 5.14
  counts RLIMIT_NPROC per user namespace). Needs root or unprivileged user namespaces
  (`sysctl user.max_user_namespaces` > 0; on Debian/Ubuntu also `kernel.unprivileged_userns_clone=1`
  and, on Ubuntu >= 23.10, `kernel.apparmor_restrict_unprivileged_userns=0`). `isolation_problem()`
  says whether this host can, and what is missing.
* "none": only when the user allowed it (`eval.code.allow_unsandboxed`, `--allow-unsandboxed`): the
  same processes and limits in a fresh 0700 folder, as the user who runs the stage, with all that user
  may do (read `.env` and tokens, write $HOME, signal its processes, reach the network).

In all, the verdict is not the program's to give: the tests run in a second interpreter (the
checker), which calls the program's function through a pipe and gets back plain data. A pass means the
checker ran `check(candidate)` to its end. Always: a wall-clock timeout that SIGKILLs everything,
RLIMIT_CPU, RLIMIT_AS (memory bombs become MemoryError), RLIMIT_FSIZE (10 MiB a file, stderr
included), RLIMIT_NOFILE, RLIMIT_CORE 0, an environment of our own (no API keys).

What it does not protect against: kernel exploits (it is a namespace sandbox, not a VM); reading
world-readable files under /usr; tests that can be answered by reading them (HumanEval's expected
values sit in its asserts, which the program never sees, but a model may have memorised them);
memory of a sample as a whole: RLIMIT_AS is per process, so a program that forks may hold up to
`processes` x `memory_bytes` (no cgroup: an ordinary user rarely has one delegated, and hosts with
cgroup v1 have none to give); kernel memory charged to no process that the filter leaves (socket
buffers: small); the host paths of the interpreter and the project (/proc/1/cmdline, mountinfo). Only the standard library is importable (-S: no site-packages), which is all HumanEval needs.
"""

from __future__ import annotations

import functools
import os
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from engine.core.secrets import redact
from engine.evals.sandbox_child import DEVICES, WORKDIR, WRITABLE, decode

CHILD_SCRIPT = Path(__file__).with_name("sandbox_child.py")
ERROR_CHARS = 2000  # how much of the end of stderr a result keeps
SANDBOX_UID_BASE = 1_610_612_736  # as root, sample slot N runs as uid/gid _sandbox_uid(N): ids no account uses
SLOTS_PER_PROCESS = 1024
BUILTIN, BWRAP, UNSANDBOXED = "builtin", "bwrap", "none"  # backends; "none" is also the isolation of no sandbox
BACKENDS = ("auto", BWRAP, BUILTIN)  # what eval.code.sandbox and --sandbox accept; auto: bwrap, else builtin
ISOLATION = {BUILTIN: "namespaces", BWRAP: "bwrap"}  # the isolation level each backend records
BWRAP_CHILD = "/sandbox_child.py"  # where bwrap shows the child script (nothing else of the project)


@dataclass(frozen=True)
class Program:
    """What one sample runs: `code` (prompt + completion: untrusted) in the program's interpreter,
    `tests` (prompt + the benchmark's `check`: trusted) in the checker's, which calls `entry_point`."""

    code: str
    tests: str
    entry_point: str


@dataclass(frozen=True)
class Limits:
    """Per-program limits; each process of a sample (program, checker) gets them."""

    memory_bytes: int = 1 << 30
    file_bytes: int = 10 << 20
    processes: int = 64
    open_files: int = 256
    tmpfs_bytes: int = 64 << 20  # the whole writable file system of a sample: /tmp, /var/tmp, /dev/shm, /work


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error" (the sandbox itself could not run the program)
    error: str  # the end of stderr, or why it failed, redacted; "" when passed
    duration_s: float
    exit_code: int | None = None  # of the program; negative: killed by that signal
    isolation: str = UNSANDBOXED  # a value of ISOLATION, or UNSANDBOXED
    uid: int | None = None  # the program ran as this user (outside any user namespace)
    pid: int | None = None  # of the sandbox's supervisor: also the session and process group id of the run
    # (isolated, init and the sample's processes have a session of their own, inside the PID namespace)

    @property
    def network_isolated(self) -> bool:
        return self.isolation != UNSANDBOXED

    @property
    def pid_namespace(self) -> bool:
        return self.isolation != UNSANDBOXED


class SandboxUnavailable(RuntimeError):
    """The host cannot isolate programs and the user did not allow running them unsandboxed."""


def clean_env(workdir: str) -> dict[str, str]:
    """Everything the program sees of the environment: nothing of ours, so no API keys.

    No PYTHONHASHSEED: `-I` makes the interpreter ignore every PYTHON* variable anyway.
    """
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}


class _Slots:
    """Small integers, one per sample running now: as root, slot N is the sample's uid BASE + N."""

    def __init__(self):
        self._lock = threading.Lock()
        self._taken: set[int] = set()

    def take(self) -> int:
        with self._lock:
            slot = next(n for n in range(len(self._taken) + 1) if n not in self._taken)
            self._taken.add(slot)
            return slot

    def give_back(self, slot: int) -> None:
        with self._lock:
            self._taken.discard(slot)


_SLOTS = _Slots()


def _sandbox_uid(slot: int) -> int:
    """A uid for this process's sample slot: a block of uids per process (by pid), so that two evals
    running at once do not share a uid, hence a process limit. Below 2**32 - 1 for every pid < 2**21.
    With pid_max above 2**21 (systemd's 4194304) two evals may share a block, and the range overlaps
    systemd-nspawn's and systemd's foreign uids: harmless while each sample has its own namespaces."""
    return SANDBOX_UID_BASE + (os.getpid() % (1 << 21)) * SLOTS_PER_PROCESS + slot % SLOTS_PER_PROCESS


def run_program(
    program: Program, timeout_s: float = 10.0, limits: Limits = Limits(), backend: str = BUILTIN
) -> SandboxResult:
    """Run `program` in a fresh sandbox of `backend` (BUILTIN, BWRAP, or UNSANDBOXED); passed only if its
    tests, run by the checker, all passed."""
    isolate = backend != UNSANDBOXED
    started = time.monotonic()
    slot = _SLOTS.take()
    uid = _sandbox_uid(slot) if os.geteuid() == 0 else os.getuid()
    # Without isolation the program needs a folder of the host: a fresh 0700 one, removed afterwards.
    workdir = "/work" if isolate else tempfile.mkdtemp(prefix="tas-sandbox-")
    try:
        if not isolate and os.geteuid() == 0:
            os.chown(workdir, uid, uid)
        args = {
            "backend": backend,
            "uid": uid,
            "gid": uid,
            "cpu_s": int(timeout_s) + 1,
            "memory": limits.memory_bytes,
            "file_size": limits.file_bytes,
            "processes": limits.processes,
            "nofile": limits.open_files,
            "tmpfs": limits.tmpfs_bytes,
            "workdir": workdir,
            "entry_point": program.entry_point,
        }
        child = [sys.executable, "-I", "-S", "-B", str(CHILD_SCRIPT)]
        if backend == BWRAP:  # the interpreter itself, not a venv's link to it: the venv is not in the view
            child = [*_bwrap_command(limits), "--", os.path.realpath(sys.executable), "-I", "-S", "-B", BWRAP_CHILD]
        command = [*child, *(f"{k}={v}" for k, v in args.items())]
        # stdout carries the supervisor's report; stderr the tracebacks. Both are unnamed files, not
        # pipes: a chatty program cannot fill our memory, and no pipe can keep us waiting.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                # No preexec_fn (unsafe with threads, and we launch from a pool): the child script
                # sets its own limits.
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=err,
                    cwd="/" if isolate else workdir,
                    env=clean_env(workdir),
                    start_new_session=True,
                )
            except OSError as exc:
                return SandboxResult(False, "error", f"could not start the sandbox: {exc}", time.monotonic() - started)
            writer = threading.Thread(target=_send_program, args=(proc.stdin, program), daemon=True)
            writer.start()  # a thread: a program longer than the pipe must not keep us past the timeout
            finished = _wait_for_exit(proc, timeout_s)
            _kill_group(proc.pid)  # the leader is dead or dying: take every process left in its group
            proc.wait()
            writer.join()
            report = _read_report(out)
            stderr_tail = _tail(err)
        # Said by the supervisor once it is in the namespaces, before any of the sample runs: nothing the
        # program does later (crash init, make setup fail) can turn an isolated run into an unsandboxed one.
        isolation = ISOLATION[backend] if isolate and report.get("isolated") is True else UNSANDBOXED
        return _result(report, finished, stderr_tail, proc, timeout_s, time.monotonic() - started, isolation, uid)
    finally:
        _SLOTS.give_back(slot)
        if not isolate:
            shutil.rmtree(workdir, ignore_errors=True)


def run_programs(
    programs: Iterable[Program],
    workers: int = 2,
    timeout_s: float = 10.0,
    limits: Limits = Limits(),
    on_result: Callable[[int, SandboxResult], None] | None = None,
    backend: str = BUILTIN,
) -> list[SandboxResult]:
    """Run many programs, `workers` at a time; results in the order of `programs`.

    `on_result(index, result)` is called as each one finishes (from a pool thread), e.g. for progress.
    """

    def one(item: tuple[int, Program]) -> SandboxResult:
        index, program = item
        result = run_program(program, timeout_s, limits, backend)
        if on_result is not None:
            on_result(index, result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sandbox") as pool:
        return list(pool.map(one, enumerate(programs)))


# Both halves import a module that is not frozen into the interpreter: the standard library must be
# readable by the sample's uid, not only by the supervisor.
_PROBE = Program(
    "import string\ndef probe():\n    return 41 + 1\n",
    "import string\ndef check(candidate):\n    assert candidate() == 42\n",
    "probe",
)


def choose_backend(wanted: str = "auto") -> tuple[str, str | None]:
    """(the backend to run programs with, None); or (UNSANDBOXED, what is missing and how to allow it).

    `wanted` is a value of BACKENDS; "auto" tries bwrap first (it also works where bwrap is setuid and
    user namespaces are off), then our own namespaces. Each backend is probed once per process."""
    if wanted not in BACKENDS:
        raise ValueError(f"unknown sandbox backend {wanted!r} (one of {', '.join(BACKENDS)})")
    problems = []
    for backend in (BWRAP, BUILTIN) if wanted == "auto" else (wanted,):
        problem = _probe(backend)
        if problem is None:
            return backend, None
        problems.append(f"{backend}: {problem}")
    if os.geteuid() == 0:
        how = "this kernel refused the namespaces even to root (a container without CAP_SYS_ADMIN?)"
    else:
        how = (
            "an ordinary user needs unprivileged user namespaces: sysctl user.max_user_namespaces=10000 "
            "(and on Debian/Ubuntu kernel.unprivileged_userns_clone=1; on Ubuntu >= 23.10 "
            "kernel.apparmor_restrict_unprivileged_userns=0), or a setuid bwrap (bubblewrap), or run as root"
        )
    return UNSANDBOXED, f"the code sandbox cannot isolate programs here ({'; '.join(problems)}): {how}"


def isolation_problem(wanted: str = "auto") -> str | None:
    """None when this host can run programs isolated with `wanted`; else what is missing and how to allow it."""
    return choose_backend(wanted)[1]


def isolation_level(wanted: str = "auto") -> str:
    """The isolation programs get here with `wanted`: a value of ISOLATION, or UNSANDBOXED."""
    return ISOLATION.get(choose_backend(wanted)[0], UNSANDBOXED)


@functools.cache
def _probe(backend: str) -> str | None:
    """None when `backend` runs a program isolated on this host; else why not. Once per process."""
    if backend == BWRAP:
        path = shutil.which("bwrap")
        if path is None:
            return "bwrap is not installed (apt-get install bubblewrap)"
        try:
            usage = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{path} --help failed: {exc}"
        if "--size" not in usage:
            return f"{path} is too old: it has no --size for a size-limited tmpfs (bubblewrap >= 0.5 does)"
    result = run_program(_PROBE, timeout_s=20.0, backend=backend)
    if result.passed and result.isolation == ISOLATION[backend]:
        return None
    return (result.error.strip() or result.status)[-500:]


@functools.cache
def _bwrap_command(limits: Limits) -> tuple[str, ...]:
    """bwrap's part of the command: the namespaces and the file system view of engine.evals.sandbox_child
    (the same as its builtin backend's), before the child script's own command line.

    As root: no user namespace, so the child (keeping CAP_SETUID and CAP_SETGID, and nothing else) can
    become the sample's uid, whose RLIMIT_NPROC is its own. As an ordinary user: a user namespace when
    the kernel allows one (a setuid bwrap makes the others without it)."""
    root = os.geteuid() == 0
    command = [shutil.which("bwrap") or "bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
    command += ["--unshare-cgroup-try", "--die-with-parent", "--new-session", "--as-pid-1", "--cap-drop", "ALL"]
    command += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if root else ["--unshare-user-try"]
    bound = []
    for path in ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin"):
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            command += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            command += ["--ro-bind-try", path, path]
            bound.append(path)
    command += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    # The interpreter, its libpython and its standard library where they are not under /usr (pyenv, uv,
    # conda): without its own libpython the loader could find another Python's under /usr.
    ours = [os.path.realpath(sys.executable), os.path.dirname(os.__file__)]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        ours.append(os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")))
    for path in ours:
        if not any(path.startswith(top + "/") for top in bound):
            command += [*_folders_above(path), "--ro-bind-try", path, path]
    # what the host installed beside the standard library is none of the sample's business (the builtin
    # backend covers it the same way): an empty read-only tmpfs over it
    for name in ("site-packages", "dist-packages"):
        hidden = os.path.join(os.path.dirname(os.__file__), name)
        if os.path.isdir(hidden):
            command += ["--perms", "0555", "--tmpfs", hidden, "--remount-ro", hidden]
    command += ["--ro-bind", str(CHILD_SCRIPT), BWRAP_CHILD]
    command += _folders_above("/dev/null")
    for name in DEVICES:
        command += ["--dev-bind", f"/dev/{name}", f"/dev/{name}"]
    for name, fd in (("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2")):
        command += ["--symlink", f"/proc/self/fd{fd}", f"/dev/{name}"]
    # A setuid bwrap (run by an ordinary user) refuses --size: there the tmpfs has the kernel's default
    # size, and only RLIMIT_FSIZE and the timeout bound what a sample writes (it goes when the sample ends).
    setuid = not root and os.stat(command[0]).st_mode & stat.S_ISUID
    size = [] if setuid else ["--size", str(limits.tmpfs_bytes)]
    command += ["--proc", "/proc", *size, "--perms", "1777", "--tmpfs", "/tmp"]
    for path in WRITABLE[1:]:  # /var/tmp, /dev/shm, /work: links into the one tmpfs, so one size limit
        inside = "/tmp/." + path.strip("/").replace("/", "-")
        command += ["--perms", "1777", "--dir", inside, *_folders_above(path), "--symlink", inside, path]
    return (*command, "--chdir", WORKDIR, "--remount-ro", "/")


def _folders_above(path: str) -> list[str]:
    """bwrap arguments making the folders above `path` passable by the sample's uid (as root bwrap would
    make them 0700), not listable: what else the host keeps there (a pyenv tree under a 0700 home) stays
    unnamed."""
    return [
        arg
        for parent in reversed(Path(path).parents)
        if str(parent) != "/"
        for arg in ("--perms", "0711", "--dir", str(parent))
    ]


def _send_program(stdin, program: Program) -> None:
    try:
        for text in (program.code, program.tests):
            data = text.encode("utf-8")
            stdin.write(struct.pack(">Q", len(data)) + data)
        stdin.close()
    except (BrokenPipeError, ValueError, OSError):  # the sandbox is gone (killed on a timeout)
        pass


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


def _read_report(out) -> dict:
    """The supervisor's messages (4-byte length, then a dict in sandbox_child's format), merged. Only it
    writes there."""
    out.seek(0)
    data = out.read(1 << 20)
    report: dict = {}
    while len(data) >= 4:
        size = struct.unpack(">I", data[:4])[0]
        try:
            report.update(decode(data[4 : 4 + size]))
        except (ValueError, TypeError):
            break
        data = data[4 + size :]
    return report


def _tail(err) -> str:
    err.seek(0, os.SEEK_END)
    size = err.tell()
    err.seek(max(0, size - 4 * ERROR_CHARS))
    return err.read().decode(errors="replace")[-2 * ERROR_CHARS :].strip()


def _result(
    report: dict, finished: bool, stderr: str, proc, timeout_s: float, duration: float, isolation: str, uid: int
) -> SandboxResult:
    """Turn the supervisor's report (empty if it was killed) into a result."""
    exit_code = report.get("exit")
    common = dict(duration_s=round(duration, 4), exit_code=exit_code, isolation=isolation, uid=uid, pid=proc.pid)
    if not finished:
        return SandboxResult(False, "timeout", _join(f"timed out after {timeout_s:g} s", stderr), **common)
    if "setup_error" in report:
        return SandboxResult(False, "error", _join(f"sandbox setup failed: {report['setup_error']}", stderr), **common)
    if "passed" not in report:
        why = f"the sandbox exited with status {proc.returncode} without a report"
        return SandboxResult(False, "error", _join(why, stderr), **common)
    if report["passed"] is True:
        return SandboxResult(True, "passed", "", **common)
    if exit_code is not None and exit_code < 0:
        why = f"the program was killed by {_signal_name(-exit_code)}"
    elif report.get("program_exited"):
        why = f"the program exited with status {exit_code} before its tests ran to the end"
    else:
        why = ""
    return SandboxResult(False, "failed", _join(why, stderr), **common)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _join(why: str, stderr: str) -> str:
    """The error text of a result: redacted before it is cut (a cut key would no longer match)."""
    return redact("\n".join(part for part in (stderr, why) if part))[-ERROR_CHARS:]
