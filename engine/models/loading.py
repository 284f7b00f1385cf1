"""One loader for every model name a config can hold: hub id, local folder, or `tiny:<name>`.

Heavy module (imports transformers lazily, but its callers are stages). Every stage loads models
through here, so the tiny profile and a real Qwen2.5 / stable-code run share the same code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.core.secrets import clip
from engine.models.shipped import is_tiny
from engine.runner.context import StageError


class ModelNotFound(StageError):
    """A model that is neither a local folder, a tiny model, nor loadable from the hub or its cache."""


def resolve_model_path(name: str, key: str | None = None) -> str:
    """A local folder for tiny and local names; hub ids pass through unchanged (the hub cache resolves them).

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
    return name


def _hub_error(name: str, key: str, exc: Exception) -> ModelNotFound:
    reason = clip(str(exc).strip().splitlines()[0], 300) if str(exc).strip() else type(exc).__name__
    return ModelNotFound(
        f"{key}: cannot load {name!r} ({reason}). If this machine is offline, copy the model folder here "
        f"and put its path in {key}, or use a tiny:<name> model."
    )


def load_tokenizer(name: str, key: str = "model", padding_side: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name, key)
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
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name, key)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise _hub_error(name, key, exc) from None
