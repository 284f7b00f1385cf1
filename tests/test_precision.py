"""bf16 is honoured in the KD step: the student's forward goes through the Trainer's wrapped forward,
where autocast lives (calling the inner `model.model` ran in float32 whatever the config said). And which
half precision a GPU trains in: bfloat16 where it is native, float16 only where it is not (V100, T4)."""

from __future__ import annotations

import pytest
import torch

from engine.models.loading import load_causal_lm, load_tokenizer
from tests.helpers import tiny_kd_trainer


@pytest.mark.parametrize("bf16", [True, False])
def test_kd_step_runs_the_student_in_the_configured_precision(tmp_path, bf16: bool):
    tokenizer = load_tokenizer("tiny:assistant", padding_side="right")
    student = load_causal_lm("tiny:assistant", dtype=torch.float32)
    teacher = load_causal_lm("tiny:assistant", dtype=torch.float32).eval().requires_grad_(False)
    seen: list[torch.dtype] = []
    # a matmul inside the student's forward: autocast decides its output dtype (norms upcast to float32
    # by design, so the final hidden state would not tell)
    projection = student.model.layers[0].mlp.down_proj
    projection.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    ids = tokenizer("def add(a, b):\n    return a + b")["input_ids"]
    examples = [{"input_ids": ids, "labels": [-100] * 4 + ids[4:]} for _ in range(4)]
    trainer = tiny_kd_trainer(
        tmp_path,
        examples,
        student,
        teacher,
        tokenizer.pad_token_id,
        max_steps=2,
        per_device_train_batch_size=2,
        bf16=bf16,
        kd_weight=0.5,
        chunk_size=64,
        vocab_size=teacher.config.vocab_size,
    )
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16 if bf16 else torch.float32}
    assert all(torch.isfinite(p).all() for p in student.parameters())


class FakeGPU:
    """A monkeypatched `torch.cuda` for one visible GPU of a given compute capability: bf16 is native from
    8.0 (Ampere); below it torch's own check says yes by emulation unless asked not to count that."""

    def __init__(self, monkeypatch, capability: tuple[int, int]):
        self.capability = capability
        self.asked: list[bool] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", self.is_bf16_supported)

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        self.asked.append(including_emulation)
        return self.capability >= (8, 0) or including_emulation


class Events:
    def __init__(self):
        self.lines: list[str] = []

    def log(self, message: str, level: str = "info") -> None:
        self.lines.append(message)


def sft_precision(monkeypatch, capability: tuple[int, int]) -> tuple[dict[str, bool], FakeGPU]:
    """The Trainer's precision flags for the root config's train.sft on a fake GPU."""
    from types import SimpleNamespace

    from engine.config.load import load_config
    from engine.train.callbacks import precision

    from .helpers import PROJECT_CONFIG

    gpu = FakeGPU(monkeypatch, capability)
    sft = load_config(PROJECT_CONFIG).train.sft
    assert (sft.bfloat16, sft.fp16) == (False, True)  # TAS's keys, as the root config has them
    return precision(SimpleNamespace(events=Events()), sft.bfloat16, sft.fp16, "cuda"), gpu


def test_sft_trains_in_bf16_on_a_gpu_with_native_bf16(monkeypatch):
    """fp16: true means half precision: bfloat16 on an A100/H100, where float16 overflows Qwen2."""
    flags, gpu = sft_precision(monkeypatch, (8, 0))
    assert flags == {"bf16": True, "fp16": False}
    assert gpu.asked and not any(gpu.asked)  # emulation never counts


@pytest.mark.parametrize("capability", [(7, 0), (7, 5)], ids=["V100", "T4"])
def test_sft_falls_back_to_fp16_where_bf16_is_only_emulated(monkeypatch, capability):
    flags, gpu = sft_precision(monkeypatch, capability)
    assert flags == {"bf16": False, "fp16": True}
    assert gpu.asked and not any(gpu.asked)


@pytest.mark.parametrize("capability", [(7, 0), (7, 5)], ids=["V100", "T4"])
def test_bf16_weights_and_distill_fall_back_to_fp16_where_bf16_is_only_emulated(monkeypatch, capability):
    from types import SimpleNamespace

    from engine.models.device import pick_dtype
    from engine.train.callbacks import precision

    gpu = FakeGPU(monkeypatch, capability)
    assert pick_dtype(True, torch.device("cuda", 0)) == torch.float16
    assert precision(SimpleNamespace(events=Events()), True, False, "cuda") == {"bf16": False, "fp16": True}
    assert gpu.asked and not any(gpu.asked)
    FakeGPU(monkeypatch, (9, 0))
    assert pick_dtype(True, torch.device("cuda", 0)) == torch.bfloat16
