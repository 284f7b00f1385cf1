"""A loss chart: curves on one axis (plotext, braille), a legend line under it (plotext draws its own over
the first points), whole-number steps, or a message when there is nothing to plot. The Stages tab shows a
stage's series; the compare screen shows one series of several runs.

Imports plotext: imported after the panel's first frame (the Stages tab's reader preloads it)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static
from textual_plotext import PlotextPlot

Series = tuple[str, str, tuple[tuple[int, float], ...]]  # (legend label, colour, (step, value) points)


class LossChart(Vertical):
    DEFAULT_CSS = """
    LossChart #loss { height: 1fr; }
    LossChart #legend { height: auto; padding: 0 1; }
    LossChart #no-chart { height: auto; padding: 1 1; color: $text-muted; display: none; }
    """

    title = ""  # what the chart shows

    def compose(self) -> ComposeResult:
        yield PlotextPlot(id="loss")
        yield Static(id="no-chart")
        yield Static(id="legend")

    def show(self, title: str, series: list[Series], empty: str) -> bool:
        """Plot `series` under `title`, or say `empty` when there is none; True when something is plotted."""
        self.title = title
        plot = self.query_one("#loss", PlotextPlot)
        message = self.query_one("#no-chart", Static)
        legend = self.query_one("#legend", Static)
        if not series:
            plot.display = legend.display = False
            message.update(empty)
            message.display = True
            return False
        message.display = False
        plot.display = legend.display = True
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(title)
        for _, colour, points in series:
            steps, values = zip(*sorted(points))
            plt.plot(list(steps), list(values), marker="braille", color=colour or "default")
        steps = sorted({step for _, _, points in series for step, _ in points})
        plt.xticks(integer_ticks(steps[0], steps[-1], 5))  # 5 at most: the labels fit an 80-column panel
        legend.update(Text("  ").join(Text.assemble(("━━ ", colour), label) for label, colour, _ in series))
        plot.refresh()
        return True


def integer_ticks(low: int, high: int, most: int) -> list[int]:
    """At most `most` whole-number ticks from `low` to `high`, at a round spacing (1, 2, 5, 10, 20, 50, …)."""
    if high <= low:
        return [low]
    for spacing in (m * 10**e for e in range(16) for m in (1, 2, 5)):
        ticks = list(range(-(-low // spacing) * spacing, high + 1, spacing))
        if len(ticks) <= max(most, 2):
            return ticks or [low]
    return [low, high]
