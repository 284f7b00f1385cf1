"""The panel's Stages and Config tabs, driven with Textual's Pilot, plus snapshots at 80x24 and 120x40."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, Tree

from engine.config.load import load_config
from engine.store.runs import RunStore
from tests.helpers import TINY_CONFIG, python, wait_until
from tui import store_reader
from tui.app import TASPanel
from tui.screens.confirm import ConfirmScreen
from tui.screens.diff import DiffScreen
from tui.tabs.config import ConfigTab
from tui.tabs.stages import StagesTab


def stage_state(app, stage: str) -> str:
    table = app.query_one("#pipeline", DataTable)
    return str(table.get_row(stage)[1]) if table.row_count else ""


def find_node(tree: Tree, path: tuple):
    stack = [tree.root]
    while stack:
        node = stack.pop()
        if node.data == path:
            return node
        stack.extend(node.children)
    raise AssertionError(f"no tree node {path}")


async def select_key(pilot, app, path: tuple):
    """Open the Config tab (F2) and put its tree's cursor on the key at `path`."""
    await pilot.press("f2")
    tree = app.query_one("#tree", Tree)
    node = find_node(tree, path)
    parent = node.parent
    while parent is not None:
        parent.expand()
        parent = parent.parent
    await pilot.pause()
    tree.move_cursor(node)
    await pilot.pause()


# --------------------------------------------------------------------------------------------- config


async def test_config_edit_diff_and_save(project: Path):
    path = project / "configs" / "tiny.yaml"
    original = path.read_text()
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs")
    async with app.run_test(size=(120, 40)) as pilot:
        await select_key(pilot, app, ("teacher", "open", "pipeline", "batch_size"))
        value = app.query_one("#value", Input)
        assert value.value == "32"
        assert "Prompts generated at once" in str(app.query_one("#help").render())
        value.value = "16"
        await pilot.click("#value")
        await pilot.press("enter")
        await pilot.pause()
        tab = app.query_one(ConfigTab)
        assert tab.issues == [] and "batch_size: 16" in tab.text
        assert path.read_text() == original  # nothing written before save
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, DiffScreen)
        assert "-      batch_size: 32" in app.screen.diff and "+      batch_size: 16" in app.screen.diff
        await pilot.press("y")
        await pilot.pause()
    saved = path.read_text()
    assert saved == original.replace("batch_size: 32", "batch_size: 16", 1)
    assert "# Offline tiny profile" in saved  # comments survive form edits
    assert (project / "configs" / "tiny.yaml.bak").read_text() == original
    assert load_config(path).teacher.open.pipeline.batch_size == 16


async def test_config_invalid_edit_is_never_saved(project: Path):
    path = project / "configs" / "tiny.yaml"
    original = path.read_text()
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs")
    async with app.run_test(size=(120, 40)) as pilot:
        await select_key(pilot, app, ("student", "hidden_size"))
        value = app.query_one("#value", Input)
        value.value = "-64"
        await pilot.click("#value")
        await pilot.press("enter")
        await pilot.pause()
        tab = app.query_one(ConfigTab)
        assert any("student.hidden_size" in issue and "line " in issue for issue in tab.issues)
        assert "student.hidden_size" in str(app.query_one("#errors").render())
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert not isinstance(app.screen, DiffScreen)
    assert path.read_text() == original
    assert not (project / "configs" / "tiny.yaml.bak").exists()


async def test_config_raw_yaml_view_validates_each_edit(project: Path):
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs")
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("f2")
        await pilot.press("ctrl+r")
        raw = app.query_one("#raw")
        raw.text = raw.text.replace("top_k: 50", "top_kk: 50")
        tab = app.query_one(ConfigTab)
        await wait_until(pilot, lambda: any("teacher.open.pipeline.top_kk: unknown key" in i for i in tab.issues))
        assert "1 error" in str(app.query_one("#state").render())
        raw.text = raw.text.replace("top_kk: 50", "top_k: 50")
        await wait_until(pilot, lambda: tab.issues == [])
        assert "valid" in str(app.query_one("#state").render())


