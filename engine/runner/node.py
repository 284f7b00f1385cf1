"""`python -m engine.runner.node --run RUN STAGE`: one node's share of a stage run on several nodes.

`scripts/slurm-multinode.sbatch` starts it on every node (srun, one task per node). It is the supervisor
(engine.runner.supervisor.Supervisor) for one stage on one node: the same worker command (torchrun with
this node's rank and the rendezvous), the same worker environment (`worker_env`), the same cancel grace and
final status. What several hosts add:

* registration: each node records itself under the run's lock, node 0 in `<stage>/pid`, node N in
  `<stage>/pid.node<N>` (pid + kernel start ticks, host, job), refusing a run that is busy with anything
  but this job. So `tas status` and the panel show the stage running, and `tas run` or the panel's start
  refuse the run (RunBusy) while it runs (engine.store.runs.stage_processes).
* a heartbeat in the pid file every few seconds: a host that cannot check the pid (the login node, the
  other nodes) reads the agent alive while the heartbeat is recent; the agent clears it when it ends.
* cancel: `tas cancel` on any host writes `cancel_request.json`; each agent reads it within a second and
  stops its workers as the supervisor does (SIGTERM, SIGKILL after the grace). Slurm's SIGTERM (scancel,
  the time limit) is a cancel too. A node agent ends with 0 after a cancel that was asked for, so srun's
  --kill-on-bad-exit does not cut the checkpoint save of the node that holds rank 0.
* one final status: torchrun's c10d rendezvous gives global rank 0, the writer of `events.jsonl`, to any
  node (it ignores --node_rank), so only the agent whose worker has RANK=0 writes the final status its
  workers could not; node 0 writes it when no worker reported anything.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import psutil

from engine.core.fsio import read_json
from engine.core.process import ProcessRecord, write_pid_file
from engine.pipeline.stages import PIPELINE
from engine.runner.launcher import CannotStart, check_idle, run_lock
from engine.runner.supervisor import Supervisor, worker_command
from engine.store.events import read_events
from engine.store.runs import (
    CANCEL_REQUEST,
    HEARTBEAT_S,
    RUN_FILE,
    Run,
    RunNotFound,
    RunStore,
    read_stage_process,
    runs_root,
    this_host,
)

POLL_S = 1.0
"""How often an agent looks for a cancel request and for its rank-0 worker."""


class NodeAgent(Supervisor):
    def __init__(self, run: Run, stage: str, nnodes: int, node_rank: int, rdzv_endpoint: str | None, job: str):
        super().__init__(run, [stage])
        launch = self.config.launch
        launch.nnodes, launch.node_rank, launch.rdzv_endpoint = nnodes, node_rank, rdzv_endpoint
        self.stage, self.node_rank, self.job = stage, node_rank, job
        node = "" if node_rank == 0 else f".node{node_rank}"
        self.log_name = f"worker{node}.log"  # one writer per file: appends from two hosts interleave on NFS
        self.pid_path = run.stage_dir(stage) / f"pid{node}"
        self.record = ProcessRecord.of(os.getpid())
        self.started = time.time()
        self.next_poll = self.next_beat = 0.0
        self.hosts_rank0 = nnodes == 1
        self.state: str | None = None

    def main(self) -> int:
        if self.config.launch.nnodes > 1 and "torch.distributed.run" not in worker_command(
            self.stage, self.run, self.config
        ):
            print(f"stage {self.stage} runs in one process: run it on one node (sbatch --nodes=1)", file=sys.stderr)
            return 2
        try:
            with run_lock(self.run):
                check_idle(self.run, job=self.job)
                self.beat()
        except CannotStart as exc:
            print(exc, file=sys.stderr, flush=True)
            return 2
        try:
            code = super().main()
        finally:
            self.beat(ended=True)
        return 0 if self.state == "cancelled" and self.cancel_requested_at is not None else code

    def run_stage(self, stage: str) -> str:
        self.state = super().run_stage(stage)
        return self.state

    def register(self, stage_dir: Path, child) -> None:
        """Registered before the start (under the run's lock): the record is this agent, not torchrun."""

    def watch(self) -> None:
        now = time.monotonic()
        if now < self.next_poll:
            return
        self.next_poll = now + POLL_S
        if self.cancel_requested_at is None and self.cancel_requested():
            self.on_sigterm(signal.SIGTERM, None)
        if not self.hosts_rank0 and self.child is not None:
            self.hosts_rank0 = has_rank0_child(self.child.pid)
        if now >= self.next_beat:
            self.beat()

    def cancel_requested(self) -> bool:
        """`tas cancel` (on any host) asked since this agent started."""
        request = read_json(self.run.path / CANCEL_REQUEST) or {}
        ts = request.get("ts")
        return isinstance(ts, (int, float)) and ts >= self.started

    def beat(self, ended: bool = False) -> None:
        """(Re)write this node's pid file; at the end only if it is still ours (a later job may own it now)."""
        if ended:
            current = read_stage_process(self.pid_path)
            if current is None or current.record != self.record:
                return
        extra = {"host": this_host(), "node_rank": self.node_rank, "job": self.job}
        write_pid_file(self.pid_path, self.record, **extra, heartbeat=None if ended else time.time())
        self.next_beat = time.monotonic() + HEARTBEAT_S

    def report_end(self, stage_dir: Path, events_path: Path, seen: int, returncode: int | None, killed: bool) -> str:
        if self.hosts_rank0 or (self.node_rank == 0 and len(read_events(events_path)) == seen):
            return super().report_end(stage_dir, events_path, seen, returncode, killed)
        # rank 0 runs on another node: its worker, or its agent, reports for the stage
        if returncode == 0:
            return "done"
        return "cancelled" if self.cancel_requested_at is not None else "failed"


def has_rank0_child(pid: int) -> bool:
    """One of torchrun's workers (its children) is global rank 0 (RANK in its environment)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return False
    for child in children:
        try:
            if child.environ().get("RANK") == "0":
                return True
        except psutil.Error:
            continue
    return False


def open_run(ref: str) -> Run:
    """A run directory, or a run's id or name in the run store of the current directory."""
    if (Path(ref) / RUN_FILE).is_file():
        return Run.open(ref)
    return RunStore(runs_root(None)).get(ref)


def build_parser() -> argparse.ArgumentParser:
    """The defaults come from Slurm's environment of the task (srun), so the sbatch passes only the rest."""
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m engine.runner.node", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory, id or name")
    parser.add_argument("--nnodes", type=int, default=int(env.get("SLURM_NNODES", 1)), help="default $SLURM_NNODES")
    parser.add_argument(
        "--node-rank", type=int, default=int(env.get("SLURM_NODEID", 0)), help="this node's rank ($SLURM_NODEID)"
    )
    parser.add_argument("--rdzv-endpoint", help="host:port of node 0, for torchrun's rendezvous (several nodes)")
    parser.add_argument(
        "--job", default=env.get("SLURM_JOB_ID"), help="what ties the nodes together ($SLURM_JOB_ID, else the endpoint)"
    )
    parser.add_argument("stage", choices=PIPELINE)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nnodes > 1 and not args.rdzv_endpoint:
        parser.error("--rdzv-endpoint is needed with several nodes")
    if not 0 <= args.node_rank < args.nnodes:
        parser.error(f"--node-rank {args.node_rank} is not one of the {args.nnodes} nodes")
    job = args.job or args.rdzv_endpoint or f"{this_host()}-{os.getpid()}"
    try:
        run = open_run(args.run)
    except (RunNotFound, FileNotFoundError) as exc:
        print(exc, file=sys.stderr)
        return 2
    return NodeAgent(run, args.stage, args.nnodes, args.node_rank, args.rdzv_endpoint, job).main()


if __name__ == "__main__":
    sys.exit(main())
