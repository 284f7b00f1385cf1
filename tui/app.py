"""The TAS panel (Textual). Placeholder until the panel issue lands: it lists the run store's runs.

The panel never imports the ML stack: it talks to stage workers through the run store and events.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import App, ComposeResult
from textual.widgets import Footer, Header, Static

from engine.cli import runs_root
from engine.render import run_block
from engine.runs import RunStore


class RunsView(Static):
    """Recent runs as `tas status` shows them, refreshed every second."""

    def __init__(self, store: RunStore):
        super().__init__()
        self.store = store

    def on_mount(self) -> None:
        self.refresh_runs()
        self.set_interval(1.0, self.refresh_runs)

    def refresh_runs(self) -> None:
        runs = self.store.list()[:5]
        if not runs:
            self.update(f"No runs in {self.store.root}/ yet.\n\nStart one from a shell: tas run data --config configs/tiny.yaml")
        else:
            self.update("\n\n".join(run_block(run) for run in runs))


class TASPanel(App):
    TITLE = "TAS Panel"
    BINDINGS = [("q", "quit", "Quit")]

    def __init__(self, config_path: str = "config.yaml"):
        super().__init__()
        self.config_path = config_path
        self.sub_title = config_path

    def compose(self) -> ComposeResult:
        yield Header()
        yield RunsView(RunStore(runs_root(self.config_path)))
        yield Footer()


def main(config_path: str = "config.yaml") -> int:
    if not Path(config_path).exists():
        print(f"note: {config_path} not found; the panel shows the run store only")
    TASPanel(config_path).run()
    return 0
