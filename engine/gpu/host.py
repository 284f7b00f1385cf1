"""The host beside the GPUs: CPU (total and per core), load average, RAM and swap, and the CPU % and RSS of
single processes, read with psutil.

Kept apart from the GPU backends because it is about the machine, not the driver, and it runs on CPU-only
boxes too. Like nvitop, every reading that fails (psutil raises, the process is gone or not readable)
becomes None ("N/A" on screen); nothing here raises. Call it from the sampler thread, never the event loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

from engine.gpu.model import HostStats


@dataclass(frozen=True)
class ProcessStats:
    cpu_percent: float | None = None  # of one core (nvitop and top: may exceed 100 with threads)
    rss: int | None = None  # bytes
    create_time: float | None = None


class HostSampler:
    """Host and per-process readings. CPU percentages are over the time since the previous call (psutil's
    non-blocking mode), so the first reading of the host is primed at construction and a process seen for
    the first time has no CPU % (None) until its second sample."""

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}
        _try(lambda: psutil.cpu_percent(interval=None, percpu=True))  # prime: the first call returns 0.0

    def host(self) -> HostStats:
        per_core = _try(lambda: tuple(float(v) for v in psutil.cpu_percent(interval=None, percpu=True))) or ()
        total = sum(per_core) / len(per_core) if per_core else None
        memory = _try(psutil.virtual_memory)
        swap = _try(psutil.swap_memory)
        return HostStats(
            cpu_percent=total,
            per_core=per_core,
            cpu_count=_try(psutil.cpu_count) or (len(per_core) or None),
            load_average=_try(lambda: tuple(float(v) for v in os.getloadavg())),  # type: ignore[arg-type]
            memory_used=None if memory is None else int(memory.total - memory.available),
            memory_total=None if memory is None else int(memory.total),
            swap_used=None if swap is None else int(swap.used),
            swap_total=None if swap is None else int(swap.total),
        )

    def process(self, pid: int) -> ProcessStats:
        """CPU % and RSS of `pid`; None for what cannot be read (gone, another user's, a zombie)."""
        try:
            known = self._processes.get(pid)
            current = psutil.Process(pid)
            created = current.create_time()
            first = known is None or known.create_time() != created
        except (psutil.Error, OSError):
            self._processes.pop(pid, None)
            return ProcessStats()
        except Exception:
            return ProcessStats()
        if first:
            self._processes[pid] = known = current
            _try(known.cpu_percent)  # prime
            cpu = None
        else:
            assert known is not None
            cpu = _try(known.cpu_percent)
        info = _try(known.memory_info)
        return ProcessStats(cpu_percent=cpu, rss=None if info is None else int(info.rss), create_time=created)

    def forget_except(self, pids: set[int]) -> None:
        """Drop the state of processes no longer shown (so the cache does not grow without end)."""
        for pid in list(self._processes):
            if pid not in pids:
                del self._processes[pid]


def _try(read):  # type: ignore[no-untyped-def]
    """`read()`, or None when it raises anything: a reading we cannot take is N/A, never an error."""
    try:
        return read()
    except Exception:
        return None
