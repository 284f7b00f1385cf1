"""What a stage gets and may raise: the API between the worker and the stage modules.

Light module. It lives apart from engine.runner.worker because the worker runs as `python -m engine.runner.worker`
(module `__main__`): exception classes defined there would be different classes from the ones the
stages import, and a stage's StageCancelled would not be caught as one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from engine.config.errors import ConfigError
from engine.config.prompts import load_system_prompts
from engine.config.schema import TASConfig
from engine.core.fsio import FileWriteError
from engine.store.events import EventWriter
from engine.store.runs import Run


class StageCancelled(Exception):
    """Raised by `StageContext.check_cancelled` after SIGTERM; the stage should have saved by then."""


class StageError(Exception):
    """An expected failure with a message for the user (bad input, missing file, ...): no traceback."""


EXPECTED_FAILURES = (StageError, ConfigError, FileWriteError)
"""Failures the user can fix: reported as a message, no traceback (ModelNotFound is a StageError; FileWriteError names path, key and what to do)."""


@dataclass
class StageContext:
    """What a stage gets: its config, where to write, how to report, and whether to stop."""

    stage: str
    run: Run
    config: TASConfig
    events: EventWriter
    rank: int = 0
    world_size: int = 1
    cancel_event: threading.Event = field(default_factory=threading.Event)

    @property
    def stage_dir(self) -> Path:
        return self.run.stage_dir(self.stage)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_event.is_set()

    def system_prompt(self, role: str) -> str | None:
        """The `role` ("Teacher" / "Assistant") system prompt of prompts.path; None (with a warning) if absent."""
        path = Path(self.config.prompts.path)
        if not path.exists():
            self.events.log(f"prompts.path: {path} not found; no {role} system prompt", level="warning")
            return None
        try:
            return load_system_prompts(path).get(role)
        except ValueError as exc:
            raise StageError(str(exc)) from None

    def check_cancelled(self) -> None:
        """Call between units of work: raises StageCancelled once SIGTERM has arrived."""
        if self.cancel_event.is_set():
            raise StageCancelled("cancelled by request")
