"""What a GPU sample is: the dataclasses and the backend interface every other `engine.gpu` module shares.

Kept apart so that the backends (nvml, fake), the labelling, the sampler and the formatting depend on this
small module rather than on each other. Stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

GIB = 1024**3
MIB = 1024**2


class GpuUnavailable(Exception):
    """No GPU can be read; `message` says why and what to do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class HostStats:
    cpu_percent: float | None = None  # all cores together, since the previous sample
    per_core: tuple[float, ...] = ()  # percent per core; empty when unreadable
    cpu_count: int | None = None
    load_average: tuple[float, float, float] | None = None  # 1, 5, 15 minutes
    memory_used: int | None = None  # bytes
    memory_total: int | None = None
    swap_used: int | None = None
    swap_total: int | None = None


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str | None = None
    memory_used: int | None = None  # bytes
    memory_total: int | None = None  # bytes
    utilization_gpu: float | None = None  # percent
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None

    @property
    def memory_fraction(self) -> float | None:
        if self.memory_used is None or not self.memory_total:
            return None
        return max(0.0, min(1.0, self.memory_used / self.memory_total))


@dataclass(frozen=True)
class GpuProcess:
    gpu_index: int | None  # None: one of our workers that uses no GPU (a CPU-only run)
    pid: int
    used_memory: int | None = None  # bytes; None when the driver does not say (e.g. WDDM, MIG, containers)
    name: str | None = None  # short command line
    label: str | None = None  # "run <id> · <stage>" for our stage workers and their children
    cpu_percent: float | None = None  # of one core; None: not readable (gone, another user's) or first sample
    rss: int | None = None  # resident memory, bytes; None: not readable
    run_id: str | None = None  # ours: the run
    stage: str | None = None  # ours: the stage
    role: str | None = None  # ours: "worker" (the stage worker itself), "child" (a rank...), "vllm" (the server)
    create_time: float | None = None  # psutil's start time, so that a signal never reaches a reused pid

    @property
    def is_ours(self) -> bool:
        return self.label is not None


@dataclass(frozen=True)
class GpuSnapshot:
    ts: float
    gpus: list[GpuInfo] = field(default_factory=list)
    processes: list[GpuProcess] = field(default_factory=list)
    driver_version: str | None = None
    error: str | None = None
    source: str = ""  # "NVML", "fake: 2 GPUs", ...
    host: HostStats | None = None  # the machine's CPU, load, RAM and swap (also when no GPU can be read)


class Backend(Protocol):
    """A source of samples: `sample() -> (gpus, processes, driver_version)`; raises GpuUnavailable."""

    source: str

    def sample(self) -> tuple[list[GpuInfo], list[GpuProcess], str | None]: ...

    def close(self) -> None: ...


def to_float(value: Any, divide: float = 1) -> float | None:
    """`value / divide` for a reading that is a number; None (not supported) for anything else."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return value / divide
