"""The panel's Stages and Config tabs, driven with Textual's Pilot, plus snapshots at 80x24 and 120x40."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, Tree

from engine.core.config import load_config
from engine.core.runs import RunStore
from tui.app import TASPanel
from tui.tabs.config import ConfigTab, DiffScreen

from .conftest import ROOT
from .test_processes import wait_for


def find_node(tree: Tree, path: tuple):
    stack = [tree.root]
    while stack:
        node = stack.pop()
        if node.data == path:
            return node
        stack.extend(node.children)
    raise AssertionError(f"no tree node {path}")


async def select_key(pilot, app, path: tuple):
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
        await pilot.press("f2")
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
        await pilot.press("f2")
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
        await pilot.pause()
        tab = app.query_one(ConfigTab)
        assert any("teacher.open.pipeline.top_kk: unknown key" in issue for issue in tab.issues)
        raw.text = raw.text.replace("top_kk: 50", "top_k: 50")
        await pilot.pause()
        assert tab.issues == []


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
        await pilot.pause()
        await pilot.press("s")  # no run yet: a new run with the selected stage (data)
        store = RunStore(project / "runs")
        run = wait_for(lambda: store.list() and store.list()[0], timeout=10)

        async def shows_done() -> bool:
            await pilot.pause(0.3)
            table = app.query_one("#pipeline", DataTable)
            return table.row_count and "done" in str(table.get_cell("data", table.columns[list(table.columns)[1]].key))

        for _ in range(100):
            if await shows_done():
                break
        else:
            raise AssertionError("the data stage never showed done")
        log = "\n".join(str(line.text) for line in app.query_one("#log").lines)
        assert "kept" in log and "done" in log
    assert run.stages()[0].state == "done"


def write_finished_run(root: Path) -> None:
    """A run with fixed timestamps and metrics, so snapshots do not depend on the clock."""
    store = RunStore(root)
    run = store.create(load_config(ROOT / "configs" / "tiny.yaml"), "configs/tiny.yaml")
    fixed = run.path.with_name("20261125-080000-tiny")
    run.path.rename(fixed)
    meta = json.loads((fixed / "run.json").read_text())
    meta.update(id=fixed.name, created=1795600000.0)
    (fixed / "run.json").write_text(json.dumps(meta))
    ts = 1795600000.0
    streams = {
        "data": [{"kind": "status", "state": "running"}, {"kind": "progress", "done": 320, "total": 320, "unit": "records"},
                 {"kind": "metric", "name": "prompts", "value": 315, "step": None}, {"kind": "status", "state": "done"}],
        "teacher": [{"kind": "status", "state": "running"}, {"kind": "progress", "done": 315, "total": 315, "unit": "prompts"},
                    {"kind": "metric", "name": "tokens_per_s", "value": 3702.5, "step": 10},
                    {"kind": "status", "state": "done"}],
        "sft": [{"kind": "status", "state": "running"}]
        + [{"kind": "metric", "name": "loss", "value": 7.5 - 0.05 * i, "step": 5 * i} for i in range(1, 8)]
        + [{"kind": "progress", "done": 20, "total": 36, "unit": "steps"},
           {"kind": "status", "state": "failed", "error": "out of memory at train.sft.per_device_train_batch_size=8; lower it"}],
    }
    for stage, events in streams.items():
        (fixed / stage).mkdir()
        with open(fixed / stage / "events.jsonl", "w") as f:
            for i, event in enumerate(events):
                f.write(json.dumps({"ts": ts + i, **event}) + "\n")
        ts += 100


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_snapshot_stages(project: Path, snap_compare, size):
    write_finished_run(project / "runs")
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)

    async def select_sft(pilot):
        await pilot.pause(0.5)
        await pilot.press("down", "down")
        await pilot.pause(0.5)

    assert snap_compare(app, terminal_size=size, run_before=select_sft)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_snapshot_config(project: Path, snap_compare, size):
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)

    async def open_key(pilot):
        await pilot.press("f2")
        await select_key(pilot, app, ("train", "sft", "learning_rate"))

    assert snap_compare(app, terminal_size=size, run_before=open_key)


def test_panel_never_imports_the_ml_stack(project: Path):
    """Mount every tab in a fresh process, then look at sys.modules."""
    script = (
        "import asyncio, sys\n"
        "from tui.app import TASPanel\n"
        "async def main():\n"
        "    app = TASPanel(config_path='configs/tiny.yaml', runs_dir='runs')\n"
        "    async with app.run_test(size=(120, 40)) as pilot:\n"
        "        for key in ('f2', 'f3', 'f4', 'f1'):\n"
        "            await pilot.press(key)\n"
        "            await pilot.pause(0.3)\n"
        "asyncio.run(main())\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets', 'bitsandbytes', 'accelerate')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


@pytest.mark.e2e
async def test_runs_started_elsewhere_appear_and_update_live(project: Path):
    """Reattach: a run started by the CLI while the panel is open shows up and follows to done."""
    from engine.core import launcher

    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.5)
        store = RunStore(project / "runs")
        run = store.create(load_config(project / "configs" / "tiny.yaml"), "configs/tiny.yaml")
        launcher.start(run, ["data"])
        for _ in range(100):
            await pilot.pause(0.3)
            options = [o.id for o in app.query_one("#runs").options]
            table = app.query_one("#pipeline", DataTable)
            if run.id in options and table.row_count and "done" in str(table.get_row("data")[1]):
                break
        else:
            raise AssertionError("the CLI's run never showed up as done in the panel")


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

    from tui.tabs.stages import StagesTab

    app = TASPanel(config_path="config.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("f2")
        app.query_one("#file", Select).value = "configs/tiny.yaml"
        await pilot.pause()
        assert app.query_one(StagesTab).config_path == "configs/tiny.yaml"
        assert app.sub_title == "configs/tiny.yaml"


async def test_eval_stage_shows_the_report(project: Path):
    write_finished_run(project / "runs")
    run_dir = project / "runs" / "20261125-080000-tiny"
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "events.jsonl").write_text(
        json.dumps({"ts": 1795600900.0, "kind": "status", "state": "running"}) + "\n"
        + json.dumps({"ts": 1795600905.0, "kind": "status", "state": "done"}) + "\n"
    )
    numbers = lambda loss, kl: {"loss": loss, "perplexity": 2.718281828 ** loss, "kl_to_assistant": kl, "tokens": 90}  # noqa: E731
    (run_dir / "eval" / "report.json").write_text(json.dumps({
        "examples": 16, "models": {"assistant": numbers(2.0, 0.0), "student_kd": numbers(2.5, 0.1), "student_ce": numbers(2.6, 0.2)},
    }))
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.5)
        await pilot.press("down", "down", "down", "down")
        await pilot.pause(1.2)
        shown = str(app.query_one("#metrics").render())
    assert "KD student" in shown and "2.50" in shown and "0.100" in shown and "CE student" in shown
