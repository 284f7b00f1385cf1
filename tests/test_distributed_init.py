"""Joining the torchrun group on GPUs: each rank sets its own GPU first and binds the group to it.

NCCL's first barrier runs on the *current* device. A stage that joins the group before it picks its
device (the teacher does: it needs its rank to shard the prompts) would run that barrier on cuda:0 on
every rank: "Duplicate GPU detected" or a hang (issue 22, finding 1). No GPU here, so a fake torch.cuda
and torch.distributed record the calls; only their order and arguments matter.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from engine.models import device


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    recorded: list[tuple] = []
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: recorded.append(("set_device", index)))
    monkeypatch.setattr(dist, "is_initialized", lambda: any(c[0] == "init_process_group" for c in recorded))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: recorded.append(("init_process_group", kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    return recorded


def test_a_rank_sets_its_gpu_before_it_joins_the_group(calls):
    assert device.init_distributed() == (3, 8)
    names = [name for name, *_ in calls]
    assert names == ["set_device", "init_process_group"], calls
    assert calls[0] == ("set_device", 3)


def test_the_nccl_group_is_bound_to_the_rank_s_gpu(calls):
    device.init_distributed()
    options = calls[-1][1]
    assert options["backend"] == "nccl"
    assert options["device_id"] == torch.device("cuda", 3)


def test_without_a_gpu_the_group_is_gloo_and_no_device_is_set(calls, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device.init_distributed()
    assert [name for name, *_ in calls] == ["init_process_group"]
    assert calls[0][1]["backend"] == "gloo" and "device_id" not in calls[0][1]
