"""The code results of one run: every benchmark problem each model tried, whether it passed, and for any
problem the completion the model wrote and the error its tests raised.

The eval stage writes one file per model (`runs/<run>/eval/code/<model>.jsonl`: task_id, completion,
passed, status, error); this screen only reads them (in a thread: a run may hold thousands of samples).
A user who sees "pass@1 0.25" wants to know *why* the other problems failed — a syntax error from a
truncated completion, a wrong answer, a timeout — so failed problems come first and the detail pane shows
the whole completion with the error under it. The summary line says whether the code ran isolated.

Completions and errors are the model's and its program's words: shown as plain `Text` (never markup), with
control characters made visible, so no escape sequence of theirs reaches the terminal.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

from rich.console import Group
from rich.syntax import Syntax
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Select, Static

from engine.evals.sandbox import ISOLATION
from engine.pipeline.models import label_of, order_key


@dataclass
class ModelResults:
    """One model's results file, read: its samples in file order, and the lines that could not be read."""

    model: str
    samples: list[dict]
    bad_lines: list[str]

    @property
    def passed(self) -> int:
        return sum(1 for s in self.samples if s.get("passed") is True)


def read_code_results(code_dir: Path) -> list[ModelResults]:
    """Every `<model>.jsonl` under `code_dir`, in the report's model order; a corrupt line is skipped and
    named (file and line), never fatal: the rest of the file is still worth reading."""
    from engine.core.fsio import iter_jsonl

    paths = sorted(code_dir.glob("*.jsonl"), key=lambda p: order_key(p.stem))
    results = []
    for path in paths:
        samples: list[dict] = []
        bad: list = []  # CorruptLine errors (their text names file and line), or OSError text
        try:
            # the eval stage writes whole files atomically: a last line without newline is still a record
            for _, record in iter_jsonl(path, final_line_may_lack_newline=True, on_corrupt=bad.append):
                if "task_id" in record:
                    samples.append(record)
        except OSError as exc:
            bad.append(f"{path}: {exc.strerror or exc}")
        results.append(ModelResults(path.stem, samples, [str(b) for b in bad]))
    return results


def isolation_note(samples: list[dict]) -> Text:
    """How the samples ran (the eval writes `isolation` into every row): a run whose code was not isolated
    (`eval.code.allow_unsandboxed`) says so in red; files written before the field existed say nothing."""
    levels = {s.get("isolation") for s in samples} - {None}
    if not levels:
        return Text("")
    if len(levels) == 1 and levels <= set(ISOLATION.values()):  # "namespaces" or "bwrap": who isolated them
        return Text(f"sandboxed ({levels.pop()}) · ", style="green")
    return Text("NOT sandboxed: the code ran as you (eval.code.allow_unsandboxed) · ", style="bold red")


def sort_failed_first(samples: list[dict]) -> list[dict]:
    """Failed samples first (in file order), then the passed ones."""
    return sorted(samples, key=lambda s: s.get("passed") is True)


def _failed_how(status: object) -> str:
    return "failed" if status in (None, "", "failed") else f"failed ({status})"


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but tab and newline, DEL, C1 (ESC is \x1b)


