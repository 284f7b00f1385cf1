"""One loader for every model name a config can hold: hub id, local folder, or `tiny:<name>`.

Heavy module (imports transformers lazily, but its callers are stages). Every stage loads models
through here, so the tiny profile and a real Qwen2.5 / stable-code run share the same code path.

A hub id is checked before anything is downloaded: when the hub cannot be reached (`HF_HUB_OFFLINE`, or
no connection within a second: engine.runner.hub) a model that is not in the local Hugging Face cache
fails at once with the config key to change, and a cached one loads from the cache without network retries.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from engine.core.secrets import clip
from engine.models.shipped import is_tiny
from engine.runner import hub
from engine.runner.context import StageError


class ModelNotFound(StageError):
    """A model that is neither a local folder, a tiny model, nor loadable from the hub or its cache."""


def resolve_model_path(name: str, key: str | None = None, check_hub: bool = False) -> str:
    """A local folder for tiny and local names; hub ids pass through unchanged (the hub cache resolves them),
    with `check_hub` once `check_hub_model` has found them loadable (the loaders below ask for it).

    `key` is the config key the name came from, so an error can say where to fix it.
    """
    where = f"{key}: " if key else ""
    if is_tiny(name):
        from engine.models import tiny

        try:
            return str(tiny.resolve(name))
        except ValueError as exc:
            raise ModelNotFound(f"{where}{exc}") from None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "tokenizer_config.json").exists():
            raise ModelNotFound(f"{where}{name}: folder exists but holds no Hugging Face model (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFound(f"{where}{name}: no such model folder")
    if check_hub:
        check_hub_model(name, key)
    return name


def is_hub_id(name: str) -> bool:
    """`name` would be looked up on the hub: not tiny:, not an existing path, not a path-looking name."""
    return not (
        is_tiny(name) or Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    )


def check_hub_model(name: str, key: str | None = None) -> None:
    """A hub id can be loaded: the hub answers, or the model is in the local cache (then this process works
    offline from now on, so loading it never waits for network retries). Otherwise ModelNotFound at once,
    naming `key`, the cache and what to do."""
    reason = hub.unreachable_reason()
    if reason is None:
        if not in_hub_cache(name):
            _check_on_hub(name, key)
        return
    if in_hub_cache(name):
        hub.work_offline()
        return
    setting = key or "the model name"
    raise ModelNotFound(
        f"{key + ': ' if key else ''}cannot load {name!r}: not in the local Hugging Face cache ({_cache_dir()}) "
        f"and the hub is unreachable ({reason}); download it where there is internet (hf download {name}) and "
        f"copy the cache folder here, or set {setting} to a local model folder or tiny:<name>."
    )


def _check_on_hub(name: str, key: str | None) -> None:
    """A hub that answers is asked whether `name` is there, so a mistyped id fails before a stage touches its
    outputs, not at loading. Only a clear "no such repository" fails: a hub error or a timeout proves nothing,
    and loading decides. A private or gated repository counts as there when the token can see it."""
    if _hub_lacks(name):
        raise ModelNotFound(
            f"{key + ': ' if key else ''}{name!r} is neither a local folder nor a model on the Hugging Face hub; "
            "check the spelling, or log in (hf auth login, or HF_TOKEN in .env) if it is "
            "a private or gated model."
        )


@functools.cache
def _hub_lacks(name: str) -> bool:
    """The hub's answer for `name`, asked once per process: a stage checks its model first, then its
    tokenizer and model loaders check the same name again."""
    from huggingface_hub import repo_exists

    try:
        return not repo_exists(name)
    except Exception:  # the hub's own trouble (5xx, timeout, rate limit): not a verdict on the name
        return False


def in_hub_cache(name: str) -> bool:
    """The local Hugging Face cache holds `name` (its config or tokenizer config at revision main)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(
            isinstance(try_to_load_from_cache(name, filename), str)
            for filename in ("config.json", "tokenizer_config.json")
        )
    except Exception:  # not a valid repo id, unreadable cache: not there
        return False


def _cache_dir() -> str:
    from huggingface_hub import constants

    path = Path(constants.HF_HUB_CACHE).expanduser()
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def _hub_error(name: str, key: str, exc: Exception) -> ModelNotFound:
    reason = clip(str(exc).strip().splitlines()[0], 300) if str(exc).strip() else type(exc).__name__
    return ModelNotFound(
        f"{key}: cannot load {name!r} ({reason}). If this machine is offline, copy the model folder here "
        f"and set {key} to its path, or use a tiny:<name> model."
    )


def load_tokenizer(name: str, key: str = "model", padding_side: str | None = None, trust_remote_code: bool = False):
    path = resolve_model_path(name, key, check_hub=True)  # before transformers is imported: a bad name fails at once
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if padding_side:
        kwargs["padding_side"] = padding_side
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, key, exc) from None
    if tokenizer.pad_token is None:  # many base models ship without one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, key: str = "model", **kwargs: Any):
    """`AutoModelForCausalLM.from_pretrained` with config-derived kwargs and clear offline errors."""
    path = resolve_model_path(name, key, check_hub=True)  # before transformers is imported: a bad name fails at once
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise _hub_error(name, key, exc) from None


TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
"""End-of-turn tokens of common chat templates (ChatML, Llama 3, Gemma, Phi-3)."""


def stop_token_ids(tokenizer, model=None, extra_tokens: list[str] | tuple[str, ...] = ()) -> list[int]:
    """Every token that ends a reply: the generation config's EOS (one or several), the tokenizer's EOS,
    the end-of-turn token the chat template writes after each turn, and `extra_tokens` (TAS's
    `additional_special_tokens`).

    A model's generation config often names only `<|endoftext|>` (stable-code-instruct-3b does) while its
    chat template ends each turn with `<|im_end|>`: a generation that stops at EOS alone runs past the end
    of its answer into a new turn.
    """
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += (
        list(configured) if isinstance(configured, (list, tuple)) else ([configured] if configured is not None else [])
    )
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    template = getattr(tokenizer, "chat_template", None) or ""
    template = template if isinstance(template, str) else " ".join(str(t) for t in template)
    wanted = [*extra_tokens, *(token for token in TURN_END_TOKENS if token in template)]
    ids += [vocab[token] for token in wanted if token in vocab]
    return sorted({int(i) for i in ids})


def max_positions(model) -> int:
    """The longest sequence `model` takes: its config's max_position_embeddings (4096 when it names none)."""
    return getattr(model.config, "max_position_embeddings", 4096)


def encode_prompts(tokenizer, texts: list[str], model, max_new_tokens: int, add_special_tokens: bool = False):
    """A batch of prompt texts as `model.generate`'s input, on the model's device: padded on the tokenizer's
    side (left, for generation), each cut to the room `max_new_tokens` leaves (on its truncation side)."""
    return tokenizer(
        texts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max(1, max_positions(model) - max_new_tokens),
        add_special_tokens=add_special_tokens,
    ).to(model.device)
