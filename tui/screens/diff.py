"""The Config tab's save question: the unified diff of the file to the edited text; y saves, n / Esc goes back."""

from __future__ import annotations

from rich.syntax import Syntax
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static


class DiffScreen(ModalScreen[bool]):
    """The unified diff of file → buffer; y saves, n / Esc goes back."""

    DEFAULT_CSS = """
    DiffScreen { align: center middle; }
    DiffScreen > Vertical { width: 90%; height: 85%; border: thick $primary; background: $surface; }
    DiffScreen #diff { height: 1fr; }
    DiffScreen #hint { height: 1; background: $primary 20%; }
    """
    BINDINGS = [Binding("y", "save", "Save"), Binding("n,escape", "back", "Back")]

    def __init__(self, path: str, diff: str):
        super().__init__()
        self.path = path
        self.diff = diff

    def compose(self) -> ComposeResult:
        with Vertical():
            with VerticalScroll(id="diff"):
                yield Static(Syntax(self.diff, "diff", theme="ansi_dark", word_wrap=True))
            yield Label(f" save {self.path}?  y: save (old file kept as .bak)   n / Esc: back", id="hint")

    def action_save(self) -> None:
        self.dismiss(True)

    def action_back(self) -> None:
        self.dismiss(False)
