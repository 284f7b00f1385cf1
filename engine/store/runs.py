"""The run store: one directory per run, and what state each stage of a run is in.

Light module (stdlib, psutil, PyYAML, pydantic). Layout (see DESIGN.md):

    runs/<run-id>/run.json               id, created, workdir, config source
    runs/<run-id>/config.yaml            frozen copy of the validated config
    runs/<run-id>/supervisor.json        pid + start time + stages of the process running the stages
    runs/<run-id>/<stage>/events.jsonl   the stage's event stream
    runs/<run-id>/<stage>/worker.log     the worker's stdout + stderr
    runs/<run-id>/<stage>/pid            pid + start time of the stage's worker
    runs/<run-id>/<stage>/pid.node<N>    node N's agent of a stage run on several nodes (engine.runner.node)

State is never kept in memory only: everything the panel or `tas status` shows is derived from these
files, so a panel started later (or `tas status` over another SSH session) sees exactly the same.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config.errors import ConfigError
from engine.config.load import load_config
from engine.config.schema import TASConfig
from engine.core.fsio import atomic_write, file_lock, read_json
from engine.core.process import ProcessRecord
from engine.core.secrets import secret_keys
from engine.pipeline.stages import PIPELINE
from engine.store.events import FINAL_STATES, read_events
from engine.store.lineage import resolve_outputs

RUN_FILE = "run.json"
SUPERVISOR_FILE = "supervisor.json"
FROZEN_CONFIG = "config.yaml"
CANCEL_REQUEST = "cancel_request.json"
DEFAULT_CONFIG = "config.yaml"
"""The config file every command uses unless told otherwise."""


# ------------------------------------------------------------------------------------ stage processes

HEARTBEAT_S = 5.0
"""How often a node agent (engine.runner.node) rewrites its pid file with a fresh `heartbeat`."""
HEARTBEAT_STALE_S = 30.0
"""A pid file of another host whose heartbeat is older than this is a process that died without a word."""


def this_host() -> str:
    return socket.gethostname()


@dataclass(frozen=True)
class StageProcess:
    """A process that runs a stage, read from its pid file: the supervisor's worker (`pid`, this host), or
    one node's agent of a stage run on several nodes (`pid` for node 0, `pid.node<N>`, with `host`).

    A pid means something only on its own host, where it is checked exactly (engine.core.process); any other
    host (the login node, the other nodes) sees the agent alive while its heartbeat is recent. An agent that
    has ended clears its heartbeat, so other hosts see the end at once."""

    path: Path
    record: ProcessRecord
    host: str | None  # None: written by the supervisor, on the machine that reads it
    heartbeat: float | None
    job: str | None = None  # the Slurm job (or rendezvous) the node agent belongs to

    @property
    def is_local(self) -> bool:
        return self.host is None or self.host == this_host()

    def is_alive(self) -> bool:
        if self.is_local:
            return self.record.is_alive()
        return self.heartbeat is not None and time.time() - self.heartbeat < HEARTBEAT_STALE_S


def stage_processes(stage_dir: Path) -> list[StageProcess]:
    """Every process recorded for the stage: `pid` first, then `pid.node<N>` in node order."""
    nodes = sorted(stage_dir.glob("pid.node*"), key=lambda p: (len(p.name), p.name))
    processes = [read_stage_process(path) for path in [stage_dir / "pid", *nodes]]
    return [process for process in processes if process is not None]


def read_stage_process(path: Path) -> StageProcess | None:
    """The process in one pid file (its heartbeat as of now); None when it is missing, torn or corrupt."""
    data = read_json(path)
    record = ProcessRecord.from_json(data)
    if record is None:
        return None
    heartbeat, host, job = data.get("heartbeat"), data.get("host"), data.get("job")
    heartbeat = float(heartbeat) if isinstance(heartbeat, (int, float)) else None
    return StageProcess(path, record, str(host) if host else None, heartbeat, str(job) if job else None)


# ---------------------------------------------------------------------------------------- stage state


@dataclass
class StageStatus:
    """What one stage of a run is doing, derived from its events and its pid."""

    name: str
    state: str  # pending | queued | running | done | failed | cancelled | died
    progress: dict[str, Any] | None = None  # last progress event
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # latest metric event per name
    error: str | None = None
    message: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    pid: int | None = None
    events: int = 0
    first_progress: dict[str, Any] | None = None  # first progress event of this attempt (after loading)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES or self.state == "died"

    @property
    def elapsed(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.time()) - self.started_at

    @property
    def fraction(self) -> float | None:
        p = self.progress
        if not p or not p.get("total"):
            return None
        return min(1.0, float(p["done"]) / float(p["total"]))

    @property
    def eta_s(self) -> float | None:
        """Remaining seconds at this attempt's rate (running stages only).

        The rate counts from the attempt's first progress event, so model loading is not counted as
        work, and a resumed stage (which starts at, say, 204/400) is timed on what it did itself.
        """
        p, first = self.progress, self.first_progress
        if self.state != "running" or not p or not first or not p.get("total"):
            return None
        done, total = float(p.get("done") or 0), float(p["total"])
        worked = done - float(first.get("done") or 0)
        seconds = float(p.get("ts", 0)) - float(first.get("ts", 0))
        if worked <= 0 or seconds <= 0 or done >= total:
            return None
        since_last = max(0.0, time.time() - float(p.get("ts", 0)))
        return max(0.0, (total - done) * seconds / worked - since_last)


def stage_status(stage_dir: Path, name: str, queued_since: float | None = None) -> StageStatus:
    """Derive a stage's state from its events and pid.

    `queued_since` is the start time of a live supervisor that will run this stage: events older than
    that belong to an earlier attempt, so until the new attempt starts the stage shows as queued.
    """
    events = read_events(stage_dir / "events.jsonl")
    status = StageStatus(name=name, state="pending", events=len(events))
    processes = stage_processes(stage_dir)
    status.pid = processes[0].record.pid if processes else None
    last_state = None
    for event in events:
        kind = event.get("kind")
        if kind == "status":
            last_state = event.get("state")
            if last_state == "running":
                status.started_at = event.get("ts")
                status.ended_at = status.error = status.message = None
                status.progress, status.metrics, status.first_progress = None, {}, None
            elif last_state in FINAL_STATES:
                status.ended_at = event.get("ts")
                status.error = event.get("error")
                status.message = event.get("message")
        elif kind == "progress":
            status.progress = event
            if status.first_progress is None or event.get("unit") != status.first_progress.get("unit"):
                status.first_progress = event
        elif kind == "metric" and "name" in event:
            status.metrics[event["name"]] = event
    last_ts = events[-1].get("ts", 0) if events else 0
    if any(p.is_alive() and (last_state not in FINAL_STATES or p.record.started > last_ts) for p in processes):
        status.state = "running"  # a worker that has reported its end may still be exiting: the report wins
    elif queued_since is not None and (not events or last_ts < queued_since or last_state not in FINAL_STATES):
        # a live supervisor will (re)start this stage, or is about to write its final status
        status.state = "queued" if (not events or last_ts < queued_since) else "running"
        if status.state == "queued":  # what is shown belongs to the earlier attempt
            status.error = status.message = status.progress = status.started_at = status.ended_at = None
            status.metrics, status.first_progress = {}, None
    elif last_state in FINAL_STATES:
        status.state = last_state
    elif events:
        status.state = "died"
        status.ended_at = last_ts
        status.error = "the worker stopped without reporting a result (killed?); run the stage again to resume"
    return status


# ----------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    id: str
    path: Path
    created: float
    workdir: str
    config_source: str
    name: str = ""
    note: str = ""
    reused: dict[str, str] = field(default_factory=dict)  # stage -> run id whose outputs it reused

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Run:
        path = Path(path)
        meta = read_json(path / RUN_FILE)
        if meta is None:
            raise FileNotFoundError(f"{path} is not a run directory (no readable {RUN_FILE})")
        return cls(
            id=meta["id"],
            path=path,
            created=float(meta["created"]),
            workdir=meta["workdir"],
            config_source=meta.get("config_source", ""),
            name=str(meta.get("name") or ""),
            note=str(meta.get("note") or ""),
            reused=dict(meta.get("reused") or {}),
        )

    @property
    def label(self) -> str:
        """The id, with the user's name for the run when it has one."""
        return f"{self.id} ({self.name})" if self.name else self.id

    def update_meta(self, **fields: Any) -> None:
        """Change run.json fields (name, note, reused) atomically."""
        with file_lock(self.path / ".lock"):
            meta = read_json(self.path / RUN_FILE) or {}
            meta.update(fields)
            atomic_write(self.path / RUN_FILE, json.dumps(meta, indent=2).encode())
        for key, value in fields.items():
            setattr(self, key, value)

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def config(self) -> TASConfig:
        """The frozen config, its relative output paths resolved inside this run (engine.store.lineage)."""
        return resolve_outputs(load_config(self.path / FROZEN_CONFIG), self.path)

    def supervisor(self) -> tuple[ProcessRecord | None, list[str]]:
        data = read_json(self.path / SUPERVISOR_FILE) or {}
        return ProcessRecord.from_json(data), list(data.get("stages", []))

    def stages(self) -> list[StageStatus]:
        record, planned = self.supervisor()
        since = record.started if record is not None and record.is_alive() else None
        return [stage_status(self.stage_dir(name), name, since if name in planned else None) for name in PIPELINE]

    def overall_state(self, stages: list[StageStatus] | None = None) -> str:
        """One word for the whole run: live, new, finished, stopped, or the failed / cancelled / died
        state of the stage that ran last."""
        stages = self.stages() if stages is None else stages
        if self.is_live() or any(s.state == "running" for s in stages):
            return "live"
        started = [s for s in stages if s.state != "pending"]
        if not started:
            return "new"
        if all(s.state == "done" for s in started):
            return "finished"
        last = max(started, key=lambda s: s.started_at or 0)
        return last.state if last.state in ("failed", "cancelled", "died") else "stopped"

    def is_live(self) -> bool:
        record, _ = self.supervisor()
        return record is not None and record.is_alive()