async def test_config_raw_typing_is_validated_once_the_keys_rest(project: Path, monkeypatch: pytest.MonkeyPatch):
    """A burst of keystrokes costs one validation (one parse), not one per key; saving does not wait for it."""
    import tui.tabs.config

    monkeypatch.setattr(tui.tabs.config, "VALIDATE_AFTER_S", 600)  # the keys do not rest by themselves
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("f2", "ctrl+r")
        tab = app.query_one(ConfigTab)
        raw = app.query_one("#raw")
        raw.move_cursor((0, 0))
        before = tab.validations
        for key in "x: 1\n":  # a new top-level key: unknown
            raw.insert(key)
        await pilot.pause()
        assert tab.text.startswith("x: 1\n") and tab.checking and tab.validations == before
        assert "checking" in str(app.query_one("#state").render())
        await pilot.press("ctrl+s")  # checks what it would save first: one validation, and not saved
        assert not tab.checking and tab.validations == before + 1
        assert any(issue.startswith("line 1: x: unknown key") for issue in tab.issues)
        assert not isinstance(app.screen, DiffScreen)

        monkeypatch.setattr(tui.tabs.config, "VALIDATE_AFTER_S", 0.05)
        raw.text = raw.text.replace("x: 1\n", "", 1)
        await wait_until(pilot, lambda: tab.validations == before + 2)
        assert not tab.checking and tab.issues == []
        await pilot.pause(0.2)
        assert tab.validations == before + 2


async def test_config_switches_files(project: Path):
    app = TASPanel(config_path="config.yaml", runs_dir=project / "runs")
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("f2")
        tab = app.query_one(ConfigTab)
        assert "Qwen/Qwen2.5-Coder-1.5B-Instruct" in tab.text
        tab.load("configs/tiny.yaml")
        await pilot.pause()
        assert "tiny:assistant" in tab.text and tab.issues == []


# --------------------------------------------------------------------------------------------- stages


@pytest.mark.e2e
async def test_start_a_stage_from_the_panel_and_see_it_finish(project: Path):
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs")
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.query_one(StagesTab).ready)
        await pilot.press("s")  # no run yet: a new run with the selected stage (data), once confirmed
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        store = RunStore(project / "runs")
        await wait_until(pilot, store.list)
        run = store.list()[0]
        await wait_until(pilot, lambda: "done" in stage_state(app, "data"), timeout=60)
        log = "\n".join(str(line.text) for line in app.query_one("#log").lines)
        assert "kept" in log and "done" in log
    assert run.stages()[0].state == "done"


