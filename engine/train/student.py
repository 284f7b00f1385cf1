"""Build the student: a pretrained smaller model, or a Qwen2 model that speaks the assistant's vocabulary.

Heavy module (torch, transformers; peft for the LoRA parts): import it only in worker processes and tests.

Three initialisations (`train.distillation.student_init`):

* "pretrained": load `student.base_model_name`'s weights (any causal LM whose tokenizer is the
  assistant's, e.g. Qwen2.5-Coder-0.5B-Instruct for the 1.5B assistant). What torchtune's KD recipes, TRL's
  GKD trainer and DistillKit do: distil into a smaller model that can already write code. `student.*`
  sizes are not used (the checkpoint has its own).
* "random": a fresh Qwen2 model with the sizes of the `student:` section (hidden_size, intermediate_size,
  num_hidden_layers, num_attention_heads, max_position_embeddings), from a fixed seed, so the same config
  gives the same student on every machine (the caller's global RNG is left untouched).
* "assistant_layers": start from the assistant itself, keeping a subset of its decoder layers (see
  `layer_subset`) plus its embeddings, final norm and lm head. The weights copied are what the KD teacher
  computes with: an SFT LoRA adapter still injected in the assistant is merged in, and 4-bit / 8-bit
  (bitsandbytes) weights are dequantized (`dense_state_dict`); the assistant itself is not changed. Only
  possible when the student's widths equal the assistant's; otherwise a ValueError names the `student.*`
  keys that differ (no silent fallback: a run that asked for a warm start must not quietly train from
  scratch).

For "random" and "assistant_layers", everything that must agree with the assistant for distillation to make
sense comes from the assistant: the vocabulary (embedding rows), the special token ids, RoPE parameters,
RMSNorm epsilon, activation and whether input and output embeddings are tied.

KD compares the two models' distributions token id by token id, so the student must use the assistant's
tokenizer; `check_vocab_compatibility` enforces that and returns how many logit columns KD compares: the
tokenizer's (`token_columns`), never the padding rows past it, whose count differs across checkpoints
(Qwen2.5: 151,936 rows up to 3B, 152,064 from 7B, for the same 151,665 tokens).

`with_lora` wraps the student in LoRA adapters (`train.distillation.peft`); the distill stage saves the
merged weights, so what it writes is a plain model folder either way.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import torch

from engine.config.schema import LoraConfig, StudentConfig

DEFAULT_SEED = 19
"""Seed of the random initialisation (TAS's seed)."""

Init = Literal["pretrained", "random", "assistant_layers"]
INITS = ("pretrained", "random", "assistant_layers")


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
        (
            "student.hidden_size / student.num_attention_heads",
            "head_dim",
            config.hidden_size // config.num_attention_heads,
            a_head_dim,
        ),
        ("(vocab)", "vocab_size", config.vocab_size, a.vocab_size),
    ]
    return [
        f"{key}: student has {name}={ours}, assistant has {theirs}"
        for key, name, ours, theirs in pairs
        if ours != theirs
    ]


def _is_bnb_quantized(weight) -> bool:
    """A bitsandbytes 4-bit (Params4bit) or 8-bit (Int8Params) weight, which `dense_state_dict` dequantizes."""
    return type(weight).__name__ in ("Params4bit", "Int8Params")


def _check_copyable(assistant_model, config) -> None:
    a = assistant_model.config
    if getattr(a, "model_type", None) != "qwen2":
        raise ValueError(
            f"train.distillation.student_init: assistant_layers copies Qwen2 decoder layers, but the assistant is "
            f"{a.model_type!r}; use student_init: pretrained or random"
        )
    odd = sorted(
        {
            type(p).__name__
            for p in assistant_model.parameters()
            if not p.is_floating_point() and not _is_bnb_quantized(p)
        }
    )
    if odd:
        raise ValueError(
            f"train.distillation.student_init: assistant_layers cannot read the assistant's weights ({', '.join(odd)}: "
            "only float and bitsandbytes 4/8-bit weights are dequantized); use student_init: pretrained or random"
        )
    problems = _layout_mismatches(config, a)
    if problems:
        raise ValueError(
            "train.distillation.student_init: assistant_layers needs the student's widths to equal the assistant's "
            f"({a.hidden_size} hidden, {a.intermediate_size} intermediate, {a.num_attention_heads} heads); "
            "they differ:\n  " + "\n  ".join(problems) + "\nSet those student.* keys to the assistant's values, or "
            "use student_init: pretrained (a smaller checkpoint) or random (any size)."
        )
    layer_subset(a.num_hidden_layers, config.num_hidden_layers)  # raises when the student is deeper


