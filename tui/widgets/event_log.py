"""The event log: a RichLog that wraps each line at its own width (RichLog's default `min_width` of 78 renders
lines wider than an 80-column panel shows, which then cuts their middle off), and wraps them again when its
width changes. Imports RichLog (rich.pretty, attrs): imported after the panel's first frame."""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.events import Resize
from textual.widgets import RichLog

KEPT = 2000  # lines kept (and re-wrapped on resize)


class EventLog(RichLog):
    def __init__(self, id: str):
        super().__init__(id=id, markup=True, wrap=True, min_width=1, max_lines=KEPT)
        self.entries: deque[Text] = deque(maxlen=KEPT)
        self._wrapped_at = 0  # the width the lines were wrapped at; 0: not laid out yet, nothing written

    def add(self, line: Text) -> None:
        self.entries.append(line)
        if self._wrapped_at:
            self.write(line, width=self._wrapped_at)  # an explicit width: RichLog measures with the
            # console's options otherwise, which may be narrower than the log

    def reset(self) -> None:
        self.entries.clear()
        self.clear()

    def on_resize(self, event: Resize) -> None:
        width = self.scrollable_content_region.width
        if event.size.width and width > 0 and width != self._wrapped_at:
            self._size_known = True  # (what RichLog's own handler sets; nothing was deferred)
            self._wrapped_at = width
            self.clear()
            for line in self.entries:
                self.write(line, width=width)
