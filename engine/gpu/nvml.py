"""The real GPUs, read through NVML (nvidia-ml-py, imported as `pynvml`).

Kept apart because this is the one module that talks to the driver, and drivers answer in many ways:
`nvmlInit` once; every per-field call is guarded. Only NVML's own errors are caught (`pynvml.NVMLError`,
and `NVMLLibraryMismatchError` which is not one), never a bare Exception, so a bug still surfaces.

* A field the device does not support (NVMLError_NotSupported, common for power/temperature on some boards
  and in VMs; FunctionNotFound when the driver is older than nvidia-ml-py; Unknown) is None, and is
  remembered per device and field: it is never asked again (as nvitop does), so a sample costs no
  failing driver calls.
* Any other NVML error (Timeout, GPU is lost, ...) makes the field None for this sample only.

Errors that stop NVML as a whole become `GpuUnavailable` with a sentence from `describe_nvml_error`.
"""

from __future__ import annotations

from typing import Any

from engine.gpu.model import GpuInfo, GpuProcess, GpuUnavailable, to_float

NO_DRIVER = (
    "No NVIDIA driver found (libnvidia-ml not loadable): this machine has no NVIDIA GPU, or the driver is not installed"
)

# NVML return codes after which a call is not made again for that device (name, value if nvml lacks it).
_UNSUPPORTED_CODES = (
    ("NVML_ERROR_NOT_SUPPORTED", 3),
    ("NVML_ERROR_FUNCTION_NOT_FOUND", 13),
    ("NVML_ERROR_UNKNOWN", 999),
)
_SYSTEM = -1  # the "device" of system-wide calls (driver version)


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
        return (
            "A GPU has fallen off the bus (NVML: GPU is lost): check `nvidia-smi` and `dmesg`; "
            "a reset or reboot is needed"
        )
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
        mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
        self._mismatch: type[BaseException] | None = mismatch if isinstance(mismatch, type) else None
        errors = [getattr(nvml, "NVMLError", None), self._mismatch]
        self._errors: tuple[type[BaseException], ...] = tuple(e for e in errors if isinstance(e, type))
        self._unsupported_codes = {getattr(nvml, name, default) for name, default in _UNSUPPORTED_CODES}
        self._unsupported: set[tuple[int, str]] = set()  # (device index, NVML function): never called again
        self._versions: dict[str, str] = {}  # NVML function -> the `_v2` used instead (driver older than us)
        self._handles: dict[int, Any] = {}
        self._static: dict[int, tuple[str, str | None]] = {}
        try:
            nvml.nvmlInit()
        except self._errors as exc:
            raise GpuUnavailable(describe_nvml_error(exc, nvml)) from exc
        except OSError as exc:  # the library loads but is broken
            raise GpuUnavailable(f"{NO_DRIVER} ({exc})") from exc
        self._open = True
        driver = self._call(_SYSTEM, "nvmlSystemGetDriverVersion")
        self.driver_version = None if driver is None else _text(driver)
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
        self.count = int(count)

    def _is_unsupported(self, error: BaseException) -> bool:
        """An error saying the call will never work on this device (or with this driver)."""
        if self._mismatch is not None and isinstance(error, self._mismatch):
            return True
        return getattr(error, "value", None) in self._unsupported_codes

    def _call(self, index: int, name: str, *args: Any) -> Any:
        """`nvml.<name>(*args)` for device `index`: its value, or None when NVML fails.

        A call that fails as not supported is remembered for that device and never made again. When
        nvidia-ml-py is newer than the driver (NVMLLibraryMismatchError), the `_v2` call is used from then
        on, for every device. Only NVML errors are caught: anything else is a bug and propagates.
        """
        key = (index, name)
        if key in self._unsupported:
            return None
        function = getattr(self.nvml, self._versions.get(name, name), None)
        if function is None:  # an nvidia-ml-py without this call
            self._unsupported.add(key)
            return None
        try:
            return function(*args)
        except self._errors as exc:
            older = f"{name}_v2"
            if (
                self._mismatch is not None
                and isinstance(exc, self._mismatch)
                and name not in self._versions
                and hasattr(self.nvml, older)
            ):
                self._versions[name] = older
                return self._call(index, name, *args)
            if self._is_unsupported(exc):
                self._unsupported.add(key)
            return None

    def _handle(self, index: int) -> Any:
        if index not in self._handles:
            self._handles[index] = self.nvml.nvmlDeviceGetHandleByIndex(index)
        return self._handles[index]

    def _gpu(self, index: int) -> GpuInfo:
        try:
            handle = self._handle(index)
        except self._errors as exc:
            return GpuInfo(index=index, name=f"unreadable ({exc})")
        call = self._call
        if index not in self._static:
            name = call(index, "nvmlDeviceGetName", handle)
            uuid = call(index, "nvmlDeviceGetUUID", handle)
            self._static[index] = (
                f"GPU {index}" if not name else _text(name),
                None if uuid is None else _text(uuid),
            )
        name, uuid = self._static[index]
        memory = call(index, "nvmlDeviceGetMemoryInfo", handle)
        rates = call(index, "nvmlDeviceGetUtilizationRates", handle)
        sensor = getattr(self.nvml, "NVML_TEMPERATURE_GPU", 0)
        temperature = call(index, "nvmlDeviceGetTemperature", handle, sensor)
        power_mw = call(index, "nvmlDeviceGetPowerUsage", handle)
        limit_mw = call(index, "nvmlDeviceGetEnforcedPowerManagementLimit", handle)
        return GpuInfo(
            index=index,
            name=name,
            uuid=uuid,
            memory_used=_int_attr(memory, "used"),
            memory_total=_int_attr(memory, "total"),
            utilization_gpu=to_float(getattr(rates, "gpu", None)),
            temperature_c=to_float(temperature),
            power_w=to_float(power_mw, 1000),
            power_limit_w=to_float(limit_mw, 1000),
        )

    def _processes(self, index: int) -> list[GpuProcess]:
        try:
            handle = self._handle(index)
        except self._errors:
            return []
        found: dict[int, int | None] = {}
        for kind in ("Compute", "Graphics"):
            for entry in self._call(index, f"nvmlDeviceGet{kind}RunningProcesses", handle) or []:
                pid = getattr(entry, "pid", None)
                if pid is None:
                    continue
                used = getattr(entry, "usedGpuMemory", None)
                used = int(used) if isinstance(used, (int, float)) and 0 <= used < 2**63 else None
                if pid in found and found[pid] is not None and (used is None or used < found[pid]):
                    continue
                found[int(pid)] = used
        return [GpuProcess(gpu_index=index, pid=pid, used_memory=used) for pid, used in found.items()]

    def sample(self) -> tuple[list[GpuInfo], list[GpuProcess], str | None]:
        try:
            count = int(self.nvml.nvmlDeviceGetCount())
        except self._errors as exc:
            raise GpuUnavailable(describe_nvml_error(exc, self.nvml, "list the GPUs")) from exc
        if count != self.count:  # a GPU fell off the bus, or came back: indices may name other devices
            self._handles.clear()
            self._static.clear()
            self._unsupported = {key for key in self._unsupported if key[0] == _SYSTEM}
            self.count = count
        gpus = [self._gpu(i) for i in range(count)]
        processes = [p for i in range(count) for p in self._processes(i)]
        return gpus, processes, self.driver_version

    def close(self) -> None:
        if getattr(self, "_open", False):
            self._open = False
            try:
                self.nvml.nvmlShutdown()
            except self._errors:
                pass


def _int_attr(obj: Any, name: str) -> int | None:
    value = getattr(obj, name, None)
    return int(value) if isinstance(value, (int, float)) else None
