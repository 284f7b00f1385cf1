"""The Stages tab: runs on the left; for the selected run, its pipeline with state, progress, ETA and
latest metrics, the selected stage's error when it has one, its loss curves (LOSS_SERIES: only series on one
scale share the chart), and its event log, wrapped at the log's width. Nothing is cut at 80x24: lines wrap,
and the last table column is cut to the room the others leave.

Everything shown is read from the run store, so runs started by the CLI, or by a panel that was killed,
appear and update exactly like our own (reattach is just reading). One reader does it: an async worker
that, every second or as soon as the selection changes, reads the store in a thread (one read at a time,
so the event tails are only ever used by one thread) and shows the snapshot on the event loop; a snapshot
read for a selection that has changed since is dropped. Widgets and the selection (`run_id`, `stage`) are
only touched on the event loop. Starting and cancelling go through engine.runner.launcher, in thread workers.

The run store, the launcher and the plot are imported by the reader, in a thread, once the panel has painted
its first frame (the app calls `start_reader`): the panel shows up before the config schema (pydantic) and
plotext are loaded.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.widgets import DataTable, OptionList, Static
from textual.widgets.option_list import Option

from engine.pipeline.models import STUDENT_KD, label_of
from engine.pipeline.stages import PIPELINE

if TYPE_CHECKING:
    from engine.store.events import EventTail
    from engine.store.runs import Run, RunStore, StageStatus

# The loss curves of each training stage: (label, colour, metric names, the first one logged is plotted).
# Only series on one scale share the chart. sft: the assistant's train and eval loss, both cross-entropy.
# distill: the KD student's `loss` is (1 - w)·CE + w·T²·KL, a different quantity from the CE-only control's
# loss (pure CE): on one axis a KD loss of ~3.4 beside a control at ~7 would suggest KD halves the loss. So
# the chart puts the KD student's CE part (`ce_loss`, logged beside `loss`) against the control's CE: the
# same measure on the same answer tokens. The total KD loss and its KL part stay in the metrics pane.
LOSS_SERIES = {
    "sft": [("train", "cyan", ("loss",)), ("eval", "magenta", ("eval_loss",))],
    "distill": [
        (STUDENT_KD.label, "cyan", ("ce_loss",)),
        ("CE-only control", "magenta", ("control/ce_loss", "control/loss")),
    ],
}
LOSS_TITLE = {"sft": "sft loss (CE)", "distill": "distill CE loss"}  # short: plotext drops a title wider than the plot
REFRESH_S = 1.0  # the reader reads the store this often (and at once when the selection changes)
# what the reader imports in its thread before its first read: the run store (and with it the config schema),
# and the two widgets that replace their placeholders then (plotext; RichLog brings rich.pretty and attrs)
READER_IMPORTS = (
    "engine.store.runs",
    "engine.store.events",
    "engine.store.render",
    "textual_plotext",
    "textual.widgets:RichLog",
)


def preload(*modules: str) -> None:
    """Import modules, or `module:name` (a lazily loaded attribute), in a thread: the event loop keeps
    painting meanwhile, and the imports on it later are found done."""
    for entry in modules:
        module, _, name = entry.partition(":")
        loaded = importlib.import_module(module)
        if name:
            getattr(loaded, name)


@dataclass
class RunSummary:
    id: str
    state: str  # live | finished | failed | cancelled | stopped | new
    name: str = ""  # the user's name for the run (tas run --name / tas note --name)


@dataclass
class StoreSnapshot:
    """What the reader read from the run store, for one selection."""

    selection: int  # the selection generation it was read for: shown only if still the current one
    runs: list[RunSummary]
    run_id: str | None
    stage: str
    stages: list[StageStatus]
    new_events: list[tuple[str, dict]]  # (stage, event) appended since the last read
    reset_log: bool
    losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    report: dict | None = None  # the eval stage's report.json, when the eval stage is selected


class StagesTab(Vertical):
    DEFAULT_CSS = """
    StagesTab { height: 1fr; }
    StagesTab #runs { width: 21; height: 1fr; border: round $primary 40%; scrollbar-size-vertical: 1; }
    StagesTab #runs:focus-within { border: round $primary; }
    StagesTab #right { width: 1fr; }
    StagesTab #pipeline { height: auto; max-height: 7; overflow-x: hidden; }
    StagesTab #detail { height: auto; padding: 0 1; color: $text-error; display: none; }
    StagesTab #middle { height: 2fr; min-height: 7; }
    StagesTab #middle.empty { height: auto; min-height: 3; }  /* no chart: the log gets the room */
    StagesTab #middle.empty > #chart { height: auto; }
    StagesTab #chart { width: 1fr; }
    StagesTab #loss { height: 1fr; }
    StagesTab #legend { height: auto; padding: 0 1; }
    StagesTab #no-chart { height: auto; padding: 1 1; color: $text-muted; display: none; }
    StagesTab #metrics { width: 30; padding: 0 1; }
    StagesTab #log { height: 1fr; min-height: 4; border-top: solid $primary 40%; scrollbar-gutter: stable; }
    """

    BINDINGS = [
        Binding("s", "start", "Start stage"),
        Binding("f", "start_from_here", "From here"),
        Binding("n", "new_run", "New run"),
        Binding("c", "cancel", "Cancel"),
        Binding("v", "code_results", "Results"),
        Binding("x", "export", f"Export {STUDENT_KD.title}", show=False),
    ]

    def __init__(self, config_path: str, runs_dir: Path | Callable[[], Path]):
        """`runs_dir`: the run store, or a function giving it (called off the event loop, on first use)."""
        super().__init__()
        self.config_path = config_path  # follows the app's config_path: new runs use this file
        self._runs_dir = runs_dir
        self._store: RunStore | None = None
        self._store_lock = threading.Lock()
        # the selection: event loop only
        self.run_id: str | None = None
        self.stage: str = PIPELINE[0]
        self._selection = 0  # bumped at every selection change (and read request)
        self._reader_started = False
        self._wake: asyncio.Event | None = None
        self.shown: tuple[str | None, str] | None = None  # (run, stage) of the snapshot on screen
        self.snapshots_shown = 0
        # the reader's state: used by one read at a time
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
                yield Static(id="detail")  # the selected stage's error, whole (wrapped), when it has one
                with Horizontal(id="middle"):
                    with Vertical(id="chart"):
                        yield Static(id="loss")  # the plot replaces it with the first snapshot
                        yield Static(id="no-chart")
                        yield Static(id="legend")
                    yield Static(id="metrics")
                yield Static(id="log")  # the event log replaces it with the first snapshot

    def on_mount(self) -> None:
        self.query_one("#runs", OptionList).border_title = "runs"
        self.query_one("#pipeline", DataTable).focus()
        self.watch(self.app, "config_path", self._config_path_changed, init=False)

    def _config_path_changed(self, path: str) -> None:
        self.config_path = path

    @property
    def store(self) -> RunStore:
        """The run store (opened on first use; imports it and may read the config: not on the event loop)."""
        with self._store_lock:
            if self._store is None:
                from engine.store.runs import RunStore

                self._store = RunStore(self._runs_dir() if callable(self._runs_dir) else self._runs_dir)
            return self._store

    @property
    def ready(self) -> bool:
        """The reader is running and a snapshot is on screen."""
        return self.snapshots_shown > 0

    # ---------------------------------------------------------------------------------- reading

    def start_reader(self) -> None:
        """Start reading the store (the panel does it once its first frame is painted; once)."""
        if not self._reader_started:
            self._reader_started = True
            self._reader()

    def refresh_store(self) -> None:
        """Read the store now (the selection changed, or a run was started): wakes the reader up, and
        drops whatever it is reading for the previous selection."""
        self._selection += 1
        if self._wake is not None:
            self._wake.set()

    @work(exclusive=True, group="stages-refresh")
    async def _reader(self) -> None:
        """The one reader of the run store, started once; never two reads at a time."""
        self._wake = asyncio.Event()
        try:
            await self._read_loop()
        except NoMatches:
            pass  # the tab is being removed (the app is closing) while a read was in flight: nothing to show

    async def _read_loop(self) -> None:
        await asyncio.to_thread(lambda: (preload(*READER_IMPORTS), self.store))
        await self._mount_deferred_widgets()
        while True:
            self._wake.clear()
            selection = self._selection
            snapshot = await asyncio.to_thread(self._read, selection, self.run_id, self.stage)
            if snapshot.selection == self._selection:
                self._show(snapshot)
            else:
                self._tails_key = None  # its events were read for nothing: the next read starts the log over
            try:
                await asyncio.wait_for(self._wake.wait(), REFRESH_S)
            except TimeoutError:
                pass

    async def _mount_deferred_widgets(self) -> None:
        """The loss plot and the event log, in place of their placeholders (imported by now)."""
        from textual_plotext import PlotextPlot

        await self.query_one("#loss", Static).remove()
        await self.query_one("#chart", Vertical).mount(PlotextPlot(id="loss"), before=0)
        await self.query_one("#log", Static).remove()
        await self.query_one("#right", Vertical).mount(event_log_class()(id="log"))

    def _read(self, selection: int, run_id: str | None, stage: str) -> StoreSnapshot:
        """Read the store for one selection (in a thread: touches no widget and no selection state)."""
        from engine.store.events import EventTail
        from engine.store.runs import read_json

        runs = self.store.list()
        summaries, selected = [], None
        for run in runs[:50]:
            stages = run.stages()
            summaries.append(RunSummary(run.id, run.overall_state(stages), run.name))
            if run.id == run_id:
                selected = (run, stages)
        if selected is None and runs:
            selected = (runs[0], runs[0].stages())
        if selected is None:
            return StoreSnapshot(selection, summaries, None, stage, [], [], reset_log=True)
        run, stages = selected
        key = (run.id, stage)
        reset = key != self._tails_key
        if reset:
            self._tails = {stage: EventTail(run.stage_dir(stage) / "events.jsonl")}
            self._tails_key = key
        new_events = [(name, e) for name, tail in self._tails.items() for e in tail.poll()]
        report = read_json(run.stage_dir("eval") / "report.json") if stage == "eval" else None
        return StoreSnapshot(
            selection, summaries, run.id, stage, stages, new_events, reset, self._losses(run, stage), report
        )

    @staticmethod
    def _losses(run: Run, stage: str) -> dict[str, list[tuple[int, float]]]:
        """The selected stage's loss curves (LOSS_SERIES), by label; none for a stage that does not train."""
        from engine.store.events import read_events

        wanted = {name for _, _, names in LOSS_SERIES.get(stage, ()) for name in names}
        if not wanted:
            return {}
        logged: dict[str, list[tuple[int, float]]] = {}
        for event in read_events(run.stage_dir(stage) / "events.jsonl"):
            if (
                event.get("kind") == "metric"
                and event.get("name") in wanted
                and event.get("step") is not None
                and isinstance(event.get("value"), (int, float))
            ):
                logged.setdefault(event["name"], []).append((int(event["step"]), float(event["value"])))
        series = {}
        for label, _, names in LOSS_SERIES[stage]:
            name = next((n for n in names if logged.get(n)), None)
            if name is not None:
                series[label] = logged[name]
        return series

    # --------------------------------------------------------------------------------- showing

    def _show(self, snapshot: StoreSnapshot) -> None:
        from engine.store.render import event_line

        self.run_id = snapshot.run_id
        self._stages = snapshot.stages
        self._show_runs(snapshot.runs)
        self._show_pipeline(snapshot.stages)
        self._show_detail()
        self._show_losses(snapshot.stage, snapshot.losses)
        self._show_metrics(snapshot.report)
        log = self.query_one("#log", event_log_class())
        if snapshot.reset_log:
            log.reset()
            log.border_title = f"{snapshot.stage} events"
        for stage, event in snapshot.new_events:
            line = event_line(stage, event)
            if line and event.get("kind") not in ("progress", "memory", "metric"):  # those have their own panes
                log.add(Text.from_markup(line))
        self.shown = (snapshot.run_id, snapshot.stage)
        self.snapshots_shown += 1

    def _show_runs(self, runs: list[RunSummary]) -> None:
        """One line a run (its glyph and its id less the date, which heads each day's runs), and the user's
        name for it, if any, on a second line: ids never wrap in the narrow list."""
        from engine.store.render import RUN_STYLE

        option_list = self.query_one("#runs", OptionList)
        room = max(8, option_list.scrollable_content_region.width or RUNS_ROOM)
        options, day = [], None
        for run in runs:
            date, short = split_run_id(run.id)
            if date != day:
                day = date
                options.append(Option(Text(date or "other runs", style="dim"), id=f"day:{date}", disabled=True))
            glyph, style = RUN_STYLE.get(run.state, ("?", ""))
            label = Text.assemble((f"{glyph} ", style), clip(short, room - 2))
            if run.name:
                label.append("\n  " + clip(run.name, room - 2), style="italic")
            options.append(Option(label, id=run.id))
        current = [o.id for o in option_list.options]
        if current != [o.id for o in options]:
            option_list.set_options(options)
        else:
            for index, option in enumerate(options):
                option_list.replace_option_prompt_at_index(index, option.prompt)
        if self.run_id is not None and any(r.id == self.run_id for r in runs):
            index = option_list.get_option_index(self.run_id)
            if option_list.highlighted != index:
                option_list.highlighted = index
        if not runs:
            option_list.set_options([Option(Text("no runs yet: press n", style="dim"), disabled=True)])

    def _show_pipeline(self, stages: list[StageStatus]) -> None:
        """The stages, one row each. Column widths follow their cells (also when a cell is updated), and the
        last column is cut to the room the others leave, so no column is pushed out of sight."""
        from rich.cells import cell_len

        from engine.store.render import STATE_STYLE, bar, duration, metrics_text, number

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
            eta = (
                duration(status.eta_s)
                if status.eta_s is not None
                else (duration(status.elapsed) if status.ended_at else "")
            )
            latest = status.error or metrics_text(status, limit=2)
            rows.append([status.name, state, progress, eta, " ".join(latest.split())])
        labels = [str(column.label) for column in table.columns.values()]
        widths = [max([cell_len(labels[i])] + [cell_len(str(row[i])) for row in rows]) for i in range(4)]
        # each column has one cell of padding either side
        room = (table.scrollable_content_region.width or 40) - sum(widths) - 2 * len(labels)
        for row in rows:
            row[4] = clip(row[4], max(room, cell_len(labels[4])))
        if table.row_count != len(rows):
            table.clear()
            for row in rows:
                table.add_row(*row, key=row[0])
        else:
            for row in rows:
                for column, value in zip(table.columns, row):
                    table.update_cell(row[0], column, value, update_width=True)

    def _show_detail(self) -> None:
        """The selected stage's error (or why it was cancelled), wrapped, under the table; the log has it too,
        so when it is longer than a few lines the end is cut here and said to be there."""
        import textwrap

        detail = self.query_one("#detail", Static)
        status = next((s for s in self._stages if s.name == self.stage), None)
        problem = status and (status.error or (status.message if status.state == "cancelled" else None))
        if not problem:
            detail.display = False
            return
        width = max(20, (self.query_one("#right").size.width or 60) - 2)
        from engine.store.render import STATE_STYLE

        glyph = STATE_STYLE.get(status.state, ("?", ""))[0]
        detail.styles.color = "magenta" if status.state == "cancelled" else None  # else the CSS colour ($text-error)
        lines = textwrap.wrap(f"{glyph} {status.name} {status.state}: {' '.join(problem.split())}", width)
        most = max(2, self.size.height // 6)
        if len(lines) > most:
            lines = lines[:most]
            lines[-1] = clip(lines[-1] + " …", width - 23) + " (the rest: in the log)"
        detail.update(Text("\n".join(lines)))
        detail.display = True

    def _show_losses(self, stage: str, losses: dict[str, list[tuple[int, float]]]) -> None:
        """The selected stage's loss curves, titled with the stage; the legend is a line of its own under
        the plot (plotext draws its legend over the first points); steps are whole numbers."""
        from textual_plotext import PlotextPlot

        plot = self.query_one("#loss", PlotextPlot)
        message = self.query_one("#no-chart", Static)
        legend = self.query_one("#legend", Static)
        self.query_one("#middle").set_class(not losses, "empty")
        if not losses:
            plot.display = legend.display = False
            message.update(
                f"no training metrics for {stage}" if stage not in LOSS_SERIES else f"no {stage} loss logged yet"
            )
            message.display = True
            return
        message.display = False
        plot.display = legend.display = True
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(LOSS_TITLE.get(stage, f"{stage}: loss"))
        colours = {label: colour for label, colour, _ in LOSS_SERIES.get(stage, ())}
        for label, points in losses.items():
            steps, values = zip(*sorted(points))
            plt.plot(list(steps), list(values), marker="braille", color=colours.get(label, "default"))
        steps = sorted({step for points in losses.values() for step, _ in points})
        plt.xticks(integer_ticks(steps[0], steps[-1], 5))  # 5 at most: the labels fit an 80-column panel
        legend.update(Text("  ").join(Text.assemble(("━━ ", colours.get(label, "")), label) for label in losses))
        plot.refresh()

    def _show_metrics(self, report: dict | None = None) -> None:
        from engine.store.render import duration, number

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
        if event.option.id and not event.option.disabled and event.option.id != self.run_id:
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
        self._confirm_start([self.stage], self.run_id, self.config_path)

    def action_start_from_here(self) -> None:
        self._confirm_start(list(PIPELINE[PIPELINE.index(self.stage) :]), self.run_id, self.config_path)

    def action_new_run(self) -> None:
        self._confirm_start(list(PIPELINE), None, self.config_path)

    def _confirm_start(self, stages: list[str], run_id: str | None, config_path: str) -> None:
        """Starting may take hours: say what will start (stages, run, config file), whether each stage fits its GPU
        (engine.plan), and wait for y / Enter."""
        from engine.plan.render import summary
        from tui.screens.confirm import ConfirmScreen

        if run_id is None:
            question = "Start a new run?"
            run, config = "new run", config_path
        else:
            question = f"Start {'stage' if len(stages) == 1 else 'stages'} in run {run_id}?"
            frozen = (
                self._store.root / run_id / "config.yaml" if self._store is not None else Path(run_id, "config.yaml")
            )
            run, config = run_id, f"{_shown_path(frozen)} (the run's frozen copy)"
        details = [("stages", " → ".join(stages)), ("run", run), ("config", config)]
        memory = summary(config_path if run_id is None else frozen, stages)  # engine.plan: will each stage fit?

        def answered(yes: bool | None) -> None:
            if yes:
                self._start(stages, run_id, config_path)

        screen = ConfirmScreen(question, details + memory.lines, yes="start", no="cancel", warning=memory.warning)
        self.app.push_screen(screen, answered)

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
    def _start(self, stages: list[str], run_id: str | None, config_path: str) -> None:
        """Start `stages` in run `run_id`, or in a new run of `config_path` when there is none."""
        from engine.config.errors import ConfigError
        from engine.config.load import load_config
        from engine.runner import launcher

        try:
            if run_id is None:
                run = self.store.create(load_config(config_path), config_path)
            else:
                run = self.store.get(run_id)
            launcher.start(run, stages)
        except (ConfigError, launcher.CannotStart, ValueError, LookupError, OSError) as exc:
            self.app.call_from_thread(self.notify, str(exc), title="cannot start", severity="error", timeout=8)
            return
        self.app.call_from_thread(self._started, run.id, stages)

    def _started(self, run_id: str, stages: list[str]) -> None:
        self.notify(f"run {run_id}: started {', '.join(stages)}")
        self.run_id = run_id
        self.refresh_store()

    def action_code_results(self) -> None:
        if self.run_id is None:
            self.notify("no run selected yet", timeout=3)
            return
        self._open_code_results(self.run_id)

    @work(thread=True, group="stages-actions")
    def _open_code_results(self, run_id: str) -> None:
        """The selected run's code eval, problem by problem (the store is read off the event loop)."""
        from tui.screens.code_results import CodeResultsScreen

        try:
            code_dir = self.store.get(run_id).stage_dir("eval") / "code"
        except (LookupError, OSError) as exc:
            self.app.call_from_thread(self.notify, str(exc), title="cannot open results", severity="error")
            return
        if not code_dir.is_dir():
            self.app.call_from_thread(
                self.notify,
                f"run {run_id} has no code results yet: run its eval stage (eval.code.benchmark: humaneval)",
                title="no code results",
                timeout=6,
            )
            return
        self.app.call_from_thread(self.app.push_screen, CodeResultsScreen(run_id, code_dir))

    def action_export(self) -> None:
        if self.run_id is None:
            self.notify("no run selected yet", timeout=3)
            return
        self._export(self.run_id)

    @work(thread=True, group="stages-export", exclusive=True)
    def _export(self, run_id: str) -> None:
        """`tas export RUN`: the KD student as a merged, servable folder (the merge loads the ML stack, so it
        runs in a process of its own, as the CLI runs it)."""
        from engine.export.plan import ExportRefused, prepare, run_export
        from engine.store.runs import RunIsLive

        notify = self.app.call_from_thread
        try:
            run = self.store.get(run_id)
            source, out = prepare(run, STUDENT_KD.target)
        except (ExportRefused, RunIsLive, LookupError, OSError) as exc:
            notify(self.notify, str(exc), title="cannot export", severity="error", timeout=8)
            return
        notify(self.notify, f"exporting the {source.label} of run {run_id} …", timeout=4)
        code, why = run_export(run, source.target, out, capture_errors=True)
        if code != 0:
            notify(self.notify, why, title="export failed", severity="error", timeout=10)
            return
        notify(self.notify, f"{out}\n(tas export {run_id} --push uploads it)", title="exported", timeout=10)

    @work(thread=True, group="stages-actions")
    def _cancel(self, run_id: str) -> None:
        from engine.runner import launcher

        run = self.store.get(run_id)
        self.app.call_from_thread(self.notify, f"cancelling run {run_id}…")
        stopped = launcher.cancel(run)
        self.app.call_from_thread(self.notify, f"run {run_id}: {'cancelled' if stopped else 'nothing was running'}")


def integer_ticks(low: int, high: int, most: int) -> list[int]:
    """At most `most` whole-number ticks from `low` to `high`, at a round spacing (1, 2, 5, 10, 20, 50, …)."""
    if high <= low:
        return [low]
    for spacing in (m * 10**e for e in range(16) for m in (1, 2, 5)):
        ticks = list(range(-(-low // spacing) * spacing, high + 1, spacing))
        if len(ticks) <= max(most, 2):
            return ticks or [low]
    return [low, high]


RUNS_ROOM = 16  # the run list's text width (21 columns less border, padding and scrollbar) before layout


def clip(text: str, width: int) -> str:
    """`text` in at most `width` cells, its end replaced by … when cut."""
    from rich.cells import cell_len, set_cell_size

    return text if cell_len(text) <= width else set_cell_size(text, max(width - 1, 0)) + "…"


def split_run_id(run_id: str) -> tuple[str, str]:
    """("2026-11-25", "080000-tiny") for "20261125-080000-tiny"; ("", run_id) for ids not made by the store."""
    date, sep, rest = run_id.partition("-")
    if sep and rest and len(date) == 8 and date.isdigit():
        return f"{date[:4]}-{date[4:6]}-{date[6:]}", rest
    return "", run_id


@functools.cache
def event_log_class() -> type:
    """The event log: a RichLog that wraps each line at its own width (RichLog's default `min_width` of 78
    renders lines wider than an 80-column panel shows, which then cuts their middle off), and wraps them
    again when its width changes. Made on first use: RichLog is imported after the first frame."""
    from textual.events import Resize
    from textual.widgets import RichLog

    class EventLog(RichLog):
        def __init__(self, id: str):
            super().__init__(id=id, markup=True, wrap=True, min_width=1, max_lines=2000)
            self.entries: deque[Text] = deque(maxlen=2000)
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

    return EventLog


def _shown_path(path: Path) -> str:
    """`path` relative to the working directory when it is under it (shorter), else as it is."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _cell(numbers: dict, key: str, width: int, spec: str) -> str:
    value = numbers.get(key)
    return f"{value:>{width}{spec}}" if isinstance(value, (int, float)) else f"{'—':>{width}}"


def eval_table(report: dict) -> Text:
    """The eval report as aligned lines, models side by side: lower loss / KL is better, higher pass@1.

    The teacher has its own tokenizer, so only the code benchmark compares it (—: not measured).
    """
    text = Text()
    text.append(f"{'model':<10}{'loss':>6}{'ppl':>6}{'KL':>6}{'pass@1':>7}\n", style="bold")  # 35 columns
    for name, numbers in report["models"].items():
        if not isinstance(numbers, dict):
            continue
        text.append(
            f"{label_of(name)[:10]:<10}{_cell(numbers, 'loss', 6, '.2f')}"
            f"{_cell(numbers, 'perplexity', 6, '.0f')}{_cell(numbers, 'kl_to_assistant', 6, '.3f')}"
            f"{_cell(numbers, 'pass@1', 7, '.2f')}\n"
        )
    code = report.get("code") or {}
    note = f"{report.get('examples', '?')} answers; KL to assistant"
    if code:
        note += f"; {code.get('benchmark')} {code.get('problems')} problems (v: each problem)"
    note += f"; x exports the {STUDENT_KD.title}"
    text.append(note, style="dim")
    return text
