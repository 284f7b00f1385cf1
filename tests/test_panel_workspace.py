"""The Stages tab as a run workspace: marked runs compared side by side (curves, eval reports, config diff),
and a stage's worker log followed live, searched, its traceback found, its secrets redacted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from textual.widgets import DataTable, Log

from tests.helpers import wait_until
from tests.test_panel import select, training, write_run
from tui.app import TASPanel
from tui.tabs.stages import StagesTab

RUNS = ("20261120-080000-tiny", "20261121-080000-tiny", "20261122-080000-tiny")


def write_three_runs(root: Path) -> None:
    """Three finished runs: their sft and distill curves apart, an eval report each, their learning rates apart."""
    done = {"kind": "status", "state": "done", "seconds": 12}
    for n, run_id in enumerate(RUNS):
        start = 7.5 - 0.3 * n
        streams = {
            "sft": [*training({"loss": start, "eval_loss": start - 0.1}, 20), done],
            "distill": [*training({"ce_loss": start - 0.5, "control/ce_loss": start - 0.4}, 20), done],
        }
        write_run(root, run_id, streams, name=f"lr {n + 1}e-3")
        path = root / run_id
        frozen = path / "config.yaml"
        frozen.write_text(frozen.read_text().replace("learning_rate: 0.002", f"learning_rate: 0.00{n + 1}", 1))
        (path / "eval").mkdir()
        models = {
            "assistant": {"loss": 3.0 - 0.1 * n, "perplexity": 20.0 - n, "pass@1": 0.1 * n},
            "student_kd": {"loss": 3.5 - 0.2 * n, "perplexity": 33.0 - 2 * n, "kl_to_assistant": 0.5 - 0.1 * n},
        }
        (path / "eval" / "report.json").write_text(json.dumps({"examples": 16, "models": models}))


async def open_compare(pilot, app) -> None:
    """Mark the three runs in the run list (m) and compare them (C)."""
    from tui.screens.compare import CompareScreen

    tab = app.query_one(StagesTab)
    await wait_until(pilot, lambda: tab.ready and app.query_one("#pipeline", DataTable).row_count)
    runs = app.query_one("#runs")
    runs.focus()
    for run_id in RUNS:
        runs.highlighted = runs.get_option_index(run_id)
        await wait_until(pilot, lambda run_id=run_id: tab.run_id == run_id)
        await pilot.press("m")
    assert runs.marked == list(RUNS)
    assert all("◆" in str(runs.get_option(run_id).prompt) for run_id in RUNS)
    await pilot.press("C")
    await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen))
    await pilot.pause(0.2)


def rendered(widget) -> str:
    return str(widget.render())


async def test_compare_overlays_the_curves_and_sets_reports_and_configs_side_by_side(project: Path):
    write_three_runs(project / "runs")
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_compare(pilot, app)
        screen = app.screen
        sft = screen.query_one("#curve-sft")
        legend = rendered(sft.query_one("#legend"))
        assert all(f"lr {n}e-3" in legend for n in (1, 2, 3)), legend
        assert [len(curves) for stage in ("sft", "distill") for _, curves in screen.snapshot.curves[stage]] == [3] * 4
        assert sft.title == "sft loss (CE): train"
        await pilot.press("t")  # the next series: sft eval loss, the CE-only control
        assert sft.title == "sft loss (CE): eval"
        assert screen.query_one("#curve-distill").title == "distill CE loss: CE-only control"
        evals = screen.eval_text().plain
        assert "KD student" in evals and "assistant" in evals
        assert "0.200*" in evals  # the best pass@1 of the assistant: the third run
        assert "3.100*" in evals  # the best KD loss: the third run
        config = screen.config_text().plain
        assert "train.sft.learning_rate" in config and "0.003" in config
        await pilot.press("escape")
        assert isinstance(app.screen.query_one(StagesTab), StagesTab)


@pytest.mark.parametrize(
    ("tab", "size"),
    [("curves", (80, 24)), ("curves", (120, 40)), ("evals", (80, 24)), ("evals", (120, 40)), ("config", (80, 24))],
    ids=["curves-80x24", "curves-120x40", "evals-80x24", "evals-120x40", "config-80x24"],
)
def test_snapshot_compare_three_runs(project: Path, snap_compare, tab, size):
    write_three_runs(project / "runs")
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)

    async def go(pilot):
        await open_compare(pilot, app)
        await pilot.press({"curves": "1", "evals": "2", "config": "3"}[tab])
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=go)


SECRET = "hf_" + "abcdefghijklmnopqrstuvwxyz0123"
LOG_START = [
    "building the tiny model",
    f"token {SECRET} from the environment",
    "step 1 loss 7.5",
]
TRACEBACK = [
    "Traceback (most recent call last):",
    '  File "engine/stages/sft.py", line 12, in run',
    "RuntimeError: CUDA out of memory",
]


async def follow_worker_log(pilot, app, project: Path, monkeypatch) -> Path:
    """Select the sft stage of the run, open its worker log (l) before the log exists, then write it."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    await select(pilot, app, RUNS[0], "sft")
    await pilot.press("l")
    log_path = project / "runs" / RUNS[0] / "sft" / "worker.log"
    assert not log_path.exists()
    pane = app.query_one("#worker-log")
    await wait_until(pilot, lambda: "no worker.log yet" in str(pane.border_subtitle))  # it says so, and waits
    log_path.write_text("\n".join(LOG_START) + "\n")
    log = app.query_one("#worker-log").query_one(Log)
    await wait_until(pilot, lambda: len(log.lines) == 3)
    return log_path


