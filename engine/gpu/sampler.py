"""Sampling for the UIs (`tas gpu`, the panel's GPU tab): picks a backend, labels processes, keeps history.

Kept apart so that the CLI and the panel share one loop body that never raises: when no GPU can be read,
`GpuSnapshot.error` carries a sentence a user can act on (from `GpuUnavailable`), never a traceback, and the
backend is opened again a little later.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import replace

from engine.gpu.fake import FAKE_ENV, FakeBackend
from engine.gpu.labels import label_processes
from engine.gpu.model import Backend, GpuSnapshot, GpuUnavailable
from engine.gpu.nvml import NO_DRIVER, NvmlBackend

MIN_INTERVAL_S = 0.25  # the shortest time between samples a UI may ask for
HISTORY_LEN = 120


def open_backend() -> Backend:
    """Fake GPUs when TAS_FAKE_GPUS is set, else NVML. Raises GpuUnavailable with a clear message."""
    fake = os.environ.get(FAKE_ENV, "").strip()
    if fake:
        return FakeBackend.from_env(fake)
    return NvmlBackend()


class Sampler:
    """Samples a backend (opened lazily, retried while unavailable), labels the processes, and keeps a
    bounded history per GPU for sparklines. Use it from one thread; it never raises from `sample()`."""

    def __init__(
        self,
        runs_root: str | os.PathLike[str] | None = None,
        backend: Backend | None = None,
        history: int = HISTORY_LEN,
        retry_s: float = 10.0,
    ):
        self.runs_root = runs_root
        self.backend = backend
        self.history_len = history
        self.retry_s = retry_s
        self.memory: dict[int, deque[int | None]] = {}
        self.utilization: dict[int, deque[float | None]] = {}
        self._error: str | None = None
        self._last_attempt: float | None = None

    def _ensure_backend(self) -> Backend | None:
        if self.backend is not None:
            return self.backend
        now = time.monotonic()
        if self._last_attempt is not None and now - self._last_attempt < self.retry_s:
            return None
        self._last_attempt = now
        try:
            self.backend = open_backend()
            self._error = None
        except GpuUnavailable as exc:
            self._error = exc.message
        except Exception as exc:  # reported, never raised into the UI
            self._error = f"GPU monitoring could not start: {exc!r}"
        return self.backend

    def sample(self) -> GpuSnapshot:
        backend = self._ensure_backend()
        if backend is None:
            return GpuSnapshot(ts=time.time(), error=self._error or NO_DRIVER)
        try:
            gpus, processes, driver = backend.sample()
        except GpuUnavailable as exc:
            self._drop_backend(exc.message)
            return GpuSnapshot(ts=time.time(), error=exc.message, source=backend.source)
        except Exception as exc:  # reported (not hidden), never raised into the UI
            self._drop_backend(f"GPU sampling failed: {exc!r}")
            return GpuSnapshot(ts=time.time(), error=self._error, source=backend.source)
        try:
            processes = label_processes(processes, self.runs_root)
        except Exception:  # labels are a nicety: show the processes anyway
            processes = [replace(p, name=p.name or "?") for p in processes]
        processes.sort(key=lambda p: (p.gpu_index, -(p.used_memory or 0), p.pid))
        for gpu in gpus:
            self.memory.setdefault(gpu.index, deque(maxlen=self.history_len)).append(gpu.memory_used)
            self.utilization.setdefault(gpu.index, deque(maxlen=self.history_len)).append(gpu.utilization_gpu)
        return GpuSnapshot(
            ts=time.time(), gpus=gpus, processes=processes, driver_version=driver, source=backend.source
        )

    def _drop_backend(self, message: str) -> None:
        self._error = message
        self._last_attempt = time.monotonic()
        if self.backend is not None:
            try:
                self.backend.close()
            finally:
                self.backend = None

    def history(self) -> dict[int, tuple[list[int | None], list[float | None]]]:
        """A copy (safe to hand to another thread): gpu index -> (memory used bytes, utilization %)."""
        return {i: (list(self.memory[i]), list(self.utilization.get(i, ()))) for i in self.memory}

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
