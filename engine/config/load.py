"""Loading a config: YAML text or file into a validated TASConfig, every failure a ConfigError naming key and line.

Light (stdlib, PyYAML, pydantic). The order: size and encoding, YAML syntax, duplicate keys, `${}`
references (`engine.config.references`), then the schema (`engine.config.schema`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from engine.config.errors import ConfigError, ConfigIssue, dotted_key, line_of
from engine.config.references import resolve_references
from engine.config.schema import TASConfig

MAX_CONFIG_BYTES = 1024 * 1024
"""A TAS config is a few KB; anything past this is the wrong file, not a config."""


def load_config(path: str | os.PathLike[str]) -> TASConfig:
    """Read and validate a config file; every failure is a ConfigError naming key and line."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigError(str(path), [ConfigIssue("", "file not found")]) from None
    except OSError as exc:
        raise ConfigError(str(path), [ConfigIssue("", f"cannot read: {exc.strerror}")]) from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            str(path),
            [
                ConfigIssue(
                    "", f"file is {size:,} bytes; a config is a few KB (limit {MAX_CONFIG_BYTES:,}): wrong file?"
                )
            ],
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [ConfigIssue("", f"cannot read: {exc.strerror}")]) from None
    return parse_config(raw, source=str(path))


def parse_config(text: str | bytes, source: str = "<config>") -> TASConfig:
    """Validate YAML text (e.g. the panel's editor buffer) into a TASConfig."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = text[: exc.start].count(b"\n") + 1
            raise ConfigError(
                source, [ConfigIssue("", f"not UTF-8 text (byte 0x{text[exc.start]:02x}); save it as UTF-8", line)]
            ) from None
    if len(text.encode("utf-8", "replace")) > MAX_CONFIG_BYTES:
        raise ConfigError(source, [ConfigIssue("", "text is larger than 1 MiB; a config is a few KB")])
    text = text.removeprefix("\ufeff")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise ConfigError(
            source, [ConfigIssue("", f"character {exc.character!r} is not allowed in YAML; remove it", line)]
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        message = f"YAML syntax error: {problem}" + (f" ({context})" if context else "")
        raise ConfigError(source, [ConfigIssue("", message, mark.line + 1 if mark else None)]) from None
    if data is None:
        raise ConfigError(source, [ConfigIssue("", "the file is empty; start from config.yaml or configs/tiny.yaml")])
    if not isinstance(data, dict):
        raise ConfigError(
            source, [ConfigIssue("", f"the top level must be a mapping of sections, not a {type(data).__name__}", 1)]
        )
    return validate_tree(data, node, source)


def validate_tree(data: dict[Any, Any], node: yaml.Node | None, source: str = "<config>") -> TASConfig:
    """Validate parsed YAML (`data`, and `node`, its composed tree, for line numbers) into a TASConfig.

    Duplicate keys, then `${}` references, then the schema; every failure is a ConfigError naming key and line.
    """
    duplicates = list(_duplicate_keys(node))
    if duplicates:
        raise ConfigError(source, duplicates)
    data = resolve_references(data, node, source)
    try:
        return TASConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_issue_from_error(err, node) for err in exc.errors()]) from None


def _issue_from_error(err: Any, root: yaml.Node | None) -> ConfigIssue:
    loc = tuple(err["loc"])
    path = dotted_key(loc)
    kind = err["type"]
    if kind == "missing":
        message = "missing (required)"
        if len(loc) == 1:
            message = "missing section (required)"
    elif kind == "extra_forbidden":
        parent = dotted_key(loc[:-1]) or "the top level"
        message = f"unknown key in {parent}; check the spelling against config.yaml"
    else:
        message = err["msg"]
        if "input" in err and not isinstance(err["input"], (dict, list)):
            message += f" (got {err['input']!r})"
    return ConfigIssue(path, message, line_of(root, loc))


def _duplicate_keys(node: yaml.Node | None, path: tuple[Any, ...] = ()):
    """PyYAML keeps the last of two equal keys silently; a config with both is almost always a mistake."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                yield ConfigIssue(
                    dotted_key(path + (key,)),
                    "duplicate key (the later one would win silently)",
                    key_node.start_mark.line + 1,
                )
            seen.add(key)
            yield from _duplicate_keys(value_node, path + (key,))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, path + (index,))
