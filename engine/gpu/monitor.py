"""GPU monitoring: NVML sampling, our stage workers among the GPU processes, and `tas gpu`.

Light module: stdlib, psutil and pynvml (nvidia-ml-py) only; the panel's GPU tab samples through it in a
thread. Two backends behind one small interface (`sample() -> (gpus, processes, driver_version)`):

* `NvmlBackend`: the real one. `nvmlInit` once; every per-field call is guarded, so a field the GPU does
  not support (NVMLError_NotSupported, common for power/temperature on some boards and in VMs) is None.
* `FakeBackend`: chosen by `TAS_FAKE_GPUS`, for machines without a GPU (development, demos, tests):
    TAS_FAKE_GPUS=2           two fake H100s whose values vary slowly with time
    TAS_FAKE_GPUS=2:frozen    the same with fixed values (deterministic screenshots)
    TAS_FAKE_GPUS=/p/f.json   GPUs and processes described in a JSON file, re-read at every sample:
        {"driver_version": "550.54.15",
         "gpus": 2  or  [{"name": ..., "memory_used": bytes, "memory_total": bytes, "utilization_gpu": %,
                          "temperature_c": ..., "power_w": ..., "power_limit_w": ...}, ...],
         "frozen": true,
         "processes": [{"gpu": 0, "pid": 1234, "used_memory": bytes, "name": "optional"}],
         "error": "optional: pretend the GPUs are unavailable with this message"}
      In a list of GPUs a missing field is "not supported" (None).

When no GPU can be read, `GpuUnavailable(message)` (from `open_backend`) or `GpuSnapshot.error` carries a
sentence a user can act on, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import psutil

FAKE_ENV = "TAS_FAKE_GPUS"
MIN_INTERVAL_S = 0.25
HISTORY_LEN = 120
WIDTH = 80
GIB = 1024**3
MIB = 1024**2

NO_DRIVER = (
    "No NVIDIA driver found (libnvidia-ml not loadable): this machine has no NVIDIA GPU, "
    "or the driver is not installed"
)


class GpuUnavailable(Exception):
    """No GPU can be read; `message` says why and what to do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# ---------------------------------------------------------------------------------------------- data


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
    gpu_index: int
    pid: int
    used_memory: int | None = None  # bytes; None when the driver does not say (e.g. WDDM, MIG, containers)
    name: str | None = None  # short command line
    label: str | None = None  # "run <id> · <stage>" for our stage workers and their children

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


# ------------------------------------------------------------------------------------------ backends


class Backend(Protocol):
    source: str

    def sample(self) -> tuple[list[GpuInfo], list[GpuProcess], str | None]: ...

    def close(self) -> None: ...


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def describe_nvml_error(error: BaseException, nvml: Any = None, during: str = "start") -> str:
    """A sentence for a user, from an NVML error raised while starting NVML (or reading the GPU list)."""
    code = getattr(error, "value", None)

    def is_code(name: str, default: int) -> bool:
        return code == getattr(nvml, name, default)

    if is_code("NVML_ERROR_LIBRARY_NOT_FOUND", 12):
        return NO_DRIVER
    if is_code("NVML_ERROR_DRIVER_NOT_LOADED", 9):
        return (
            "The NVIDIA driver is not loaded (NVML: Driver Not Loaded): check `nvidia-smi`; "
            "the kernel module may need `modprobe nvidia` or a reboot"
        )
    if is_code("NVML_ERROR_LIB_RM_VERSION_MISMATCH", 18):
        return (
            "NVIDIA driver/library version mismatch: the loaded kernel module and libnvidia-ml differ "
            "(usually after a driver upgrade); reboot, or reload the nvidia kernel modules"
        )
    if is_code("NVML_ERROR_NO_PERMISSION", 4):
        return (
            "No permission to query the NVIDIA driver (NVML: Insufficient Permissions): check access to "
            "/dev/nvidia* (your user's groups, or the container's device options)"
        )
    if is_code("NVML_ERROR_GPU_IS_LOST", 15):
        return "A GPU has fallen off the bus (NVML: GPU is lost): check `nvidia-smi` and `dmesg`; a reset or reboot is needed"
    mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
    if (mismatch is not None and isinstance(error, mismatch)) or is_code("NVML_ERROR_FUNCTION_NOT_FOUND", 13):
        return (
            "nvidia-ml-py and the installed NVIDIA driver do not match (a function is missing from "
            f"libnvidia-ml): update the driver or pin an older nvidia-ml-py ({error})"
        )
    return f"NVML could not {during}: {error}"


