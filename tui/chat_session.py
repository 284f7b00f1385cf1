"""The Chat tab's conversation as plain data: what each model was asked and answered, and where each stands.

No Textual here (tests drive it with plain calls, no Pilot): the tab (tui.tabs.chat) turns keys and worker
replies (engine.chat.protocol) into calls on this model and renders what it holds. A `Conversation` is one
prompt line feeding one to four `ChatSession`s, the columns of side by side; each session talks to one
target (engine.chat.targets) in its own worker process and keeps its own history, since each model must
see its own earlier replies.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from engine.chat.client import build_messages, format_stats
from engine.chat.protocol import EndReply, ReadyReply
from engine.chat.targets import ChatTarget

MAX_COLUMNS = 4
_request_ids = itertools.count(1)


class ChatState(StrEnum):
    """Where one session's worker stands."""

    IDLE = "idle"  # no worker: it starts with the first message
    STARTING = "starting"  # spawned or switching models; a message sent now waits in the worker's queue
    READY = "ready"  # loaded, nothing streaming
    STREAMING = "streaming"  # a reply is coming in
    STOPPING = "stopping"  # asked to stop; its `end` has not come yet
    FAILED = "failed"  # the worker is gone (or never started): ctrl+r starts a new one


@dataclass
class Reply:
    """The reply streaming now: its request id, the pieces so far and who is answering with which params."""

    id: str
    meta: dict[str, Any]
    pieces: list[str] = field(default_factory=list)
    first_at: float | None = None  # monotonic time of the first piece: the live tokens/s counts from it

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass
class ChatSession:
    """One column: a target, its worker's state, the history it is sent, the reply streaming now.

    `client` is the engine.chat.client.ChatClient serving it (the tab starts and ends it; this model never
    calls it)."""

    target: ChatTarget | None
    state: ChatState = ChatState.IDLE
    history: list[dict[str, str]] = field(default_factory=list)
    reply_meta: dict[int, dict[str, Any]] = field(default_factory=dict)  # history index → label, model, params, stats
    reply: Reply | None = None
    ready_line: str = ""  # `model on device` once loaded
    device: str | None = None
    status: str = "model not loaded · it starts with the first message"
    tone: str = ""  # "", "busy" or "error": how the status is shown
    figures: str = ""  # the last reply's, short: `64 tok · 512.3 tok/s` (`stopped · ` first if it was)
    client: Any = None

    # ---- the turn
    def ask(self, text: str, system: str | None, params: dict[str, Any]) -> tuple[str, list[dict[str, str]]]:
        """A user message: recorded, and a reply awaited; returns (request id, the messages to send)."""
        assert self.target is not None
        self.history.append({"role": "user", "content": text})
        where = self.target.model + (f" + {self.target.adapter}" if self.target.adapter else "")
        rid = f"chat{next(_request_ids)}"
        self.reply = Reply(rid, {"label": self.target.label, "model": where, "params": params})
        if self.state == ChatState.READY:
            self.state = ChatState.STREAMING
            self.set_status(f"{self.ready_line} · generating …", "busy")
        return rid, build_messages(system, self.history)

    def token(self, rid: str, text: str) -> bool:
        """A piece of the reply `rid`; False when it is not the one awaited (a stopped or dropped request)."""
        if self.reply is None or rid != self.reply.id:
            return False
        if self.reply.first_at is None:
            self.reply.first_at = time.monotonic()
        self.reply.pieces.append(text)
        return True

    def tokens_per_s(self, now: float | None = None) -> float | None:
        """The live rate of the reply streaming (pieces a second since the first: a piece is about a token)."""
        if self.reply is None or self.reply.first_at is None or len(self.reply.pieces) < 2:
            return None
        elapsed = (time.monotonic() if now is None else now) - self.reply.first_at
        return (len(self.reply.pieces) - 1) / elapsed if elapsed > 0 else None

    def end(self, end: EndReply) -> str | None:
        """The reply `end.id` is over: it joins the history with its figures; returns its text (None when
        it is not the one awaited)."""
        if self.reply is None or end.id != self.reply.id:
            return None
        text = self.reply.text
        stats = format_stats(end)
        rate = f" · {end.tokens_per_s:.3g} tok/s" if end.tokens_per_s is not None else ""
        self.figures = ("stopped · " if end.stopped else "") + f"{end.tokens} tok{rate}"
        self.history.append({"role": "assistant", "content": text})
        self.reply_meta[len(self.history) - 1] = {**self.reply.meta, "stats": stats}
        self.reply = None
        self.state = ChatState.READY
        self.set_status(f"{self.ready_line} │ {stats}")
        return text

    def drop_reply(self) -> None:
        """The reply in flight failed or was abandoned: forget it and the question it answered."""
        self.reply = None
        if self.history and self.history[-1]["role"] == "user":
            self.history.pop()
        if self.state in (ChatState.STREAMING, ChatState.STOPPING):
            self.state = ChatState.READY

    def stopping(self) -> None:
        if self.reply is not None:
            self.state = ChatState.STOPPING
            self.set_status("stopping …", "busy")

    # ---- the worker
    def starting(self, target: ChatTarget, verb: str = "loading") -> None:
        self.target = target
        self.state = ChatState.STARTING
        self.set_status(f"{verb} {target.label} ({short(target.model)}) …", "busy")

    def ready(self, reply: ReadyReply) -> None:
        self.device = reply.device
        self.ready_line = f"{short(reply.model)}" + (" + LoRA" if reply.adapter else "") + f" on {reply.device}"
        if self.reply is not None:
            self.state = ChatState.STREAMING
            self.set_status(f"{self.ready_line} · generating …  (Esc stops)", "busy")
        else:
            self.state = ChatState.READY
            self.set_status(f"{self.ready_line} · ready (loaded in {reply.load_s:.1f} s)")

    def failed(self, message: str) -> None:
        """The worker is gone: its reply (if any) is dropped, ctrl+r starts a new one."""
        self.drop_reply()
        self.state = ChatState.FAILED
        self.client = None
        self.set_status(f"✗ {message.splitlines()[0]}", "error")

    def set_status(self, text: str, tone: str = "") -> None:
        self.status, self.tone = text, tone

    def clear(self) -> None:
        """A new conversation: the history goes, the worker stays."""
        self.history.clear()
        self.reply_meta.clear()
        self.reply = None

    # ---- saving
    def saved_messages(self) -> list[dict[str, Any]]:
        """The history as saved: each reply with who answered; a reply still streaming, what came so far."""
        messages = [dict(m, **self.reply_meta.get(i, {})) for i, m in enumerate(self.history)]
        if self.reply is not None and self.reply.pieces:
            messages.append({"role": "assistant", "content": self.reply.text, "partial": True, **self.reply.meta})
        return messages