class StartRecorder:
    """Stands in for launcher.start: records (run id, stages) instead of spawning a supervisor."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        from engine.runner import launcher

        self.calls: list[tuple[str, list[str]]] = []
        monkeypatch.setattr(launcher, "start", lambda run, stages, **kw: self.calls.append((run.id, list(stages))))


def confirm_text(screen: ConfirmScreen) -> str:
    return "\n".join(str(widget.render()) for widget in screen.query("Static"))


async def test_new_run_asks_first_and_esc_starts_nothing(project: Path, monkeypatch: pytest.MonkeyPatch):
    started = StartRecorder(monkeypatch)
    store = RunStore(project / "runs")
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.query_one(StagesTab).ready)
        await pilot.press("n")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        shown = confirm_text(app.screen)
        assert "Start a new run?" in shown and "new run" in shown and "configs/tiny.yaml" in shown
        assert "data → teacher → sft → distill → eval" in shown
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        await pilot.pause(0.3)
        assert store.list() == [] and started.calls == []  # no run created, nothing started
        await pilot.press("n")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")  # n answers the question: no
        await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        await pilot.pause(0.3)
        assert store.list() == [] and started.calls == []
        await pilot.press("n")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: started.calls)
    runs = store.list()
    assert len(runs) == 1 and runs[0].config_source == "configs/tiny.yaml"
    assert started.calls == [(runs[0].id, ["data", "teacher", "sft", "distill", "eval"])]


async def test_start_and_start_from_here_name_the_run_and_its_frozen_config(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    write_finished_run(project / "runs")
    started = StartRecorder(monkeypatch)
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        tab = app.query_one(StagesTab)
        await wait_until(pilot, lambda: tab.ready and app.query_one("#pipeline", DataTable).row_count)
        await pilot.press("down", "down")
        await wait_until(pilot, lambda: tab.shown == ("20261125-080000-tiny", "sft"))
        await pilot.press("s")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        shown = confirm_text(app.screen)
        assert "Start stage in run 20261125-080000-tiny?" in shown
        assert "runs/20261125-080000-tiny/config.yaml" in shown and "sft" in shown and "teacher" not in shown
        await pilot.press("enter")  # Enter confirms too
        await wait_until(pilot, lambda: started.calls)
        assert started.calls == [("20261125-080000-tiny", ["sft"])]
        await pilot.press("f")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "sft → distill → eval" in confirm_text(app.screen)
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        await pilot.press("f")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: len(started.calls) == 2)
    assert started.calls[1] == ("20261125-080000-tiny", ["sft", "distill", "eval"])
    assert len(RunStore(project / "runs").list()) == 1  # no new run: both went to the selected one


async def test_quit_with_unsaved_config_edits_asks(project: Path):
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f2")
        await wait_until(pilot, lambda: app.query(ConfigTab))
        tab = app.query_one(ConfigTab)
        tab.set_text(tab.text.replace("batch_size: 32", "batch_size: 16", 1), from_raw=False)
        app.query_one("#tree", Tree).focus()
        await pilot.pause()
        await pilot.press("q")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "Quit and lose your edits to configs/tiny.yaml?" in confirm_text(app.screen)
        await pilot.press("n")
        await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        await pilot.pause(0.2)
        assert app.return_code is None and "batch_size: 16" in tab.text  # still here, edits kept
        await pilot.press("q")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: app.return_code is not None)
    assert app.return_code == 0
    assert "batch_size: 32" in (project / "configs" / "tiny.yaml").read_text()  # nothing was saved


@pytest.mark.parametrize("edited_then_reverted", [False, True])
async def test_quit_without_unsaved_edits_quits_at_once(project: Path, edited_then_reverted: bool):
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        if edited_then_reverted:  # the Config tab is open, its buffer equals the file again
            await pilot.press("f2")
            await wait_until(pilot, lambda: app.query(ConfigTab))
            tab = app.query_one(ConfigTab)
            tab.set_text(tab.text + "# a comment\n", from_raw=False)
            tab.set_text(tab.saved_text, from_raw=False)
            app.query_one("#tree", Tree).focus()
        await wait_until(pilot, lambda: app.query_one(StagesTab).ready)
        await pilot.press("q")
        await wait_until(pilot, lambda: app.return_code is not None)
        assert not isinstance(app.screen, ConfirmScreen)
    assert app.return_code == 0


def write_finished_run(root: Path) -> None:
    """A run with fixed timestamps and metrics, so snapshots do not depend on the clock."""
    streams = {
        "data": [
            {"kind": "status", "state": "running"},
            {"kind": "progress", "done": 320, "total": 320, "unit": "records"},
            {"kind": "metric", "name": "prompts", "value": 315, "step": None},
            {"kind": "status", "state": "done"},
        ],
        "teacher": [
            {"kind": "status", "state": "running"},
            {"kind": "progress", "done": 315, "total": 315, "unit": "prompts"},
            {"kind": "metric", "name": "tokens_per_s", "value": 3702.5, "step": 10},
            {"kind": "status", "state": "done"},
        ],
        "sft": [{"kind": "status", "state": "running"}]
        + [{"kind": "metric", "name": "loss", "value": 7.5 - 0.05 * i, "step": 5 * i} for i in range(1, 8)]
        + [
            {"kind": "progress", "done": 20, "total": 36, "unit": "steps"},
            {
                "kind": "status",
                "state": "failed",
                "error": "out of memory at train.sft.per_device_train_batch_size=8; lower it",
            },
        ],
    }
    write_run(root, "20261125-080000-tiny", streams, created=1795600000.0)


async def test_stages_reads_the_store_one_read_at_a_time(project: Path, monkeypatch: pytest.MonkeyPatch):
    """However fast the selection moves, one read at a time, in a thread; what is shown is the last selection's."""
    import threading

    write_finished_run(project / "runs")
    lock, active, most, threads = threading.Lock(), [0], [0], set()
    read = StagesTab._read

    def slow_read(self, *args):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            threads.add(threading.current_thread())
        try:
            time.sleep(0.05)
            return read(self, *args)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(StagesTab, "_read", slow_read)
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(120, 40)) as pilot:
        tab = app.query_one(StagesTab)
        await wait_until(pilot, lambda: tab.ready and app.query_one("#pipeline", DataTable).row_count)
        await pilot.press("down", "down", "down", "up", "up", "up", "down", "down")
        await wait_until(pilot, lambda: tab.shown == ("20261125-080000-tiny", "sft"))
        await pilot.pause(0.2)
        log = app.query_one("#log")
        lines = [str(line.text) for line in log.lines]
        assert log.border_title == "sft events" and lines
        assert not any(f" {stage} " in line for line in lines for stage in ("data", "teacher")), lines
        assert sum(" sft " in line for line in lines) == 2, lines  # running, failed: each event once
    assert most[0] == 1
    assert threading.main_thread() not in threads


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_snapshot_stages(project: Path, snap_compare, size):
    write_finished_run(project / "runs")
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)

    async def select_sft(pilot):
        tab = app.query_one(StagesTab)
        await wait_until(pilot, lambda: tab.ready and app.query_one("#pipeline", DataTable).row_count)
        await pilot.press("down", "down")
        await wait_until(pilot, lambda: tab.shown == ("20261125-080000-tiny", "sft"))

    assert snap_compare(app, terminal_size=size, run_before=select_sft)


