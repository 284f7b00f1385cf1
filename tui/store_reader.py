"""The panel's one reader of the run store: turns engine.store's runs into immutable snapshots the views
only render (strings, styles, numbers: no widget needs engine.store, and no view reads a file).

Textual-free, and slow to import (the run store brings the config schema): the Stages tab imports it in a
thread once its first frame is painted. A `StoreReader` keeps the event and log tails of one selection, so
it is used by one thread at a time (the Stages tab's reader); `store` may be used by any thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.core.fsio import LineTail, read_json
from engine.core.secrets import redact
from engine.pipeline.models import STUDENT_KD
from engine.store.compare import Comparison, compare_runs
from engine.store.events import EventTail, read_events
from engine.store.render import RUN_STYLE, STATE_STYLE, bar, duration, event_line, metrics_text, number
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
RUNS_SHOWN = 50  # the run list shows the newest 50
WORKER_LOG = "worker.log"  # runs/<run>/<stage>/worker.log: the stage worker's stdout + stderr (as `tas logs`)
LOG_START_BYTES = 1 << 20  # a worker log is first read from its last MiB: the view keeps its last lines only
QUIET_EVENTS = ("progress", "memory", "metric")  # not in the event log: they have their own panes

Points = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class RunRow:
    """A run in the run list."""

    id: str
    state: str  # live | finished | failed | cancelled | stopped | new
    glyph: str
    style: str
    name: str = ""  # the user's name for the run (tas run --name / tas note --name)

    @property
    def title(self) -> str:
        """How a run is called where space allows: its name, else its id."""
        return self.name or self.id


@dataclass(frozen=True)
class StageRow:
    """A stage in the pipeline table, its metrics pane lines, and its problem (error, or why it was cancelled)."""

    name: str
    state: str
    glyph: str
    style: str
    progress: str
    eta: str
    latest: str
    problem: str = ""
    metrics: tuple[str, ...] = ()  # markup lines for the metrics pane


@dataclass(frozen=True)
class StoreSnapshot:
    """What the reader read from the run store, for one selection."""

    selection: int  # the selection generation it was read for: shown only if still the current one
    runs: tuple[RunRow, ...]
    run_id: str | None
    stage: str
    stages: tuple[StageRow, ...]
    new_events: tuple[str, ...]  # event log lines (markup) appended since the last read
    reset_log: bool
    losses: dict[str, Points] = field(default_factory=dict)
    report: dict | None = None  # the eval stage's report.json, when the eval stage is selected
    chart: tuple = ("", (), "")  # the loss chart's (title, series (label, colour, points), message when empty)
    log_lines: tuple[str, ...] = ()  # worker.log lines (redacted) appended since the last read, when followed
    reset_worker_log: bool = False
    worker_log: str = ""  # the followed worker log, as `<run>/<stage>/worker.log` ("" when not followed)
    worker_log_missing: bool = False  # it does not exist (yet)

    @property
    def selected(self) -> StageRow | None:
        return next((s for s in self.stages if s.name == self.stage), None)


@dataclass(frozen=True)
class Curve:
    """One run's series of a metric, for the compare screen."""

    run: str  # the run's title
    points: Points


@dataclass(frozen=True)
class CompareSnapshot:
    """Marked runs side by side: per training stage its first loss series of every run, the eval reports and
    the frozen configs' differences (engine.store.compare, as `tas compare` prints them)."""

    runs: tuple[RunRow, ...]
    # stage -> its series (LOSS_SERIES order), each (chart title, one curve a run that logged it)
    curves: dict[str, tuple[tuple[str, tuple[Curve, ...]], ...]]
    comparison: Comparison


def losses(run: Run, stage: str) -> dict[str, Points]:
    """The stage's loss curves (LOSS_SERIES), by label; none for a stage that does not train."""
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
            series[label] = tuple(sorted(logged[name]))
    return series


def loss_chart(stage: str, series: dict[str, Points]) -> tuple[str, tuple, str]:
    """The stage's chart as the view draws it: its title, its series with their colours, and what to say
    instead when there is none."""
    colours = {label: colour for label, colour, _ in LOSS_SERIES.get(stage, ())}
    empty = f"no training metrics for {stage}" if stage not in LOSS_SERIES else f"no {stage} loss logged yet"
    title = LOSS_TITLE.get(stage, f"{stage}: loss")
    return title, tuple((label, colours.get(label, ""), points) for label, points in series.items()), empty


def run_row(run: Run, stages: list[StageStatus] | None = None) -> RunRow:
    state = run.overall_state(stages if stages is not None else run.stages())
    glyph, style = RUN_STYLE.get(state, ("?", ""))
    return RunRow(run.id, state, glyph, style, run.name)


