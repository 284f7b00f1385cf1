"""The student is built from the config's student section and the assistant's vocabulary and conventions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.core.config import load_config
from engine.models.loading import load_causal_lm, load_tokenizer
from engine.train.student import (
    build_student,
    check_vocab_compatibility,
    layer_subset,
    student_config,
    vocab_fingerprint,
)

from .helpers import TINY_CONFIG


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY_CONFIG).student


@pytest.fixture(scope="module")
def assistant():
    return load_causal_lm("tiny:assistant").eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny:assistant")


def same_sizes_as(cfg, assistant, **overrides):
    a = assistant.config
    sizes = dict(
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_attention_heads=a.num_attention_heads,
        num_hidden_layers=a.num_hidden_layers,
    )
    return cfg.model_copy(update={**sizes, **overrides})


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_config_from_tiny_profile(cfg, assistant):
    config = student_config(cfg, assistant.config, assistant.config.vocab_size)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads) == (
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
    )
    assert config.max_position_embeddings == cfg.max_position_embeddings
    a = assistant.config
    assert cfg.num_attention_heads % a.num_key_value_heads == 0  # so the student keeps the assistant's GQA
    assert config.num_key_value_heads == a.num_key_value_heads
    for key in ("vocab_size", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(config, key) == getattr(a, key), key
    assert config.rope_parameters == a.rope_parameters
    # a head count the assistant's KV heads do not divide: plain multi-head attention
    heads = a.num_key_value_heads + 1
    odd = cfg.model_copy(update={"hidden_size": 16 * heads, "num_attention_heads": heads})
    assert student_config(odd, a, a.vocab_size).num_key_value_heads == heads


def test_head_mismatch_names_the_keys(cfg, assistant):
    bad = cfg.model_copy(update={"hidden_size": 66, "num_attention_heads": 4})
    with pytest.raises(ValueError, match=r"student\.hidden_size.*student\.num_attention_heads"):
        student_config(bad, assistant.config, assistant.config.vocab_size)


def test_random_student_is_smaller_works_and_is_reproducible(cfg, assistant, tokenizer):
    student = build_student(cfg, assistant, tokenizer, init="random", seed=7)
    assert n_params(student) < n_params(assistant)
    assert student.config.vocab_size == assistant.config.vocab_size
    batch = tokenizer(["def add(a, b):\n    return a + b", "print('hi')"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = student(**batch)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], assistant.config.vocab_size)
    assert torch.isfinite(out.logits).all()

    rng_before = torch.random.get_rng_state()
    again = build_student(cfg, assistant, tokenizer, init="random", seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    other = build_student(cfg, assistant, tokenizer, init="random", seed=8)
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(student.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(student.state_dict()[w], other.state_dict()[w])


def test_save_reload_round_trip(cfg, assistant, tokenizer, tmp_path):
    student = build_student(cfg, assistant, tokenizer).eval()
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    assert reloaded.config.student_init == "random"
    ids = tokenizer("for i in range(3): print(i)", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(student(ids).logits, reloaded(ids).logits)
    assert reloaded.generation_config.pad_token_id == tokenizer.pad_token_id


def test_layer_subset_rule():
    assert layer_subset(3, 2) == [0, 2]
    assert layer_subset(3, 3) == [0, 1, 2]
    assert layer_subset(5, 1) == [0]
    assert layer_subset(28, 8) == [0, 4, 8, 12, 15, 19, 23, 27]
    for la in range(1, 30):
        for ls in range(1, la + 1):
            keep = layer_subset(la, ls)
            assert len(keep) == ls and keep == sorted(set(keep)) and keep[0] == 0
            assert ls == 1 or keep[-1] == la - 1
    with pytest.raises(ValueError, match="student.num_hidden_layers"):
        layer_subset(3, 4)


def test_assistant_layers_init_copies_the_right_layers(cfg, assistant, tokenizer):
    two = same_sizes_as(cfg, assistant, num_hidden_layers=2)
    student = build_student(two, assistant, tokenizer, init="assistant_layers")
    last = assistant.config.num_hidden_layers - 1
    assert student.config.student_init_layers == [0, last]
    a_state, s_state = assistant.state_dict(), student.state_dict()
    for mine, theirs in enumerate([0, last]):
        for name, value in student.model.layers[mine].state_dict().items():
            assert torch.equal(value, a_state[f"model.layers.{theirs}.{name}"]), (mine, name)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_state[name], a_state[name]), name

    # every layer kept: the student is the assistant
    full = build_student(same_sizes_as(cfg, assistant), assistant, tokenizer, init="assistant_layers").eval()
    ids = tokenizer("x = [1, 2, 3]", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, assistant(ids).logits)


def test_assistant_layers_init_refuses_other_widths(cfg, assistant, tokenizer):
    with pytest.raises(ValueError) as err:
        build_student(cfg, assistant, tokenizer, init="assistant_layers")  # the tiny student is narrower
    message = str(err.value)
    assert "student.hidden_size" in message and "student.intermediate_size" in message
    assert f"hidden_size={cfg.hidden_size}, assistant has {assistant.config.hidden_size}" in message
    deeper = same_sizes_as(cfg, assistant, num_hidden_layers=assistant.config.num_hidden_layers + 1)
    with pytest.raises(ValueError, match="student.num_hidden_layers"):
        build_student(deeper, assistant, tokenizer, init="assistant_layers")
    with pytest.raises(ValueError, match="init"):
        build_student(cfg, assistant, tokenizer, init="copy")


def test_vocab_compatibility(tokenizer, assistant):
    n = len(tokenizer)
    padded = assistant.config.vocab_size
    assert check_vocab_compatibility(tokenizer, tokenizer, padded, padded) == padded
    assert check_vocab_compatibility(tokenizer, tokenizer, n + 64, n + 128) == n + 64  # crop to the smaller
    with pytest.raises(ValueError, match="embeddings have only"):
        check_vocab_compatibility(tokenizer, tokenizer, n - 1, n + 64)

    other = load_tokenizer("tiny:assistant")
    other.add_tokens(["<|student_only|>"])
    assert vocab_fingerprint(other) != vocab_fingerprint(tokenizer)
    with pytest.raises(ValueError, match=r"student\.base_model_name.*assistant\.model\.name"):
        check_vocab_compatibility(tokenizer, other, padded, padded + 64)