OFFLINE_ERROR = (
    "datasets[0].name: cannot load 'openai/openai_humaneval' from the Hugging Face hub (Couldn't reach "
    "'openai/openai_humaneval' on the Hub (LocalEntryNotFoundError)). If this machine is offline, download "
    "the dataset elsewhere and set datasets[0].external_local_path to its JSONL/Parquet/CSV file or folder."
)
KEPT = "kept 160 prompts of 320 records (320 read, 5 over the word limit, 155 over data.limit)"
NOW = 1795640000.0  # the clock of the snapshots below (elapsed times and ETAs are read against it)


def write_run(
    root: Path,
    run_id: str,
    streams: dict[str, list[dict]],
    name: str = "",
    live: str | None = None,
    created: float | None = None,
) -> None:
    """A run `run_id` with these events (one second apart, stages 100 s apart, from `created`, default the id's
    time); `live`: that stage's worker and the run's supervisor are this very process, so the stage is running."""
    import calendar
    import os

    from engine.core.process import ProcessRecord, write_pid_file

    if created is None:
        created = float(calendar.timegm(time.strptime(run_id[:15], "%Y%m%d-%H%M%S")))
    run = RunStore(root).create(load_config(TINY_CONFIG), "configs/tiny.yaml", name=name)
    fixed = run.path.with_name(run_id)
    run.path.rename(fixed)
    meta = json.loads((fixed / "run.json").read_text())
    meta.update(id=run_id, created=created)
    (fixed / "run.json").write_text(json.dumps(meta))
    ts = created
    for stage, events in streams.items():
        (fixed / stage).mkdir()
        with open(fixed / stage / "events.jsonl", "w") as f:
            for i, event in enumerate(events):
                f.write(json.dumps({"ts": ts + i, **event}) + "\n")
        ts += 100
    if live:
        me = ProcessRecord.of(os.getpid())
        record = ProcessRecord(me.pid, me.create_time, me.start_ticks, recorded_at=created)
        write_pid_file(fixed / "supervisor.json", record, stages=[live])
        write_pid_file(fixed / live / "pid", record)


