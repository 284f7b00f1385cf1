"""The `${}` reference language of a config, OmegaConf-style: TAS loaded its YAML with OmegaConf.

Light (stdlib, PyYAML). `resolve_references` resolves a parsed file before validation; `escape_references`
makes every `${` literal again when a resolved config is written back (a run's frozen copy).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import yaml

from engine.config.errors import ConfigError, ConfigIssue, dotted_key, line_of


def resolve_references(data: dict[Any, Any], node: yaml.Node | None, source: str = "<config>") -> dict[Any, Any]:
    """`data` with every `${a.b}` reference resolved, OmegaConf-style (TAS loaded its YAML with OmegaConf).

    * `${a.b.c}` is an absolute key path; list items are `${datasets.0.name}` or `${datasets[0].name}`;
      `${.key}` is a sibling of the key holding the reference, `${..key}` one level further up.
    * A value that is exactly one reference takes the referenced value with its type (a number, a bool,
      a whole section); a reference inside a longer string is interpolated as text.
    * `\\${` is a literal `${` (and `\\\\${` a backslash followed by a reference).
    * References see the keys written in the file, not the schema's defaults, as in TAS.

    A reference to a missing key, a cycle, a malformed reference or a resolver (`${oc.env:X}`) raises a
    ConfigError naming the key that holds the reference and its line. `data` is not modified.
    """
    refs = _References(data, node)
    resolved = refs.resolve()
    if refs.issues:
        raise ConfigError(source, refs.issues)
    return resolved


_BROKEN = object()
"""A value whose reference failed; its issue is recorded once, and values built from it record nothing more."""


class _RefProblem(Exception):
    """A reference that cannot be resolved (recorded as an issue at the key that holds it)."""


class _Silent(Exception):
    """A reference that leads to a value that already failed: its issue is recorded already."""


@dataclass(frozen=True)
class _Ref:
    expr: str  # the text between `${` and `}`, possibly with nested references


class _References:
    def __init__(self, data: Any, node: yaml.Node | None):
        self.data = data
        self.node = node
        self.done: dict[tuple[Any, ...], Any] = {}
        self.stack: list[tuple[Any, ...]] = []  # paths being resolved, outermost first
        self.issues: list[ConfigIssue] = []

    def resolve(self) -> Any:
        return self._at(())

    # ----------------------------------------------------------------------------- one key path

    def _at(self, path: tuple[Any, ...]) -> Any:
        """The fully resolved value at `path` (memoized); a path already being resolved is a cycle."""
        if path in self.done:
            return self.done[path]
        if path in self.stack:
            chain = self.stack[self.stack.index(path) :] + [path]
            raise _RefProblem("reference cycle: " + " → ".join(dotted_key(p) or "(the whole file)" for p in chain))
        self.stack.append(path)
        try:
            raw, resolved = self._raw(path)
            value = raw if resolved else self._value(raw, path)
        finally:
            self.stack.pop()
        self.done[path] = value
        return value

    def _raw(self, path: tuple[Any, ...]) -> tuple[Any, bool]:
        """The value at `path` as written, or already resolved when the path runs through a reference."""
        current, resolved = self.data, False
        for depth, part in enumerate(path):
            if not resolved and isinstance(current, str) and "${" in current:
                current, resolved = self._at(path[:depth]), True
            if current is _BROKEN:
                raise _Silent
            current = _child(current, part, path[: depth + 1])
        return current, resolved

    def _value(self, raw: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(raw, dict):
            return {key: self._at(path + (key,)) for key in raw}
        if isinstance(raw, list):
            return [self._at(path + (index,)) for index in range(len(raw))]
        if isinstance(raw, str) and "${" in raw:
            try:
                return self._interpolate(raw, path)
            except _Silent:
                return _BROKEN
            except _RefProblem as exc:
                self.issues.append(ConfigIssue(dotted_key(path), str(exc), line_of(self.node, path)))
                return _BROKEN
        return raw

    # ------------------------------------------------------------------------------ one string

    def _interpolate(self, text: str, path: tuple[Any, ...]) -> Any:
        pieces = _split_refs(text)
        if len(pieces) == 1 and isinstance(pieces[0], _Ref):  # exactly one reference: keep the type
            return copy.deepcopy(self._lookup(pieces[0], path))
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(piece)
                continue
            value = self._lookup(piece, path)
            if isinstance(value, (dict, list)):
                kind = "a section" if isinstance(value, dict) else "a list"
                raise _RefProblem(
                    f"${{{piece.expr}}} is {kind}; it can be a whole value, not part of the text {text!r}"
                )
            out.append(str(value))
        return "".join(out)

    def _lookup(self, ref: _Ref, path: tuple[Any, ...]) -> Any:
        expr = ref.expr
        if "${" in expr:  # a nested reference names the key: ${a.${b}}
            inner = self._interpolate(expr, path)
            if isinstance(inner, (dict, list)):
                raise _RefProblem(f"${{{ref.expr}}}: the inner reference must give a key name, not a section")
            expr = str(inner)
        target = _ref_target(expr.strip(), path)
        try:
            value = self._at(target)
        except _Missing as missing:
            raise _RefProblem(
                f"${{{ref.expr}}}: {dotted_key(missing.path)} is not in the config "
                "(references see the keys written in the file, not defaults)"
            ) from None
        if value is _BROKEN:
            raise _Silent
        return value


class _Missing(_RefProblem):
    def __init__(self, path: tuple[Any, ...]):
        super().__init__(dotted_key(path))
        self.path = path


def _child(container: Any, part: Any, path: tuple[Any, ...]) -> Any:
    if isinstance(container, dict):
        if part in container:
            return container[part]
        for key, value in container.items():
            if str(key) == str(part):
                return value
    elif isinstance(container, list) and isinstance(part, int) and 0 <= part < len(container):
        return container[part]
    raise _Missing(path)


_KEY_PART = re.compile(r"[^.\[\]]+")


def _ref_target(expr: str, path: tuple[Any, ...]) -> tuple[Any, ...]:
    """The absolute key path a reference expression names, seen from the key at `path`."""
    if not expr:
        raise _RefProblem("empty reference ${}")
    if ":" in expr:
        raise _RefProblem(
            f"${{{expr}}}: resolvers (name:arguments, e.g. oc.env) are not supported; only ${{key.path}} references"
        )
    dots = len(expr) - len(expr.lstrip("."))
    rest = expr[dots:]
    if dots:
        if dots > len(path):
            raise _RefProblem(f"${{{expr}}}: goes {dots} levels up from {dotted_key(path)}, above the top of the file")
        base = path[: len(path) - dots]
    else:
        base = ()
    if not rest:
        raise _RefProblem(f"${{{expr}}}: names no key")
    parts: list[Any] = []
    for chunk in re.split(r"\.|(?=\[)", rest):
        index = re.fullmatch(r"\[\s*(\d+)\s*\]", chunk)
        if index:
            parts.append(int(index.group(1)))
        elif _KEY_PART.fullmatch(chunk):
            parts.append(int(chunk) if chunk.isdigit() else chunk)
        else:
            raise _RefProblem(f"${{{expr}}} is not a key path (write ${{section.key}} or ${{list[0].key}})")
    return base + tuple(parts)


def _split_refs(text: str) -> list[str | _Ref]:
    """`text` as literal pieces and references; `\\${` escapes a reference, as in OmegaConf."""
    pieces: list[str | _Ref] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            end = i
            while end < len(text) and text[end] == "\\":
                end += 1
            if text.startswith("${", end):
                count = end - i
                literal.append("\\" * (count // 2))
                if count % 2:  # escaped: a literal ${
                    literal.append("${")
                    end += 2
            else:
                literal.append(text[i:end])
            i = end
        elif text.startswith("${", i):
            close = _closing_brace(text, i)
            if close < 0:
                raise _RefProblem(f"unclosed ${{ in {text!r} (write \\${{ for a literal ${{)")
            if literal:
                pieces.append("".join(literal))
                literal = []
            pieces.append(_Ref(text[i + 2 : close]))
            i = close + 1
        else:
            literal.append(char)
            i += 1
    if literal:
        pieces.append("".join(literal))
    return pieces


def _closing_brace(text: str, start: int) -> int:
    """Index of the `}` closing the `${` at `start` (nested `${...}` included), or -1."""
    depth, i = 0, start
    while i < len(text):
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def escape_references(value: Any) -> Any:
    """Resolved data written back as YAML: every `${` in a string made literal again."""
    if isinstance(value, dict):
        return {key: escape_references(item) for key, item in value.items()}
    if isinstance(value, list):
        return [escape_references(item) for item in value]
    if isinstance(value, str) and "${" in value:
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    return value
