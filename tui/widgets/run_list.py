"""The run list: one line a run (its glyph and its id less the date, which heads each day's runs), the user's
name for it on a second line; runs marked for comparing end with a ◆ in their compare colour."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from tui.widgets.text import RUN_COLOURS, clip, split_run_id

RUNS_ROOM = 16  # the list's text width (21 columns less border, padding and scrollbar) before layout


class RunList(OptionList):
    def __init__(self, *, id: str):
        super().__init__(id=id)
        self.marked: list[str] = []  # run ids marked for comparing, in the order marked
        self._rows: tuple = ()

    def toggle_mark(self, run_id: str) -> None:
        if run_id in self.marked:
            self.marked.remove(run_id)
        else:
            self.marked.append(run_id)
        self.show(self._rows)

    def show(self, runs: tuple, selected: str | None = None) -> None:
        """`runs`: store_reader.RunRow, newest first; ids never wrap in the narrow list."""
        self._rows = runs
        self.marked = [run_id for run_id in self.marked if any(r.id == run_id for r in runs)]
        room = max(8, self.scrollable_content_region.width or RUNS_ROOM)
        options, day = [], None
        for run in runs:
            date, short = split_run_id(run.id)
            if date != day:
                day = date
                options.append(Option(Text(date or "other runs", style="dim"), id=f"day:{date}", disabled=True))
            label = Text.assemble((f"{run.glyph} ", run.style))
            if run.id in self.marked:
                colour = RUN_COLOURS[self.marked.index(run.id) % len(RUN_COLOURS)]
                label.append(clip(short, room - 4))
                label.append(" ◆", style=colour)
            else:
                label.append(clip(short, room - 2))
            if run.name:
                label.append("\n  " + clip(run.name, room - 2), style="italic")
            options.append(Option(label, id=run.id))
        current = [o.id for o in self.options]
        if current != [o.id for o in options]:
            self.set_options(options)
        else:
            for index, option in enumerate(options):
                self.replace_option_prompt_at_index(index, option.prompt)
        if selected is not None and any(r.id == selected for r in runs):
            index = self.get_option_index(selected)
            if self.highlighted != index:
                self.highlighted = index
        if not runs:
            self.set_options([Option(Text("no runs yet: press n", style="dim"), disabled=True)])