def training(prefixes: dict[str, float], steps: int, every: int = 2, total: int | None = None) -> list[dict]:
    """Loss metrics (name prefix -> starting value) logged every `every` steps, with progress."""
    events = []
    for i in range(1, steps // every + 1):
        for name, start in prefixes.items():
            events.append({"kind": "metric", "name": name, "value": round(start - 0.04 * i, 4), "step": every * i})
        events.append({"kind": "progress", "done": every * i, "total": total or steps, "unit": "steps"})
    return events


def write_store(root: Path) -> None:
    """Four runs over two days: finished, failed with a long (offline) error, failed (write_finished_run), live."""
    running, done = {"kind": "status", "state": "running"}, {"kind": "status", "state": "done", "seconds": 12}
    data = [
        running,
        {"kind": "progress", "done": 320, "total": 320, "unit": "records"},
        {"kind": "log", "level": "info", "msg": KEPT},
        done,
    ]
    teacher = [running, {"kind": "progress", "done": 160, "total": 160, "unit": "prompts"}, done]
    sft = [running, *training({"loss": 7.5, "eval_loss": 7.4}, 20), done]
    kd = [
        running,
        {
            "kind": "log",
            "level": "info",
            "msg": "KD student: 0.52M parameters, init random, KD weight 0.5, "
            "T=2.0; 144 train / 16 eval; KD over 512 token columns",
        },
        *training({"loss": 4.0, "ce_loss": 7.0, "kd_loss": 1.0}, 20, total=40),
    ]
    control = [
        {**e, "done": e["done"] + 20} if e["kind"] == "progress" else e
        for e in training({"control/loss": 7.1, "control/ce_loss": 7.1}, 12, total=40)
    ]
    write_run(
        root, "20261124-230000-tiny", {"data": data, "teacher": teacher, "sft": sft, "distill": [*kd, *control, done]}
    )
    write_run(
        root,
        "20261125-070000-tiny",
        {
            "data": [
                running,
                {"kind": "log", "level": "info", "msg": "datasets[0] openai/openai_humaneval: loading from the hub"},
                {"kind": "status", "state": "failed", "error": OFFLINE_ERROR},
            ]
        },
    )
    write_finished_run(root)
    live = [{**event, "ts": NOW - 60 + i} for i, event in enumerate([*kd, *control])]
    write_run(
        root,
        "20261125-090000-tiny",
        {"data": data, "teacher": teacher, "sft": sft, "distill": live},
        name="kd weight 0.5",
        live="distill",
    )


class FrozenTime:
    """engine.store.runs' `time` at NOW: elapsed times and ETAs in snapshots do not follow the clock."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def time() -> float:
        return NOW


async def select(pilot, app, run_id: str, stage: str) -> None:
    """Highlight a run in the list and a stage in the pipeline, as a user does, and wait until it is shown."""
    from textual.widgets import OptionList

    tab = app.query_one(StagesTab)
    await wait_until(pilot, lambda: tab.ready and app.query_one("#pipeline", DataTable).row_count)
    runs = app.query_one("#runs", OptionList)
    runs.highlighted = runs.get_option_index(run_id)
    await wait_until(pilot, lambda: tab.shown is not None and tab.shown[0] == run_id)
    table = app.query_one("#pipeline", DataTable)
    table.focus()
    table.move_cursor(row=table.get_row_index(stage))
    await wait_until(pilot, lambda: tab.shown == (run_id, stage))
    await pilot.pause(0.1)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
@pytest.mark.parametrize(
    "case",
    [("20261125-070000-tiny", "data"), ("20261125-090000-tiny", "distill"), ("20261124-230000-tiny", "sft")],
    ids=["long-failure", "live", "finished"],
)
def test_snapshot_stages_runs(project: Path, snap_compare, monkeypatch: pytest.MonkeyPatch, size, case):
    """A failed stage with a long message (the detail line and the wrapped log), a live run (distill: KD against
    the control), a finished run reached after looking at the others (the table keeps its columns)."""
    import engine.store.runs

    monkeypatch.setattr(engine.store.runs, "time", FrozenTime())
    write_store(project / "runs")
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)

    async def go(pilot):
        if case[0] == "20261124-230000-tiny":
            await select(pilot, app, "20261125-090000-tiny", "distill")
        await select(pilot, app, *case)

    assert snap_compare(app, terminal_size=size, run_before=go)


async def test_stages_at_80x24_lose_no_text(project: Path, monkeypatch: pytest.MonkeyPatch):
    """The log wraps at its width (every word of a long error is there, no line wider than the log), the error
    is in the detail line, the table keeps every column after switching runs, the run list lines fit, and
    the chart shows the selected stage's comparable series only."""
    import engine.store.runs

    monkeypatch.setattr(engine.store.runs, "time", FrozenTime())
    write_store(project / "runs")
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        await select(pilot, app, "20261125-070000-tiny", "data")
        log = app.query_one("#log")
        assert all(line.cell_length <= log.scrollable_content_region.width for line in log.lines)
        logged = " ".join(str(line.text).strip() for line in log.lines)
        assert " ".join(OFFLINE_ERROR.split()) in " ".join(logged.split())
        detail = _rendered(app.query_one("#detail"))
        assert "✗ data failed: datasets[0].name: cannot load" in detail and "in the log" in detail
        narrow = len(log.lines)
        await pilot.resize_terminal(120, 40)  # wrapped again at the new width: fewer, longer lines
        await pilot.pause(0.2)
        assert len(log.lines) < narrow
        assert all(line.cell_length <= log.scrollable_content_region.width for line in log.lines)
        assert " ".join(OFFLINE_ERROR.split()) in " ".join(" ".join(str(line.text) for line in log.lines).split())
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.2)
        assert len(log.lines) == narrow
        assert "no training metrics for data" in " ".join(_rendered(app.query_one("#no-chart")).split())
        assert not app.query_one("#loss").display

        await select(pilot, app, "20261125-090000-tiny", "distill")  # live
        assert not app.query_one("#detail").display
        await select(pilot, app, "20261124-230000-tiny", "sft")  # finished, after the others
        table = app.query_one("#pipeline", DataTable)
        shown = _rendered(table)
        for text in ("progress", "ETA", "latest", "100%", "31s", "loss=7.1"):
            assert text in shown, shown
        runs = _rendered(app.query_one("#runs"))
        assert "✓ 230000-tiny" in runs and "2026-11-24" in runs and "kd weight 0.5" in runs

        await select(pilot, app, "20261124-230000-tiny", "distill")
        run = RunStore(project / "runs").get("20261124-230000-tiny")
        losses = store_reader.losses(run, "distill")
        assert list(losses) == ["KD student", "CE-only control"]
        assert losses["KD student"][0] == (2, 6.96)  # ce_loss, not the KD total (loss = 3.96)
        assert losses["CE-only control"][0] == (2, 7.06)
        assert "KD student" in _rendered(app.query_one("#legend"))
        assert store_reader.losses(run, "eval") == {} and store_reader.losses(run, "data") == {}


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_snapshot_config(project: Path, snap_compare, size):
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)

    async def open_key(pilot):
        await select_key(pilot, app, ("train", "sft", "learning_rate"))

    assert snap_compare(app, terminal_size=size, run_before=open_key)


