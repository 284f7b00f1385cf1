"""Start and cancel stages of a run. Light module: the panel and the CLI call it.

`start` spawns the run's supervisor (`python -m engine.runner.supervisor`) in a session of its own, with its
output going to a file, never to a pipe: nothing the panel does (or fails to do) can block it, and an
SSH hang-up or a killed panel leaves it running. The supervisor starts one worker per stage.

`cancel` sends SIGTERM to that session's process group: each worker saves what it can and reports
`cancelled`; whatever is still alive after the grace period gets SIGKILL. Only processes whose command
line is this run's are signalled (`is_run_process`): a pid file written by someone else names nothing.
A stage run on several nodes (engine.runner.node) is signalled on this host; the node agents of other
hosts read `cancel_request.json` and stop their workers themselves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from engine.core.fsio import atomic_write, file_lock
from engine.core.process import ProcessRecord, kill_tree, read_pid_file, send_signal, write_pid_file
from engine.pipeline.stages import check_stage_names
from engine.store.events import EventWriter
from engine.store.runs import CANCEL_REQUEST, SUPERVISOR_FILE, Run, StageProcess, read_stage_process, stage_processes


class CannotStart(RuntimeError):
    """Stages of a run cannot be started; the message says why and what to do."""


class RunBusy(CannotStart):
    """The run already has stages running."""


def run_lock(run: Run):
    """Serialises start/cancel of one run between processes (panel, CLI, node agents); the OS drops it if we die."""
    return file_lock(run.path / ".lock")


def check_idle(run: Run, job: str | None = None) -> None:
    """Raise RunBusy while anything of the run runs, except the node agents of `job` (engine.runner.node: the
    nodes of one job register one after another). Call it holding `run_lock`."""
    record, planned = run.supervisor()
    if record is not None and record.is_alive():
        raise RunBusy(
            f"run {run.id} is busy (stages {', '.join(planned)}; pid {record.pid}); "
            f"wait for it or `tas cancel {run.id}`"
        )
    for status in run.stages():
        others = [p for p in stage_processes(run.stage_dir(status.name)) if p.is_alive() and p.job != job]
        if status.state == "running" and (job is None or others):  # also a worker whose supervisor was killed
            raise RunBusy(
                f"stage {status.name} of run {run.id} is still running (pid {status.pid}); "
                f"wait for it or `tas cancel {run.id}`"
            )


def start(run: Run, stages: list[str]) -> ProcessRecord:
    """Run `stages` (in pipeline order) in the background; returns the supervisor's process record."""
    stages = check_stage_names(stages)
    with run_lock(run):
        check_idle(run)
        if not Path(run.workdir).is_dir():
            raise CannotStart(f"run {run.id} was started in {run.workdir}, which no longer exists; start a new run")
        run.config()  # a frozen config that no longer validates fails here, with its message
        (run.path / CANCEL_REQUEST).unlink(missing_ok=True)  # a new start is not cancelled by an old request
        log = open(run.path / "supervisor.log", "ab")
        try:
            process = subprocess.Popen(
                [sys.executable, "-u", "-m", "engine.runner.supervisor", "--run", str(run.path), *stages],
                cwd=run.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session + process group: survives the panel and SSH
                close_fds=True,
                env=python_env(),
            )
        finally:
            log.close()
        record = ProcessRecord.of(process.pid)
        write_pid_file(run.path / SUPERVISOR_FILE, record, stages=stages, started=time.time())
        _reap_when_done(process)
        return record


def _reap_when_done(process: subprocess.Popen) -> None:
    """Wait for the supervisor in a daemon thread, so the starter (the panel, which lives on) collects its
    exit status and no zombie is left behind. Liveness is never read from here: the pid file and the
    kernel's start time say it, as for runs started by another process."""
    threading.Thread(target=process.wait, name=f"reap-supervisor-{process.pid}", daemon=True).start()


