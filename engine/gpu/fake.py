"""Fake GPUs, for machines without one (development, demos, tests, deterministic screenshots).

Kept apart from the NVML backend so that the real one stays about the driver only. Chosen by `TAS_FAKE_GPUS`
(see `engine.gpu.sampler.open_backend`):

    TAS_FAKE_GPUS=2           two fake H100s whose values vary slowly with time
    TAS_FAKE_GPUS=2:frozen    the same with fixed values (deterministic screenshots)
    TAS_FAKE_GPUS=/p/f.json   GPUs and processes described in a JSON file, re-read at every sample:
        {"driver_version": "550.54.15",
         "gpus": 2  or  [{"name": ..., "memory_used": bytes, "memory_total": bytes, "utilization_gpu": %,
                          "temperature_c": ..., "power_w": ..., "power_limit_w": ...}, ...],
         "frozen": true,
         "processes": [{"gpu": 0, "pid": 1234, "used_memory": bytes, "name": "optional"}],
         "error": "optional: pretend the GPUs are unavailable with this message",
         "host": {"cpu_percent": 12.5, "per_core": [..], "cpu_count": 8, "load_average": [1, 1, 1],
                  "memory_used_gib": 9, "memory_total_gib": 62, "swap_used_gib": 0, "swap_total_gib": 8}}
      (optional: a fixed host instead of this machine's, for deterministic screenshots).
      In a list of GPUs a missing field is "not supported" (None).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from engine.gpu.model import GIB, MIB, GpuInfo, GpuProcess, GpuUnavailable, HostStats, to_float

FAKE_ENV = "TAS_FAKE_GPUS"

H100_NAME = "NVIDIA H100 80GB HBM3"
H100_MEMORY = 81559 * MIB
H100_POWER_LIMIT_W = 700.0


def fake_gpu(index: int, t: float) -> GpuInfo:
    """A plausible H100 whose values drift slowly with `t` (seconds); t=0 gives fixed values."""
    phase = 1.7 * index
    util = max(0.0, min(100.0, round(55 + 30 * math.sin(t / 6 + phase) + 8 * math.sin(t / 1.3 + 2 * phase))))
    memory_used = int(H100_MEMORY * (0.45 + 0.25 * math.sin(t / 90 + phase)))
    memory_used -= memory_used % MIB
    return GpuInfo(
        index=index,
        name=H100_NAME,
        uuid=f"GPU-fa4e0000-0000-4000-8000-{index:012d}",
        memory_used=memory_used,
        memory_total=H100_MEMORY,
        utilization_gpu=util,
        temperature_c=float(round(38 + util * 0.35)),
        power_w=float(round(90 + util * 5.5)),
        power_limit_w=H100_POWER_LIMIT_W,
    )


class FakeBackend:
    """Fake GPUs for machines without one (see the module docstring for TAS_FAKE_GPUS)."""

    def __init__(
        self,
        count: int = 2,
        *,
        frozen: bool = False,
        processes: list[GpuProcess] | list[dict[str, Any]] | None = None,
        driver_version: str = "fake",
        spec_path: str | os.PathLike[str] | None = None,
    ):
        self.count = count
        self.frozen = frozen
        self.processes = [_fake_process(p) for p in processes or []]
        self.driver_version = driver_version
        self.spec_path = Path(spec_path) if spec_path is not None else None
        self.started = time.monotonic()
        self.source = f"fake: {Path(spec_path).name}" if spec_path is not None else f"fake: {count} GPUs"
        if self.spec_path is not None:
            self._read_spec()  # a broken file fails at once

    @classmethod
    def from_env(cls, value: str) -> FakeBackend:
        value = value.strip()
        head, _, option = value.partition(":")
        if head.isdigit():
            if option not in ("", "frozen"):
                raise GpuUnavailable(f"{FAKE_ENV}={value!r}: use N, N:frozen or a JSON file")
            return cls(int(head), frozen=option == "frozen")
        return cls(spec_path=value)

    def _read_spec(self) -> dict[str, Any]:
        assert self.spec_path is not None
        try:
            spec = json.loads(self.spec_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise GpuUnavailable(f"{FAKE_ENV}: cannot read {self.spec_path}: {exc}") from exc
        if not isinstance(spec, dict):
            raise GpuUnavailable(f"{FAKE_ENV}: {self.spec_path} must hold a JSON object")
        return spec

    def sample(self) -> tuple[list[GpuInfo], list[GpuProcess], str | None]:
        t = 0.0 if self.frozen else time.monotonic() - self.started
        if self.spec_path is None:
            return [fake_gpu(i, t) for i in range(self.count)], list(self.processes), self.driver_version
        spec = self._read_spec()
        if spec.get("error"):
            raise GpuUnavailable(str(spec["error"]))
        if spec.get("frozen"):
            t = 0.0
        described = spec.get("gpus", 1)
        try:
            if isinstance(described, int):
                gpus = [fake_gpu(i, t) for i in range(described)]
            else:
                gpus = [_fake_gpu_from(i, g) for i, g in enumerate(described)]
            processes = [_fake_process(p) for p in spec.get("processes", [])]
        except (TypeError, ValueError, KeyError) as exc:
            raise GpuUnavailable(f"{FAKE_ENV}: {self.spec_path} is not a valid description: {exc}") from exc
        if not gpus:
            raise GpuUnavailable("The NVIDIA driver (fake) is loaded but reports no GPU")
        return gpus, processes, str(spec.get("driver_version", self.driver_version))

    def fake_host(self) -> HostStats | None:
        """The host described in the JSON file (`"host"`), or None: the sampler reads the real machine."""
        if self.spec_path is None:
            return None
        spec = self._read_spec().get("host")
        if not isinstance(spec, dict):
            return None

        def gib(key: str) -> int | None:
            return None if spec.get(f"{key}_gib") is None else int(float(spec[f"{key}_gib"]) * GIB)

        load = spec.get("load_average")
        return HostStats(
            cpu_percent=to_float(spec.get("cpu_percent")),
            per_core=tuple(float(v) for v in spec.get("per_core", ())),
            cpu_count=spec.get("cpu_count"),
            load_average=tuple(float(v) for v in load) if load else None,  # type: ignore[arg-type]
            memory_used=gib("memory_used"),
            memory_total=gib("memory_total"),
            swap_used=gib("swap_used"),
            swap_total=gib("swap_total"),
        )

    def close(self) -> None:
        pass


def _fake_gpu_from(index: int, spec: dict[str, Any]) -> GpuInfo:
    def gib_or_bytes(key: str) -> int | None:
        if spec.get(key) is not None:
            return int(spec[key])
        if spec.get(f"{key}_gib") is not None:
            return int(float(spec[f"{key}_gib"]) * GIB)
        return None

    return GpuInfo(
        index=int(spec.get("index", index)),
        name=str(spec.get("name", "Fake GPU")),
        uuid=spec.get("uuid"),
        memory_used=gib_or_bytes("memory_used"),
        memory_total=gib_or_bytes("memory_total"),
        utilization_gpu=to_float(spec.get("utilization_gpu")),
        temperature_c=to_float(spec.get("temperature_c")),
        power_w=to_float(spec.get("power_w")),
        power_limit_w=to_float(spec.get("power_limit_w")),
    )


def _fake_process(p: GpuProcess | dict[str, Any]) -> GpuProcess:
    if isinstance(p, GpuProcess):
        return p
    used = p.get("used_memory")
    if used is None and p.get("used_memory_gib") is not None:
        used = float(p["used_memory_gib"]) * GIB
    return GpuProcess(
        gpu_index=int(p.get("gpu", 0)),
        pid=int(p["pid"]),
        used_memory=int(used) if used is not None else None,
        name=p.get("name"),
    )