MOUNT_EVERY_TAB = """
import asyncio, sys
from tui.app import TASPanel
from tui.tabs.stages import StagesTab
from tui.widgets.lazy_pane import LazyPane

async def main():
    app = TASPanel(config_path='configs/tiny.yaml', runs_dir='runs')
    async with app.run_test(size=(120, 40)) as pilot:
        for key in ('f2', 'f3', 'f4', 'f1'):
            await pilot.press(key)
        stages = app.query_one(StagesTab)
        while not (stages.ready and all(p.built for p in app.query(LazyPane))):
            await pilot.pause(0.05)

asyncio.run(main())
heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets', 'bitsandbytes', 'accelerate') if m in sys.modules]
print('HEAVY', heavy)
"""


def test_panel_never_imports_the_ml_stack(project: Path):
    """Mount every tab in a fresh process, then look at sys.modules."""
    result = python("-c", MOUNT_EVERY_TAB, cwd=project)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


FIRST_FRAME = """
import sys
from tui.app import TASPanel

DEFERRED = ('pydantic', 'engine.config.schema', 'engine.store.runs', 'plotext', 'textual_plotext', 'rich.pretty',
            'tui.tabs.config', 'tui.tabs.gpu', 'tui.tabs.chat', 'engine.chat.client', 'engine.gpu.sampler')

class Timed(TASPanel):
    def on_mount(self):
        self.call_after_refresh(self.first_frame)

    def first_frame(self):
        print('LOADED', [m for m in DEFERRED if m in sys.modules])
        self.exit()

Timed(config_path='configs/tiny.yaml', gpu_interval=3600).run(headless=True, size=(120, 40))
"""


