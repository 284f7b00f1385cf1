"""Where a stage runs: device, dtype, attention kernel, torch.distributed, peak memory.

Heavy module (torch). Shared by the stages so that every one picks devices and reports memory alike.
"""

from __future__ import annotations

import os
import resource
from datetime import timedelta
from typing import Any

import torch

from engine.config.schema import TASConfig


def pick_device(config: TASConfig) -> torch.device:
    """The stage's device from `device.type` and `cuda.allow_tf32`; on the CPU, `device.cpu_threads` threads."""
    device = select_device(config.device.type, config.cuda.allow_tf32)
    if device.type == "cpu" and config.device.cpu_threads:
        torch.set_num_threads(config.device.cpu_threads)
    return device


def select_device(wanted: str, allow_tf32: bool = True) -> torch.device:
    """cuda (must exist), cuda:N (that visible GPU), cpu, or auto (cuda when present). Under torchrun:
    cuda:LOCAL_RANK."""
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {wanted} was asked for but no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES / drivers)"
        )
    if wanted == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if wanted.startswith("cuda:"):
        index = int(wanted.removeprefix("cuda:"))
        if index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {wanted}: only {torch.cuda.device_count()} GPU(s) are visible "
                "(indices count among CUDA_VISIBLE_DEVICES)"
            )
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    if allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda", local_rank)


def has_native_bf16() -> bool:
    """Whether the current GPU computes in bfloat16 in hardware (Ampere and newer).

    torch's `is_bf16_supported()` also says yes where bf16 is only emulated (V100, T4: slowly, in float32
    units), so the float16 fallback never fired there; emulation does not count here.
    """
    return torch.cuda.is_bf16_supported(including_emulation=False)


def pick_dtype(bfloat16: bool, device: torch.device) -> torch.dtype:
    """The dtype a config's `bfloat16: true` means on this device: bfloat16 where the device has it; on a
    GPU without it natively (V100, T4) float16, as TAS did; float32 when the config asks for full precision."""
    if not bfloat16:
        return torch.float32
    if device.type == "cuda" and not has_native_bf16():
        return torch.float16
    return torch.bfloat16


def pick_attention(wanted: str | None, device: torch.device) -> tuple[str | None, str | None]:
    """The attention kernel to use, and a warning when the configured one cannot run here.

    TAS configs ask for flash_attention_2, which needs the flash-attn package and a CUDA GPU; on any
    other machine we fall back to PyTorch's SDPA instead of failing the stage.
    """
    if wanted != "flash_attention_2":
        return wanted, None
    if device.type != "cuda":
        return "sdpa", "flash_attention_2 needs a CUDA GPU; using sdpa on this device"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa", "flash_attention_2 needs the flash-attn package (pip install flash-attn); using sdpa"
    return wanted, None


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group when there is one; returns (rank, world_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            # Each rank on its own GPU before the group exists, and the group bound to it: otherwise NCCL's
            # first barrier runs on the current device, cuda:0, on every rank ("Duplicate GPU detected" or a
            # hang) when a stage, like the teacher, joins the group before it picks its device (issue 22).
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            dist.init_process_group(
                backend="nccl", timeout=timedelta(hours=12), device_id=torch.device("cuda", local_rank)
            )
        else:
            dist.init_process_group(backend="gloo", timeout=timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (e.g. a cancel seen by one rank stops all at the same step,
    instead of leaving the others waiting in a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def peak_memory() -> dict[str, Any]:
    """Peak bytes per device: CUDA allocator peaks, and the process's peak RSS for the CPU."""
    devices: dict[str, Any] = {"cpu_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            devices[f"cuda:{index}"] = torch.cuda.max_memory_allocated(index)
    return devices


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_accelerator_memory() -> None:
    """Give the allocator's cached blocks back after an out-of-memory, so a smaller retry can use them."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
