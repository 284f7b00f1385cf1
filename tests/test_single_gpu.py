"""One process, several visible GPUs (the default: launch.nproc_per_node 1, cuda_visible_devices null): a
stage uses the one GPU `select_device` picked (issue 22, finding 4).

HF's Trainer, in one process that sees N GPUs, wraps the model in `nn.DataParallel` and multiplies the
batch by N (`TrainingArguments.n_gpu`, read from `torch.cuda.device_count()`); TRL 1.16's SFTTrainer
refuses to start there. The open teacher's `device_map="auto"` split the model layer by layer over every
GPU. No GPU here: a fake `torch.cuda` reports two, models stay on the CPU, and only what would be built and
where it would go is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config.load import load_config
from tests.helpers import TINY_CONFIG, make_context


class Built(Exception):
    """Raised by the patched train_resumable: the Trainer is built, nothing more is needed."""


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch):
    """torch.cuda says two GPUs; DataParallel fails the test if anything builds it; nothing moves to a GPU."""
    from transformers import Trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)

    class NoDataParallel(torch.nn.DataParallel):  # a class still: accelerate's isinstance checks read it
        def __init__(self, *args, **kwargs):
            raise AssertionError("nn.DataParallel was built: one process must use one GPU")

    monkeypatch.setattr(torch.nn, "DataParallel", NoDataParallel)
    monkeypatch.setattr(Trainer, "_move_model_to_device", lambda self, model, device: None)


def built_trainer(monkeypatch: pytest.MonkeyPatch, module) -> list:
    """Patch `module.train_resumable` to keep the Trainer it is given, wrap its model as training would, and stop."""
    trainers: list = []

    def keep(ctx, trainer, *args, **kwargs):
        trainers.append(trainer)
        trainer._wrap_model(trainer.model)  # what train() does first: DataParallel when n_gpu > 1
        raise Built

    monkeypatch.setattr(module, "train_resumable", keep)
    return trainers


def test_distill_trains_on_one_gpu_of_two(two_gpus, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from engine.models.loading import load_causal_lm, load_tokenizer
    from engine.stages import distill

    config = load_config(TINY_CONFIG)
    ctx = make_context(config, "distill", tmp_path)
    tokenizer = load_tokenizer("tiny:assistant", padding_side="right")
    student = load_causal_lm("tiny:assistant", dtype=torch.float32)
    teacher = load_causal_lm("tiny:assistant", dtype=torch.float32).eval().requires_grad_(False)
    ids = tokenizer("def add(a, b):\n    return a + b")["input_ids"]
    examples = [{"input_ids": ids, "labels": ids} for _ in range(4)]
    trainers = built_trainer(monkeypatch, distill)
    with pytest.raises(Built):
        distill.train_one(
            ctx,
            "student",
            student,
            teacher,
            tokenizer,
            examples,
            [],
            tmp_path / "student",
            0.5,
            teacher.config.vocab_size,
            100.0,
            torch.device("cuda", 0),
            "",
        )
    trainer = trainers[0]
    assert trainer.args.n_gpu == 1
    assert trainer.args.train_batch_size == config.train.distillation.per_device_train_batch_size


def test_sft_trains_on_one_gpu_of_two(two_gpus, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import json

    from engine.models import loading
    from engine.stages import sft

    config = load_config(TINY_CONFIG)
    config.device.type, config.cuda.allow_tf32 = "auto", False  # the fake GPU, and no global flag set by it
    config.assistant.quantization.load_in_4bit = False  # bitsandbytes would place it on the (fake) GPU
    config.teacher.base.output_path = str(tmp_path / "answers.jsonl")
    config.data.output_path = str(tmp_path / "no-prompts.jsonl")
    config.train.sft.save_path = str(tmp_path / "adapter")
    answers = [{"id": f"p{i}", "instruction": f"Add {i} and 1.", "output": f"{i + 1}"} for i in range(8)]
    Path(config.teacher.base.output_path).write_text("".join(json.dumps(a) + "\n" for a in answers))

    def on_the_cpu(*args, **kwargs):  # the model stays here; a move to the picked device changes nothing
        model = loading.load_causal_lm(*args, **kwargs)
        model.to = lambda *args, **kwargs: model
        return model

    monkeypatch.setattr(sft, "load_causal_lm", on_the_cpu)
    setup = sft.prepare(make_context(config, "sft", tmp_path))
    trainer = setup.trainer
    trainer._wrap_model(trainer.model)  # what train() does first: DataParallel when n_gpu > 1
    assert trainer.args.n_gpu == 1
    assert trainer.args.train_batch_size == config.train.sft.per_device_train_batch_size


def test_the_open_teacher_loads_on_one_gpu_of_two(two_gpus, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from engine.teacher import open as open_teacher

    config = load_config(TINY_CONFIG)
    config.device.type, config.cuda.allow_tf32 = "auto", False
    asked: list[dict] = []

    class Model:
        def to(self, device):
            return self

        def eval(self):
            return self

    def load(name, **kwargs):
        asked.append(kwargs)
        return Model()

    monkeypatch.setattr(open_teacher, "load_causal_lm", load)
    open_teacher.load_teacher(make_context(config, "teacher", tmp_path))
    assert asked[0]["device_map"] == {"": torch.device("cuda", 0)}
