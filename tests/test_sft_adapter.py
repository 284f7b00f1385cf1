"""What `sft` makes of the assistant on a GPU node (issue 22, findings 7 and 11): tied embeddings trained as
one matrix and reloaded with the trained head after a merge, the merged copy saved in the dtype sft
trained in, the 4-bit compute dtype and the trainer arguments that fit the device. On the tiny assistant,
whose embeddings are tied like Qwen2.5-3B's; a monkeypatched `torch.cuda` stands in for a GPU's answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.config.load import load_config
from engine.models.loading import load_causal_lm
from engine.stages import sft
from engine.train.assistant import quantization_config, trained_dtype

from .helpers import PROMPTS, TINY_CONFIG, make_context, write_teacher_answers
from .test_masking import RECORDS

EMBEDDINGS = ["lm_head", "embed_token"]  # as the root config spells them ("embed_token": TAS's typo, fixed by sft)


def tiny_config(tmp_path: Path):
    cfg = load_config(TINY_CONFIG)
    write_teacher_answers(cfg, tmp_path / "teacher.jsonl", RECORDS)
    cfg.train.sft.save_path = str(tmp_path / "adapter")
    cfg.train.sft.peft.lora.modules_to_save = list(EMBEDDINGS)
    return cfg


def weight(module) -> torch.Tensor:
    """The weight a module computes with: the trained copy when PEFT wrapped it (modules_to_save)."""
    wrapped = getattr(module, "modules_to_save", None)
    return (wrapped[module.active_adapters[0]] if wrapped is not None else module).weight


def tied_lora_model(cfg, tmp_path: Path):
    from peft import get_peft_model

    model = load_causal_lm(cfg.assistant.model.name, dtype=torch.float32)
    return get_peft_model(model, sft.lora_config(make_context(cfg, "sft", tmp_path), model))


def test_modules_to_save_trains_tied_embeddings_as_one_matrix(tmp_path: Path):
    """modules_to_save [lm_head, embed_tokens] on a tied model: one trainable copy, used as embeddings and head
    (without ensure_weight_tying PEFT trains two copies that drift apart)."""
    cfg = tiny_config(tmp_path)
    model = tied_lora_model(cfg, tmp_path)
    full = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
    assert len(full) == 1 and "embed_tokens" in full[0], full
    assert weight(model.get_output_embeddings()) is weight(model.get_input_embeddings())


def test_untied_models_are_not_asked_to_tie(tmp_path: Path):
    cfg = tiny_config(tmp_path)
    model = load_causal_lm(cfg.assistant.model.name, dtype=torch.float32)
    assert sft.ties_embeddings(model, ["embed_tokens"]) and not sft.ties_embeddings(model, ["q_proj"])
    assert not sft.ties_embeddings(model, None)
    model.config.tie_word_embeddings = False
    assert not sft.ties_embeddings(model, ["lm_head", "embed_tokens"])


def save_trained_adapter(cfg, tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """An adapter whose LoRA and embedding copy moved away from the base, as training would; and its head."""
    from engine.models.loading import load_tokenizer

    model = tied_lora_model(cfg, tmp_path)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    adapter = Path(cfg.train.sft.save_path)
    model.save_pretrained(adapter)
    load_tokenizer(cfg.assistant.model.name).save_pretrained(adapter)
    return adapter, weight(model.get_output_embeddings()).detach().clone()


@pytest.mark.parametrize(
    ("bfloat16", "native_bf16", "saved"),
    [(False, True, torch.float32), (True, True, torch.bfloat16), (True, False, torch.float16)],
)
def test_merged_assistant_keeps_its_trained_head_in_the_dtype_it_trained_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bfloat16, native_bf16, saved
):
    """The merged copy reloads with the trained head (= the trained embeddings, still tied), saved in the
    4-bit compute dtype sft trained in: bfloat16, float16 on a GPU without native bfloat16, float32 when
    the config asks for full precision (it was always float32)."""
    cfg = tiny_config(tmp_path)
    cfg.assistant.quantization.bfloat16 = bfloat16
    adapter, trained_head = save_trained_adapter(cfg, tmp_path)
    monkeypatch.setattr(sft, "pick_device", lambda config: torch.device("cuda", 0))  # the merge itself runs on CPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native_bf16)
    sft.merge_adapter(make_context(cfg, "sft", tmp_path), adapter, tmp_path / "merged")

    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == str(saved).removeprefix("torch.")
    merged = load_causal_lm(str(tmp_path / "merged"), dtype="auto")
    assert merged.dtype == saved
    assert torch.equal(merged.lm_head.weight, trained_head.to(saved))
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


@pytest.mark.train
def test_sft_with_modules_to_save_merges_a_model_with_its_trained_head(tmp_path: Path, monkeypatch):
    """The whole stage, 4-bit base and all: training moves the one embedding copy, and the merged model,
    reloaded as any transformers model, computes with it as its head."""
    shutil.copy(PROMPTS, tmp_path / "prompt.yaml")
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path)
    cfg.train.sft.max_steps = 2
    cfg.train.sft.learning_rate = 1e-2
    cfg.train.sft.merge_adapter = True
    ctx = make_context(cfg, "sft", tmp_path)
    setup = sft.prepare(ctx)
    model = setup.trainer.model
    before = weight(model.get_output_embeddings()).detach().clone()
    sft.train(ctx, setup)
    trained = weight(model.get_output_embeddings()).detach().float()
    assert weight(model.get_input_embeddings()) is weight(model.get_output_embeddings())
    assert not torch.equal(trained, before.float())  # the head was trained

    merged = load_causal_lm(str(tmp_path / "adapter" / "merged"), dtype=torch.float32)
    assert torch.equal(merged.lm_head.weight, trained)


def test_4bit_compute_dtype_follows_the_device(monkeypatch: pytest.MonkeyPatch):
    """bnb_4bit_compute_dtype is what `quantization.bfloat16` means on the device (pick_dtype): bfloat16 on
    a GPU with it and on CPU, float16 on a GPU without native bfloat16 (V100, T4), float32 when off."""
    cfg = load_config(TINY_CONFIG)
    q = cfg.assistant.quantization
    q.load_in_4bit, q.bfloat16 = True, True
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert quantization_config(cfg, cuda).bnb_4bit_compute_dtype == torch.float16
    assert trained_dtype(cfg, cuda) == torch.float16
    assert quantization_config(cfg, cpu).bnb_4bit_compute_dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert quantization_config(cfg, cuda).bnb_4bit_compute_dtype == torch.bfloat16
    q.bfloat16 = False
    assert quantization_config(cfg, cuda).bnb_4bit_compute_dtype == torch.float32
    q.load_in_4bit = False
    assert quantization_config(cfg, cuda) is None


def test_trainer_arguments_do_not_search_for_unused_parameters(tmp_path: Path):
    """Every trainable parameter is used in each forward: DDP is told so (HF's default would be True for a
    plain model without checkpointing, and always for a PEFT model: an autograd-graph walk every step)."""
    from transformers import TrainingArguments

    from engine.train.arguments import trainer_arguments

    cfg = load_config(TINY_CONFIG)
    for section in (cfg.train.sft, cfg.train.distillation):
        shared, _ = trainer_arguments(
            make_context(cfg, "sft", tmp_path),
            section,
            tmp_path / "checkpoints",
            torch.device("cpu"),
            run_name="x",
            logging_steps=1,
            seed=0,
            bf16=False,
            fp16=False,
        )
        assert TrainingArguments(**shared).ddp_find_unused_parameters is False
