"""Text for people: the `fmt_*` helpers, `bar`, and the 80-column table `tas gpu` prints.

Kept apart so that the panel's GPU tab and the CLI show values the same way ("n/a" for a field the GPU does
not support) without either depending on the other. Stdlib only.
"""

from __future__ import annotations

import time

from engine.gpu.model import GIB, MIB, GpuSnapshot

WIDTH = 80


def fmt_bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    if value >= GIB:
        return f"{value / GIB:.1f} GiB"
    return f"{value / MIB:.0f} MiB"


def fmt_memory(used: int | None, total: int | None) -> str:
    if used is None and total is None:
        return "n/a"
    u = "?" if used is None else f"{used / GIB:.1f}"
    t = "?" if total is None else f"{total / GIB:.1f}"
    return f"{u}/{t} GiB"


def fmt_util(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def fmt_temp(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}°C"


def fmt_power(power: float | None, limit: float | None) -> str:
    if power is None and limit is None:
        return "n/a"
    p = "?" if power is None else f"{power:.0f}"
    return p + ("" if limit is None else f"/{limit:.0f}") + " W"


def bar(fraction: float | None, width: int) -> str:
    if fraction is None:
        return "·" * width
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "█" * filled + "░" * (width - filled)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render_snapshot(snapshot: GpuSnapshot, width: int = WIDTH) -> str:
    """The `tas gpu` table: one line per GPU, then the processes; every line fits `width` columns."""
    if snapshot.error:
        return _fit(snapshot.error, 10_000)
    stamp = time.strftime("%H:%M:%S", time.localtime(snapshot.ts))
    head = f"{len(snapshot.gpus)} GPU{'s' if len(snapshot.gpus) != 1 else ''}"
    head += f" · driver {snapshot.driver_version or '?'}"
    if snapshot.source and snapshot.source != "NVML":
        head += f" · {snapshot.source}"
    lines = [_fit(f"{head} · {stamp}", width), ""]
    lines.append(f"{'GPU':>3}  {'Name':<22} {'Memory':<28} {'Util':>4} {'Temp':>5} {'Power':>11}")
    for g in snapshot.gpus:
        lines.append(
            f"{g.index:>3}  {_fit(g.name, 22):<22} {bar(g.memory_fraction, 12)} "
            f"{fmt_memory(g.memory_used, g.memory_total):>15} {fmt_util(g.utilization_gpu):>4} "
            f"{fmt_temp(g.temperature_c):>5} {fmt_power(g.power_w, g.power_limit_w):>11}"
        )
    lines.append("")
    if snapshot.processes:
        lines.append(f"{'GPU':>3}  {'PID':>8}  {'VRAM':>9}  Process")
        for p in snapshot.processes:
            lines.append(f"{p.gpu_index:>3}  {p.pid:>8}  {fmt_bytes(p.used_memory):>9}  {p.label or p.name or '?'}")
    else:
        lines.append("no processes on the GPUs")
    return "\n".join(_fit(line, width) for line in lines)
