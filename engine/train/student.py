"""Build the student: a small Qwen2 model that speaks the assistant's vocabulary.

Heavy module (torch, transformers): import it only in worker processes and tests.

The student's *sizes* come from the `student:` section of the config (hidden_size, intermediate_size,
num_hidden_layers, num_attention_heads, max_position_embeddings). Everything that must agree with the
assistant for distillation to make sense comes from the assistant: the vocabulary (embedding rows), the
special token ids, RoPE parameters, RMSNorm epsilon, activation and whether input and output embeddings
are tied. KD compares the two models' distributions token id by token id, so the student must use the
assistant's tokenizer; `check_vocab_compatibility` enforces that and says how many columns they share.

Two initialisations:

* "random": a fresh model from a fixed seed, so the same config gives the same student on every machine
  (the caller's global RNG is left untouched).
* "assistant_layers": start from the assistant itself, keeping a subset of its decoder layers (see
  `layer_subset`) plus its embeddings, final norm and lm head. Only possible when the student's widths
  equal the assistant's; otherwise a ValueError lists which sizes differ (no silent fallback: a run that
  asked for a warm start must not quietly train from scratch).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import torch

from engine.core.config import StudentConfig

DEFAULT_SEED = 19
"""Seed of the random initialisation (TAS's seed)."""

Init = Literal["random", "assistant_layers"]


# --------------------------------------------------------------------------------------------- config


def _kv_heads(num_attention_heads: int, assistant_kv_heads: int | None) -> int:
    """Grouped-query attention like the assistant's when its KV-head count divides ours, else full MHA."""
    if assistant_kv_heads and num_attention_heads % assistant_kv_heads == 0:
        return assistant_kv_heads
    return num_attention_heads


def _rope_parameters(assistant_config: Any) -> dict[str, Any]:
    """The assistant's RoPE settings (transformers 5 `rope_parameters`, or the older `rope_theta`)."""
    params = getattr(assistant_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return dict(params)
    scaling = getattr(assistant_config, "rope_scaling", None)
    params = dict(scaling) if isinstance(scaling, dict) else {"rope_type": "default"}
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = float(getattr(assistant_config, "rope_theta", 10000.0))
    return params


def student_config(student_cfg: StudentConfig, assistant_model_config: Any, vocab_size: int):
    """A `Qwen2Config` with the student's sizes and the assistant's vocabulary and conventions.

    vocab_size: embedding rows of the student, normally the assistant's `config.vocab_size` (its padded
    vocab), so a student logit column means the same token as an assistant column.
    num_key_value_heads: the assistant's if it divides student.num_attention_heads, else
    num_attention_heads (plain multi-head attention).
    """
    from transformers import Qwen2Config

    hidden, heads = student_cfg.hidden_size, student_cfg.num_attention_heads
    if hidden % heads:
        raise ValueError(
            f"student.hidden_size ({hidden}) must be a multiple of student.num_attention_heads ({heads}): "
            "each head gets hidden_size / num_attention_heads dimensions"
        )
    if (hidden // heads) % 2:
        raise ValueError(
            f"student.hidden_size / student.num_attention_heads = {hidden // heads} must be even "
            "(rotary embeddings rotate pairs of dimensions)"
        )
    a = assistant_model_config
    eps = getattr(a, "rms_norm_eps", None) or getattr(a, "layer_norm_eps", None) or 1e-6
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=student_cfg.intermediate_size,
        num_hidden_layers=student_cfg.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=_kv_heads(heads, getattr(a, "num_key_value_heads", None)),
        max_position_embeddings=student_cfg.max_position_embeddings,
        hidden_act=getattr(a, "hidden_act", "silu"),
        initializer_range=getattr(a, "initializer_range", 0.02),
        rms_norm_eps=eps,
        rope_parameters=_rope_parameters(a),
        tie_word_embeddings=bool(getattr(a, "tie_word_embeddings", False)),
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=getattr(a, "bos_token_id", None),
        eos_token_id=getattr(a, "eos_token_id", None),
        pad_token_id=getattr(a, "pad_token_id", None),
    )


# ------------------------------------------------------------------------------------------- building


def layer_subset(assistant_layers: int, student_layers: int) -> list[int]:
    """Which assistant layers a student of `student_layers` layers keeps: evenly spaced, ends included.

    Student layer i takes assistant layer round(i * (L_a - 1) / (L_s - 1)), rounding halves up, for
    i = 0 .. L_s - 1: the first (0) and last (L_a - 1) layers are always kept, the rest spread evenly
    between them. With L_s == 1 only layer 0 is kept. E.g. L_a = 28, L_s = 8 gives
    [0, 4, 8, 12, 15, 19, 23, 27]; L_s == L_a keeps every layer.
    """
    if not 0 < student_layers <= assistant_layers:
        raise ValueError(
            f"student.num_hidden_layers ({student_layers}) must be between 1 and the assistant's "
            f"{assistant_layers} layers to initialise from assistant layers"
        )
    if student_layers == 1:
        return [0]
    span, steps = assistant_layers - 1, student_layers - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(student_layers)]  # round half up, in ints


def _layout_mismatches(config, assistant_config) -> list[str]:
    """The sizes that would have to be equal to copy assistant weights into this student, where they differ."""
    a = assistant_config
    a_head_dim = getattr(a, "head_dim", None) or a.hidden_size // a.num_attention_heads
    pairs = [
        ("student.hidden_size", "hidden_size", config.hidden_size, a.hidden_size),
        ("student.intermediate_size", "intermediate_size", config.intermediate_size, a.intermediate_size),
        ("student.num_attention_heads", "num_attention_heads", config.num_attention_heads, a.num_attention_heads),
        (
            "student.num_attention_heads",
            "num_key_value_heads",
            config.num_key_value_heads,
            getattr(a, "num_key_value_heads", a.num_attention_heads),
        ),
        ("student.hidden_size / student.num_attention_heads", "head_dim",
         config.hidden_size // config.num_attention_heads, a_head_dim),
        ("(vocab)", "vocab_size", config.vocab_size, a.vocab_size),
    ]
    return [
        f"{key}: student has {name}={ours}, assistant has {theirs}" for key, name, ours, theirs in pairs if ours != theirs
    ]


def _check_copyable(assistant_model, config) -> None:
    a = assistant_model.config
    if getattr(assistant_model, "peft_config", None):
        raise ValueError(
            "init='assistant_layers' needs a plain assistant model, got one with a LoRA adapter: merge it first "
            "(merge_and_unload) so the copied layers include the fine-tuning"
        )
    if getattr(a, "model_type", None) != "qwen2":
        raise ValueError(
            f"init='assistant_layers' copies Qwen2 decoder layers, but the assistant is {a.model_type!r}; "
            "use init='random'"
        )
    if any(not p.is_floating_point() for p in assistant_model.parameters()):
        raise ValueError(
            "init='assistant_layers' needs unquantized assistant weights (this one is loaded in 4/8-bit); "
            "load it in float32/bfloat16"
        )
    problems = _layout_mismatches(config, a)
    if problems:
        raise ValueError(
            "init='assistant_layers' needs the student's widths to equal the assistant's; they differ:\n  "
            + "\n  ".join(problems)
        )
    layer_subset(a.num_hidden_layers, config.num_hidden_layers)  # raises when the student is deeper


@torch.no_grad()
def _copy_from_assistant(student, assistant_model) -> list[int]:
    """Embeddings, final norm, lm head and the `layer_subset` decoder layers, copied (and cast) in place."""
    keep = layer_subset(assistant_model.config.num_hidden_layers, student.config.num_hidden_layers)
    student.get_input_embeddings().weight.copy_(assistant_model.get_input_embeddings().weight)
    if not student.config.tie_word_embeddings:
        student.get_output_embeddings().weight.copy_(assistant_model.get_output_embeddings().weight)
    student.model.norm.load_state_dict(assistant_model.model.norm.state_dict())
    for mine, theirs in zip(student.model.layers, keep):
        mine.load_state_dict(assistant_model.model.layers[theirs].state_dict())
    return keep


def build_student(
    student_cfg: StudentConfig,
    assistant_model,
    tokenizer,
    init: Init = "random",
    seed: int = DEFAULT_SEED,
    dtype: torch.dtype = torch.float32,
):
    """A new `Qwen2ForCausalLM` student for `assistant_model`, which uses `tokenizer`.

    The student has as many embedding rows as the assistant (`assistant_model.config.vocab_size`), which
    must cover the tokenizer. Weights are built in `dtype` (float32 by default: train in mixed precision,
    keep master weights in full precision). `init` is "random" (seeded, reproducible) or
    "assistant_layers" (see `layer_subset`; ValueError when the widths differ). Sets
    `model.config.student_init` and, for a warm start, `model.config.student_init_layers`.
    """
    from transformers import GenerationConfig, Qwen2ForCausalLM

    if init not in ("random", "assistant_layers"):
        raise ValueError(f"init must be 'random' or 'assistant_layers', got {init!r}")
    a_config = assistant_model.config
    vocab_size = a_config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the assistant (assistant.model.name) has only "
            f"{vocab_size} embedding rows"
        )
    config = student_config(student_cfg, a_config, vocab_size)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    if init == "assistant_layers":
        _check_copyable(assistant_model, config)

    with torch.random.fork_rng(devices=[]):  # the same student for the same seed, caller's RNG untouched
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(dtype)
    config.student_init = init
    if init == "assistant_layers":
        config.student_init_layers = _copy_from_assistant(model, assistant_model)

    a_gen = getattr(assistant_model, "generation_config", None)
    model.generation_config = GenerationConfig(
        eos_token_id=getattr(a_gen, "eos_token_id", None) or config.eos_token_id,
        pad_token_id=getattr(a_gen, "pad_token_id", None) if getattr(a_gen, "pad_token_id", None) is not None
        else config.pad_token_id,
        bos_token_id=config.bos_token_id,
    )
    return model


# ----------------------------------------------------------------------------------------- vocabulary


def vocab_fingerprint(tokenizer) -> str:
    """A short hash of token -> id (added tokens included): equal fingerprints, same ids for same text."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()[:12]


def check_vocab_compatibility(
    assistant_tokenizer, student_tokenizer, assistant_vocab_size: int, student_vocab_size: int
) -> int:
    """The number of logit columns KD compares: min of the two embedding sizes, checked against the tokenizer.

    The tokenizers (of assistant.model.name and student.base_model_name) must map the same strings to the
    same ids, or the KL would compare unrelated tokens column by column: ValueError otherwise. The two
    embedding sizes may differ in padding only (rows past len(tokenizer) that no token uses), so the shared
    size is their minimum; it must still cover every token of the tokenizer.
    """
    a_vocab, s_vocab = assistant_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if a_vocab != s_vocab:
        only_a = sorted(set(a_vocab.items()) - set(s_vocab.items()), key=lambda kv: kv[1])[:3]
        only_s = sorted(set(s_vocab.items()) - set(a_vocab.items()), key=lambda kv: kv[1])[:3]
        raise ValueError(
            "student.base_model_name and assistant.model.name use different tokenizers "
            f"({len(s_vocab)} tokens, fingerprint {vocab_fingerprint(student_tokenizer)} vs "
            f"{len(a_vocab)} tokens, fingerprint {vocab_fingerprint(assistant_tokenizer)}; "
            f"e.g. assistant has {only_a}, student has {only_s}). Distillation compares token ids, so "
            "student.base_model_name must name the assistant's model family (usually the same model)."
        )
    shared = min(assistant_vocab_size, student_vocab_size)
    needed = len(assistant_tokenizer)
    if shared < needed:
        raise ValueError(
            f"the tokenizer has {needed} tokens but the embeddings have only {shared} rows "
            f"(assistant.model.name: {assistant_vocab_size}, student.base_model_name: {student_vocab_size})"
        )
    return shared