def test_the_first_frame_does_not_wait_for_what_it_does_not_show(project: Path):
    """Start-up: the config schema (pydantic), the run store, plotext and the other tabs load after the first frame."""
    result = python("-c", FIRST_FRAME, cwd=project)
    assert "LOADED []" in result.stdout, result.stdout + result.stderr


@pytest.mark.e2e
async def test_runs_started_elsewhere_appear_and_update_live(project: Path):
    """Reattach: a run started by the CLI while the panel is open shows up and follows to done."""
    from engine.runner import launcher

    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.query_one(StagesTab).ready)
        store = RunStore(project / "runs")
        run = store.create(load_config(project / "configs" / "tiny.yaml"), "configs/tiny.yaml")
        launcher.start(run, ["data"])

        def shows_the_run_done() -> bool:
            options = [o.id for o in app.query_one("#runs").options]
            return run.id in options and "done" in stage_state(app, "data")

        await wait_until(pilot, shows_the_run_done, timeout=60)


async def test_trust_remote_code_is_flagged(project: Path):
    path = project / "configs" / "tiny.yaml"
    path.write_text(path.read_text().replace("trust_remote_code: false", "trust_remote_code: true"))
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("f2")
        await pilot.pause()
        assert "trust_remote_code is on" in str(app.query_one("#state").render())


async def test_new_runs_use_the_config_file_chosen_in_the_config_tab(project: Path):
    from textual.widgets import Select

    app = TASPanel(config_path="config.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("f2")
        app.query_one("#file", Select).value = "configs/tiny.yaml"
        await pilot.pause()
        assert app.config_path == "configs/tiny.yaml"
        assert app.query_one(StagesTab).config_path == "configs/tiny.yaml"
        assert app.sub_title == "configs/tiny.yaml"
        assert "tiny:assistant" in app.query_one(ConfigTab).text
        # and the other way round: setting the app's config file opens it in the Config tab
        app.config_path = "config.yaml"
        await pilot.pause()
        assert app.query_one("#file", Select).value == "config.yaml"
        assert "Qwen/Qwen2.5-Coder-1.5B-Instruct" in app.query_one(ConfigTab).text
        assert app.query_one(StagesTab).config_path == "config.yaml" and app.sub_title == "config.yaml"


async def test_eval_stage_shows_the_report(project: Path):
    write_finished_run(project / "runs")
    run_dir = project / "runs" / "20261125-080000-tiny"
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "events.jsonl").write_text(
        json.dumps({"ts": 1795600900.0, "kind": "status", "state": "running"})
        + "\n"
        + json.dumps({"ts": 1795600905.0, "kind": "status", "state": "done"})
        + "\n"
    )
    numbers = lambda loss, kl: {"loss": loss, "perplexity": 2.718281828**loss, "kl_to_assistant": kl, "tokens": 90}  # noqa: E731
    (run_dir / "eval" / "report.json").write_text(
        json.dumps(
            {
                "examples": 16,
                "models": {
                    "assistant": numbers(2.0, 0.0),
                    "student_kd": numbers(2.5, 0.1),
                    "student_ce": numbers(2.6, 0.2),
                },
            }
        )
    )
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        tab = app.query_one(StagesTab)
        await wait_until(pilot, lambda: tab.ready and app.query_one("#pipeline", DataTable).row_count)
        await pilot.press("down", "down", "down", "down")
        await wait_until(pilot, lambda: tab.shown == ("20261125-080000-tiny", "eval"))
        shown = str(app.query_one("#metrics").render())
    assert "KD student" in shown and "2.50" in shown and "0.100" in shown and "CE student" in shown


