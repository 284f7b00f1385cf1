"""Training on several processes (CPU, gloo): sft and distill under torchrun with 2 ranks, cancel under DDP,
and two torchrun agents on localhost joined by a rendezvous (the multi-node path)."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from engine.config.load import load_config
from engine.runner import launcher
from engine.runner.supervisor import worker_command, worker_env
from engine.store.events import read_events

from .helpers import make_run, wait_for

pytestmark = pytest.mark.e2e


DDP = {
    "data.limit": 48,
    "teacher.open.pipeline.max_new_tokens": 16,
    "launch.nproc_per_node": 2,
    "device.cpu_threads": 1,  # two ranks on two cores: one thread each, not two each fighting over them
    "train.sft.max_steps": 3,  # sft only makes the assistant the tests need (its DDP test sets its own)
    "train.distillation.ce_only_control": False,
}


def ddp_run(project: Path, name: str, **changes):
    return make_run(project, "configs/tiny.yaml", {**DDP, **changes}, name=name)


def final(run, stage: str) -> dict:
    return [e for e in read_events(run.stage_dir(stage) / "events.jsonl") if e["kind"] == "status"][-1]


def test_sft_and_distill_run_data_parallel_on_two_ranks(project: Path):
    run = ddp_run(
        project, "ddp", **{"train.sft.max_steps": 3, "train.distillation.max_steps": 3, "train.sft.logging_steps": 1}
    )  # distill logs at the same interval
    launcher.start(run, ["data", "teacher", "sft", "distill"])
    wait_for(lambda: not run.is_live(), timeout=900, interval=1, what="the run to end")
    for stage in ("teacher", "sft", "distill"):
        assert final(run, stage)["state"] == "done", (
            stage,
            final(run, stage),
            (run.stage_dir(stage) / "worker.log").read_text()[-3000:],
        )
        running = [e for e in read_events(run.stage_dir(stage) / "events.jsonl") if e.get("state") == "running"]
        assert running[-1]["world_size"] == 2 and running[-1]["rank"] == 0
        rank1 = read_events(run.stage_dir(stage) / "events.rank1.jsonl")
        assert rank1 and rank1[-1]["state"] == "done"
        if stage != "teacher":  # training: rank 0 alone reports progress, metrics and artifacts
            assert not any(e["kind"] in ("progress", "metric", "artifact") for e in rank1), stage
    config = run.config()
    events = read_events(run.stage_dir("distill") / "events.jsonl")
    progress = [e for e in events if e["kind"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == 3
    losses = [e["value"] for e in events if e["kind"] == "metric" and e["name"] == "loss"]
    assert losses and all(v == v and v > 0 for v in losses)
    out = Path(config.train.distillation.output_dir)
    assert (out / "model.safetensors").exists() and (out / "checkpoints" / "COMPLETED").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3"]
    assert (Path(config.train.sft.save_path) / "adapter_model.safetensors").exists()

    # the same distill on 1 rank at the same global batch (2 x 8 = 1 x 16): the same loss curve, within the
    # difference between averaging the two ranks' mean losses and one mean over all tokens
    frozen = run.path / "config.yaml"
    single = load_config(frozen)
    single.launch.nproc_per_node = 1
    single.train.distillation.per_device_train_batch_size *= 2
    frozen.write_text(single.to_yaml())
    launcher.start(run, ["distill"])
    wait_for(lambda: not run.is_live(), timeout=600, interval=1, what="the 1-rank distill to end")
    assert final(run, "distill")["state"] == "done"
    attempts = attempt_losses(read_events(run.stage_dir("distill") / "events.jsonl"))
    two_ranks, one_rank = attempts[-2], attempts[-1]
    assert len(one_rank) == len(two_ranks) == 3, attempts
    for step, (a, b) in enumerate(zip(two_ranks, one_rank), start=1):
        assert abs(a - b) <= 0.05 * b, f"step {step}: 2 ranks {a:.4f} vs 1 rank {b:.4f}"


def attempt_losses(events: list[dict]) -> list[list[float]]:
    """The KD student's training loss per step, one list per attempt of the stage (split at `running`)."""
    attempts: list[list[float]] = []
    for event in events:
        if event["kind"] == "status" and event.get("state") == "running":
            attempts.append([])
        elif event["kind"] == "metric" and event["name"] == "loss" and attempts:
            attempts[-1].append(event["value"])
    return attempts


def test_cancel_under_ddp_saves_once_and_every_rank_exits(project: Path):
    run = ddp_run(project, "ddp-cancel", **{"train.distillation.max_steps": 400, "train.distillation.save_steps": 1000})
    launcher.start(run, ["data", "teacher", "sft", "distill"])
    wait_for(
        lambda: any(
            e["kind"] == "progress" and e["done"] >= 2 for e in read_events(run.stage_dir("distill") / "events.jsonl")
        ),
        timeout=900,
        interval=0.5,
        what="distill to take two steps",
    )
    workers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "--run-dir" in (p.info["cmdline"] or []) and str(run.path) in " ".join(p.info["cmdline"] or [])
    ]
    launcher.cancel(run)
    wait_for(lambda: not run.is_live(), timeout=120, interval=0.5, what="the run to stop")
    status = final(run, "distill")
    assert status["state"] == "cancelled" and "checkpoint saved" in status.get("message", ""), status
    checkpoints = list((Path(run.config().train.distillation.output_dir) / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_two_torchrun_agents_on_localhost_finish_a_distill(project: Path):
    """The multi-node path: two agents (one process each) meet at a rendezvous on node 0's address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = ddp_run(project, "two-nodes", **{"train.distillation.max_steps": 2, "launch.nproc_per_node": 1})
    launcher.start(run, ["data", "teacher", "sft"])
    wait_for(lambda: not run.is_live(), timeout=900, interval=1, what="the stages before distill")
    agents = []
    for node_rank in (0, 1):
        config = run.config()
        config.launch.nnodes, config.launch.node_rank = 2, node_rank
        config.launch.rdzv_endpoint = f"127.0.0.1:{port}"
        command = worker_command("distill", run, config)
        assert "--nnodes" in command and "--standalone" not in command
        agents.append(
            subprocess.Popen(
                command, cwd=project, env=worker_env(config), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
            )
        )
    assert [agent.wait(timeout=600) for agent in agents] == [0, 0]
    assert final(run, "distill")["state"] == "done"
    assert json.loads(json.dumps(read_events(run.stage_dir("distill") / "events.rank1.jsonl")))
    assert (Path(run.config().train.distillation.output_dir) / "model.safetensors").exists()
