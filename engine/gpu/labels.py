"""Which GPU processes are ours: our stage workers (and their children) labelled "run <id> · <stage>", and
the vLLM teacher servers (their own process group) "run <id> · teacher · vLLM server".

Kept apart from the backends because it is about the run store and the process tree, not the GPU: it reads
the pid files the supervisor writes (runs/<run>/<stage>/pid) and walks process ancestry with psutil.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import psutil

from engine.core.process import ProcessRecord, read_pid_file
from engine.gpu.model import GpuProcess


@dataclass(frozen=True)
class Worker:
    """A live stage worker, from its pid file."""

    run_id: str
    stage: str
    record: ProcessRecord


def live_workers(runs_root: str | os.PathLike[str] | None) -> dict[int, Worker]:
    """pid -> (run, stage) of every stage worker alive now, from runs/<run>/<stage>/pid.

    Only a pid file whose process is alive with the recorded start time counts (a reused pid does not), and
    only if its command line is that run's worker (a pid file anyone wrote names nothing).
    Every run's pid files are looked at, not only runs whose supervisor is alive: a worker that outlived
    a killed supervisor still holds its GPU memory and is still ours. Only pid files are read (no events).
    """
    if runs_root is None:
        return {}
    from engine.pipeline.stages import PIPELINE
    from engine.store.runs import RunStore

    workers: dict[int, Worker] = {}
    for run in RunStore(runs_root).list():
        for stage in PIPELINE:
            record = read_pid_file(run.stage_dir(stage) / "pid")
            if record is not None and record.is_alive() and _is_process_of(record.pid, run):
                workers[record.pid] = Worker(run.id, stage, record)
    return workers


def _is_process_of(pid: int, run) -> bool:
    """The process `pid` is one of `run`'s by its command line; False when it cannot be read."""
    from engine.runner.launcher import is_run_process

    try:
        return is_run_process(psutil.Process(pid), run)
    except (psutil.Error, OSError):
        return False


def live_servers(runs_root: str | os.PathLike[str] | None) -> dict[int, str]:
    """pid -> label of every process of a vLLM teacher server alive now (runs/<run>/teacher/vllm.pid).

    The server runs in its own process group and may outlive its worker (a SIGKILLed worker leaves it to
    the next worker of the run to end), so its processes are found by group, not by ancestry."""
    if runs_root is None:
        return {}
    from engine.store.runs import RunStore
    from engine.teacher.vllm_server import server_processes

    servers: dict[int, str] = {}
    for run in RunStore(runs_root).list():
        pid_file = run.stage_dir("teacher") / "vllm.pid"
        if pid_file.exists():
            for pid in server_processes(pid_file):
                servers[pid] = f"run {run.id} · teacher · vLLM server"
    return servers


_names: dict[tuple[int, float], str] = {}


def short_command(process: psutil.Process, width: int = 48) -> str:
    """`python -m engine.runner.worker teacher --run …`: the command line, shortened; else the process name."""
    try:
        key = (process.pid, process.create_time())
    except (psutil.Error, OSError):
        return "?"
    if key in _names:
        return _names[key]
    try:
        argv = process.cmdline()
    except (psutil.Error, OSError):
        argv = []
    if argv:
        text = " ".join([os.path.basename(argv[0]), *argv[1:]])
    else:
        try:
            text = process.name()
        except (psutil.Error, OSError):
            text = "?"
    text = " ".join(text.split())  # one line: `python -c "..."` may hold newlines
    text = text if len(text) <= width else text[: width - 1] + "…"
    if len(_names) > 2000:
        _names.clear()
    _names[key] = text
    return text


def label_processes(
    processes: list[GpuProcess],
    runs_root: str | os.PathLike[str] | None,
    workers: dict[int, Worker] | None = None,
    servers: dict[int, str] | None = None,
) -> list[GpuProcess]:
    """The processes with `label` (and `run_id`, `stage`, `role`) set for our stage workers (and their
    children: torchrun ranks, dataloader workers) and vLLM servers, `name` filled in from the command line
    and `create_time` from the process. The run store is scanned once per call (unless given)."""
    if not processes:
        return []
    if workers is None:
        workers = live_workers(runs_root)
    if servers is None:
        servers = live_servers(runs_root)
    labelled = []
    for gp in processes:
        name, owner, created = gp.name, Owner(), None
        try:
            process = psutil.Process(gp.pid)
            created = process.create_time()
        except (psutil.Error, OSError):
            process = None
        if process is not None:
            if name is None:
                name = short_command(process)
            owner = _server_owner(gp.pid, servers) or _owner(process, workers)
        labelled.append(
            replace(
                gp,
                label=owner.label,
                run_id=owner.run_id,
                stage=owner.stage,
                role=owner.role,
                name=name or "?",
                create_time=created,
            )
        )
    return labelled


@dataclass(frozen=True)
class Owner:
    """Whose a process is: ours (a run's stage worker, a child of one, a vLLM server) or nobody's (None)."""

    label: str | None = None
    run_id: str | None = None
    stage: str | None = None
    role: str | None = None  # "worker", "child", "vllm"


def _server_owner(pid: int, servers: dict[int, str]) -> Owner | None:
    label = servers.get(pid)
    if label is None:
        return None
    run_id = label.removeprefix("run ").split(" · ", 1)[0]
    return Owner(label, run_id, "teacher", "vllm")


def _owner(process: psutil.Process, workers: dict[int, Worker]) -> Owner:
    if not workers:
        return Owner()
    worker = workers.get(process.pid)
    if worker is not None and worker.record.is_alive():
        return Owner(f"run {worker.run_id} · {worker.stage}", worker.run_id, worker.stage, "worker")
    try:
        ancestors = process.parents()
    except (psutil.Error, OSError):
        return Owner()
    for ancestor in ancestors:
        worker = workers.get(ancestor.pid)
        if worker is not None and worker.record.is_alive():
            rank = process_rank(process)
            label = f"run {worker.run_id} · {worker.stage}" + (f" · rank {rank}" if rank is not None else "")
            return Owner(label, worker.run_id, worker.stage, "child")
    return Owner()


def process_rank(process: psutil.Process) -> str | None:
    """The distributed rank of a worker's child (torchrun sets RANK/LOCAL_RANK), when it can be read."""
    try:
        env = process.environ()
    except (psutil.Error, OSError):
        return None
    return env.get("RANK") or env.get("LOCAL_RANK")
