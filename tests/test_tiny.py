"""The offline tiny profile's tokenizer and models survive save/reload bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.models import tiny
from engine.models.loading import ModelNotFound, load_tokenizer, resolve_model_path

SAMPLES = [
    "Write a function that returns the n-th Fibonacci number.",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tclass A:\n        pass",
    "Café, naïve, Straße → 北京 こんにちは “quotes”",
    "Ａｂｃ ﬁ Å",  # NFC changes some of these: training and reload must agree
    "<|im_start|>user\nhi<|im_end|>\n",
    "   leading spaces and trailing   \n\n\n",
]


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    return tiny.resolve("tiny:tokenizer")


def test_tokenizer_ids_identical_after_reload(tokenizer_dir: Path, tmp_path: Path):
    fresh = tiny.build_tokenizer()
    reloaded = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert type(reloaded).__name__ == "Qwen2Tokenizer"
    for text in SAMPLES:
        assert reloaded(text)["input_ids"] == fresh(text)["input_ids"], text
    # and once more through a second save/reload cycle
    reloaded.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert again(text)["input_ids"] == fresh(text)["input_ids"], text


def test_tokenizer_settings_survive_reload(tokenizer_dir: Path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.padding_side == "left"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert len(tok) == tiny.TOKENIZER_VOCAB
    for token in tiny.SPECIAL_TOKENS:
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token
    # byte level: any text round-trips, nothing is unknown
    for text in SAMPLES[:3]:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_chat_template_marks_assistant_tokens(tokenizer_dir: Path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [
        {"role": "system", "content": "You are a senior Python developer."},
        {"role": "user", "content": "Reverse a list."},
        {"role": "assistant", "content": "Use items[::-1]."},
    ]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    marked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert marked == "Use items[::-1].<|im_end|>"
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("name", sorted(tiny.TINY_SPECS))
def test_models_logits_identical_after_reload(name: str, tmp_path: Path):
    path = tiny.resolve(f"tiny:{name}")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size >= len(tok)
    batch = tok(SAMPLES[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = reloaded(**batch).logits
    assert torch.equal(logits, again)


def test_models_are_deterministic_and_sized_in_order():
    tok = AutoTokenizer.from_pretrained(tiny.resolve("tiny:tokenizer"))
    a, b = tiny.build_model("student", tok), tiny.build_model("student", tok)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name
    sizes = {k: sum(p.numel() for p in tiny.build_model(k, tok).parameters()) for k in tiny.TINY_SPECS}
    assert sizes["teacher"] > sizes["assistant"] > sizes["student"]


def test_cached_build_is_reused():
    first = tiny.resolve("tiny:assistant")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny.resolve("tiny:assistant") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_model_names_resolve(tmp_path: Path):
    assert resolve_model_path("tiny:student") == str(tiny.resolve("tiny:student"))
    assert resolve_model_path(str(tiny.resolve("tiny:student"))) == str(tiny.resolve("tiny:student"))
    assert resolve_model_path("Qwen/Qwen2.5-Coder-1.5B-Instruct") == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    with pytest.raises(ModelNotFound, match="no such model folder"):
        resolve_model_path("./models/missing")
    with pytest.raises(ModelNotFound, match="holds no Hugging Face model"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelNotFound, match="unknown tiny model"):
        resolve_model_path("tiny:giant")


def test_hub_model_offline_gives_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    # the env var is read at import time; patch the constant so no network retries are waited for
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFound, match=r"assistant\.model\.name: cannot load 'someone/not-cached-model'.*offline"):
        load_tokenizer("someone/not-cached-model", key="assistant.model.name")