def _dense_weight(layer) -> torch.Tensor:
    """A linear / embedding layer's weight in float32, dequantized when bitsandbytes quantized it."""
    weight = layer.weight
    if _is_bnb_quantized(weight):
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(weight, state=getattr(layer, "state", None)).float()
    return weight.detach().float().clone()


def _merged_lora(layer) -> dict[str, torch.Tensor]:
    """weight (and bias) of a peft LoRA layer with its active, not yet merged adapters added in, in float32."""
    base = layer.get_base_layer()
    weight = _dense_weight(base)
    bias = base.bias.detach().float().clone() if getattr(base, "bias", None) is not None else None
    if not layer.disable_adapters:
        for name in layer.active_adapters:
            known = name in layer.lora_A or name in getattr(layer, "lora_embedding_A", {})
            if not known or name in layer.merged_adapters:
                continue
            if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name):
                raise ValueError(
                    f"train.distillation.student_init: assistant_layers merges plain LoRA adapters only; adapter {name!r} "
                    "is a variant (DoRA, ...): merge it into the assistant first or use student_init: pretrained"
                )
            delta = layer.get_delta_weight(name).float().to(weight.device)
            if delta.shape != weight.shape:
                raise ValueError(
                    f"LoRA adapter {name!r}: delta {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}"
                )
            weight += delta
            if getattr(layer, "lora_bias", {}).get(name) and bias is not None:
                bias += (layer.lora_B[name].bias * layer.scaling[name]).float().to(bias.device)
    out = {"weight": weight}
    if bias is not None:
        out["bias"] = bias
    return out


