"""A TabPane whose content is built on demand: the panel's first frame pays only for the tab it shows.

The factory may be a plain function or a coroutine function (to read files in a thread first); it runs
once, on the event loop, the first time `build()` is awaited: when the tab is first shown, or earlier
for a tab that works in the background (the GPU sampler).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

from textual.widget import Widget
from textual.widgets import TabPane

Factory = Callable[[], Widget | Awaitable[Widget]]


class LazyPane(TabPane):
    def __init__(self, title: str, factory: Factory, *, id: str):
        super().__init__(title, id=id)
        self._factory: Factory | None = factory
        self._lock = asyncio.Lock()

    @property
    def built(self) -> bool:
        return self._factory is None

    async def build(self) -> None:
        """Build and mount the content (once; later calls wait for the first and return)."""
        async with self._lock:
            if self._factory is None:
                return
            content = self._factory()
            if inspect.isawaitable(content):
                content = await content
            self._factory = None
            await self.mount(content)
