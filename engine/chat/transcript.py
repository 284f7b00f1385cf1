"""Conversations as text: the text a typed, pasted or piped message sends (message_text), and a conversation
saved to files, Markdown to read and JSON to reload or replay (the Chat tab's ctrl+s, `tas chat --save`).

Light module (stdlib, engine.chat.client.printable, engine.core.fsio). One conversation is one record:

    {"format": "tas-chat/1", "saved": ISO time, "run": run id or null,
     "target": {"label", "model", "adapter"}, "device": str or null, "params": {...},
     "messages": [{"role": "system" | "user" | "assistant", "content": str, ...}]}

`messages` is what the next turn would send (the system prompt first), so it can be replayed as is; an
assistant message also carries who answered (`model`), the `params` it was generated with and its `stats`
line, and `partial: true` when it was still streaming when saved. Both files are replaced atomically.

A side-by-side conversation (one prompt to several models, the Chat tab) adds `"columns": [{"target", "device",
"messages"}, ...]`, one per model, each with the messages it was sent and gave; the top-level `target`,
`device` and `messages` stay those of the first column, so a reader of single chats still reads it. `columns`
reads either kind as a list of columns.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.chat.client import printable
from engine.core.fsio import atomic_write

FORMAT = "tas-chat/1"
CHAT_DIR = "chat"  # runs/<run>/chat/
LOOSE_DIR = ".chats"  # beside the config when no run's models are in use


def chat_dir(run_path: str | Path | None, workdir: str | Path = ".") -> Path:
    """Where the conversations go: `<run>/chat/` when chatting with a run's models, else `<workdir>/.chats/`."""
    return Path(run_path) / CHAT_DIR if run_path else Path(workdir) / LOOSE_DIR


