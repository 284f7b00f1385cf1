"""Text for people: the `fmt_*` helpers, `bar`, and the 80-column table `tas gpu` prints.

Kept apart so that the panel's GPU tab and the CLI show values the same way ("n/a" for a field the GPU does
not support) without either depending on the other. Stdlib only.
"""

from __future__ import annotations

import time

from engine.gpu.model import GIB, MIB, GpuSnapshot, HostStats

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


def fmt_percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def fmt_load(load: tuple[float, float, float] | None) -> str:
    return "n/a" if load is None else " ".join(f"{v:.2f}" for v in load)


def fmt_host(host: HostStats | None) -> str:
    """`CPU 23% ×8 · load 1.52 1.40 1.31 · RAM 9.2/62.0 GiB · swap 0.0/8.0 GiB`; n/a for what cannot be read."""
    if host is None:
        return "host n/a"
    cores = f" ×{host.cpu_count}" if host.cpu_count else ""
    swap = "none" if host.swap_total == 0 else fmt_memory(host.swap_used, host.swap_total)
    return (
        f"CPU {fmt_percent(host.cpu_percent)}{cores} · load {fmt_load(host.load_average)} · "
        f"RAM {fmt_memory(host.memory_used, host.memory_total)} · swap {swap}"
    )


def bar(fraction: float | None, width: int) -> str:
    if fraction is None:
        return "·" * width
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "█" * filled + "░" * (width - filled)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render_snapshot(snapshot: GpuSnapshot, width: int = WIDTH) -> str:
    """The `tas gpu` table: the host line, one line per GPU, then the processes (CPU % and RSS beside
    each); every line fits `width` columns. With `error` (no GPU): the error, the host and our workers."""
    stamp = time.strftime("%H:%M:%S", time.localtime(snapshot.ts))
    if snapshot.error:
        lines = [_fit(snapshot.error, 10_000), "", f"host {fmt_host(snapshot.host)} · {stamp}"]
    else:
        head = f"{len(snapshot.gpus)} GPU{'s' if len(snapshot.gpus) != 1 else ''}"
        head += f" · driver {snapshot.driver_version or '?'}"
        if snapshot.source and snapshot.source != "NVML":
            head += f" · {snapshot.source}"
        lines = [f"{head} · {stamp}", f"host {fmt_host(snapshot.host)}", ""]
        lines.append(f"{'GPU':>3}  {'Name':<22} {'Memory':<28} {'Util':>4} {'Temp':>5} {'Power':>11}")
        for g in snapshot.gpus:
            lines.append(
                f"{g.index:>3}  {_fit(g.name, 22):<22} {bar(g.memory_fraction, 12)} "
                f"{fmt_memory(g.memory_used, g.memory_total):>15} {fmt_util(g.utilization_gpu):>4} "
                f"{fmt_temp(g.temperature_c):>5} {fmt_power(g.power_w, g.power_limit_w):>11}"
            )
    lines.append("")
    if snapshot.processes:
        lines.append(f"{'GPU':>3}  {'PID':>8}  {'VRAM':>9}  {'CPU':>5}  {'RSS':>9}  Process")
        for p in snapshot.processes:
            gpu = "-" if p.gpu_index is None else str(p.gpu_index)
            vram = "-" if p.gpu_index is None else fmt_bytes(p.used_memory)
            lines.append(
                f"{gpu:>3}  {p.pid:>8}  {vram:>9}  {fmt_percent(p.cpu_percent):>5}  {fmt_bytes(p.rss):>9}  "
                f"{p.label or p.name or '?'}"
            )
    elif not snapshot.error:
        lines.append("no processes on the GPUs")
    if snapshot.error:
        lines = lines[:1] + [_fit(line, width) for line in lines[1:]]
        return "\n".join(lines).rstrip("\n")
    return "\n".join(_fit(line, width) for line in lines)