@dataclass
class Conversation:
    """What the Chat tab shows: the run whose models are offered, and one session per column."""

    run_id: str | None = None
    sessions: list[ChatSession] = field(default_factory=list)
    started: float | None = None  # when the first message went (names the saved files)
    current: int = 0  # the column the target picker and a column's stop act on

    @property
    def session(self) -> ChatSession:
        return self.sessions[self.current]

    @property
    def streaming(self) -> bool:
        return any(s.reply is not None for s in self.sessions)

    def add(self, target: ChatTarget | None) -> ChatSession | None:
        """A new column for `target` (None when there are MAX_COLUMNS already); it becomes the current one."""
        if len(self.sessions) >= MAX_COLUMNS:
            return None
        self.sessions.append(ChatSession(target))
        self.current = len(self.sessions) - 1
        return self.sessions[-1]

    def remove(self, index: int) -> ChatSession:
        session = self.sessions.pop(index)
        self.current = min(self.current, len(self.sessions) - 1)
        return session

    def next_target(self, targets: list[ChatTarget]) -> ChatTarget | None:
        """The first target (best first) no column shows yet; None when every one has a column."""
        shown = {s.target for s in self.sessions}
        return next((t for t in targets if t not in shown), None)

    def clear(self) -> None:
        for session in self.sessions:
            session.clear()
        self.started = None

    def record(self, system: str | None, params: dict[str, Any]) -> dict[str, Any] | None:
        """The transcript (engine.chat.transcript) of every column; None when nothing was said yet."""
        from engine.chat.transcript import make_record

        sides = [(s, s.saved_messages()) for s in self.sessions if s.target is not None]
        if not any(messages for _, messages in sides):
            return None
        system_part = [{"role": "system", "content": system}] if system else []
        columns = [
            {
                "target": {"label": s.target.label, "model": s.target.model, "adapter": s.target.adapter},
                "device": s.device,
                "messages": system_part + messages,
            }
            for s, messages in sides
        ]
        first = sides[0][0]
        last = next((m for m in reversed(sides[0][1]) if m["role"] == "assistant" and "params" in m), {})
        return make_record(
            columns[0]["messages"],
            label=first.target.label,
            model=first.target.model,
            adapter=first.target.adapter,
            params=last.get("params") or params,
            run=self.run_id,
            device=first.device,
            columns=columns,
        )


def short(path: str, width: int = 34) -> str:
    """A model name or path cut to fit a narrow line, keeping its end (the part that differs)."""
    text = str(path)
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1) :]