class NvmlBackend:
    """The real GPUs, through NVML (nvidia-ml-py). Raises GpuUnavailable when NVML cannot start."""

    source = "NVML"

    def __init__(self, nvml: Any = None):
        if nvml is None:
            try:
                import pynvml as nvml  # nvidia-ml-py
            except ImportError as exc:  # pragma: no cover - a dependency of the project
                raise GpuUnavailable(f"nvidia-ml-py is not installed ({exc}): pip install nvidia-ml-py") from exc
        self.nvml = nvml
        errors = [getattr(nvml, "NVMLError", None), getattr(nvml, "NVMLLibraryMismatchError", None)]
        self._errors: tuple[type[BaseException], ...] = tuple(e for e in errors if isinstance(e, type))
        try:
            nvml.nvmlInit()
        except self._errors as exc:
            raise GpuUnavailable(describe_nvml_error(exc, nvml)) from exc
        except OSError as exc:  # the library loads but is broken
            raise GpuUnavailable(f"{NO_DRIVER} ({exc})") from exc
        self._open = True
        self.driver_version = self._field(lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        try:
            count = nvml.nvmlDeviceGetCount()
        except self._errors as exc:
            self.close()
            raise GpuUnavailable(describe_nvml_error(exc, nvml, "list the GPUs")) from exc
        if not count:
            self.close()
            raise GpuUnavailable(
                f"The NVIDIA driver ({self.driver_version or 'version unknown'}) is loaded but reports no GPU; "
                "in a container, pass the GPUs through (e.g. `docker run --gpus all`)"
            )
        self._handles: dict[int, Any] = {}
        self._static: dict[int, tuple[str, str | None]] = {}
        self.count = int(count)

    def _field(self, read):  # noqa: ANN001, ANN202
        """One NVML call; any failure (NotSupported above all) makes the field None instead of a crash."""
        try:
            return read()
        except Exception:  # noqa: BLE001 - a monitor must survive whatever a driver answers
            return None

    def _handle(self, index: int) -> Any:
        if index not in self._handles:
            self._handles[index] = self.nvml.nvmlDeviceGetHandleByIndex(index)
        return self._handles[index]

    def _gpu(self, index: int) -> GpuInfo:
        nvml = self.nvml
        try:
            handle = self._handle(index)
        except Exception as exc:  # noqa: BLE001
            return GpuInfo(index=index, name=f"unreadable ({exc})")
        if index not in self._static:
            name = self._field(lambda: _text(nvml.nvmlDeviceGetName(handle))) or f"GPU {index}"
            uuid = self._field(lambda: _text(nvml.nvmlDeviceGetUUID(handle)))
            self._static[index] = (name, uuid)
        name, uuid = self._static[index]
        memory = self._field(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        rates = self._field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
        temperature = self._field(lambda: nvml.nvmlDeviceGetTemperature(handle, sensor))
        power_mw = self._field(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        limit_mw = self._field(lambda: nvml.nvmlDeviceGetEnforcedPowerManagementLimit(handle))
        return GpuInfo(
            index=index,
            name=name,
            uuid=uuid,
            memory_used=_int_attr(memory, "used"),
            memory_total=_int_attr(memory, "total"),
            utilization_gpu=_num(getattr(rates, "gpu", None)),
            temperature_c=_num(temperature),
            power_w=_num(power_mw, 1000),
            power_limit_w=_num(limit_mw, 1000),
        )

    def _processes(self, index: int) -> list[GpuProcess]:
        try:
            handle = self._handle(index)
        except Exception:  # noqa: BLE001
            return []
        found: dict[int, int | None] = {}
        for kind in ("Compute", "Graphics"):
            for entry in self._versioned(f"nvmlDeviceGet{kind}RunningProcesses", handle) or []:
                pid = getattr(entry, "pid", None)
                if pid is None:
                    continue
                used = getattr(entry, "usedGpuMemory", None)
                used = int(used) if isinstance(used, (int, float)) and used >= 0 and used < 2**63 else None
                if pid in found and found[pid] is not None and (used is None or used < found[pid]):
                    continue
                found[int(pid)] = used
        return [GpuProcess(gpu_index=index, pid=pid, used_memory=used) for pid, used in found.items()]

    def _versioned(self, name: str, handle: Any) -> list[Any] | None:
        """`name(handle)`; when nvidia-ml-py is newer than the driver, fall back to the `_v2` call."""
        mismatch = getattr(self.nvml, "NVMLLibraryMismatchError", None)
        try:
            return getattr(self.nvml, name)(handle)
        except Exception as exc:  # noqa: BLE001
            older = getattr(self.nvml, f"{name}_v2", None)
            if older is not None and mismatch is not None and isinstance(exc, mismatch):
                return self._field(lambda: older(handle))
            return None

    def sample(self) -> tuple[list[GpuInfo], list[GpuProcess], str | None]:
        try:
            count = int(self.nvml.nvmlDeviceGetCount())
        except self._errors as exc:
            raise GpuUnavailable(describe_nvml_error(exc, self.nvml, "list the GPUs")) from exc
        if count != self.count:  # a GPU fell off the bus, or came back
            self._handles.clear()
            self._static.clear()
            self.count = count
        gpus = [self._gpu(i) for i in range(count)]
        processes = [p for i in range(count) for p in self._processes(i)]
        return gpus, processes, self.driver_version

    def close(self) -> None:
        if getattr(self, "_open", False):
            self._open = False
            self._field(self.nvml.nvmlShutdown)


def _int_attr(obj: Any, name: str) -> int | None:
    value = getattr(obj, name, None)
    return int(value) if isinstance(value, (int, float)) else None


def _num(value: Any, divide: float = 1) -> float | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return value / divide


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
        utilization_gpu=_num(spec.get("utilization_gpu")),
        temperature_c=_num(spec.get("temperature_c")),
        power_w=_num(spec.get("power_w")),
        power_limit_w=_num(spec.get("power_limit_w")),
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


def open_backend() -> Backend:
    """Fake GPUs when TAS_FAKE_GPUS is set, else NVML. Raises GpuUnavailable with a clear message."""
    fake = os.environ.get(FAKE_ENV, "").strip()
    if fake:
        return FakeBackend.from_env(fake)
    return NvmlBackend()


# ---------------------------------------------------------------------------------- our processes


@dataclass(frozen=True)
class _Worker:
    run_id: str
    stage: str
    create_time: float


def live_workers(runs_root: str | os.PathLike[str] | None) -> dict[int, _Worker]:
    """pid -> (run, stage) of every stage worker alive now, from runs/<run>/<stage>/pid.

    Only a pid file whose process is alive with the recorded start time counts (a reused pid does not).
    Every run's pid files are looked at, not only runs whose supervisor is alive: a worker that outlived
    a killed supervisor still holds its GPU memory and is still ours. Only pid files are read (no events).
    """
    if runs_root is None:
        return {}
    from engine.core.runs import ProcessRecord, RunStore
    from engine.stages import PIPELINE

    workers: dict[int, _Worker] = {}
    for run in RunStore(runs_root).list():
        for stage in PIPELINE:
            record = ProcessRecord.read(run.stage_dir(stage) / "pid")
            if record is not None and record.is_alive():
                workers[record.pid] = _Worker(run.id, stage, record.create_time)
    return workers


_names: dict[tuple[int, float], str] = {}


def short_command(process: psutil.Process, width: int = 48) -> str:
    """`python -m engine.runner.worker teacher --run …`: the command line, shortened; else the process name."""
    try:
        key = (process.pid, process.create_time())
    except (psutil.Error, OSError):
        return "?"
    if key in _names:
        return _names[key]
    try:
        argv = process.cmdline()
    except (psutil.Error, OSError):
        argv = []
    if argv:
        text = " ".join([os.path.basename(argv[0]), *argv[1:]])
    else:
        try:
            text = process.name()
        except (psutil.Error, OSError):
            text = "?"
    text = text if len(text) <= width else text[: width - 1] + "…"
    if len(_names) > 2000:
        _names.clear()
    _names[key] = text
    return text


def label_processes(
    processes: list[GpuProcess],
    runs_root: str | os.PathLike[str] | None,
    workers: dict[int, _Worker] | None = None,
) -> list[GpuProcess]:
    """The processes with `label` set for our stage workers (and their children: torchrun ranks, dataloader
    workers) and `name` filled in from the command line. The run store is scanned once per call."""
    if not processes:
        return []
    if workers is None:
        workers = live_workers(runs_root)
    labelled = []
    for gp in processes:
        label, name = None, gp.name
        try:
            process = psutil.Process(gp.pid)
        except (psutil.Error, OSError):
            process = None
        if process is not None:
            if name is None:
                name = short_command(process)
            label = _label(process, workers)
        labelled.append(replace(gp, label=label, name=name or "?"))
    return labelled


def _label(process: psutil.Process, workers: dict[int, _Worker]) -> str | None:
    if not workers:
        return None
    worker = workers.get(process.pid)
    if worker is not None and _same_start(process, worker):
        return f"run {worker.run_id} · {worker.stage}"
    try:
        ancestors = process.parents()
    except (psutil.Error, OSError):
        return None
    for ancestor in ancestors:
        worker = workers.get(ancestor.pid)
        if worker is not None and _same_start(ancestor, worker):
            rank = _rank(process)
            return f"run {worker.run_id} · {worker.stage}" + (f" · rank {rank}" if rank is not None else "")
    return None


def _same_start(process: psutil.Process, worker: _Worker) -> bool:
    try:
        return abs(process.create_time() - worker.create_time) <= 0.05
    except (psutil.Error, OSError):
        return False


def _rank(process: psutil.Process) -> str | None:
    try:
        env = process.environ()
    except (psutil.Error, OSError):
        return None
    return env.get("RANK") or env.get("LOCAL_RANK")


# ------------------------------------------------------------------------------------------- sampler


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
        except Exception as exc:  # noqa: BLE001 - reported, never raised into the UI
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
        except Exception as exc:  # noqa: BLE001 - reported, never raised into the UI
            self._drop_backend(f"GPU sampling failed: {exc!r}")
            return GpuSnapshot(ts=time.time(), error=self._error, source=backend.source)
        try:
            processes = label_processes(processes, self.runs_root)
        except Exception:  # noqa: BLE001 - labels are a nicety: show the processes anyway
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


# ------------------------------------------------------------------------------------------ formatting


def fmt_bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    if value >= GIB:
        return f"{value / GIB:.1f} GiB"
    return f"{value / MIB:.0f} MiB"


def fmt_memory(used: int | None, total: int | None) -> str:
    if used is None and total is None:
        return "n/a"
    u = "?" if used is None else f"{used / GIB:.1f}"
    t = "?" if total is None else f"{total / GIB:.1f}"
    return f"{u}/{t} GiB"


def fmt_util(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def fmt_temp(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}°C"


def fmt_power(power: float | None, limit: float | None) -> str:
    if power is None and limit is None:
        return "n/a"
    p = "?" if power is None else f"{power:.0f}"
    return p + ("" if limit is None else f"/{limit:.0f}") + " W"


def bar(fraction: float | None, width: int) -> str:
    if fraction is None:
        return "·" * width
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "█" * filled + "░" * (width - filled)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render_snapshot(snapshot: GpuSnapshot, width: int = WIDTH) -> str:
    """The `tas gpu` table: one line per GPU, then the processes; every line fits `width` columns."""
    if snapshot.error:
        return _fit(snapshot.error, 10_000)
    stamp = time.strftime("%H:%M:%S", time.localtime(snapshot.ts))
    head = f"{len(snapshot.gpus)} GPU{'s' if len(snapshot.gpus) != 1 else ''}"
    head += f" · driver {snapshot.driver_version or '?'}"
    if snapshot.source and snapshot.source != "NVML":
        head += f" · {snapshot.source}"
    lines = [_fit(f"{head} · {stamp}", width), ""]
    lines.append(f"{'GPU':>3}  {'Name':<22} {'Memory':<28} {'Util':>4} {'Temp':>5} {'Power':>11}")
    for g in snapshot.gpus:
        lines.append(
            f"{g.index:>3}  {_fit(g.name, 22):<22} {bar(g.memory_fraction, 12)} "
            f"{fmt_memory(g.memory_used, g.memory_total):>15} {fmt_util(g.utilization_gpu):>4} "
            f"{fmt_temp(g.temperature_c):>5} {fmt_power(g.power_w, g.power_limit_w):>11}"
        )
    lines.append("")
    if snapshot.processes:
        lines.append(f"{'GPU':>3}  {'PID':>8}  {'VRAM':>9}  Process")
        for p in snapshot.processes:
            lines.append(f"{p.gpu_index:>3}  {p.pid:>8}  {fmt_bytes(p.used_memory):>9}  {p.label or p.name or '?'}")
    else:
        lines.append("no processes on the GPUs")
    return "\n".join(_fit(line, width) for line in lines)


# --------------------------------------------------------------------------------------------- tas gpu


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < MIN_INTERVAL_S:
        raise argparse.ArgumentTypeError(f"the interval must be at least {MIN_INTERVAL_S} s")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("the count must be at least 1")
    return value


def add_gpu_command(subparsers: Any, common_parent: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Register `tas gpu` on an argparse subparsers object; returns its parser."""
    gpu = subparsers.add_parser(
        "gpu",
        parents=[common_parent] if common_parent is not None else [],
        help="GPU memory, utilization, temperature, power and processes (ours labelled by run and stage)",
        description="GPU memory, utilization, temperature, power and the processes on each GPU; "
        "processes of our stage workers are labelled with their run and stage. "
        f"Set {FAKE_ENV}=2 to try it without a GPU.",
    )
    gpu.add_argument("-w", "--watch", action="store_true", help="keep refreshing (Ctrl-C to stop)")
    gpu.add_argument("--interval", type=_interval, default=1.0, metavar="S",
                     help=f"seconds between samples when watching (default 1.0, at least {MIN_INTERVAL_S})")
    gpu.add_argument("--count", type=_count, default=None, metavar="N",
                     help="watch for N samples, then exit (implies --watch)")
    gpu.set_defaults(func=cmd_gpu)
    return gpu


def cmd_gpu(args: argparse.Namespace) -> int:
    """Print the GPU table once, or repeatedly with --watch/--count. Exit 1 when no GPU can be read."""
    from engine.cli.main import runs_root

    root = runs_root(getattr(args, "config", None))
    sampler = Sampler(root)
    watch = bool(getattr(args, "watch", False)) or getattr(args, "count", None) is not None
    count = getattr(args, "count", None)
    interval = max(MIN_INTERVAL_S, float(getattr(args, "interval", 1.0) or 1.0))
    tty = sys.stdout.isatty()
    shown = 0
    try:
        while True:
            snapshot = sampler.sample()
            if snapshot.error and shown == 0:
                print(f"error: {snapshot.error}", file=sys.stderr)
                return 1
            text = render_snapshot(snapshot)
            if watch and tty:
                sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
            else:
                sys.stdout.write(("\n" if shown else "") + text + "\n")
            sys.stdout.flush()
            shown += 1
            if not watch or (count is not None and shown >= count):
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    finally:
        sampler.close()