async def test_code_results_show_each_failed_problem_with_its_completion_and_error(project: Path):
    """`v` on a run opens its code eval problem by problem: failed first, the completion and the error of
    the highlighted one, `m` for the next model; a damaged line is named, not fatal."""
    from textual.widgets import Select

    from tui.screens.code_results import CodeResultsScreen

    write_finished_run(project / "runs")
    code_dir = project / "runs" / "20261125-080000-tiny" / "eval" / "code"
    code_dir.mkdir(parents=True)

    def sample(task, passed, completion, error="", status=None, isolation="namespaces"):
        record = {
            "task_id": task,
            "completion": completion,
            "passed": passed,
            "status": status or ("passed" if passed else "failed"),
            "error": error,
            "duration_s": 0.1,
            "isolation": isolation,
        }
        return json.dumps(record) + "\n"

    (code_dir / "student_kd.jsonl").write_text(
        sample("HumanEval/0", True, "    return a + b\n")
        + sample(
            "HumanEval/1",
            False,
            "    return a - b_typo\n",
            "Traceback (most recent call last):\n  ...\nNameError: name 'b_typo' is not defined",
        )
        + "{not json\n"
        + sample("HumanEval/2", False, "    while True: pass\n", "timed out after 10 s", "timeout")
    )
    (code_dir / "assistant.jsonl").write_text(sample("HumanEval/0", True, "    return sum((a, b))\n", isolation="none"))
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        tab = app.query_one(StagesTab)
        await wait_until(pilot, lambda: tab.ready and tab.run_id == "20261125-080000-tiny")
        await pilot.press("v")
        await wait_until(pilot, lambda: isinstance(app.screen, CodeResultsScreen) and app.screen.rows)
        screen = app.screen
        assert screen.model == "assistant"  # the report's model order: assistant before the students
        assert "NOT sandboxed" in str(screen.query_one("#code-summary").render())  # its code ran as the user
        await pilot.press("m")
        await wait_until(pilot, lambda: screen.model == "student_kd")
        table = screen.query_one("#code-table", DataTable)
        assert [str(table.get_row_at(i)[0]) for i in range(table.row_count)] == [
            "HumanEval/1",
            "HumanEval/2",
            "HumanEval/0",
        ]
        assert "NameError: name 'b_typo' is not defined" in str(table.get_row_at(0)[2])
        summary = str(screen.query_one("#code-summary").render())
        assert "2 failed, 1 passed" in summary and "student_kd.jsonl:3" in summary
        assert "sandboxed (namespaces)" in summary
        detail = screen.query_one("#code-detail-text")
        await pilot.press("down")  # the timed-out one
        await pilot.pause()
        shown = _rendered(detail)
        assert "while True: pass" in shown and "timed out after 10 s" in shown and "timeout" in shown
        assert str(screen.query_one("#code-model", Select).value) == "student_kd"
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, CodeResultsScreen))


def _rendered(widget) -> str:
    """What a widget shows, as plain text (its lines as painted)."""
    return "\n".join(
        "".join(segment.text for segment in strip) for strip in widget.render_lines(widget.region.reset_offset)
    )


def test_config_tab_resolves_references_like_the_loader():
    """A `${}` reference in a number field is valid in the editor as it is on load; a broken one is named."""
    from tests.helpers import ROOT
    from tui.tabs.config import check_config_text

    text = (ROOT / "tests" / "data" / "tiny.yaml").read_text()
    with_ref = text.replace("  distillation:\n", "  distillation:\n    logging_steps: ${train.sft.logging_steps}\n", 1)
    assert with_ref != text
    assert check_config_text(with_ref, "tiny.yaml").issues == []
    broken = text.replace("  distillation:\n", "  distillation:\n    logging_steps: ${train.sft.nope}\n", 1)
    issues = check_config_text(broken, "tiny.yaml").issues
    assert len(issues) == 1 and "train.distillation.logging_steps" in issues[0] and "train.sft.nope" in issues[0]