@torch.no_grad()
def dense_state_dict(module) -> dict[str, torch.Tensor]:
    """The float32 weights `module` computes with, named as in the plain (unquantized, adapter-free) model.

    Handles what `load_tuned_assistant` hands over: peft LoRA layers still injected (their active adapters
    are added to the base weight, as merge_and_unload would), peft modules_to_save copies (the active copy
    is taken), and bitsandbytes 4-bit / 8-bit linear layers (dequantized). `module` is not changed. Returns
    parameters only (no buffers), on the module's device.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    out: dict[str, torch.Tensor] = {}

    def visit(m, prefix: str) -> None:
        if isinstance(m, ModulesToSaveWrapper):
            active = m.active_adapters
            chosen = m.modules_to_save[active[0]] if active and active[0] in m.modules_to_save else m.original_module
            visit(chosen, prefix)
            return
        if isinstance(m, LoraLayer):
            out.update({prefix + k: v for k, v in _merged_lora(m).items()})
            return
        if _is_bnb_quantized(getattr(m, "weight", None)):
            out[prefix + "weight"] = _dense_weight(m)
            if getattr(m, "bias", None) is not None:
                out[prefix + "bias"] = m.bias.detach().float().clone()
            return
        for name, param in m.named_parameters(recurse=False):
            out[prefix + name] = param.detach().float().clone()
        for name, child in m.named_children():
            visit(child, f"{prefix}{name}.")

    visit(module, "")
    return out


@torch.no_grad()
def _copy_from_assistant(student, assistant_model) -> list[int]:
    """Embeddings, final norm, lm head and the `layer_subset` decoder layers, merged, dequantized and cast."""
    keep = layer_subset(assistant_model.config.num_hidden_layers, student.config.num_hidden_layers)
    student.get_input_embeddings().load_state_dict(dense_state_dict(assistant_model.get_input_embeddings()))
    if not student.config.tie_word_embeddings:
        student.get_output_embeddings().load_state_dict(dense_state_dict(assistant_model.get_output_embeddings()))
    student.model.norm.load_state_dict(dense_state_dict(assistant_model.model.norm))
    for mine, theirs in zip(student.model.layers, keep):  # one layer at a time: a few MB, never the whole model
        mine.load_state_dict(dense_state_dict(assistant_model.model.layers[theirs]))
    return keep


def load_pretrained_student(student_cfg: StudentConfig, tokenizer, dtype: torch.dtype = torch.float32):
    """`student.base_model_name`'s own weights, in `dtype`; ValueError when its embeddings miss tokens.

    Whether the checkpoint's tokenizer is the assistant's is `check_vocab_compatibility`'s job (the distill
    stage calls it with the student's tokenizer); here the embedding rows must cover `tokenizer`.
    """
    from engine.models.loading import load_causal_lm

    name = student_cfg.base_model_name
    model = load_causal_lm(name, key="student.base_model_name", dtype=dtype)
    rows = embedding_rows(model)
    if rows < token_columns(tokenizer):
        raise ValueError(
            f"student.base_model_name ({name}) has {rows} embedding rows but the assistant's tokenizer uses "
            f"{token_columns(tokenizer)} token ids: it is not a model of the assistant's family"
        )
    model.config.student_init = "pretrained"
    model.config.student_base_model = name
    gen = model.generation_config
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    return model


def build_student(
    student_cfg: StudentConfig,
    assistant_model,
    tokenizer,
    init: Init = "random",
    seed: int = DEFAULT_SEED,
    dtype: torch.dtype = torch.float32,
):
    """The student for `assistant_model`, which uses `tokenizer`, with weights in `dtype`.

    float32 by default: train in mixed precision, keep master weights in full precision. `init`:

    * "pretrained": `load_pretrained_student` (student.base_model_name's weights, its own sizes);
    * "random": a new `Qwen2ForCausalLM` with `student.*` sizes and as many embedding rows as the
      assistant (`assistant_model.config.vocab_size`, which must cover the tokenizer), seeded;
    * "assistant_layers": the same shape, initialised from the assistant (see `layer_subset`; LoRA merged,
      4-bit dequantized; ValueError naming the keys when the widths differ).

    Sets `model.config.student_init` and, for a warm start, `model.config.student_init_layers`.
    """
    if init not in INITS:
        raise ValueError(f"train.distillation.student_init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "pretrained":
        return load_pretrained_student(student_cfg, tokenizer, dtype)

    from transformers import GenerationConfig, Qwen2ForCausalLM

    a_config = assistant_model.config
    vocab_size = a_config.vocab_size
    if token_columns(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer uses {token_columns(tokenizer)} token ids but the assistant (assistant.model.name) has "
            f"only {vocab_size} embedding rows"
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
        pad_token_id=getattr(a_gen, "pad_token_id", None)
        if getattr(a_gen, "pad_token_id", None) is not None
        else config.pad_token_id,
        bos_token_id=config.bos_token_id,
    )
    return model


# --------------------------------------------------------------------------------------------- LoRA


def with_lora(model, lora: LoraConfig, key: str = "train.distillation.peft.lora"):
    """`model` wrapped in trainable LoRA adapters (peft), everything else frozen; ValueError names `key`.

    `modules_to_save` names are checked against the model; TAS's "embed_token" becomes Qwen's
    "embed_tokens" (peft would silently skip a name that matches nothing).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    modules_to_save = lora.modules_to_save
    if modules_to_save:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        fixed = [m + "s" if m not in names and m + "s" in names else m for m in modules_to_save]
        unknown = [m for m in fixed if m not in names]
        if unknown:
            raise ValueError(f"{key}.modules_to_save: the student has no module named {unknown}")
        modules_to_save = fixed
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        modules_to_save=modules_to_save,
        bias=getattr(lora, "bias", "none"),
        task_type=lora.task_type,
        ensure_weight_tying=_touches_tied_embeddings(model, modules_to_save, lora.target_modules),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _touches_tied_embeddings(model, modules_to_save: list[str] | None, target_modules: str | list[str]) -> bool:
    """Tied input/output embeddings (Qwen2.5-0.5B, the tiny models) that the adapter trains a copy of or
    targets: peft must then keep the two tied, or the lm head would go on using the untrained matrix."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    embeddings = {model.get_input_embeddings(), model.get_output_embeddings()}
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module in embeddings}
    listed = set(modules_to_save or []) | (set(target_modules) if isinstance(target_modules, list) else set())
    return bool(names & listed)


def merged_student(model):
    """A plain model to save: LoRA adapters merged in (a `with_lora` model), or `model` itself."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def trained_student(trainer, dtype: torch.dtype):
    """The student a Trainer trained, as a plain model in `dtype` to save; None on every rank but rank 0.

    Under FSDP (`train.distillation.fsdp`) each rank holds a shard of every weight: the full weights are
    gathered onto rank 0 (a collective, so every rank must call this), which puts them into a copy of the
    architecture built on the meta device (nothing allocated, nothing initialised twice), so the saved
    folder and its config say `dtype` like an unsharded run's. Without FSDP: `merged_student`.
    """
    model = trainer.model
    gathered = trainer.accelerator.get_state_dict(model) if trainer.is_fsdp_enabled else None
    if not trainer.accelerator.is_main_process:
        return None
    if gathered is None:
        return merged_student(model).to(dtype)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    plain.load_state_dict({name: weight.to(dtype) for name, weight in gathered.items()}, assign=True)
    plain.tie_weights()  # tied embeddings (Qwen2.5-0.5B, the tiny models) share one tensor again
    plain.generation_config = model.generation_config
    return plain


# ----------------------------------------------------------------------------------------- vocabulary


def embedding_rows(model) -> int:
    """Rows of the model's output head (its logit columns), padding included."""
    head = model.get_output_embeddings()
    weight = head.weight if head is not None else model.get_input_embeddings().weight
    return int(weight.shape[0])


def token_columns(tokenizer) -> int:
    """The logit columns real tokens use: the highest token id + 1 (added tokens included).

    Embedding rows past it are padding (Qwen2.5 pads to 151,936 or 152,064 rows for 151,665 tokens):
    no text ever maps there, and their number differs across checkpoints of one family.
    """
    return max(max(tokenizer.get_vocab().values(), default=-1) + 1, len(tokenizer))


def vocab_fingerprint(tokenizer) -> str:
    """A short hash of token -> id (added tokens included): equal fingerprints, same ids for same text."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()[:12]


def check_same_tokenizer(assistant_tokenizer, student_tokenizer) -> None:
    """ValueError unless the tokenizers of assistant.model.name and student.base_model_name map the same
    strings to the same ids (otherwise the KL would compare unrelated tokens column by column)."""
    a_vocab, s_vocab = assistant_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if a_vocab != s_vocab:
        only_a = sorted(set(a_vocab.items()) - set(s_vocab.items()), key=lambda kv: kv[1])[:3]
        only_s = sorted(set(s_vocab.items()) - set(a_vocab.items()), key=lambda kv: kv[1])[:3]
        raise ValueError(
            "student.base_model_name and assistant.model.name use different tokenizers "
            f"({len(s_vocab)} tokens, fingerprint {vocab_fingerprint(student_tokenizer)} vs "
            f"{len(a_vocab)} tokens, fingerprint {vocab_fingerprint(assistant_tokenizer)}; "
            f"e.g. assistant has {only_a}, student has {only_s}). Distillation compares token ids, so "
            "student.base_model_name must be a model of the assistant's family (same tokenizer)."
        )


SPECIAL_ROLES = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def template_special_tokens(tokenizer) -> set[str]:
    """The special and added tokens the tokenizer's chat template writes (`<|im_start|>`, `<|im_end|>`, ...)."""
    template = str(tokenizer.chat_template or "")  # a str, or a dict of named templates
    tokens = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return {token for token in tokens if token and token in template}


def special_token_differences(assistant_tokenizer, student_tokenizer) -> list[str]:
    """What the two tokenizers' special tokens disagree on, one line each: the bos/eos/pad/unk ids, and the
    special tokens of their chat templates. Empty when they agree.

    `check_same_tokenizer` has already made every token's id the same; these are the *roles*. Training
    reads only the assistant's tokenizer (the data, the padding, the saved student's tokenizer), so a
    difference does not corrupt the KD loss; but a `pretrained` student keeps its checkpoint's
    generation config, whose end-of-answer id may then not be the one the assistant's answers end with.
    The distill stage logs these as warnings.
    """
    differences = []
    for role in SPECIAL_ROLES:
        mine, theirs = getattr(assistant_tokenizer, role, None), getattr(student_tokenizer, role, None)
        if mine != theirs:
            name = role.removesuffix("_id")
            differences.append(
                f"{name}: assistant.model.name {mine} ({getattr(assistant_tokenizer, name, None)!r}), "
                f"student.base_model_name {theirs} ({getattr(student_tokenizer, name, None)!r})"
            )
    mine, theirs = template_special_tokens(assistant_tokenizer), template_special_tokens(student_tokenizer)
    if mine != theirs:
        differences.append(
            f"chat-template special tokens: assistant.model.name {sorted(mine)}, "
            f"student.base_model_name {sorted(theirs)}"
        )
    return differences


def check_vocab_compatibility(
    assistant_tokenizer, student_tokenizer, assistant_vocab_size: int, student_vocab_size: int
) -> int:
    """The number of logit columns KD compares: the tokenizer's `token_columns`, checked against both models.

    `assistant_vocab_size` and `student_vocab_size` are each model's own embedding rows (`embedding_rows`),
    which may differ in padding only (rows past the tokenizer that no token uses); both must cover every
    token id. The tokenizers must be the same (`check_same_tokenizer`). The KD loss then reads the first
    `token_columns` columns of each model, so neither model's padding columns enter the comparison.
    """
    check_same_tokenizer(assistant_tokenizer, student_tokenizer)
    needed = token_columns(assistant_tokenizer)
    short = [
        f"{key}: {rows}"
        for key, rows in (
            ("assistant.model.name", assistant_vocab_size),
            ("student.base_model_name", student_vocab_size),
        )
        if rows < needed
    ]
    if short:
        raise ValueError(
            f"the tokenizer uses {needed} token ids but the embeddings have only {' / '.join(short)} rows "
            f"(assistant.model.name: {assistant_vocab_size}, student.base_model_name: {student_vocab_size})"
        )
    return needed