def shown_match(pane, log) -> int:
    """The number of the match the pane says it shows (`'loss 7.3': match 7/11, line 37`), checked against the
    line it names and the view (that line is on screen)."""
    subtitle = str(pane.border_subtitle)
    number, line = int(subtitle.split("match ")[1].split("/")[0]), int(subtitle.split("line ")[1])
    assert "/11," in subtitle and "loss 7.3" in log.lines[line - 1]
    assert log.scroll_y <= line - 1 < log.scroll_y + log.size.height
    return number


async def test_worker_log_follows_searches_and_finds_the_traceback(project: Path, monkeypatch: pytest.MonkeyPatch):
    write_three_runs(project / "runs")
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        path = await follow_worker_log(pilot, app, project, monkeypatch)
        pane = app.query_one("#worker-log")
        log = pane.query_one(Log)
        assert SECRET not in "\n".join(log.lines) and "token" in log.lines[1]  # redacted
        with open(path, "a") as f:  # appended while the panel runs: it follows
            f.write("\n".join([*(f"step {i} loss 7.{i}" for i in range(2, 40)), *TRACEBACK, "after"]) + "\n")
        await wait_until(pilot, lambda: log.lines and log.lines[-1] == "after")
        assert pane.action_traceback() == 3 + 38
        assert not log.auto_scroll  # a jump stops following
        await pilot.press("slash")
        await pilot.press(*"loss 7.3", "enter")
        first = shown_match(pane, log)  # the first at or below the view's top
        await pilot.press("n")
        assert shown_match(pane, log) == first + 1
        await pilot.press("N", "N")
        assert shown_match(pane, log) == first - 1
        await pilot.press("G")
        assert log.auto_scroll
        path.write_text("rotated 1\nrotated 2\n")  # truncated (or replaced): read again from the start
        await wait_until(pilot, lambda: list(log.lines) == ["rotated 1", "rotated 2"])
        new = path.with_name("worker.log.new")
        new.write_text("replaced 1\nreplaced 2\nreplaced 3\n")
        os.replace(new, path)  # a new file in its place (rotation): followed from its start
        await wait_until(pilot, lambda: list(log.lines) == ["replaced 1", "replaced 2", "replaced 3"])
        await pilot.press("l")  # back to the events
        assert app.query_one("#log").display and not pane.display


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_snapshot_worker_log_at_its_traceback(project: Path, snap_compare, monkeypatch: pytest.MonkeyPatch, size):
    write_three_runs(project / "runs")
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)

    async def go(pilot):
        path = await follow_worker_log(pilot, app, project, monkeypatch)
        log = app.query_one("#worker-log").query_one(Log)
        with open(path, "a") as f:
            f.write("\n".join([*(f"step {i} loss 7.{i}" for i in range(2, 60)), *TRACEBACK]) + "\n")
        await wait_until(pilot, lambda: log.lines[-1] == TRACEBACK[-1])
        await pilot.press("t")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=go)


def test_worker_log_tail_starts_near_the_end_of_a_long_log_and_keeps_partial_lines(tmp_path, monkeypatch):
    """A long log is read from its last LOG_START_BYTES (from a whole line on); a line being written is
    shown once its newline arrives, redacted whole."""
    from tui import store_reader

    monkeypatch.setattr(store_reader, "LOG_START_BYTES", 100)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    path = tmp_path / "worker.log"
    path.write_text("".join(f"line {i:03d} padding padding\n" for i in range(100)))  # 26 bytes a line
    tail = store_reader.WorkerLogTail(path)
    lines, restarted = tail.poll_lines()
    assert lines == [f"line {i:03d} padding padding" for i in (97, 98, 99)] and not restarted
    with open(path, "a") as f:
        f.write(f"token {SECRET[:10]}")
    assert tail.poll_lines() == ([], False)
    with open(path, "a") as f:
        f.write(f"{SECRET[10:]} read\n")
    (line,), _ = tail.poll_lines()
    assert SECRET not in line and line.startswith("token ") and line.endswith(" read")
