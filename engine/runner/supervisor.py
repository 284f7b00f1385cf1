"""`python -m engine.runner.supervisor --run DIR STAGE...`: runs the stages of one run, one worker each.

Light process, started by `engine.runner.launcher.start` in a session of its own. It exists so that

* several stages run back to back (`tas run all`) without anyone watching,
* every stage ends with a final status even when its worker dies hard (SIGKILL, OOM killer, segfault):
  the supervisor writes `failed` with the exit code the worker could not report itself,
* a cancel is enforced: SIGTERM is passed on, and a worker still alive after the grace period
  (`launch.cancel_grace_s`, or `tas cancel --grace`) is killed, torchrun's ranks with it, and marked
  `cancelled`.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.config.schema import TASConfig
from engine.core.process import ProcessRecord, kill_tree, write_pid_file
from engine.pipeline.stages import runs_under_torchrun
from engine.runner import hub
from engine.store.events import FINAL_STATES, EventWriter, read_events
from engine.store.runs import CANCEL_REQUEST, Run, read_json

TORCHRUN_SHUTDOWN_S = 24 * 3600
"""How long torchrun's agent waits for its ranks after passing on a cancel before it SIGKILLs them (its own
default is 30 s). Longer than any grace period: the grace of a cancel (`launch.cancel_grace_s`, or the
`--grace` of `tas cancel`, known only when it comes) is enforced by the supervisor, which kills the whole
tree, ranks included, when it runs out. The agent's own deadline cut a longer grace short, and a slow
checkpoint save with it."""


def worker_command(stage: str, run: Run, config: TASConfig) -> list[str]:
    worker = ["-m", "engine.runner.worker", stage, "--run", str(run.path)]
    launch = config.launch
    if runs_under_torchrun(stage, config):
        # torchrun's own parser would take `--run` for an abbreviation of its `--run-path`
        worker = ["-m", "engine.runner.worker", stage, "--run-dir", str(run.path)]
        if launch.nnodes > 1:  # every node runs the same command; node 0 hosts the rendezvous
            where = [
                "--nnodes",
                str(launch.nnodes),
                "--node_rank",
                str(launch.node_rank),
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                str(launch.rdzv_endpoint),
                "--rdzv_id",
                f"{run.id}-{stage}",
            ]
        else:
            where = ["--standalone"]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *where,
            f"--nproc_per_node={launch.nproc_per_node}",
            f"--shutdown-timeout={TORCHRUN_SHUTDOWN_S}",
            *worker,
        ]
    return [sys.executable, "-u", *worker]


QUIET_ENV = {
    # worker.log is read by people: no progress bars (each redraw is a line of `\r` noise there; a stage
    # reports its progress as events), unless the user's own environment asks for them
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub downloads, and transformers' bars (weights loading)
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' map / filter / tokenizing
    "TQDM_DISABLE": "1",  # any other tqdm bar (the Trainer's): tqdm reads its defaults from TQDM_*
}


# device.cpu_isa: avx2 caps every CPU math library at AVX2 (x86-64): torch's own kernels, MKL's BLAS (its
# conditional numerical reproducibility mode) and oneDNN. Read when they load, so set before the worker starts.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def worker_env(config: TASConfig) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name, value in QUIET_ENV.items():
        env.setdefault(name, value)
    if config.cuda.cuda_alloc_conf:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", config.cuda.cuda_alloc_conf)
    if config.launch.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = config.launch.cuda_visible_devices
    if config.device.cpu_isa == "avx2" and platform.machine().lower() in ("x86_64", "amd64"):
        env.update(AVX2_ENV)  # not setdefault: results repeatable across machines is what the key promises
    if config.device.cpu_threads:
        env["OMP_NUM_THREADS"] = str(config.device.cpu_threads)  # the libraries' own thread pools too
    return env


def hub_offline_note(env: dict[str, str]) -> str | None:
    """When the Hugging Face hub cannot be reached right now, the stage works offline (HF_HUB_OFFLINE=1 in
    `env`): cached models and datasets load at once, others fail at once with the key to change, instead of
    a minute of HTTP retries each. Asked afresh for every stage (a second at most). Returns the line for
    worker.log, or None when the hub answered or HF_HUB_OFFLINE was already set."""
    if hub.offline_flag() is not None:
        return None
    reason = hub.unreachable_reason(fresh=True)
    if reason is None:
        return None
    env["HF_HUB_OFFLINE"] = "1"
    return f"the Hugging Face hub is unreachable ({reason}): HF_HUB_OFFLINE=1, only cached models and datasets"


class Supervisor:
    log_name = "worker.log"

    def __init__(self, run: Run, stages: list[str]):
        self.run = run
        self.stages = stages
        self.config = run.config()
        self.cancel_requested_at: float | None = None
        self.grace_s = self.config.launch.cancel_grace_s
        self.child: subprocess.Popen[bytes] | None = None

    def on_sigterm(self, signum: int, frame: object) -> None:
        if self.cancel_requested_at is None:
            self.cancel_requested_at = time.monotonic()
            self.grace_s = cancel_grace(self.run, self.config)
        if self.child is not None and self.child.poll() is None:
            try:
                self.child.send_signal(signal.SIGTERM)  # in case the signal was sent to us alone
            except ProcessLookupError:
                pass

    def main(self) -> int:
        signal.signal(signal.SIGTERM, self.on_sigterm)
        signal.signal(signal.SIGINT, self.on_sigterm)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for stage in self.stages:
            if self.cancel_requested_at is not None:
                break
            state = self.run_stage(stage)
            if state != "done":
                return 1
        return 0 if self.cancel_requested_at is None else 1

    def run_stage(self, stage: str) -> str:
        stage_dir = self.run.stage_dir(stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        events_path = stage_dir / "events.jsonl"
        seen = len(read_events(events_path))
        env = worker_env(self.config)
        offline = hub_offline_note(env)
        with open(stage_dir / self.log_name, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start {stage}\n".encode())
            if offline:
                log.write(f"=== {offline}\n".encode())
            log.flush()
            self.child = subprocess.Popen(
                worker_command(stage, self.run, self.config),
                cwd=self.run.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.register(stage_dir, self.child)
        if self.cancel_requested_at is not None:  # SIGTERM arrived while we were starting it
            self.child.send_signal(signal.SIGTERM)
        killed = False
        while self.child.poll() is None:
            if self.cancel_requested_at is not None and time.monotonic() - self.cancel_requested_at > self.grace_s:
                kill_tree(self.child.pid)
                self.child.wait()
                killed = True
                break
            self.watch()
            time.sleep(0.1)
        returncode = self.child.returncode
        self.child = None
        final = _final_state(read_events(events_path)[seen:])
        if final is not None:
            return final
        return self.report_end(stage_dir, events_path, seen, returncode, killed)

    def register(self, stage_dir: Path, child: subprocess.Popen[bytes]) -> None:
        """Record the worker in the stage's pid file: `tas status`, `tas cancel` and the panel find it there."""
        write_pid_file(stage_dir / "pid", ProcessRecord.of(child.pid))

    def watch(self) -> None:
        """Called every 0.1 s while the worker runs (engine.runner.node adds its heartbeat here)."""

    def report_end(self, stage_dir: Path, events_path: Path, seen: int, returncode: int | None, killed: bool) -> str:
        """The worker ended without a final status (events after the first `seen`): write one for it."""
        writer = EventWriter(events_path)
        if self.cancel_requested_at is not None:
            how = f"killed after the grace period of {self.grace_s:g}s" if killed else _exit_reason(returncode)
            writer.status("cancelled", message=how)
            state = "cancelled"
        else:
            writer.status("failed", error=_exit_reason(returncode) + f"; see {stage_dir / 'worker.log'}")
            state = "failed"
        writer.close()
        return state


def cancel_grace(run: Run, config: TASConfig) -> float:
    """The grace period of the cancel in progress: `tas cancel --grace` writes it, else the config's."""
    request = read_json(run.path / CANCEL_REQUEST) or {}
    try:
        return float(request["grace_s"])
    except (KeyError, TypeError, ValueError):
        return config.launch.cancel_grace_s


def _final_state(events: list[dict]) -> str | None:
    states = [e.get("state") for e in events if e.get("kind") == "status"]
    return states[-1] if states and states[-1] in FINAL_STATES else None


def _exit_reason(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:  # real-time signals have no name
            name = f"signal {-returncode}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if name == "SIGKILL" else ""
        return f"the worker was stopped by {name}{hint} before reporting a result"
    return f"the worker exited with code {returncode} without reporting a result"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.runner.supervisor")
    parser.add_argument("--run", required=True)
    parser.add_argument("stages", nargs="+")
    args = parser.parse_args(argv)
    return Supervisor(Run.open(args.run), args.stages).main()


if __name__ == "__main__":
    sys.exit(main())
