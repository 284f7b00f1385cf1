"""Marked runs side by side (`C` in the Stages tab): each training stage's loss curve of every run on one
axis (a colour a run, the run list's ◆ colours; `t` shows the stage's next series: sft eval, the CE control), the eval reports (every model, each run a row, the best per
column starred) and what differs in their frozen configs (engine.store.compare, as `tas compare` shows it).
Esc or q goes back. Everything was read before the screen opens (tui.store_reader.CompareSnapshot)."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static, TabbedContent, TabPane

from engine.pipeline.models import label_of
from engine.store.compare import REPORT_METRICS
from tui.store_reader import CompareSnapshot
from tui.widgets.loss_chart import LossChart
from tui.widgets.text import RUN_COLOURS, clip

HIGHER_IS_BETTER = ("pass@1",)  # every other report metric (loss, perplexity, KL) is better lower
HEADINGS = {"loss": "loss", "perplexity": "ppl", "kl_to_assistant": "KL", "pass@1": "pass@1"}
SPECS = {"loss": ".3f", "perplexity": ".1f", "kl_to_assistant": ".4f", "pass@1": ".3f"}


class CompareScreen(Screen):
    DEFAULT_CSS = """
    CompareScreen #compare-title { height: 1; padding: 0 1; text-style: bold; }
    CompareScreen TabbedContent { height: 1fr; }
    CompareScreen #curves { height: 1fr; }
    CompareScreen LossChart { height: 1fr; min-height: 9; }
    CompareScreen .table { padding: 0 1; width: auto; }
    """

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("q", "app.pop_screen", "Back", show=False),
        Binding("1", "show('curves')", "Curves"),
        Binding("2", "show('evals')", "Evals"),
        Binding("3", "show('config')", "Config diff"),
        Binding("t", "next_series", "Series"),
    ]

    def __init__(self, snapshot: CompareSnapshot):
        super().__init__()
        self.snapshot = snapshot
        self.colours = {run.title: RUN_COLOURS[i % len(RUN_COLOURS)] for i, run in enumerate(snapshot.runs)}
        self.series = 0  # which of each stage's series the curves show (t: the next)

    def compose(self) -> ComposeResult:
        runs = Text("compare ")
        for i, run in enumerate(self.snapshot.runs):
            runs.append(("  " if i else "") + f"◆ {run.title}", style=self.colours[run.title])
        yield Static(runs, id="compare-title")
        with TabbedContent(initial="curves"):
            with TabPane("Curves", id="curves"), Vertical():
                for stage in self.snapshot.curves:
                    yield LossChart(id=f"curve-{stage}")
            with TabPane("Evals", id="evals"), VerticalScroll():
                yield Static(self.eval_text(), classes="table", id="eval-table")
            with TabPane("Config diff", id="config"), VerticalScroll():
                yield Static(self.config_text(), classes="table", id="config-diff")
        yield Footer()

    def on_mount(self) -> None:
        self.show_curves()

    def show_curves(self) -> None:
        """Each stage's chart: its series number `series` (sft: train, eval; distill: KD student, CE control)."""
        for stage, all_series in self.snapshot.curves.items():
            title, curves = all_series[self.series % len(all_series)]
            series = [(c.run, self.colours.get(c.run, ""), c.points) for c in curves]
            self.query_one(f"#curve-{stage}", LossChart).show(title, series, f"{title}: none of these runs logged it")

    def action_next_series(self) -> None:
        self.series += 1
        self.show_curves()

    def action_show(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def eval_text(self) -> Text:
        """Each model, each run a row; per model, the best value of each column starred."""
        runs = self.snapshot.runs
        table: dict[str, dict[str, list[Any]]] = {}
        for model, metric, values in self.snapshot.comparison.eval_rows:
            table.setdefault(model, {})[metric] = values
        if not table:
            return Text("none of these runs has an eval report yet (run its eval stage)", style="dim")
        text = Text()
        text.append(f"{'model':<11}{'run':<20}" + "".join(f"{HEADINGS[m]:>9}" for m in REPORT_METRICS), style="bold")
        for model, metrics in table.items():
            best = {m: _best(m, values) for m, values in metrics.items()}
            for i, run in enumerate(runs):
                text.append("\n")
                text.append(f"{label_of(model)[:10] if i == 0 else '':<11}")
                text.append(f"{clip(run.title, 19):<20}", style=self.colours[run.title])
                for metric in REPORT_METRICS:
                    value = metrics.get(metric, [None] * len(runs))[i]
                    if not isinstance(value, (int, float)):
                        text.append(f"{'—':>9}", style="dim")
                        continue
                    starred = value == best.get(metric)
                    cell = f"{value:{SPECS[metric]}}{'*' if starred else ' '}"
                    text.append(f"{cell:>9}", style="bold green" if starred else "")
        text.append("\n\n* best of these runs (lower loss, ppl, KL; higher pass@1)", style="dim")
        return text

    def config_text(self) -> Text:
        """Each key whose value differs, and its value in each run (frozen configs, secrets redacted)."""
        diff = self.snapshot.comparison.config_diff
        if not diff:
            return Text("their frozen configs are the same", style="dim")
        text = Text()
        for n, (key, values) in enumerate(diff):
            text.append(("\n" if n else "") + key, style="bold")
            for run, value in zip(self.snapshot.runs, values):
                text.append("\n  ◆ ", style=self.colours[run.title])
                text.append(f"{clip(run.title, 24)}: ")
                text.append("—" if value is None else str(value), style="dim" if value is None else "")
        return text


def _best(metric: str, values: list[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    if len(numbers) < 2:
        return None  # nothing to compare it with
    return max(numbers) if metric in HIGHER_IS_BETTER else min(numbers)
