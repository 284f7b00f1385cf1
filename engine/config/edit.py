"""Editing a config file the way the panel does: schema help for a key, one scalar replaced in place
(comments and layout kept), and a save that refuses invalid text.

Light module (PyYAML + the schema).
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from engine.config.errors import dotted_key
from engine.config.load import parse_config
from engine.config.schema import TASConfig
from engine.core.fsio import atomic_write


def save_config_text(path: str | os.PathLike[str], text: str) -> TASConfig:
    """Validate `text`, then replace the file atomically, keeping the old one as `<name>.bak`.

    An invalid text raises ConfigError before anything on disk is touched, so an invalid edit can never
    be saved over a valid file.
    """
    config = parse_config(text, source=str(path))
    atomic_write(Path(path), text.encode("utf-8"), backup=True)
    return config


@dataclass(frozen=True)
class FieldHelp:
    """What the schema says about one key: shown as help beside the value being edited."""

    path: str
    description: str
    type: str
    default: str


def field_help(path: tuple[str | int, ...]) -> FieldHelp | None:
    """Schema help for a key path like ("train", "sft", "learning_rate"); list indices are skipped."""
    model: Any = TASConfig
    info = None
    for part in path:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            # the old alias of eval_strategy
            if fields and part == "evaluation_strategy" and "eval_strategy" in fields:
                part = "eval_strategy"
            else:
                return None
        info = fields[part]
        model = _inner_model(info.annotation)
    if info is None:
        return None
    default = "" if info.is_required() else repr(info.get_default(call_default_factory=True))
    kind = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
    return FieldHelp(dotted_key(path), info.description or "", kind, default if len(default) < 80 else "")


def _inner_model(annotation: Any) -> Any:
    """The pydantic model inside list[Model] / Model | None, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def set_yaml_value(text: str, path: tuple[str | int, ...], value: Any) -> str:
    """`text` with the scalar at `path` replaced by `value`, everything else (comments, order) untouched.

    Raises KeyError when the key is not in the text (edit it in the raw YAML view instead).
    """
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    node = root
    for part in path:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is None:
            raise KeyError(f"{dotted_key(path)} is not in the file")
        node = child
    rendered = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1000).strip()
    rendered = rendered.removesuffix("\n...").removesuffix("...").strip()
    if isinstance(node, (yaml.MappingNode,)) or (isinstance(node, yaml.SequenceNode) and not node.flow_style):
        raise KeyError(f"{dotted_key(path)} is a section; edit its keys")
    start, end = node.start_mark.index, node.end_mark.index
    return text[:start] + rendered + text[end:]
