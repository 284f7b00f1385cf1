"""A problem in a config file, located by its dotted key and its line: what loading and references report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file, located by key path and line."""

    path: str  # dotted key path, e.g. "train.sft.learning_rate" or "datasets[0].key"
    message: str
    line: int | None = None  # 1-based

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        key = f"{self.path}: " if self.path else ""
        return f"{where}{key}{self.message}"


class ConfigError(ValueError):
    """A config file that cannot be used; `issues` says what and where."""

    def __init__(self, source: str, issues: list[ConfigIssue]):
        self.source = source
        self.issues = issues
        lines = [f"{source}: {issue}" for issue in issues]
        super().__init__("invalid config\n" + "\n".join(lines) if len(lines) > 1 else lines[0])


def dotted_key(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest node on `loc` that exists in the YAML tree."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    child = value_node
                    line = key_node.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line
