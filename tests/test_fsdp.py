"""FSDP2 for the distill student (`train.distillation.fsdp`): the config refuses what cannot work, and two
gloo ranks sharding the student take the same KD steps as one process on the same global batch.

The KD loss multiplies by the lm head outside the model's forward; under FSDP2 the head is then a shard
unless its unit keeps it gathered. accelerate 1.16 happens to (the "default wrapping" case passed before
the fix too); with the head's unit resharded after the forward (accelerate before 1.16, torch's default for
a unit) the loss failed with "got mixed torch.Tensor and DTensor" (issue 22, finding 12).

accelerate enables FSDP on GPUs only; tests/fsdp_kd_steps.py lets it shard on CPU ranks (see there)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from engine.config.errors import ConfigError
from engine.config.keys import set_key
from engine.config.load import load_config, parse_config

from .helpers import ROOT, TINY_CONFIG, make_context

# ------------------------------------------------------------------------------------------ the config


def tiny_with(**changes) -> str:
    config = load_config(TINY_CONFIG)
    for key, value in changes.items():
        set_key(config, key, value)
    return config.to_yaml()


def test_fsdp_on_one_process_is_a_config_error_naming_the_keys():
    with pytest.raises(ConfigError) as failure:
        parse_config(tiny_with(**{"train.distillation.fsdp": True}))
    text = str(failure.value)
    assert "train.distillation.fsdp" in text and "launch.nproc_per_node" in text
    parse_config(tiny_with(**{"train.distillation.fsdp": True, "launch.nproc_per_node": 2}))
    parse_config(tiny_with(**{"train.distillation.fsdp": True, "launch.nnodes": 2, "launch.rdzv_endpoint": "n0:29500"}))


def test_fsdp_with_a_lora_student_is_refused():
    config = load_config(TINY_CONFIG)
    set_key(config, "train.distillation.peft", {"lora": {"r": 4}})
    with pytest.raises(ValidationError, match=r"train\.distillation\.peft"):
        set_key(config, "train.distillation.fsdp", True)


def test_fsdp_on_cpu_is_refused_before_any_model_loads(tmp_path):
    """accelerate shards on GPUs only; on CPU ranks it would keep a whole student on each, without a word."""
    from engine.runner.context import StageError
    from engine.stages import distill

    config = parse_config(tiny_with(**{"train.distillation.fsdp": True, "launch.nproc_per_node": 2}))
    with pytest.raises(StageError, match=r"train\.distillation\.fsdp .* runs on cpu"):
        distill.run(make_context(config, "distill", tmp_path))


# ------------------------------------------------------------------------------------- two gloo ranks


def kd_steps(out: Path, *flags: str, ranks: int = 1) -> dict:
    """tests/fsdp_kd_steps.py (`-m tests.fsdp_kd_steps`) on `ranks` processes (torchrun, gloo); its steps.json."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    # as a module from the project root, so that the script imports `tests.helpers` without an installed path
    command = [*(launcher if ranks > 1 else [sys.executable]), "-m", "tests.fsdp_kd_steps", str(out), *flags]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "steps.json").read_text())


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, Path]:
    """The reference: the same steps in one process, for the tied and the untied student."""
    runs = {}
    for head in ("tied", "untied"):
        out = tmp_path_factory.mktemp(f"one-{head}")
        kd_steps(out, *(["--untied"] if head == "untied" else []))
        runs[head] = out
    return runs


@pytest.mark.e2e
@pytest.mark.parametrize(
    "head, wrapping",
    [("tied", "default"), ("tied", "--reshard-head"), ("untied", "--reshard-head")],
    ids=["tied-accelerate-wrapping", "tied-head-resharded", "untied-head-resharded"],
)
def test_two_fsdp_ranks_take_the_steps_of_one_process(tmp_path, one_process, head: str, wrapping: str):
    flags = ["--fsdp", *(["--untied"] if head == "untied" else []), *([wrapping] if wrapping != "default" else [])]
    sharded = kd_steps(tmp_path, *flags, ranks=2)
    single = json.loads((one_process[head] / "steps.json").read_text())
    assert sharded["sharded"] and not single["sharded"]  # FSDP really split the weights
    assert len(sharded["steps"]) == len(single["steps"]) == 2
    for two, one in zip(sharded["steps"], single["steps"]):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)

    # the student as distill saves it: gathered from the shards into a plain model, the one-process weights
    got, want = weights(tmp_path / "model"), weights(one_process[head] / "model")
    assert got.keys() == want.keys() and ("lm_head.weight" in got) == (head == "untied")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    bf16 = weights(tmp_path / "model-bf16")
    assert all(bf16[name].equal(got[name].bfloat16()) for name in got)
    assert json.loads((tmp_path / "model-bf16" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.e2e
def test_an_fsdp_run_resumed_from_its_checkpoint_ends_with_the_same_student(tmp_path):
    """Checkpoints of a sharded student (the full state dict, written by rank 0) resume on both ranks."""
    from engine.train.callbacks import last_checkpoint

    whole = kd_steps(tmp_path / "whole", "--fsdp", "--save-every-step", ranks=2)
    resume = tmp_path / "resumed" / "checkpoint-1"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "checkpoint-1", resume)
    assert last_checkpoint(resume.parent) == str(resume)  # a complete checkpoint, as resume picks them
    resumed = kd_steps(tmp_path / "resumed", "--fsdp", "--resume", str(resume), ranks=2)
    assert resumed["steps"][-1] == whole["steps"][-1]
    got, want = weights(tmp_path / "resumed" / "model"), weights(tmp_path / "whole" / "model")
    assert all(got[name].equal(want[name]) for name in want)
