"""The Stages tab: runs on the left; for the selected run, its pipeline with state, progress, ETA and
latest metrics, the selected stage's error when it has one, its loss curves (store_reader.LOSS_SERIES: only
series on one scale share the chart), and its event log, wrapped at the log's width, or (`l`) its worker log,
followed live. Nothing is cut at 80x24: lines wrap, and the last table column is cut to the room the others
leave. Runs marked in the list (`m`) open side by side in the compare screen (`C`).

Everything shown is read from the run store, so runs started by the CLI, or by a panel that was killed,
appear and update exactly like our own (reattach is just reading). One reader does it (tui.store_reader): an
async worker that, every second or as soon as the selection changes, reads the store in a thread (one read
at a time, so the tails are only ever used by one thread) and shows the snapshot on the event loop; a
snapshot read for a selection that has changed since is dropped. Widgets and the selection (`run_id`,
`stage`) are only touched on the event loop. Starting and cancelling go through engine.runner.launcher, in
thread workers.

First frame: the reader module (the run store, and with it the config schema), the plot, the logs and what
the actions use are imported in a thread once the panel has painted its first frame (the app calls
`start_reader`), so the imports inside functions below find them loaded; the panel shows up first.
"""

from __future__ import annotations

import asyncio
import importlib
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.widgets import DataTable, OptionList, Static

from engine.pipeline.models import STUDENT_KD
from engine.pipeline.stages import PIPELINE
from tui.screens.confirm import ConfirmScreen
from tui.widgets.metrics_pane import MetricsPane
from tui.widgets.pipeline_table import PipelineTable
from tui.widgets.run_list import RunList
from tui.widgets.text import clip

if TYPE_CHECKING:
    from engine.store.runs import RunStore
    from tui.store_reader import StageRow, StoreReader, StoreSnapshot

REFRESH_S = 1.0  # the reader reads the store this often (and at once when the selection changes)
# what the reader imports in its thread before its first read: the reader (the run store, the config schema),
# the widgets that replace their placeholders then (plotext; RichLog brings rich.pretty and attrs) and what
# the actions and the compare screen use
READER_IMPORTS = (
    "tui.store_reader",
    "tui.widgets.loss_chart",
    "tui.widgets.event_log",
    "tui.widgets.log_view",
    "tui.screens.compare",
    "engine.runner.launcher",
)


