"""Prompts as every stage sees them: stable prompt ids, and the system prompts of prompt.yaml.

Light module. The id of a prompt is a hash of its normalised text, so the same prompt has the same id in
every run, whichever stage (data, teacher download) produced it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def normalise(text: str) -> str:
    """Spacing and case do not make a different prompt."""
    return " ".join(text.split()).casefold()


def prompt_id(text: str) -> str:
    return "p" + hashlib.sha1(normalise(text).encode("utf-8")).hexdigest()[:12]


def load_system_prompts(path: str | os.PathLike[str]) -> dict[str, str]:
    """The TAS prompt.yaml: {"Teacher": {"system": ...}, "Assistant": {"system": ...}} → {"Teacher": "...", ...}."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"prompts.path: {path} not found (the system prompts file, like prompt.yaml)") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"prompts.path: {path} is not valid YAML: {exc}") from None
    prompts = {}
    for role, value in data.items() if isinstance(data, dict) else []:
        if isinstance(value, dict) and isinstance(value.get("system"), str):
            prompts[role] = value["system"].strip()
    return prompts