def new_name(now: float | None = None) -> str:
    """`chat-20250101-120000`: the files' stem, from the conversation's start."""
    return time.strftime("chat-%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))


def target_label(label: str, model: str, adapter: str | None = None) -> str:
    """`KD student (runs/…/Student)`, or the model alone when the label is the model."""
    where = model + (f" + {adapter}" if adapter else "")
    return where if label == model else f"{label} ({where})"


def make_record(
    messages: Sequence[Mapping[str, Any]],
    *,
    label: str,
    model: str,
    adapter: str | None = None,
    params: Mapping[str, Any] | None = None,
    run: str | None = None,
    device: str | None = None,
    saved: float | None = None,
    columns: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The JSON record of a conversation (`messages` with the system prompt first, if any); `columns`, the
    side-by-side ones (see the module docstring), only when there are two or more."""
    record = {
        "format": FORMAT,
        "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() if saved is None else saved)),
        "run": run,
        "target": {"label": label, "model": model, "adapter": adapter},
        "device": device,
        "params": dict(params or {}),
        "messages": [dict(m) for m in messages],
    }
    if len(columns) > 1:
        record["columns"] = [
            {"target": dict(c["target"]), "device": c.get("device"), "messages": [dict(m) for m in c["messages"]]}
            for c in columns
        ]
    return record


def columns(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation's columns, {"target", "device", "messages"} each: a single chat (every record written
    before side by side, too) is one column."""
    if record.get("columns"):
        return [dict(c) for c in record["columns"]]
    return [
        {"target": record.get("target") or {}, "device": record.get("device"), "messages": record.get("messages") or []}
    ]


def load(path: str | Path) -> dict[str, Any]:
    """A saved conversation's record, from its JSON file (or the Markdown beside it)."""
    return json.loads(paths_for(path)[1].read_text(encoding="utf-8"))


def message_text(raw: str) -> str:
    """What is sent of a typed, pasted or piped message: blank lines around it and trailing spaces dropped,
    line ends made `\\n`; the indentation of a multi-line message kept (code), a one-line message stripped."""
    lines = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    lines = [line.rstrip() for line in lines]
    if len(lines) == 1:
        return lines[0].strip()
    return "\n".join(lines)


def _fence(text: str, info: str = "text") -> str:
    """`text` verbatim in a code fence longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def _params_line(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in params.items()) or "defaults"


def to_markdown(record: Mapping[str, Any]) -> str:
    """The conversation to read: your turns verbatim (fenced, as typed or pasted), replies as the Markdown
    they are (the panel renders them so, terminal controls dropped), each followed by who answered and its
    stats; a side-by-side one, column after column. The JSON keeps every message exactly."""
    out: list[str] = []
    sides = columns(record)
    if len(sides) > 1:
        labels = [_label(c.get("target") or {}) for c in sides]
        out += [f"# Side by side: {' · '.join(labels)}", ""]
        out += _header(record, None)
        for n, side in enumerate(sides, 1):
            out += ["", f"# Column {n}: {labels[n - 1]}", ""]
            out += _header({"target": side.get("target"), "device": side.get("device")}, record)
            out += _messages(side.get("messages") or [], labels[n - 1], record.get("params"))
        return "\n".join(out) + "\n"
    label = _label(record.get("target") or {})
    out += [f"# Chat with {label}", "", *_header(record, record)]
    out += _messages(record.get("messages") or [], label, record.get("params"))
    return "\n".join(out) + "\n"


def _label(target: Mapping[str, Any]) -> str:
    return target.get("label") or target.get("model") or "model"


def _header(record: Mapping[str, Any], run_record: Mapping[str, Any] | None) -> list[str]:
    """The list under a title: the model (when `record` has a target) and, from `run_record`, run, params, time."""
    out = []
    target = record.get("target")
    if target:
        out.append(f"- model: `{target.get('model')}`")
        if target.get("adapter"):
            out.append(f"- adapter: `{target['adapter']}`")
    if run_record is not None and run_record.get("run"):
        out.append(f"- run: `{run_record['run']}`")
    if record.get("device"):
        out.append(f"- device: {record['device']}")
    if run_record is not None:
        out.append(f"- params: {_params_line(run_record.get('params') or {})}")
        out.append(f"- saved: {run_record.get('saved')}")
    return out


def _messages(messages: Sequence[Mapping[str, Any]], label: str, params: Mapping[str, Any] | None) -> list[str]:
    out: list[str] = []
    for message in messages:
        role, content = message.get("role"), str(message.get("content", ""))
        out.append("")
        if role == "system":
            out += ["## System", "", _fence(content)]
        elif role == "user":
            out += ["## You", "", _fence(content)]
        else:
            out += [f"## {message.get('label') or label}", "", printable(content).strip() or "*(empty reply)*"]
            notes = [n for n in (message.get("model"), message.get("stats")) if n]
            if message.get("params") and message.get("params") != params:
                notes.append(_params_line(message["params"]))
            if message.get("partial"):
                notes.append("partial: still streaming when saved")
            if notes:
                out += ["", "*" + " · ".join(notes) + "*"]
    return out


def paths_for(path: str | Path) -> tuple[Path, Path]:
    """(Markdown path, JSON path) of one save: `x.json` → (x.md, x.json); anything else → (it, it.json beside)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return path.with_suffix(".md"), path
    if path.suffix.lower() in (".md", ".markdown"):
        return path, path.with_suffix(".json")
    return path, path.with_name(path.name + ".json")


def save(record: Mapping[str, Any], path: str | Path) -> tuple[Path, Path]:
    """Write the conversation as Markdown and JSON (see paths_for), each atomically; FileWriteError (an
    OSError naming the path) when it cannot be written. Returns (Markdown path, JSON path)."""
    md_path, json_path = paths_for(path)
    if md_path.parent.name == LOOSE_DIR and not md_path.parent.exists():
        # a loose chat folder in a checkout stays out of git without touching the project's .gitignore
        atomic_write(md_path.parent / ".gitignore", b"*\n")
    atomic_write(json_path, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    atomic_write(md_path, to_markdown(record).encode("utf-8"))
    return md_path, json_path