def preload(*modules: str) -> None:
    """Import modules, or `module:name` (a lazily loaded attribute), in a thread: the event loop keeps
    painting meanwhile, and the imports on it later are found done."""
    for entry in modules:
        module, _, name = entry.partition(":")
        loaded = importlib.import_module(module)
        if name:
            getattr(loaded, name)


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
    StagesTab #worker-log { display: none; }
    StagesTab.-worker-log #worker-log { display: block; }
    StagesTab.-worker-log #middle, StagesTab.-worker-log #log { display: none; }
    """

    BINDINGS = [
        Binding("s", "start", "Start"),
        Binding("f", "start_from_here", "From here"),
        Binding("n", "new_run", "New run"),
        Binding("c", "cancel", "Cancel"),
        Binding("v", "code_results", "Code"),
        Binding("l", "worker_log", "Log"),
        Binding("m", "mark", "Mark"),
        Binding("C", "compare", "Compare"),
        Binding("x", "export", f"Export {STUDENT_KD.title}", show=False),
    ]
    # The keys of where the focus is, so that the footer holds them at 80 columns: the run list's (mark, compare
    # and new run, cancel), the pipeline's (a stage's), the worker log's own (search, traceback) and `l` back.
    RUN_LIST_KEYS = {"new_run", "cancel", "mark", "compare"}
    LOG_KEYS = {"worker_log"}

    def __init__(self, config_path: str, runs_dir: Path | Callable[[], Path]):
        """`runs_dir`: the run store, or a function giving it (called off the event loop, on first use)."""
        super().__init__()
        self.config_path = config_path  # follows the app's config_path: new runs use this file
        self._runs_dir = runs_dir
        self.reader: StoreReader | None = None  # made in a thread by the first read
        # the selection: event loop only
        self.run_id: str | None = None
        self.stage: str = PIPELINE[0]
        self.follow_log = False  # the worker log is shown (and read) instead of the events
        self._selection = 0  # bumped at every selection change (and read request)
        self._reader_started = False
        self._wake: asyncio.Event | None = None
        self.shown: tuple[str | None, str] | None = None  # (run, stage) of the snapshot on screen
        self.snapshots_shown = 0
        self._cancel_armed_at = 0.0
        self._selected: StageRow | None = None

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield RunList(id="runs")
            with Vertical(id="right"):
                yield PipelineTable(id="pipeline")
                yield Static(id="detail")  # the selected stage's error, whole (wrapped), when it has one
                with Horizontal(id="middle"):
                    yield Vertical(Static(id="loss"), id="chart")  # the loss chart replaces it, once imported
                    yield MetricsPane(id="metrics")
                yield Static(id="log")  # the event log replaces it with the first snapshot
                yield Static(id="worker-log")  # the worker log too

    def on_mount(self) -> None:
        self.query_one("#runs", OptionList).border_title = "runs"
        self.query_one("#pipeline", DataTable).focus()
        self.watch(self.app, "config_path", self._config_path_changed, init=False)

    def _config_path_changed(self, path: str) -> None:
        self.config_path = path

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Each key where it belongs (see RUN_LIST_KEYS); a key of another place is off and not in the footer."""
        focused = self.screen.focused  # (not the app's: a modal over the tab has its own)
        if focused is None or self not in focused.ancestors:
            return True
        if focused.id == "runs":
            return action in self.RUN_LIST_KEYS
        if any(widget.id == "worker-log" for widget in focused.ancestors):
            return action in self.LOG_KEYS
        return action not in ("mark", "compare")

    @property
    def store(self) -> RunStore:
        """The run store (opened on first use; may read the config: not on the event loop)."""
        return self._open_reader().store

    def _open_reader(self) -> StoreReader:
        from tui.store_reader import StoreReader  # in a thread: it imports the run store

        if self.reader is None:
            self.reader = StoreReader(self._runs_dir)
        return self.reader

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
            snapshot = await asyncio.to_thread(self._read, selection, self.run_id, self.stage, self.follow_log)
            if snapshot.selection == self._selection:
                self._show(snapshot)
            else:
                self.reader.forget()  # its lines were read for nothing: the next read starts the logs over
            try:
                await asyncio.wait_for(self._wake.wait(), REFRESH_S)
            except TimeoutError:
                pass

    async def _mount_deferred_widgets(self) -> None:
        """The loss chart, the event log and the worker log, in place of their placeholders (imported by now)."""
        from tui.widgets.event_log import EventLog
        from tui.widgets.log_view import LogView
        from tui.widgets.loss_chart import LossChart

        right = self.query_one("#right", Vertical)
        await self.query_one("#chart").remove()
        await self.query_one("#middle", Horizontal).mount(LossChart(id="chart"), before=0)
        await self.query_one("#log", Static).remove()
        await self.query_one("#worker-log", Static).remove()
        await right.mount(EventLog(id="log"))
        await right.mount(LogView(id="worker-log"))

    def _read(self, selection: int, run_id: str | None, stage: str, follow_log: bool = False) -> StoreSnapshot:
        """Read the store for one selection (in a thread: touches no widget and no selection state)."""
        return self.reader.read(selection, run_id, stage, follow_log)

    # --------------------------------------------------------------------------------- showing

    def _show(self, snapshot: StoreSnapshot) -> None:
        self.run_id = snapshot.run_id
        self._selected = snapshot.selected
        self.query_one("#runs", RunList).show(snapshot.runs, self.run_id)
        self.query_one("#pipeline", PipelineTable).show(snapshot.stages)
        self._show_detail()
        # the chart and the logs: their classes were imported by the reader (see _mount_deferred_widgets)
        plotted = self.query_one("#chart").show(*snapshot.chart)
        self.query_one("#middle").set_class(not plotted, "empty")
        self.query_one("#metrics", MetricsPane).show(self._selected, snapshot.report)
        log = self.query_one("#log")
        if snapshot.reset_log:
            log.reset()
            log.border_title = f"{snapshot.stage} events"
        for line in snapshot.new_events:
            log.add(Text.from_markup(line))
        if snapshot.worker_log:
            worker_log = self.query_one("#worker-log")
            if snapshot.reset_worker_log:
                worker_log.reset(snapshot.worker_log)
            worker_log.add(snapshot.log_lines, missing=snapshot.worker_log_missing)
        self.shown = (snapshot.run_id, snapshot.stage)
        self.snapshots_shown += 1

    def _show_detail(self) -> None:
        """The selected stage's error (or why it was cancelled), wrapped, under the table; the log has it too,
        so when it is longer than a few lines the end is cut here and said to be there."""
        detail = self.query_one("#detail", Static)
        row = self._selected
        if row is None or not row.problem:
            detail.display = False
            return
        width = max(20, (self.query_one("#right").size.width or 60) - 2)
        detail.styles.color = "magenta" if row.state == "cancelled" else None  # else the CSS colour ($text-error)
        lines = textwrap.wrap(f"{row.glyph} {row.name} {row.state}: {' '.join(row.problem.split())}", width)
        most = max(2, self.size.height // 6)
        if len(lines) > most:
            lines = lines[:most]
            lines[-1] = clip(lines[-1] + " …", width - 23) + " (the rest: in the log)"
        detail.update(Text("\n".join(lines)))
        detail.display = True

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

    def action_worker_log(self) -> None:
        """`l`: the selected stage's worker log, followed live, in place of the chart and the events (and back)."""
        self.follow_log = not self.follow_log
        self.set_class(self.follow_log, "-worker-log")
        if self.follow_log and self.ready:
            self.query_one("#worker-log").query_one("Log").focus()
        elif not self.follow_log:
            self.query_one("#pipeline", DataTable).focus()
        self.refresh_store()

    def action_mark(self) -> None:
        """`m`: mark (or unmark) the selected run for comparing."""
        if self.run_id is not None:
            self.query_one("#runs", RunList).toggle_mark(self.run_id)

    def action_compare(self) -> None:
        """`C`: the marked runs side by side (the selected one too, when fewer than two are marked)."""
        marked = list(self.query_one("#runs", RunList).marked)
        if len(marked) < 2 and self.run_id is not None and self.run_id not in marked:
            marked.append(self.run_id)
        if len(marked) < 2:
            self.notify("mark two runs or more (m) to compare them", timeout=4)
            return
        self._open_compare(marked)

    @work(thread=True, group="stages-actions")
    def _open_compare(self, run_ids: list[str]) -> None:
        """Read the runs (off the event loop), then show them side by side."""
        from tui.screens.compare import CompareScreen

        try:
            snapshot = self.reader.compare(run_ids)
        except (LookupError, OSError) as exc:
            self.app.call_from_thread(self.notify, str(exc), title="cannot compare", severity="error")
            return
        self.app.call_from_thread(self.app.push_screen, CompareScreen(snapshot))

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

        if run_id is None:
            question = "Start a new run?"
            run, config = "new run", config_path
        else:
            question = f"Start {'stage' if len(stages) == 1 else 'stages'} in run {run_id}?"
            frozen = (
                self.reader.store.root / run_id / "config.yaml"
                if self.reader is not None
                else Path(run_id, "config.yaml")
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
        from engine.store.runs import config_secret_warning

        try:
            if run_id is None:
                config = load_config(config_path)
                run = self.store.create(config, config_path)
                if warning := config_secret_warning(config, config_path):
                    self.app.call_from_thread(self.notify, warning, title="secret in config", severity="warning")
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


def _shown_path(path: Path) -> str:
    """`path` relative to the working directory when it is under it (shorter), else as it is."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)
