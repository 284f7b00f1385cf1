"""A GPU in three lines (GpuCard: name, temperature, power; memory and utilization meters, each with its
history on a fixed scale, HistorySparkline), and the meter colours the GPU tab's host line shares."""

from __future__ import annotations

from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Sparkline, Static

from engine.gpu.format import bar, fmt_memory, fmt_power, fmt_temp, fmt_util
from engine.gpu.model import GpuInfo

BAR_WIDTH = 16


def level(fraction: float | None, warn: float = 0.75, high: float = 0.9) -> str:
    if fraction is None:
        return "$text-muted"
    if fraction >= high:
        return "$error"
    if fraction >= warn:
        return "$warning"
    return "$success"


class HistorySparkline(Sparkline):
    """A Sparkline on a fixed scale (0 to `maximum`), newest sample on the right.

    Textual's Sparkline scales between the data's own min and max, which turns a 1% wobble of memory
    into a full-height saw; a monitor wants an absolute scale, and stable output while few samples exist.
    """

    BARS: ClassVar[str] = "▁▂▃▄▅▆▇█"

    def __init__(self, maximum: float | None = None, *, id: str | None = None, classes: str | None = None):
        super().__init__([], id=id, classes=classes)
        self.maximum = maximum

    def set_history(self, values: list[float | None], maximum: float | None) -> None:
        self.maximum = maximum
        self.data = list(values)

    def render(self) -> Text:
        width = max(0, self.size.width)
        values = list(self.data or [])[-width:] if width else []
        values = [None] * (width - len(values)) + values
        _, base = self.background_colors
        low = base + self.get_component_styles("sparkline--min-color").color
        high = base + self.get_component_styles("sparkline--max-color").color
        text = Text(no_wrap=True, overflow="crop")
        top = self.maximum or max((v for v in values if v is not None), default=0) or 1
        for value in values:
            if value is None:
                text.append(" ")
                continue
            fraction = max(0.0, min(1.0, value / top))
            index = min(len(self.BARS) - 1, int(round(fraction * (len(self.BARS) - 1))))
            text.append(self.BARS[index], style=Style(color=low.blend(high, fraction).rich_color))
        return text


class GpuCard(Vertical):
    """One GPU in three lines: name + temperature + power; memory bar + history; utilization bar + history."""

    DEFAULT_CSS = """
    GpuCard {
        height: auto;
        padding: 0 1;
    }
    GpuCard.-odd {
        background: $boost;
    }
    GpuCard Horizontal {
        height: 1;
    }
    GpuCard .gpu-title {
        width: 1fr;
        text-style: bold;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    GpuCard .gpu-vitals {
        width: auto;
        text-wrap: nowrap;
    }
    GpuCard .gpu-meter {
        width: 37;
        text-wrap: nowrap;
    }
    GpuCard HistorySparkline {
        width: 1fr;
        margin-left: 1;
    }
    GpuCard HistorySparkline > .sparkline--min-color {
        color: $success 60%;
    }
    GpuCard HistorySparkline > .sparkline--max-color {
        color: $error;
    }
    GpuCard HistorySparkline.-util > .sparkline--min-color {
        color: $accent 50%;
    }
    GpuCard HistorySparkline.-util > .sparkline--max-color {
        color: $accent;
    }
    """

    def __init__(self, index: int):
        super().__init__(id=f"gpu-card-{index}", classes="-odd" if index % 2 else "")
        self.index = index

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield Static("", classes="gpu-title")
            yield Static("", classes="gpu-vitals")
        with Horizontal():
            yield Static("", classes="gpu-meter gpu-mem")
            yield HistorySparkline(classes="-mem")
        with Horizontal():
            yield Static("", classes="gpu-meter gpu-util")
            yield HistorySparkline(100.0, classes="-util")

    def show(self, gpu: GpuInfo, memory: list, utilization: list) -> None:
        if not self.query(".gpu-title"):
            # mounted but not composed yet (seen on a loaded machine): the next sample fills the card
            return
        title = Text(f"GPU {gpu.index} · {gpu.name}")
        self.query_one(".gpu-title", Static).update(title)
        temp = gpu.temperature_c
        temp_style = "" if temp is None else ("$error" if temp >= 85 else "$warning" if temp >= 75 else "")
        temp_text = "temp n/a" if temp is None else fmt_temp(temp)
        power = fmt_power(gpu.power_w, gpu.power_limit_w)
        power_text = "power n/a" if power == "n/a" else power
        vitals = (f"[{temp_style}]{temp_text}[/]" if temp_style else temp_text) + "  " + _escape(power_text)
        self.query_one(".gpu-vitals", Static).update(vitals)
        frac = gpu.memory_fraction
        self.query_one(".gpu-mem", Static).update(
            f"mem  {meter(frac, level(frac))} {fmt_memory(gpu.memory_used, gpu.memory_total):>15}"
        )
        util = gpu.utilization_gpu
        ufrac = None if util is None else util / 100
        self.query_one(".gpu-util", Static).update(f"util {meter(ufrac, '$accent')} {fmt_util(util):>15}")
        self.query_one(".-mem", HistorySparkline).set_history(memory, gpu.memory_total)
        self.query_one(".-util", HistorySparkline).set_history(utilization, 100.0)


def meter(fraction: float | None, color: str, width: int = BAR_WIDTH) -> str:
    """A meter in Textual markup: the filled part in `color`, the rest as a muted track."""
    text = bar(fraction, width)
    filled = text.count("█")
    return f"[{color}]{text[:filled]}[/][$text-disabled]{text[filled:]}[/]"


def _escape(text: str) -> str:
    return text.replace("[", r"\[")
