"""The GPU tab: the host (CPU total and per core, RAM, swap, load); per-GPU memory, utilization, temperature,
power and history; the processes on the GPUs, each with its CPU % and RSS, our stage workers labelled
"run <id> · <stage>" (and listed even when they use no GPU, so a CPU-only run shows something); a clear
message when there is no GPU or driver.

Sampling (NVML, or fake GPUs with TAS_FAKE_GPUS; the host with psutil): a timer of this widget starts a thread
worker per sample (never two at once: the sampler keeps the history), which posts a `GpuTab.Sampled` message;
widgets are only touched on the event loop.
Keys: `+` samples less often, `-` more often (0.25 s to 30 s); `k` stops the selected process after a
confirmation, only when it is ours (`engine.gpu.control`).
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.timer import Timer
from textual.widgets import DataTable, Static

from engine.gpu.control import NotOurs, describe, terminate
from engine.gpu.format import fmt_bytes, fmt_load, fmt_memory, fmt_percent
from engine.gpu.model import GpuProcess, GpuSnapshot, HostStats
from engine.gpu.sampler import MIN_INTERVAL_S, Sampler
from tui.screens.confirm import ConfirmScreen
from tui.widgets.gpu_card import GpuCard, level

INTERVAL_STEPS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
NO_PROCESS = "-"  # the key of the placeholder row of an empty process table
CORE_BARS = "▁▂▃▄▅▆▇█"
COLUMNS = ("gpu", "pid", "vram", "cpu", "rss", "process")


def _fmt_interval(seconds: float) -> str:
    return f"{seconds:g} s"


def host_markup(host: HostStats | None) -> str:
    """The host line in Textual markup: CPU (with one glyph per core up to 16 cores, else the core count), RAM,
    swap, load average. About 75 columns: it fits 80."""
    if host is None:
        return "[b]host[/] n/a"
    cpu = host.cpu_percent
    if host.per_core and len(host.per_core) <= 16:
        cores = " " + "".join(
            f"[{level(v / 100)}]{CORE_BARS[min(7, int(round(max(0.0, min(100.0, v)) / 100 * 7)))]}[/]"
            for v in host.per_core
        )
    else:
        cores = f" ×{host.cpu_count}" if host.cpu_count else ""
    ram = None if host.memory_used is None or not host.memory_total else host.memory_used / host.memory_total
    swap = None if host.swap_used is None or not host.swap_total else host.swap_used / host.swap_total
    swap_text = "none" if host.swap_total == 0 else fmt_memory(host.swap_used, host.swap_total)
    return " · ".join(
        [
            f"[b]CPU[/] [{level(None if cpu is None else cpu / 100)}]{fmt_percent(cpu)}[/]{cores}",
            f"[b]RAM[/] [{level(ram)}]{fmt_memory(host.memory_used, host.memory_total)}[/]",
            f"[b]swap[/] [{'$text' if swap is None else level(swap, 0.5, 0.8)}]{swap_text}[/]",
            f"[b]load[/] {fmt_load(host.load_average)}",
        ]
    )


class GpuTab(Vertical):
    """The GPU tab. `runs_dir` is the run store (to label our workers); `interval` seconds between samples."""

    DEFAULT_CSS = """
    GpuTab {
        height: 1fr;
    }
    GpuTab #gpu-message {
        width: 1fr;
        padding: 1 2;
        background: $error 15%;
        color: $text;
        border-left: thick $error;
        display: none;
    }
    GpuTab.-unavailable #gpu-message {
        display: block;
    }
    GpuTab.-unavailable #gpu-cards {
        display: none;
    }
    GpuTab #gpu-host {
        dock: top;
        height: 1;
        padding: 0 1;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    GpuTab #gpu-cards {
        dock: top;
        margin-top: 1;  /* under #gpu-host: docked widgets on one edge overlap, the margin stacks them */
        height: auto;
        max-height: 60%;
        scrollbar-size-vertical: 1;
    }
    GpuTab #gpu-cards:focus {
        background-tint: $foreground 5%;
    }
    GpuTab #gpu-procs {
        height: 1fr;
        margin-top: 1;
        min-height: 3;
    }
    GpuTab #gpu-status {
        dock: bottom;
        height: 1;
        padding: 0 1;
        color: $text-muted;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    """

    BINDINGS = [
        Binding("plus", "slower", "Slower", tooltip="Sample less often"),
        Binding("equals_sign", "slower", "Slower", show=False),
        Binding("minus", "faster", "Faster", tooltip="Sample more often"),
        Binding("k", "stop_process", "SIGTERM", tooltip="Stop the selected process (ours only), after a confirmation"),
    ]

    class Sampled(Message):
        """One GPU sample, posted by the sampling thread."""

        def __init__(self, snapshot: GpuSnapshot, history: dict[int, tuple[list, list]]):
            super().__init__()
            self.snapshot = snapshot
            self.history = history

    def __init__(self, runs_dir: Path, interval: float = 1.0, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.runs_dir = Path(runs_dir)
        self.interval = max(MIN_INTERVAL_S, float(interval))
        self.snapshot: GpuSnapshot | None = None
        self.samples = 0
        self._sampler: Sampler | None = None  # opened by the first sample (NVML init: off the event loop)
        self._sampling = False
        self._timer: Timer | None = None
        self._row_keys: list[str] = []
        self._row_processes: dict[str, GpuProcess] = {}

    # ----------------------------------------------------------------------------------------- layout

    def compose(self) -> ComposeResult:
        # The process table comes before the GPU list in the DOM (the list is docked on top) so that it is
        # the first focusable widget of the tab; Shift+Tab reaches the GPU list (it scrolls with many GPUs).
        yield Static("", id="gpu-message")
        yield Static("[b]host[/] sampling…", id="gpu-host")
        yield Static(self._status_text(), id="gpu-status")
        table: DataTable = DataTable(id="gpu-procs", cursor_type="row", zebra_stripes=True)
        table.add_column("GPU", key="gpu")
        table.add_column("PID", key="pid")
        table.add_column("VRAM", key="vram")
        table.add_column("CPU", key="cpu")
        table.add_column("RSS", key="rss")
        table.add_column("Process", key="process")
        yield table
        yield VerticalScroll(id="gpu-cards")

    def on_mount(self) -> None:
        self._timer = self.set_interval(self.interval, self._sample)
        self._sample()

    def on_unmount(self) -> None:
        self._timer.stop()
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None

    def on_show(self) -> None:
        """Coming into view (e.g. F3): take the focus, so the table and the +/- keys work at once."""
        focused = self.app.focused
        if focused is None or self not in focused.ancestors:
            self.query_one("#gpu-procs", DataTable).focus()

    # ---------------------------------------------------------------------------------------- sampling

    def _sample(self) -> None:
        """Take a sample in a thread, unless one is being taken (a slow NVML call outlasts a short interval)."""
        if not self._sampling:
            self._sampling = True
            self._take_sample()

    @work(thread=True, group="gpu-sampler", exit_on_error=False)
    def _take_sample(self) -> None:
        try:
            if self._sampler is None:
                self._sampler = Sampler(self.runs_dir)
            self.post_message(self.Sampled(self._sampler.sample(), self._sampler.history()))
        finally:
            self._sampling = False  # (a bool: the event loop reads it, this thread clears it once)

    @on(Sampled)
    async def _on_sampled(self, message: Sampled) -> None:
        self.snapshot = message.snapshot
        self.samples += 1
        snapshot = message.snapshot
        unavailable = snapshot.error is not None
        self.set_class(unavailable, "-unavailable")
        if unavailable:
            self.query_one("#gpu-message", Static).update(
                Text.assemble(
                    ("No GPU to show\n", "bold"),
                    snapshot.error or "",
                    (
                        "\nChecked again every few seconds. TAS_FAKE_GPUS=2 shows fake GPUs (for trying the panel).",
                        "dim",
                    ),
                )
            )
        else:
            await self._show_cards(snapshot, message.history)
        self.query_one("#gpu-host", Static).update(host_markup(snapshot.host))
        self._show_processes(snapshot)
        self.query_one("#gpu-status", Static).update(self._status_text())

    async def _show_cards(self, snapshot: GpuSnapshot, history: dict[int, tuple[list, list]]) -> None:
        box = self.query_one("#gpu-cards", VerticalScroll)
        cards = list(box.query_children(GpuCard))
        if [card.index for card in cards] != [gpu.index for gpu in snapshot.gpus]:
            await box.remove_children()
            cards = [GpuCard(gpu.index) for gpu in snapshot.gpus]
            await box.mount_all(cards)
        for card, gpu in zip(cards, snapshot.gpus):
            memory, utilization = history.get(gpu.index, ([], []))
            card.show(gpu, memory, utilization)

    def _show_processes(self, snapshot: GpuSnapshot) -> None:
        table = self.query_one("#gpu-procs", DataTable)
        rows = {}
        self._row_processes = {}
        for p in snapshot.processes:
            who = Text(p.label, style="bold green") if p.label else Text(p.name or "?", style="dim")
            on_gpu = p.gpu_index is not None
            key = f"{p.gpu_index if on_gpu else '-'}:{p.pid}"
            self._row_processes[key] = p
            rows[key] = (
                Text(str(p.gpu_index) if on_gpu else "-", justify="right"),
                Text(str(p.pid), justify="right"),
                Text(fmt_bytes(p.used_memory) if on_gpu else "-", justify="right"),
                Text(fmt_percent(p.cpu_percent), justify="right"),
                Text(fmt_bytes(p.rss), justify="right"),
                who,
            )
        if not rows:
            empty = "no process is using a GPU" if snapshot.error is None else "none of our workers is running"
            rows[NO_PROCESS] = (*(Text("") for _ in COLUMNS[:-1]), Text(empty, style="dim italic"))
        table.show_cursor = NO_PROCESS not in rows
        keys = list(rows)
        if keys == self._row_keys:
            for key, cells in rows.items():
                for column, value in zip(COLUMNS, cells):
                    table.update_cell(key, column, value)
            return
        selected = None
        if table.row_count and 0 <= table.cursor_row < len(self._row_keys):
            selected = self._row_keys[table.cursor_row]
        table.clear()
        for key, cells in rows.items():
            table.add_row(*cells, key=key)
        self._row_keys = keys
        if selected in rows:
            table.move_cursor(row=keys.index(selected))

    def _status_text(self) -> str:
        snap = self.snapshot
        parts = [f"every {_fmt_interval(self.interval)}"]
        if snap is None:
            parts.append("sampling…")
        elif snap.error:
            parts.append("no GPU (checked again every few seconds)")
        else:
            parts.append(f"{len(snap.gpus)} GPU{'s' if len(snap.gpus) != 1 else ''}")
            if snap.driver_version:
                parts.append(f"driver {snap.driver_version}")
            if snap.source.startswith("fake"):
                parts.append("fake GPUs (TAS_FAKE_GPUS)")
        return " · ".join(parts)

    # ----------------------------------------------------------------------------------------- actions

    def change_sample_interval(self, seconds: float) -> None:
        """Sample every `seconds` from now on (not `set_interval`: that is Textual's timer method)."""
        self.interval = max(MIN_INTERVAL_S, float(seconds))
        if self._timer is not None:
            self._timer.stop()
            self._timer = self.set_interval(self.interval, self._sample)
        self.query_one("#gpu-status", Static).update(self._status_text())

    def action_slower(self) -> None:
        bigger = [s for s in INTERVAL_STEPS if s > self.interval + 1e-9]
        self.change_sample_interval(bigger[0] if bigger else INTERVAL_STEPS[-1])

    def action_faster(self) -> None:
        smaller = [s for s in INTERVAL_STEPS if s < self.interval - 1e-9]
        self.change_sample_interval(smaller[-1] if smaller else INTERVAL_STEPS[0])

    def selected_process(self) -> GpuProcess | None:
        """The process of the table's cursor row (None for the placeholder row or an empty table)."""
        table = self.query_one("#gpu-procs", DataTable)
        if not table.row_count or not 0 <= table.cursor_row < len(self._row_keys):
            return None
        return self._row_processes.get(self._row_keys[table.cursor_row])

    def action_stop_process(self) -> None:
        """`k`: SIGTERM the selected process after a confirmation; a process not labelled as ours is refused."""
        process = self.selected_process()
        if process is None:
            self.notify("Select a process row first.", severity="warning")
            return
        try:
            question, details = describe(process)
        except NotOurs as exc:
            self.notify(str(exc), title="Not ours", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._terminate(process)

        self.app.push_screen(ConfirmScreen(question, details, yes="send SIGTERM", no="cancel"), answered)

    @work(thread=True, group="gpu-stop", exit_on_error=False)
    def _terminate(self, process: GpuProcess) -> None:
        """Off the event loop: `terminate` reads the run store and takes the run's lock."""
        try:
            message, severity = terminate(process, self.runs_dir), "information"
        except NotOurs as exc:
            message, severity = str(exc), "warning"
        except Exception as exc:  # reported, never raised into the panel
            message, severity = f"could not stop pid {process.pid}: {exc}", "error"
        self.app.call_from_thread(self.notify, message, severity=severity)  # type: ignore[arg-type]
        self.app.call_from_thread(self._sample)  # sample again now: the table shows the process going
