"""The metrics pane beside the loss chart: the selected stage's state, elapsed time, progress and latest
metrics, or, for the eval stage, its report with the models side by side (`eval_table`)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from engine.pipeline.models import STUDENT_KD, label_of


class MetricsPane(Static):
    def show(self, stage, report: dict | None = None) -> None:
        """`stage`: store_reader.StageRow, or None."""
        if stage is None:
            self.update("")
        elif report and isinstance(report.get("models"), dict):
            self.update(eval_table(report))
        else:
            self.update("\n".join(stage.metrics))


def cell(numbers: dict, key: str, width: int, spec: str) -> str:
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
            f"{label_of(name)[:10]:<10}{cell(numbers, 'loss', 6, '.2f')}"
            f"{cell(numbers, 'perplexity', 6, '.0f')}{cell(numbers, 'kl_to_assistant', 6, '.3f')}"
            f"{cell(numbers, 'pass@1', 7, '.2f')}\n"
        )
    code = report.get("code") or {}
    note = f"{report.get('examples', '?')} answers; KL to assistant"
    if code:
        note += f"; {code.get('benchmark')} {code.get('problems')} problems (v: each problem)"
    note += f"; x exports the {STUDENT_KD.title}"
    text.append(note, style="dim")
    return text