def visible(text: object) -> str:
    """`text` with each control character written out (ESC as `\\x1b`): a terminal gets no sequence to run."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def first_line(text: object, width: int = 60) -> str:
    line = str(text or "").strip().splitlines()[-1:] or [""]  # the last line of a traceback says what broke
    return line[0][:width]


class CodeResultsScreen(ModalScreen[None]):
    """Problems × models of one run's code eval; Enter/highlight shows a completion and its error."""

    DEFAULT_CSS = """
    CodeResultsScreen { align: center middle; }
    CodeResultsScreen > Vertical { width: 100%; height: 100%; border: round $primary; background: $surface; }
    CodeResultsScreen #code-bar { height: 1; }
    CodeResultsScreen #code-model { width: 34; }
    CodeResultsScreen #code-summary { width: 1fr; padding: 0 1; color: $text-muted; }
    CodeResultsScreen #code-table { height: auto; max-height: 40%; }
    CodeResultsScreen #code-detail { height: 1fr; border-top: solid $primary 40%; }
    """

    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("m", "next_model", "Next model"),
    ]

    def __init__(self, run_id: str, code_dir: Path):
        super().__init__()
        self.run_id = run_id
        self.code_dir = code_dir
        self.results: list[ModelResults] = []
        self.model: str | None = None
        self.rows: list[dict] = []  # the samples in table order

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = f"code results · run {self.run_id}"
            with Horizontal(id="code-bar"):
                yield Select([], id="code-model", compact=True, allow_blank=True, prompt="(reading …)")
                yield Static("", id="code-summary")
            table = DataTable(id="code-table", cursor_type="row", zebra_stripes=True)
            table.add_columns("problem", "result", "what broke")
            yield table
            with VerticalScroll(id="code-detail"):
                yield Static("", id="code-detail-text")
        yield Footer()

    def on_mount(self) -> None:
        self._load()

    @work(exclusive=True, group="code-results")
    async def _load(self) -> None:
        self.results = await asyncio.to_thread(read_code_results, self.code_dir)
        select = self.query_one("#code-model", Select)
        if not self.results:
            self.query_one("#code-summary", Static).update(
                f"no code results in {self.code_dir} (eval.code.benchmark: none, or the eval stage has not run)"
            )
            return
        select.set_options([(self._model_label(r), r.model) for r in self.results])
        select.value = self.results[0].model  # shows it (Select.Changed)
        self.query_one("#code-table", DataTable).focus()

    @staticmethod
    def _model_label(results: ModelResults) -> str:
        return f"{label_of(results.model)} {results.passed}/{len(results.samples)}"

    @on(Select.Changed, "#code-model")
    def model_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            self.show_model(event.value)

    def show_model(self, model: str) -> None:
        results = next(r for r in self.results if r.model == model)
        self.model = model
        self.rows = sort_failed_first(results.samples)
        table = self.query_one("#code-table", DataTable)
        table.clear()
        for sample in self.rows:
            passed = sample.get("passed") is True
            result = (
                Text("✓ pass", style="green") if passed else Text(f"✗ {sample.get('status') or 'fail'}", style="red")
            )
            broke = Text("" if passed else first_line(visible(sample.get("error") or "")))  # a str would be markup
            table.add_row(Text(visible(sample.get("task_id"))), result, broke)
        failed = len(results.samples) - results.passed
        summary = isolation_note(results.samples)
        summary.append(f"{failed} failed, {results.passed} passed (failed first)")
        if results.bad_lines:
            summary.append(f" · skipped {len(results.bad_lines)} unreadable line(s): {visible(results.bad_lines[0])}")
        self.query_one("#code-summary", Static).update(summary)
        if self.rows:
            table.move_cursor(row=0)
            self.show_sample(0)
        else:
            self.query_one("#code-detail-text", Static).update("no samples in this file")

    @on(DataTable.RowHighlighted, "#code-table")
    def row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_sample(event.cursor_row)

    def show_sample(self, index: int) -> None:
        if not 0 <= index < len(self.rows):
            return
        sample = self.rows[index]
        passed = sample.get("passed") is True
        header = Text.assemble(
            (f"{visible(sample.get('task_id'))}  ", "bold"),
            ("passed" if passed else _failed_how(sample.get("status")), "green" if passed else "red"),
        )
        if isinstance(sample.get("duration_s"), (int, float)):
            header.append(f"  {sample['duration_s']:.2f} s", style="dim")
        parts = [
            header,
            Text("completion:", style="bold"),
            Syntax(
                visible(sample.get("completion") or "(empty completion)"),
                "python",
                line_numbers=True,
                word_wrap=True,
                theme="ansi_dark",
            ),
        ]
        if not passed:
            parts += [Text("error:", style="bold red"), Text(visible(sample.get("error") or "(no error text)"))]
        self.query_one("#code-detail-text", Static).update(Group(*parts))

    def action_next_model(self) -> None:
        if not self.results:
            return
        models = [r.model for r in self.results]
        following = models[(models.index(self.model) + 1) % len(models)] if self.model in models else models[0]
        self.query_one("#code-model", Select).value = following