class RunNotFound(LookupError):
    pass


def config_secret_warning(config: TASConfig, source: str) -> str | None:
    """What to tell a user whose config file holds a secret (a key, a password in a URL, `--api-key X`):
    the run's frozen copy keeps it (0600, as `atomic_write` creates files), so the advice is to move it to `.env`. None without one."""
    keys = secret_keys(config.model_dump(mode="json"))
    if not keys:
        return None
    return (
        f"{source}: {', '.join(keys)} holds a secret, which the run's frozen config keeps (readable by you "
        "only); put it in .env instead (OPENAI_API_KEY, VLLM_API_KEY, HF_TOKEN…), where runs do not copy it"
    )


class RunStore:
    """All runs under one root directory (config key panel.runs_dir)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def create(
        self, config: TASConfig, config_source: str, workdir: str | None = None, name: str = "", note: str = ""
    ) -> Run:
        """A new run directory with the frozen config; the id ends with the config file's name."""
        self.root.mkdir(parents=True, exist_ok=True)
        label = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(config_source).stem)[:24] or "run"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(1, 1000):
            run_id = f"{stamp}-{label}" + (f"-{attempt}" if attempt > 1 else "")
            path = self.root / run_id
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - a thousand runs in one second
            raise RuntimeError("could not allocate a run id")
        atomic_write(path / FROZEN_CONFIG, config.to_yaml().encode("utf-8"))
        meta = {
            "id": run_id,
            "created": time.time(),
            "workdir": str(Path(workdir or os.getcwd()).resolve()),
            "config_source": str(config_source),
            "name": name,
            "note": note,
        }
        atomic_write(path / RUN_FILE, json.dumps(meta, indent=2).encode())
        return Run.open(path)

    def list(self) -> list[Run]:
        """Every readable run, newest first; folders that are not runs are skipped."""
        if not self.root.is_dir():
            return []
        runs = []
        for child in self.root.iterdir():
            if child.is_dir() and (child / RUN_FILE).is_file():
                try:
                    runs.append(Run.open(child))
                except (FileNotFoundError, KeyError, ValueError):
                    continue
        return sorted(runs, key=lambda r: (r.created, r.id), reverse=True)

    def get(self, ref: str | None) -> Run:
        """A run by id, its name, any unique part of the id, or `last`/`latest`/None for the newest."""
        runs = self.list()
        if not runs:
            raise RunNotFound(f"no runs in {self.root}/ yet; start one with `tas run data`")
        if ref in (None, "", "last", "latest"):
            return runs[0]
        exact = [r for r in runs if r.id == ref] or [r for r in runs if r.name == ref]
        if len(exact) == 1:
            return exact[0]
        matches = exact or [r for r in runs if ref in r.id]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise RunNotFound(f"no run {ref!r} in {self.root}/; `tas status` lists them")
        names = ", ".join(r.id for r in matches[:5])
        raise RunNotFound(f"{ref!r} matches {len(matches)} runs ({names}); give more of the id")


class RunIsLive(RuntimeError):
    pass


def remove_run(run: Run, archive: bool = False) -> Path | None:
    """Delete a run's folder, or move it to `<runs>/.archive/`; never a live run. Returns the archive path."""
    if run.is_live() or any(s.state == "running" for s in run.stages()):
        raise RunIsLive(f"run {run.id} is running; cancel it first (tas cancel {run.id})")
    if archive:
        target = run.path.parent / ".archive" / run.id
        target.parent.mkdir(parents=True, exist_ok=True)
        run.path.rename(target)
        return target
    shutil.rmtree(run.path)
    return None


def runs_root(config_path: str | None) -> Path:
    """The run store: $TAS_RUNS_DIR, else panel.runs_dir of the config, else ./runs."""
    if os.environ.get("TAS_RUNS_DIR"):
        return Path(os.environ["TAS_RUNS_DIR"])
    path = Path(config_path or DEFAULT_CONFIG)
    if path.exists():
        try:
            return Path(load_config(path).panel.runs_dir)
        except ConfigError:
            pass
    return Path("runs")