def python_env() -> dict[str, str]:
    """Environment for our Python child processes (supervisor, chat worker)."""
    env = dict(os.environ)
    # the package must be importable from the run's workdir even when it is not installed
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cancel(run: Run, grace_s: float | None = None, wait: bool = True) -> bool:
    """Ask the run's stages to stop; with `wait`, SIGKILL what is left after the grace period.

    Returns True when something was running.
    """
    if grace_s is None:
        grace_s = run.config().launch.cancel_grace_s
    with run_lock(run):
        atomic_write(run.path / CANCEL_REQUEST, json.dumps({"grace_s": grace_s, "ts": time.time()}).encode())
        supervisor, _ = run.supervisor()
        targets = [supervisor] if supervisor is not None and supervisor.is_alive() else []
        workers = {}  # pid file -> the worker record we signal
        remote = []  # node agents on other hosts: they read the cancel request themselves
        for status in run.stages():
            if status.state != "running":
                continue
            for process in stage_processes(run.stage_dir(status.name)):
                if process.is_alive() and process.is_local:
                    workers[process.path] = process.record
                elif process.is_alive():
                    remote.append(process)
        targets += list(workers.values())
        targets = _signal_groups(run, targets, signal.SIGTERM)
        workers = {path: record for path, record in workers.items() if record in targets}
        if not targets and not remote:
            return False
    if not wait:
        return True
    # The supervisor enforces grace_s itself; this is the backstop for when it cannot. Wait only on the
    # processes signalled here: a run started again meanwhile is not ours to kill or mark.
    deadline = time.monotonic() + grace_s + 5
    while time.monotonic() < deadline:
        remote = [process for process in remote if still_alive(process)]
        if not any(record.is_alive() for record in targets) and not remote:
            return True
        time.sleep(0.2)
    for record in targets:  # torchrun's ranks first: they live in sessions of their own
        if record.is_alive():  # (each target was checked to be this run's before its SIGTERM)
            kill_tree(record.pid)
    _signal_groups(run, targets, signal.SIGKILL)
    time.sleep(0.2)
    for path, record in workers.items():
        stage = path.parent.name
        if read_pid_file(path) == record and run_stage_state(run, stage) == "died":
            writer = EventWriter(run.stage_dir(stage) / "events.jsonl")
            writer.status("cancelled", message=f"killed after the grace period of {grace_s:g}s")
            writer.close()
    return True


def still_alive(process: StageProcess) -> bool:
    """The process of a pid file read earlier is still alive (its file read again: a fresh heartbeat)."""
    now = read_stage_process(process.path)
    return now is not None and now.record == process.record and now.is_alive()


def run_stage_state(run: Run, stage: str) -> str:
    return next(s.state for s in run.stages() if s.name == stage)


def _signal_groups(run: Run, targets: list[ProcessRecord], sig: int) -> list[ProcessRecord]:
    """Send `sig` once to the process group of each target that is `run`'s; returns those targets.

    A pid file is only a claim (anyone who can write `runs/` can write one): a target whose command line
    is not this run's, or whose group is not the recorded one, is refused (engine.core.process.send_signal).
    """
    ours, groups = [], set()
    for record in targets:
        try:
            group = os.getpgid(record.pid)
        except OSError:
            continue
        # the supervisor and its workers share a group: one SIGTERM each, a second may mean "hurry"
        if send_signal(record, 0 if group in groups else sig, lambda p: is_run_process(p, run), group=True):
            ours.append(record)
            groups.add(group)
    return ours


RUN_MODULES = ("engine.runner.supervisor", "engine.runner.worker", "engine.runner.node")


def is_run_process(process: psutil.Process, run: Run) -> bool:
    """`process` is one of `run`'s, by its command line: the supervisor (`engine.runner.supervisor --run
    <run>`), a stage worker (`engine.runner.worker <stage> --run <run>`), or torchrun running one
    (`--run-dir <run>`), or a Slurm node agent (`engine.runner.node --run <run folder, id or name>`). The
    run folder is compared as a file, from the process's working directory."""
    argv = process.cmdline()
    if not any(module in argv for module in RUN_MODULES):
        return False
    named = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word in ("--run", "--run-dir")]
    named += [word.split("=", 1)[1] for word in argv if word.startswith(("--run=", "--run-dir="))]
    if "engine.runner.node" in argv and any(name in (run.id, run.name) for name in named):
        return True
    return any(_same_folder(os.path.join(process.cwd(), folder), run.path) for folder in named)


def _same_folder(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