def stage_row(status: StageStatus) -> StageRow:
    glyph, style = STATE_STYLE.get(status.state, ("?", ""))
    fraction = status.fraction
    if fraction is not None:
        progress = f"{bar(fraction, 10)} {fraction * 100:3.0f}%"
    elif status.progress:
        progress = f"{number(status.progress.get('done'))} {status.progress.get('unit', '')}"
    else:
        progress = ""
    if status.eta_s is not None:
        eta = duration(status.eta_s)
    else:
        eta = duration(status.elapsed) if status.ended_at else ""
    latest = " ".join((status.error or metrics_text(status, limit=2)).split())
    problem = status.error or (status.message if status.state == "cancelled" else None) or ""
    metrics = [f"[b]{status.name}[/b]  {status.state}"]
    if status.elapsed is not None:
        metrics.append(f"elapsed {duration(status.elapsed)}")
    if status.progress:
        p = status.progress
        total = f"/{number(p.get('total'))}" if p.get("total") else ""
        metrics.append(f"{number(p.get('done'))}{total} {p.get('unit', '')}")
    for name, event in list(status.metrics.items())[:5]:
        metrics.append(f"{name[:16]:<16} {number(event.get('value'))}")
    return StageRow(status.name, status.state, glyph, style, progress, eta, latest, problem, tuple(metrics))


class WorkerLogTail(LineTail):
    """`tail -F` of a worker log: lines appended since the last poll, redacted whole (a secret split across two
    reads is still one line); starts over when the file is truncated or replaced (rotated), waits for a file
    that does not exist yet, and reads a long file from its last LOG_START_BYTES."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._inode: int | None = None

    def poll_lines(self) -> tuple[list[str], bool]:
        """The new lines, and whether the file started over (truncated or replaced: what was shown is gone)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return [], False
        restarted = skip_partial = False
        if stat.st_ino != self._inode or stat.st_size < self._offset:  # first seen, replaced or truncated
            restarted = self._inode is not None
            self._inode, self._pending = stat.st_ino, b""
            self._offset = max(0, stat.st_size - LOG_START_BYTES)  # read from its (recent) start
            skip_partial = self._offset > 0
        lines = self.poll_text()
        if skip_partial and lines:
            lines = lines[1:]  # the read began mid-line
        return [redact(line.rstrip("\r")) for line in lines], restarted


class StoreReader:
    """Reads the run store for the Stages tab: one selection at a time, its tails kept between reads."""

    def __init__(self, runs_dir: Path | Callable[[], Path]):
        self._runs_dir = runs_dir
        self._store: RunStore | None = None
        self._store_lock = threading.Lock()
        self._events: EventTail | None = None
        self._events_key: tuple[str, str] | None = None
        self._log: WorkerLogTail | None = None
        self._log_key: tuple[str, str] | None = None

    @property
    def store(self) -> RunStore:
        """The run store (opened on first use: `runs_dir` may read the config)."""
        with self._store_lock:
            if self._store is None:
                self._store = RunStore(self._runs_dir() if callable(self._runs_dir) else self._runs_dir)
            return self._store

    def forget(self) -> None:
        """The last read was not shown: the next one starts the event log (and the worker log) over."""
        self._events_key = self._log_key = None

    def read(self, selection: int, run_id: str | None, stage: str, follow_log: bool = False) -> StoreSnapshot:
        runs = self.store.list()
        rows, selected = [], None
        for run in runs[:RUNS_SHOWN]:
            stages = run.stages()
            rows.append(run_row(run, stages))
            if run.id == run_id:
                selected = (run, stages)
        if selected is None and runs:
            selected = (runs[0], runs[0].stages())
        if selected is None:
            return StoreSnapshot(selection, (), None, stage, (), (), reset_log=True, chart=loss_chart(stage, {}))
        run, stages = selected
        key = (run.id, stage)
        reset = key != self._events_key
        if reset:
            self._events = EventTail(run.stage_dir(stage) / "events.jsonl")
            self._events_key = key
        lines = []
        for event in self._events.poll():
            line = event_line(stage, event)
            if line and event.get("kind") not in QUIET_EVENTS:
                lines.append(line)
        report = read_json(run.stage_dir("eval") / "report.json") if stage == "eval" else None
        log_lines, reset_worker_log, log_path, missing = (), False, "", False
        if follow_log:
            log_path = f"{run.id}/{stage}/{WORKER_LOG}"
            reset_worker_log = key != self._log_key
            if reset_worker_log:
                self._log, self._log_key = WorkerLogTail(run.stage_dir(stage) / WORKER_LOG), key
            new_lines, restarted = self._log.poll_lines()
            log_lines, reset_worker_log = tuple(new_lines), reset_worker_log or restarted
            missing = not self._log.path.exists()
        else:
            self._log_key = None
        series = losses(run, stage)
        return StoreSnapshot(
            selection,
            tuple(rows),
            run.id,
            stage,
            tuple(stage_row(s) for s in stages),
            tuple(lines),
            reset,
            series,
            report,
            loss_chart(stage, series),
            log_lines,
            reset_worker_log,
            log_path,
            missing,
        )

    def compare(self, run_ids: list[str]) -> CompareSnapshot:
        """The marked runs (in the order given) side by side."""
        runs = [self.store.get(run_id) for run_id in run_ids]
        rows = tuple(run_row(run) for run in runs)
        curves = {}
        for stage, series in LOSS_SERIES.items():
            logged = [losses(run, stage) for run in runs]
            curves[stage] = tuple(
                (
                    f"{LOSS_TITLE[stage]}: {label}",
                    tuple(Curve(row.title, found[label]) for row, found in zip(rows, logged) if found.get(label)),
                )
                for label, _, _ in series
            )
        return CompareSnapshot(rows, curves, compare_runs(runs))
