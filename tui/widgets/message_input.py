"""The chat message box: multi-line, Enter sends, ctrl+j / shift+enter add a line, a paste keeps its lines."""

from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea

NEWLINE_KEYS = frozenset({"shift+enter", "ctrl+enter", "ctrl+j", "shift+\r", "ctrl+\r"})
"""Keys that add a line to the message: ctrl+j is the newline character itself (every terminal sends it, tmux
too); shift+enter / ctrl+enter arrive only from terminals that tell them apart from Enter (kitty keyboard
protocol: kitty, WezTerm, foot, Ghostty, iTerm2 with CSI u; Textual names xterm's modifyOtherKeys form
"shift+\\r" / "ctrl+\\r"); elsewhere they arrive as plain Enter and send."""


class MessageInput(TextArea):
    """The message box: multi-line, one row tall, growing with its content to 6 rows (then it scrolls).

    Enter sends (posts Submitted); a NEWLINE_KEYS key adds a line; a paste inserts all of its lines."""

    DEFAULT_CSS = """
    MessageInput { height: auto; min-height: 1; max-height: 6; padding: 0; }
    MessageInput:focus { background-tint: $foreground 5%; }
    """

    class Submitted(Message):
        """Enter in the message box: `value` is its whole text."""

        def __init__(self, message_input: MessageInput, value: str):
            super().__init__()
            self.message_input = message_input
            self.value = value

        @property
        def control(self) -> MessageInput:
            return self.message_input

    def __init__(self, *, placeholder: str = "", id: str | None = None):
        super().__init__(
            id=id,
            compact=True,
            placeholder=placeholder,
            soft_wrap=True,
            tab_behavior="focus",
            show_line_numbers=False,
            highlight_cursor_line=False,
        )

    async def _on_key(self, event: events.Key) -> None:
        # runs before TextArea._on_key (handlers run down the MRO); prevent_default keeps TextArea's from
        # inserting the Enter as a newline
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            await self.action_submit()
        elif event.key in NEWLINE_KEYS and not self.read_only:
            event.stop()
            event.prevent_default()
            self.replace("\n", *self.selection, maintain_selection_offset=False)

    def _on_paste(self, event: events.Paste) -> None:
        # TextArea._on_paste (next in the MRO) inserts the text, every line of it; consumed here, so a Paste
        # posted to this widget does not bubble to the app, which would forward it here a second time
        event.stop()

    async def action_submit(self) -> None:
        self.post_message(self.Submitted(self, self.text))
