"""The code results screen with a hostile results file: the completion and the error are the model's and
its program's words (issue 23, F5)."""

from __future__ import annotations

import json
from pathlib import Path

from textual.app import App
from textual.widgets import DataTable

from tests.helpers import wait_until
from tui.screens.code_results import CodeResultsScreen

OSC52 = "\x1b]52;c;ZWNobyBwd25lZAo=\x1b\\"  # a clipboard write, on terminals that allow it
TITLE = "\x1b]2;PWNED-TITLE\x1b\\"


def _painted(widget) -> str:
    return "\n".join(
        "".join(segment.text for segment in strip) for strip in widget.render_lines(widget.region.reset_offset)
    )


async def test_markup_and_escape_sequences_are_shown_not_run(tmp_path: Path):
    error = (
        f"Traceback ...\n{OSC52}\x1b[2J\x1b[32mall tests passed\nCandidateError: [/x]: boom [link=https://x]y[/link]"
    )
    record = {
        "task_id": "tiny-python/add_11",
        "completion": f"def add_11(x):\n    '{TITLE}'\n    raise type('[/x]', (Exception,), {{}})('boom')\n",
        "passed": False,
        "status": "failed",
        "error": error,
        "isolation": "namespaces",
    }
    (tmp_path / "student.jsonl").write_text(json.dumps(record) + "\n")

    class Panel(App):
        def on_mount(self) -> None:
            self.push_screen(CodeResultsScreen("r1", tmp_path))

    app = Panel()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, CodeResultsScreen) and app.screen.rows)
        await pilot.pause()
        table = app.screen.query_one("#code-table", DataTable)
        cell = str(table.get_row_at(0)[2])
        assert "[/x]" in cell and "[link=" in cell  # shown as typed, not read as markup
        shown = _painted(app.screen.query_one("#code-detail-text")) + _painted(table)
    assert "\x1b" not in shown and "\\x1b]52;c;" in shown and "\\x1b]2;PWNED-TITLE" in shown
    assert app.return_code in (None, 0)
