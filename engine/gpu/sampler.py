"""Sampling for the UIs (`tas gpu`, the panel's GPU tab): picks a backend, labels processes, keeps history,
and reads the host (CPU, load, RAM, swap) and each process's CPU % and RSS (`engine.gpu.host`).

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
from engine.gpu.host import HostSampler, ProcessStats
from engine.gpu.labels import label_processes, live_servers, live_workers
from engine.gpu.model import Backend, GpuInfo, GpuProcess, GpuSnapshot, GpuUnavailable, HostStats
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
        self.host = HostSampler()

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
        """GPUs (or `error`), the host, and the processes: those on the GPUs, then our stage workers that use
        no GPU (a CPU-only run), each with its CPU % and RSS."""
        gpus: list[GpuInfo] = []
        processes: list[GpuProcess] = []
        driver, error, source = None, None, ""
        backend = self._ensure_backend()
        if backend is None:
            error = self._error or NO_DRIVER
        else:
            source = backend.source
            try:
                gpus, processes, driver = backend.sample()
            except GpuUnavailable as exc:
                self._drop_backend(exc.message)
                error = exc.message
            except Exception as exc:  # reported (not hidden), never raised into the UI
                self._drop_backend(f"GPU sampling failed: {exc!r}")
                error = self._error
        host = self._host_stats(backend)
        processes = self._processes(processes)
        for gpu in gpus:
            self.memory.setdefault(gpu.index, deque(maxlen=self.history_len)).append(gpu.memory_used)
            self.utilization.setdefault(gpu.index, deque(maxlen=self.history_len)).append(gpu.utilization_gpu)
        return GpuSnapshot(
            ts=time.time(),
            gpus=gpus,
            processes=processes,
            driver_version=driver,
            error=error,
            source=source,
            host=host,
        )

    def _host_stats(self, backend: Backend | None) -> HostStats:
        fake = getattr(backend, "fake_host", None)
        if fake is not None:
            try:
                described = fake()
            except Exception:
                described = None
            if described is not None:
                return described
        return self.host.host()

    def _processes(self, processes: list[GpuProcess]) -> list[GpuProcess]:
        """Labelled, with our CPU-only workers added and every process's CPU % and RSS; never raises."""
        try:
            workers = live_workers(self.runs_root)
            servers = live_servers(self.runs_root)
        except Exception:  # labels are a nicety: show the processes anyway
            workers, servers = {}, {}
        on_gpu = {p.pid for p in processes}
        processes = processes + [GpuProcess(None, pid) for pid in workers if pid not in on_gpu]
        try:
            processes = label_processes(processes, self.runs_root, workers, servers)
        except Exception:
            processes = [replace(p, name=p.name or "?") for p in processes]
        measured = []
        for p in processes:
            stats = self.host.process(p.pid)
            if p.create_time is not None and stats.create_time is not None and stats.create_time != p.create_time:
                stats = ProcessStats()  # the pid was reused between the two readings
            measured.append(replace(p, cpu_percent=stats.cpu_percent, rss=stats.rss))
        self.host.forget_except({p.pid for p in measured})
        measured.sort(key=lambda p: (p.gpu_index is None, p.gpu_index or 0, -(p.used_memory or 0), p.pid))
        return measured

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
