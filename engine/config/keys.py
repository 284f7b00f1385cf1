"""Dotted config keys (`train.sft.learning_rate`): the one way errors, run comparisons and MLflow params name a
setting. Read or set one on a config object, or flatten a nested dict (a frozen config) to them.

Light module (stdlib).
"""

from __future__ import annotations

from typing import Any


def get_key(config: Any, key: str) -> Any:
    """The value at `key` of a config object: `get_key(config, "data.output_path")`."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def set_key(config: Any, key: str, value: Any) -> None:
    """Set the value at `key` of a config object, in place."""
    *parents, last = key.split(".")
    target: Any = config
    for part in parents:
        target = getattr(target, part)
    setattr(target, last, value)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: value}. A list that holds dicts is indexed (`datasets[0].name`); any
    other value, a list of strings or numbers included, stays one value."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        out = {}
        for index, inner in enumerate(value):
            out.update(flatten(inner, f"{prefix}[{index}]"))
        return out
    return {prefix: value}
