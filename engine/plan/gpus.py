"""The GPUs a plan is made for: given (`--gpus 8x80GB`) or read from the machine (engine.gpu's backend: NVML,
or the fake GPUs of TAS_FAKE_GPUS)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.gpu.model import GIB, Backend, GpuUnavailable
from engine.gpu.sampler import open_backend


@dataclass(frozen=True)
class Gpus:
    count: int
    memory: int  # bytes of the smallest one: every rank must fit on it
    source: str  # where the figures come from, for the reader


_SPEC = re.compile(r"^\s*(?:(\d+)\s*[x×*]\s*)?(\d+(?:\.\d+)?)\s*(GB|GiB|G)?\s*$", re.IGNORECASE)


def parse_gpus(text: str) -> Gpus:
    """`8x80GB`, `80GB`, `2x24` -> Gpus; ValueError otherwise. A GPU's "80GB" is read as 80 GiB, close to
    what NVML reports for one (an H100 80GB has 79.6 GiB)."""
    match = _SPEC.match(text)
    if not match or float(match.group(2)) <= 0 or match.group(1) == "0":
        raise ValueError(f"--gpus {text!r}: write COUNTxMEMORY, e.g. 8x80GB or 1x24GB")
    return Gpus(int(match.group(1) or 1), int(float(match.group(2)) * GIB), f"--gpus {text.strip()}")


def detect_gpus(backend: Backend | None = None) -> tuple[Gpus | None, str]:
    """This machine's GPUs, or (None, why not)."""
    try:
        backend = backend or open_backend()
        try:
            gpus, _, _ = backend.sample()
        finally:
            backend.close()
    except GpuUnavailable as exc:
        return None, exc.message
    sizes = [g.memory_total for g in gpus if g.memory_total]
    if not sizes:
        return None, "the GPUs do not report their memory"
    names = sorted({g.name for g in gpus})
    return Gpus(len(gpus), min(sizes), f"{backend.source}: {len(gpus)} × {', '.join(names)}"), ""
