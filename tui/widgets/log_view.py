"""The worker-log pane: a stage's worker.log as it grows (`tail -F`, read by tui.store_reader, redacted
there), its last LOG_LINES lines kept, with search (`/`, then `n` / `N`), `t` to the first traceback and `G`
back to following the end. A jump stops following, so new lines do not scroll the match away."""

from __future__ import annotations

import re

from rich.highlighter import Highlighter
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, Log

LOG_LINES = 5000  # lines kept: older ones are dropped (a long training log stays a few hundred kB)
TRACEBACK = "Traceback (most recent call last):"


class Marks(Highlighter):
    """Tracebacks' first lines in red, the searched text reversed."""

    def __init__(self) -> None:
        self.pattern: re.Pattern | None = None

    def highlight(self, text: Text) -> None:
        if text.plain.startswith(TRACEBACK):
            text.stylize("bold red")
        if self.pattern is not None:
            text.highlight_regex(self.pattern, "reverse")


class LogView(Vertical):
    DEFAULT_CSS = """
    LogView { height: 1fr; border-top: solid $primary 40%; border-bottom: solid $primary 40%; }
    LogView Log { height: 1fr; }
    LogView Input { height: 3; display: none; }
    LogView.-searching Input { display: block; }
    """

    BINDINGS = [
        Binding("slash", "search", "Search"),
        Binding("n", "next_match", "Next", show=False),
        Binding("N", "previous_match", "Prev", show=False),
        Binding("t", "traceback", "Traceback"),
        Binding("G", "follow", "Follow"),
    ]

    def __init__(self, *, id: str):
        super().__init__(id=id)
        self.marks = Marks()
        self.query_text = ""
        self.path = ""
        self.note = ""  # what the last jump found (the subtitle), until the log is followed again
        self.current: int | None = None  # the line of the match shown: n / N go on from it
        self.missing = False

    def compose(self) -> ComposeResult:
        log = Log(highlight=True, max_lines=LOG_LINES)
        log.highlighter = self.marks
        yield log
        yield Input(placeholder="search the log (Enter: find, Esc: close)")

    @property
    def log_widget(self) -> Log:
        return self.query_one(Log)

    def reset(self, path: str) -> None:
        self.path = path
        self.log_widget.clear()
        self.log_widget.auto_scroll = True
        self.current = None
        self._title("")

    def add(self, lines: tuple[str, ...], missing: bool = False) -> None:
        """Append the new lines; `missing`: the file does not exist (yet): said until it does."""
        if lines:
            self.log_widget.write_lines(lines)
        if lines or missing != self.missing:
            self.missing = missing
            self._title()

    def _title(self, note: str | None = None) -> None:
        log = self.log_widget
        if note is not None:
            self.note = note
        self.border_title = f"{self.path or 'worker.log'} · {'following' if log.auto_scroll else 'paused (G follows)'}"
        if self.missing:
            self.border_subtitle = "no worker.log yet: shown as soon as the stage writes it"
        else:
            self.border_subtitle = self.note or f"{log.line_count} lines (last {LOG_LINES} kept)"

    # ------------------------------------------------------------------------------------- jumping

    def _jump(self, line: int, note: str) -> None:
        log = self.log_widget
        log.auto_scroll = False
        log.scroll_to(y=max(0, line - 2), animate=False)
        self._title(note)

    def matches(self) -> list[int]:
        if self.marks.pattern is None:
            return []
        return [i for i, line in enumerate(self.log_widget.lines) if self.marks.pattern.search(line)]

    def find(self, text: str, forward: bool = True) -> int | None:
        """Jump to the next (or previous) line holding `text` after (before) the top of the view."""
        if text != self.query_text:
            self.query_text = text
            self.marks.pattern = re.compile(re.escape(text), re.IGNORECASE) if text else None
            self.log_widget._render_line_cache.clear()  # the highlighter changed: draw the lines again
            self.log_widget.refresh()
            self.current = None
        found = self.matches()
        if not found:
            self._title(f"no match for {text!r}" if text else "")
            return None
        # from the match shown, else from the top line of the view (a new search finds what is on screen first)
        here = self.current if self.current is not None else round(self.log_widget.scroll_y) - (1 if forward else 0)
        after = [i for i in found if (i > here if forward else i < here)]
        line = (after[0] if forward else after[-1]) if after else (found[0] if forward else found[-1])
        self.current = line
        self._jump(line, f"{text!r}: match {found.index(line) + 1}/{len(found)}, line {line + 1}")
        return line

    def action_search(self) -> None:
        self.add_class("-searching")
        self.query_one(Input).focus()

    @on(Input.Submitted)
    def _searched(self, event: Input.Submitted) -> None:
        self.remove_class("-searching")
        self.log_widget.focus()
        self.find(event.value)

    def on_key(self, event) -> None:
        if event.key == "escape" and self.has_class("-searching"):
            self.remove_class("-searching")
            self.log_widget.focus()
            event.stop()

    def action_next_match(self) -> None:
        self.find(self.query_text)

    def action_previous_match(self) -> None:
        self.find(self.query_text, forward=False)

    def action_traceback(self) -> int | None:
        line = next((i for i, text in enumerate(self.log_widget.lines) if text.startswith(TRACEBACK)), None)
        if line is None:
            self._title("no traceback in the lines kept")
        else:
            self._jump(line, f"first traceback: line {line + 1}")
        return line

    def action_follow(self) -> None:
        log = self.log_widget
        log.auto_scroll = True
        log.scroll_end(animate=False)
        self._title("")
