"""The TAS panel: a Textual app over the engine's light half.

Tabs: Stages (runs and their stages, live), Config (edit config.yaml safely), GPU (NVML monitor) and
Chat (talk to the student). The panel never imports the ML stack: stages run in detached worker
processes (engine.core.launcher), the chat model lives in a chat worker process (engine.chat.worker), and
everything shown is read from the run store, NVML or those workers' JSON lines.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, Header, TabbedContent, TabPane

from engine.core.runs import runs_root
from tui.tabs.chat import ChatTab
from tui.tabs.config import ConfigFileChosen, ConfigTab
from tui.tabs.gpu import GpuTab
from tui.tabs.stages import StagesTab

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

    def __init__(self, config_path: str = "config.yaml", runs_dir: str | Path | None = None,
                 gpu_interval: float | None = None):
        super().__init__()
        self.config_path = config_path
        self.runs_dir = Path(runs_dir) if runs_dir is not None else runs_root(config_path)
        self.gpu_interval = gpu_interval
        self.sub_title = config_path

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="stages"):
            with TabPane("Stages", id="stages"):
                yield StagesTab(self.config_path, self.runs_dir)
            with TabPane("Config", id="config"):
                yield ConfigTab(self.config_path)
            with TabPane("GPU", id="gpu"):
                yield GpuTab(self.runs_dir, interval=self.gpu_interval or _gpu_interval(self.config_path))
            with TabPane("Chat", id="chat"):
                yield ChatTab(self.config_path)
        yield Footer()

    def on_config_file_chosen(self, message: ConfigFileChosen) -> None:
        self.config_path = message.path
        self.query_one(StagesTab).config_path = message.path

    def action_show_tab(self, tab: str) -> None:
        """Switch tab and focus its first widget (focus left in a hidden pane would switch back)."""
        self.query_one(TabbedContent).active = tab
        pane = self.query_one(f"TabPane#{tab}", TabPane)
        focusable = [w for w in pane.query("*") if w.focusable]
        if focusable:
            focusable[0].focus()


def _gpu_interval(config_path: str) -> float:
    from engine.core.config import ConfigError, load_config

    try:
        return load_config(config_path).panel.gpu_sample_interval_s
    except ConfigError:
        return 1.0


def main(config_path: str = "config.yaml") -> int:
    TASPanel(config_path).run()
    return 0
