"""The Stages tab: runs on the left; for the selected run, its pipeline with state, progress, ETA and
latest metrics, a live loss curve, and the event log of the selected stage.

Everything shown is read from the run store every second in a thread worker, so runs started by the
CLI, or by a panel that was killed, appear and update exactly like our own (reattach is just reading).
Starting and cancelling go through engine.core.launcher, also in thread workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, OptionList, RichLog, Static
from textual.widgets.option_list import Option
from textual_plotext import PlotextPlot

from engine.core import launcher
from engine.core.config import ConfigError, load_config
from engine.core.events import EventTail
from engine.core.pipeline import PIPELINE
from engine.core.render import STATE_STYLE, bar, duration, event_line, metrics_text, number
from engine.core.runs import Run, RunStore, StageStatus, read_json

LOSS_METRICS = ("loss", "eval_loss", "control/loss", "control/eval_loss")


@dataclass
class RunSummary:
    id: str
    state: str  # live | finished | failed | cancelled | stopped | new


@dataclass
class StoreSnapshot(Message):
    """What the refresh worker read from the run store."""

    runs: list[RunSummary]
    run_id: str | None
    stages: list[StageStatus]
    new_events: list[tuple[str, dict]]  # (stage, event) appended since the last read
    reset_log: bool
    losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    report: dict | None = None  # the eval stage's report.json, when the eval stage is selected


RUN_GLYPH = {"live": ("▶", "bold yellow"), "finished": ("✓", "green"), "failed": ("✗", "red"),
             "died": ("†", "red"), "cancelled": ("■", "magenta"), "stopped": ("‖", "yellow"), "new": ("·", "dim")}


class StagesTab(Vertical):
    DEFAULT_CSS = """
    StagesTab { height: 1fr; }
    StagesTab #runs { width: 26; height: 1fr; border: round $primary 40%; }
    StagesTab #runs:focus-within { border: round $primary; }
    StagesTab #right { width: 1fr; }
    StagesTab #pipeline { height: auto; max-height: 7; overflow-x: hidden; }
    StagesTab #middle { height: 8; }
    StagesTab #loss { width: 1fr; }
    StagesTab #metrics { width: 30; padding: 0 1; }
    StagesTab #log { height: 1fr; border-top: solid $primary 40%; }
    """

    BINDINGS = [
        Binding("s", "start", "Start/resume stage"),
        Binding("f", "start_from_here", "From here"),
        Binding("n", "new_run", "New run"),
        Binding("c", "cancel", "Cancel run"),
    ]

    def __init__(self, config_path: str, runs_dir: Path):
        super().__init__()
        self.config_path = config_path
        self.store = RunStore(runs_dir)
        self.run_id: str | None = None
        self.stage: str = PIPELINE[0]
        self._tails: dict[str, EventTail] = {}
        self._tails_key: tuple[str | None, str] | None = None
        self._cancel_armed_at = 0.0
        self._stages: list[StageStatus] = []

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield OptionList(id="runs")
            with Vertical(id="right"):
                table = DataTable(id="pipeline", cursor_type="row", zebra_stripes=False)
                table.add_columns("stage", "state", "progress", "ETA", "latest")
                yield table
                with Horizontal(id="middle"):
                    yield PlotextPlot(id="loss")
                    yield Static(id="metrics")
                yield RichLog(id="log", markup=True, wrap=True, max_lines=2000)

    def on_mount(self) -> None:
        self.query_one("#runs", OptionList).border_title = "runs"
        self.query_one("#pipeline", DataTable).focus()
        self.refresh_store()
        self.set_interval(1.0, self.refresh_store)

    # ---------------------------------------------------------------------------------- reading

    @work(thread=True, exclusive=True, group="stages-refresh")
    def refresh_store(self) -> None:
        runs = self.store.list()
        summaries, selected = [], None
        for run in runs[:50]:
            stages = run.stages()
            summaries.append(RunSummary(run.id, run.overall_state(stages)))
            if run.id == self.run_id:
                selected = (run, stages)
        if selected is None and runs:
            selected = (runs[0], runs[0].stages())
        if selected is None:
            self.post_message(StoreSnapshot(summaries, None, [], [], reset_log=True))
            return
        run, stages = selected
        key = (run.id, self.stage)
        reset = key != self._tails_key
        if reset:
            self._tails = {self.stage: EventTail(run.stage_dir(self.stage) / "events.jsonl")}
            self._tails_key = key
        new_events = [(stage, e) for stage, tail in self._tails.items() for e in tail.poll()]
        report = read_json(run.stage_dir("eval") / "report.json") if self.stage == "eval" else None
        self.post_message(StoreSnapshot(summaries, run.id, stages, new_events, reset, self._losses(run), report))

    def _losses(self, run: Run) -> dict[str, list[tuple[int, float]]]:
        """Loss curves of the selected stage, or of the last training stage that has some."""
        from engine.core.events import read_events

        candidates = [self.stage] + [s for s in ("distill", "sft") if s != self.stage]
        for stage in candidates:
            series: dict[str, list[tuple[int, float]]] = {}
            for event in read_events(run.stage_dir(stage) / "events.jsonl"):
                if event.get("kind") == "metric" and event.get("name") in LOSS_METRICS and event.get("step") is not None:
                    series.setdefault(f"{stage} {event['name']}", []).append((event["step"], float(event["value"])))
            if series:
                return series
        return {}

    # --------------------------------------------------------------------------------- showing

    @on(StoreSnapshot)
    def show_snapshot(self, message: StoreSnapshot) -> None:
        self.run_id = message.run_id
        self._stages = message.stages
        self._show_runs(message.runs)
        self._show_pipeline(message.stages)
        self._show_losses(message.losses)
        self._show_metrics(message.report)
        log = self.query_one("#log", RichLog)
        if message.reset_log:
            log.clear()
            log.border_title = f"{self.stage} events"
        for stage, event in message.new_events:
            line = event_line(stage, event)
            if line and event.get("kind") not in ("progress", "memory", "metric"):  # those have their own panes
                log.write(Text.from_markup(line))

    def _show_runs(self, runs: list[RunSummary]) -> None:
        option_list = self.query_one("#runs", OptionList)
        options = []
        for run in runs:
            glyph, style = RUN_GLYPH.get(run.state, ("?", ""))
            options.append(Option(Text.assemble((f"{glyph} ", style), run.id), id=run.id))
        current = [o.id for o in option_list.options]
        if current != [o.id for o in options]:
            option_list.set_options(options)
        else:
            for index, option in enumerate(options):
                option_list.replace_option_prompt_at_index(index, option.prompt)
        if self.run_id is not None:
            index = next((i for i, r in enumerate(runs) if r.id == self.run_id), None)
            if index is not None and option_list.highlighted != index:
                option_list.highlighted = index
        if not runs:
            option_list.set_options([Option(Text("no runs yet: press n", style="dim"), disabled=True)])

    def _show_pipeline(self, stages: list[StageStatus]) -> None:
        table = self.query_one("#pipeline", DataTable)
        rows = []
        for status in stages:
            glyph, style = STATE_STYLE.get(status.state, ("?", ""))
            state = Text(f"{glyph} {status.state}", style=style)
            fraction = status.fraction
            if fraction is not None:
                progress = f"{bar(fraction, 10)} {fraction * 100:3.0f}%"
            elif status.progress:
                progress = f"{number(status.progress.get('done'))} {status.progress.get('unit', '')}"
            else:
                progress = ""
            eta = duration(status.eta_s) if status.eta_s is not None else (duration(status.elapsed) if status.ended_at else "")
            latest = status.error or metrics_text(status, limit=2)
            rows.append((status.name, state, progress, eta, latest[:40]))
        if table.row_count != len(rows):
            table.clear()
            for row in rows:
                table.add_row(*row, key=row[0])
        else:
            for row in rows:
                for column, value in zip(table.columns, row):
                    table.update_cell(row[0], column, value)

    def _show_losses(self, losses: dict[str, list[tuple[int, float]]]) -> None:
        plot = self.query_one("#loss", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("loss" if losses else "loss (no training metrics yet)")
        for name, points in losses.items():
            steps, values = zip(*points)
            plt.plot(list(steps), list(values), label=name.split(" ", 1)[1], marker="braille")
        plot.refresh()

    def _show_metrics(self, report: dict | None = None) -> None:
        status = next((s for s in self._stages if s.name == self.stage), None)
        panel = self.query_one("#metrics", Static)
        if status is None:
            panel.update("")
            return
        if report and isinstance(report.get("models"), dict):
            panel.update(eval_table(report))
            return
        lines = [f"[b]{status.name}[/b]  {status.state}"]
        if status.elapsed is not None:
            lines.append(f"elapsed {duration(status.elapsed)}")
        if status.progress:
            p = status.progress
            total = f"/{number(p.get('total'))}" if p.get("total") else ""
            lines.append(f"{number(p.get('done'))}{total} {p.get('unit', '')}")
        for name, event in list(status.metrics.items())[:5]:
            lines.append(f"{name[:16]:<16} {number(event.get('value'))}")
        panel.update("\n".join(lines))

    # -------------------------------------------------------------------------------- selection

    @on(OptionList.OptionHighlighted, "#runs")
    def select_run(self, event: OptionList.OptionHighlighted) -> None:
        if event.option.id and event.option.id != self.run_id:
            self.run_id = event.option.id
            self.refresh_store()

    @on(DataTable.RowHighlighted, "#pipeline")
    def select_stage(self, event: DataTable.RowHighlighted) -> None:
        stage = event.row_key.value if event.row_key else None
        if stage and stage != self.stage:
            self.stage = stage
            self.refresh_store()

    # ---------------------------------------------------------------------------------- actions

    def action_start(self) -> None:
        self._start([self.stage], new_run=self.run_id is None)

    def action_start_from_here(self) -> None:
        stages = list(PIPELINE[PIPELINE.index(self.stage):])
        self._start(stages, new_run=self.run_id is None)

    def action_new_run(self) -> None:
        self._start(list(PIPELINE), new_run=True)

    def action_cancel(self) -> None:
        if self.run_id is None:
            return
        now = time.monotonic()
        if now - self._cancel_armed_at > 3:
            self._cancel_armed_at = now
            self.notify(f"press c again to cancel run {self.run_id}", timeout=3)
            return
        self._cancel_armed_at = 0
        self._cancel(self.run_id)

    @work(thread=True, group="stages-actions")
    def _start(self, stages: list[str], new_run: bool) -> None:
        try:
            if new_run:
                config = load_config(self.config_path)
                run = self.store.create(config, self.config_path)
            else:
                run = self.store.get(self.run_id)
            launcher.start(run, stages)
        except (ConfigError, launcher.CannotStart, ValueError, LookupError, OSError) as exc:
            self.app.call_from_thread(self.notify, str(exc), title="cannot start", severity="error", timeout=8)
            return
        self.run_id = run.id
        self.app.call_from_thread(self.notify, f"run {run.id}: started {', '.join(stages)}")
        self.refresh_store()

    @work(thread=True, group="stages-actions")
    def _cancel(self, run_id: str) -> None:
        run = self.store.get(run_id)
        self.app.call_from_thread(self.notify, f"cancelling run {run_id}…")
        stopped = launcher.cancel(run)
        self.app.call_from_thread(self.notify, f"run {run_id}: {'cancelled' if stopped else 'nothing was running'}")


EVAL_LABELS = {"assistant": "assistant", "student_kd": "KD student", "student_ce": "CE student"}


def eval_table(report: dict) -> Text:
    """The eval report as a few aligned lines: lower loss / KL is better."""
    text = Text()
    text.append(f"{'held-out':<10}{'loss':>6}{'ppl':>6}{'KL':>6}\n", style="bold")  # 28 columns
    for name, numbers in report["models"].items():
        try:
            row = f"{EVAL_LABELS.get(name, name)[:10]:<10}{numbers['loss']:>6.2f}{numbers['perplexity']:>6.0f}" \
                  f"{numbers['kl_to_assistant']:>6.3f}\n"
        except (KeyError, TypeError, ValueError):
            continue
        text.append(row)
    text.append(f"{report.get('examples', '?')} answers; KL to assistant", style="dim")
    return text
