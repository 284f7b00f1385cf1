"""A yes/no question before something that cannot be taken back: starting hours of work, losing edits.

`ConfirmScreen(question, details, yes=..., no=..., warning=...)` is pushed with a callback; it dismisses with
True (y / Enter) or False (n / Esc). The details say exactly what will happen (the stages, the run, the config
file, the memory each stage will need), one per line, so nothing is started or lost on a key pressed by
mistake; the warning, when there is one, says what would go wrong (a stage that will not fit its GPU).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

TEXT_WIDTH = 76 - 4  # the dialog's width (DEFAULT_CSS below) less its border and padding


class ConfirmScreen(ModalScreen[bool]):
    """`question`, the `details` under it, a `warning`, and a hint line; y / Enter: True, n / Esc: False."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical {
        width: 76; max-width: 100%; height: auto; max-height: 100%;
        border: thick $warning; background: $surface; padding: 0 1;
    }
    ConfirmScreen #question { text-style: bold; margin-bottom: 1; }
    ConfirmScreen #details { margin-bottom: 1; }
    ConfirmScreen #warning { color: $error; text-style: bold; margin-bottom: 1; }
    ConfirmScreen #hint { color: $text-muted; }
    """
    BINDINGS = [Binding("y,enter", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(
        self,
        question: str,
        details: Sequence[tuple[str, str]] | str = (),
        yes: str = "yes",
        no: str = "cancel",
        warning: str = "",
    ):
        """`details`: (label, value) pairs shown aligned under the question, or plain text."""
        super().__init__()
        self.question = question
        self.details = details
        self.warning = warning
        self.yes = yes
        self.no = no

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(self.question), id="question")
            if self.details:
                yield Static(self._details_text(), id="details")
            if self.warning:
                yield Static(Text(self.warning), id="warning")
            yield Static(
                Text.assemble(
                    ("y", "bold"),
                    " / ",
                    ("Enter", "bold"),
                    f": {self.yes}    ",
                    ("n", "bold"),
                    " / ",
                    ("Esc", "bold"),
                    f": {self.no}",
                ),
                id="hint",
            )

    def _details_text(self) -> Text:
        if isinstance(self.details, str):
            return Text(self.details)
        width = max(len(label) for label, _ in self.details)
        text = Text()
        for index, (label, value) in enumerate(self.details):
            if index:
                text.append("\n")
            text.append(f"{label:<{width}}  ", style="dim")
            # a long value wraps under itself, not under the labels (the text width inside the dialog's frame)
            lines = textwrap.wrap(value, max(20, TEXT_WIDTH - width - 2)) or [""]
            text.append(("\n" + " " * (width + 2)).join(lines))
        return text

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
