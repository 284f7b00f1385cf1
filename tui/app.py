"""The TAS panel: a Textual app over the engine's light half.

Tabs: Stages (runs and their stages, live), Config (edit config.yaml safely), GPU (NVML monitor) and
Chat (talk to the student). The panel never imports the ML stack: stages run in detached worker
processes (engine.runner.launcher), the chat model lives in a chat worker process (engine.chat.worker), and
everything shown is read from the run store, NVML or those workers' JSON lines.

`config_path` is the app's reactive: the Config tab sets it when another file is chosen, and every tab
watches it (new runs, the chat targets and the header follow). The run store is fixed for the session.

Start-up: the first frame is the Stages tab, bare; what it does not need is loaded after it. The Stages
tab loads the run store, the config schema and plotext in a thread once it is on screen; the Config and
Chat tabs are built the first time they are shown; the GPU tab is built right after the first frame (it
samples in the background), or with the first frame when nothing has to be read to build it.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.reactive import reactive
from textual.widgets import Footer, Header, TabbedContent, TabPane

from tui.tabs.stages import StagesTab, preload
from tui.widgets.lazy_pane import LazyPane

TABS = ("stages", "config", "gpu", "chat")


class TASPanel(App):
    TITLE = "TAS Panel"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("f1", "show_tab('stages')", "Stages", show=False),
        Binding("f2", "show_tab('config')", "Config", show=False),
        Binding("f3", "show_tab('gpu')", "GPU", show=False),
        Binding("f4", "show_tab('chat')", "Chat", show=False),
    ]

    config_path: reactive[str] = reactive("config.yaml", init=False)
    """The config file the panel works with (set by the Config tab; watched by every tab)."""

    def __init__(
        self, config_path: str = "config.yaml", runs_dir: str | Path | None = None, gpu_interval: float | None = None
    ):
        super().__init__()
        self.set_reactive(TASPanel.config_path, config_path)
        self._start_config = config_path
        self._runs_dir = Path(runs_dir) if runs_dir is not None else None
        self._runs_dir_lock = threading.Lock()
        self.gpu_interval = gpu_interval
        self.sub_title = config_path

    @property
    def runs_dir(self) -> Path:
        """The run store: the one given, else `runs_root` of the config the panel started with. Resolving
        it reads that config (a few hundred ms the first time): call it off the event loop."""
        with self._runs_dir_lock:
            if self._runs_dir is None:
                from engine.store.runs import runs_root

                self._runs_dir = runs_root(self._start_config)
            return self._runs_dir

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="stages"):
            with TabPane("Stages", id="stages"):
                yield StagesTab(self.config_path, lambda: self.runs_dir)
            yield LazyPane("Config", self._config_tab, id="config")
            if self._runs_dir is not None and self.gpu_interval:
                from tui.tabs.gpu import GpuTab

                with TabPane("GPU", id="gpu"):
                    yield GpuTab(self._runs_dir, interval=self.gpu_interval)
            else:
                yield LazyPane("GPU", self._gpu_tab, id="gpu")
            yield LazyPane("Chat", self._chat_tab, id="chat")
        yield Footer()

    def on_mount(self) -> None:
        self.call_after_refresh(self._after_first_frame)

    def _after_first_frame(self) -> None:
        """What the first frame did not wait for: reading the run store, and the GPU tab."""
        self.query_one(StagesTab).start_reader()
        gpu = self.query_one("#gpu", TabPane)
        if isinstance(gpu, LazyPane):
            self.run_worker(gpu.build, group="panes")

    def watch_config_path(self, path: str) -> None:
        self.sub_title = path

    async def action_quit(self) -> None:
        """Quit (q, ctrl+q); with unsaved Config tab edits, ask first: n / Esc stays, y quits and loses them."""
        edited = self._unsaved_config_file()
        if edited is None:
            self.exit()
            return
        from tui.screens.confirm import ConfirmScreen

        def answered(yes: bool | None) -> None:
            if yes:
                self.exit()

        question = f"Quit and lose your edits to {edited}?"
        details = "The Config tab holds changes that are not saved (ctrl+s there shows the diff and saves)."
        await self.push_screen(ConfirmScreen(question, details, yes="quit, lose the edits", no="stay"), answered)

    def _unsaved_config_file(self) -> str | None:
        """The file the Config tab edits when its buffer differs from that file; None when nothing would be
        lost (no edits, or the tab was never opened)."""
        pane = self.query_one("#config", TabPane)
        if isinstance(pane, LazyPane) and not pane.built:
            return None
        from tui.tabs.config import ConfigTab

        tab = next(iter(pane.query(ConfigTab)), None)
        return tab.path if tab is not None and tab.text != tab.saved_text else None

    # ------------------------------------------------------------------------- the lazy tabs

    async def _config_tab(self):
        await asyncio.to_thread(preload, "tui.tabs.config", "engine.config.load")
        from tui.tabs.config import ConfigTab

        return ConfigTab(self.config_path)

    async def _chat_tab(self):
        await asyncio.to_thread(preload, "tui.tabs.chat", "engine.config.load")
        from tui.tabs.chat import ChatTab

        return ChatTab(self.config_path)

    async def _gpu_tab(self):
        runs_dir, interval = await asyncio.to_thread(self._gpu_settings, self.config_path)
        from tui.tabs.gpu import GpuTab

        return GpuTab(runs_dir, interval=interval)

    def _gpu_settings(self, config_path: str) -> tuple[Path, float]:
        """In a thread: the run store and the sampling interval (both may read the config)."""
        preload("tui.tabs.gpu")
        return self.runs_dir, self.gpu_interval or _gpu_interval(config_path)

    async def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if isinstance(event.pane, LazyPane):
            await event.pane.build()

    async def action_show_tab(self, tab: str) -> None:
        """Switch tab and focus its first widget, or the one its content names in `AUTO_FOCUS` (a selector,
        as on Textual's screens): focus left in a hidden pane would switch back, and a tab's own `on_show`
        focus may run before or after this, depending on how long the pane took to build."""
        tabbed = self.query_one(TabbedContent)
        tabbed.active = tab
        pane = tabbed.get_pane(tab)
        if isinstance(pane, LazyPane):
            await pane.build()
        named = [getattr(child, "AUTO_FOCUS", None) for child in pane.children]
        focusable = [w for selector in named if selector for w in pane.query(selector) if w.focusable]
        focusable = focusable or [w for w in pane.query("*") if w.focusable]
        if focusable:
            focusable[0].focus()


def _gpu_interval(config_path: str) -> float:
    from engine.config.errors import ConfigError
    from engine.config.load import load_config

    try:
        return load_config(config_path).panel.gpu_sample_interval_s
    except ConfigError:
        return 1.0


def main(config_path: str = "config.yaml") -> int:
    TASPanel(config_path).run()
    return 0
