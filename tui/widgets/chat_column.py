"""One model's side of a chat: a header (model, state, tokens/s) over its turns, the reply streaming as Markdown.

The Chat tab (tui.tabs.chat) shows one column per target, side by side; the column only renders what the
tab tells it (the turns) and what its session (tui.chat_session.ChatSession) says in its header. It can be
focused (Tab, a click): Esc then stops this column's reply only.
"""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Markdown, Static

from tui.chat_session import ChatSession, ChatState

STATE_MARK = {
    ChatState.IDLE: "○",
    ChatState.STARTING: "◌",
    ChatState.READY: "●",
    ChatState.STREAMING: "▶",
    ChatState.STOPPING: "■",
    ChatState.FAILED: "✗",
}


HEADER_EVERY_S = 0.25
"""How often a streaming column redraws its tokens/s: four columns of tokens must not also mean four headers a token."""


class ChatColumn(Vertical, can_focus=True):
    DEFAULT_CSS = """
    ChatColumn {
        width: 1fr;
        min-width: 24;
        height: 1fr;
        border: round $panel-lighten-2;
        border-title-color: $text-muted;
        border-subtitle-color: $text-muted;
        padding: 0 1;
    }
    ChatColumn.-current { border: round $accent; border-title-color: $text; }
    ChatColumn:focus { border: double $accent; background-tint: $foreground 3%; }
    ChatColumn.-failed { border-subtitle-color: $text-error; }
    ChatColumn > .chat-turns { height: 1fr; scrollbar-size-vertical: 1; }
    ChatColumn .chat-hint { color: $text-muted; }
    ChatColumn .chat-user { border-left: thick $accent; padding: 0 1; margin: 0 0 1 0; height: auto; }
    ChatColumn .chat-assistant { border-left: thick $success; padding: 0 1; margin: 0 0 1 0; }
    ChatColumn .chat-assistant > MarkdownParagraph:last-child { margin: 0; }
    ChatColumn .chat-assistant.-error { border-left: thick $error; }
    ChatColumn .chat-note { color: $text-muted; text-style: italic; margin: 0 0 1 0; }
    ChatColumn .chat-error { color: $text-error; margin: 0 0 1 0; }
    """

    def __init__(self, session: ChatSession, hint: str = "", *, id: str | None = None):
        super().__init__(id=id)
        self.session = session
        self.hint = hint
        self.box: Markdown | None = None  # the reply streaming now
        self._stream = None
        self._shown_at = 0.0  # when the header was last drawn: while streaming, at most HEADER_EVERY_S apart

    def compose(self) -> ComposeResult:
        turns = VerticalScroll(classes="chat-turns")
        turns.can_focus = False
        with turns:
            if self.hint:
                yield Static(self.hint, classes="chat-hint")

    def on_mount(self) -> None:
        self.turns.anchor()
        self.show()

    @property
    def turns(self) -> VerticalScroll:
        return self.query_one(".chat-turns", VerticalScroll)

    def show(self) -> None:
        """The header: which model, and how it is doing (state, live tokens/s or the last reply's figures)."""
        self._shown_at = time.monotonic()
        session = self.session
        target = session.target
        self.border_title = target.label if target else "no model"
        self.tooltip = (target.model + (f" + {target.adapter}" if target.adapter else "")) if target else None
        rate = session.tokens_per_s()
        if session.state == ChatState.STREAMING and rate is not None:
            figures = f"{rate:.3g} tok/s"
        elif session.state == ChatState.READY and session.figures:
            figures = session.figures
        else:
            figures = session.state.value
        self.border_subtitle = f"{STATE_MARK[session.state]} {figures}"
        self.set_class(session.state == ChatState.FAILED, "-failed")

    # ---- the turns
    async def add_turn(self, text: str) -> None:
        """Your message, and an empty reply bubble the tokens stream into."""
        await self.turns.query(".chat-hint").remove()
        self.box = Markdown("", classes="chat-assistant")
        await self.turns.mount_all([Static(Text(text), classes="chat-user"), self.box])
        self._stream = Markdown.get_stream(self.box)

    async def write(self, text: str) -> None:
        if self._stream is not None:
            await self._stream.write(text)
        if time.monotonic() - self._shown_at >= HEADER_EVERY_S:
            self.show()

    async def finish(self, text: str) -> None:
        """The reply is complete (`text`, the whole of it)."""
        await self._stop_stream()
        if not text.strip() and self.box is not None:
            await self.box.update("*(empty reply)*")
        self.box = None
        self.show()

    async def fail(self, error: str) -> None:
        """The reply in flight failed: its bubble says so."""
        await self._stop_stream()
        if self.box is not None:
            self.box.add_class("-error")
            await self.box.append(f"\n\n**error:** {error}")
        self.box = None
        self.show()

    async def _stop_stream(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None

    async def note(self, text: str, error: bool = False) -> None:
        await self.turns.mount(Static(Text(text), classes="chat-error" if error else "chat-note"))

    async def clear(self, hint: str) -> None:
        await self._stop_stream()
        self.box = None
        await self.turns.remove_children()
        await self.turns.mount(Static(hint, classes="chat-hint"))
        self.show()

    def on_click(self) -> None:
        self.focus()
