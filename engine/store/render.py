"""Plain-text views of runs and events for the terminal (`tas status`, `tas logs`, `tas run`).

Light module. Lines fit 80 columns; colour is added by rich markup only when printing to a terminal.
"""

from __future__ import annotations

import time
from typing import Any

from rich.markup import escape

from engine.pipeline.models import STUDENT_CE, STUDENT_KD
from engine.store.runs import Run, StageStatus

STATE_STYLE = {
    "pending": ("·", "dim"),
    "queued": ("…", "cyan"),
    "running": ("▶", "bold yellow"),
    "done": ("✓", "green"),
    "failed": ("✗", "bold red"),
    "cancelled": ("■", "magenta"),
    "died": ("†", "bold red"),
}
"""A stage's state (StageStatus.state): its glyph and colour, in the terminal and the panel alike."""

RUN_STYLE = {
    "live": STATE_STYLE["running"],
    "finished": STATE_STYLE["done"],
    "failed": (STATE_STYLE["failed"][0], "red"),  # the stage's glyph, not bold: a run list need not shout
    "died": (STATE_STYLE["died"][0], "red"),
    "cancelled": STATE_STYLE["cancelled"],
    "stopped": ("‖", "yellow"),
    "new": STATE_STYLE["pending"],
}
"""A run's overall state (Run.overall_state): its glyph and colour, in `tas status` and the panel's run list.
A run looks like the stage it takes its state from (running, done, pending, the last stage's end)."""

WIDTH = 80


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def ago(ts: float) -> str:
    return duration(time.time() - ts) + " ago"


def number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"  # counts logged as floats (num_tokens=12640.0) read as counts
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def bar(fraction: float, width: int = 12) -> str:
    filled = int(round(fraction * width))
    return "━" * filled + "─" * (width - filled)


def progress_text(status: StageStatus) -> str:
    p = status.progress
    if not p:
        return ""
    unit = p.get("unit", "")
    fraction = status.fraction
    if fraction is None:
        return f"{number(p.get('done'))} {unit}".strip()
    text = f"{bar(fraction)} {fraction * 100:3.0f}% {number(p.get('done'))}/{number(p.get('total'))} {unit}".rstrip()
    if status.eta_s is not None:
        text += f" ETA {duration(status.eta_s)}"
    return text


def kd_vs_ce(status: StageStatus) -> str:
    """The eval stage's answer to "did KD help?": the KD student against the CE-only control."""
    parts = []
    for metric, label in (("pass@1", "pass@1"), ("kl_to_assistant", "KL"), ("loss", "loss")):
        kd, ce = status.metrics.get(f"{STUDENT_KD.name}/{metric}"), status.metrics.get(f"{STUDENT_CE.name}/{metric}")
        if kd and ce:
            parts.append(f"{label} {number(kd.get('value'))} vs {number(ce.get('value'))}")
    return ("KD vs CE: " + ", ".join(parts)) if parts else ""


def metrics_text(status: StageStatus, limit: int = 3) -> str:
    if status.name == "eval" and (summary := kd_vs_ce(status)):
        return summary
    names = [n for n in ("loss", "eval_loss", "kd_loss", "tokens_per_s") if n in status.metrics]
    names += [n for n in status.metrics if n not in names]
    return "  ".join(f"{n}={number(status.metrics[n].get('value'))}" for n in names[:limit])


def stage_line(status: StageStatus) -> str:
    """One 80-column line (plus an indented error line) for a stage, with rich markup."""
    glyph, style = STATE_STYLE.get(status.state, ("?", ""))
    head = f"  {status.name:<8} [{style}]{glyph} {status.state}[/]" + " " * (9 - len(status.state))
    detail = progress_text(status) if status.state == "running" else ""
    if not detail:
        detail = metrics_text(status) or progress_text(status)
    elapsed = duration(status.elapsed) if status.started_at else ""
    room = WIDTH - 24 - len(elapsed)  # 22 for name and state, 2 spaces
    if len(detail) > room:
        detail = detail[: max(0, room - 1)] + "…"
    line = f"{head} {escape(detail):<{room}} {elapsed}".rstrip() if (detail or elapsed) else head.rstrip()
    problem = status.error or (status.message if status.state == "cancelled" else None)
    if problem:
        line += "\n" + _indent_wrapped(problem, "[red]", "[/]")
    return line


def _indent_wrapped(text: str, open_tag: str, close_tag: str, indent: int = 13) -> str:
    import textwrap

    lines = textwrap.wrap(" ".join(text.split()), WIDTH - indent) or [""]
    if len(lines) > 4:
        lines = lines[:4]
        lines[-1] = lines[-1][: WIDTH - indent - 1] + "…"
    pad = " " * indent
    return "\n".join(f"{pad}{open_tag}{escape(line)}{close_tag}" for line in lines)


def run_block(run: Run) -> str:
    stages = run.stages()
    state = run.overall_state(stages)
    label = "not started" if state == "new" else state
    overall = f"[{RUN_STYLE.get(state, ('?', 'red'))[1]}]{label}[/]"
    source = run.config_source
    room = WIDTH - len(run.id) - len(ago(run.created)) - 20
    if len(source) > room:
        source = "…" + source[-max(room - 1, 8) :]
    head = f"[bold]{escape(run.id)}[/]  {escape(source)}  {ago(run.created)}  {overall}"
    about = []
    if run.name:
        about.append(f"name: {run.name}")
    if run.note:
        about.append(f"note: {run.note}")
    if run.reused:
        about.append("reused: " + ", ".join(f"{stage} from {source_run}" for stage, source_run in run.reused.items()))
    extra = [f"  [dim]{escape(line[: WIDTH - 2])}[/]" for line in about]
    return "\n".join([head, *extra, *(stage_line(s) for s in stages)])


def event_line(stage: str, event: dict[str, Any]) -> str | None:
    """One event as a terminal line (rich markup), or None for events not worth a line."""
    kind = event.get("kind")
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("ts", time.time())))
    prefix = f"[dim]{stamp}[/] [bold]{stage:<7}[/]"
    if kind == "status":
        state = event.get("state", "?")
        glyph, style = STATE_STYLE.get(state, ("?", ""))
        extra = event.get("error") or event.get("message") or ""
        if state == "done" and "seconds" in event:
            extra = f"in {duration(event['seconds'])}"
        return f"{prefix} [{style}]{glyph} {state}[/] {escape(str(extra))}".rstrip()
    if kind == "log":
        level = event.get("level", "info")
        style = {"warning": "yellow", "error": "red"}.get(level, "")
        msg = escape(str(event.get("msg", "")))
        return f"{prefix} [{style}]{msg}[/]" if style else f"{prefix} {msg}"
    if kind == "metric":
        step = event.get("step")
        at = f" step {step}" if step is not None else ""
        return f"{prefix} {escape(str(event.get('name')))}={number(event.get('value'))}{at}"
    if kind == "artifact":
        return f"{prefix} wrote {escape(str(event.get('what', '')))}: {escape(str(event.get('path', '')))}"
    if kind == "progress":
        total = event.get("total")
        done = number(event.get("done"))
        amount = f"{done}/{number(total)}" if total else done
        return f"{prefix} [dim]{amount} {escape(str(event.get('unit', '')))}[/]"
    if kind == "memory":
        devices = event.get("devices") or {}
        text = "  ".join(f"{k}={v / 2**30:.2f}GiB" for k, v in devices.items() if isinstance(v, (int, float)))
        return f"{prefix} [dim]peak memory {text}[/]"
    return None
