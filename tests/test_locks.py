"""The dependency locks (requirements/*.txt, written by scripts/lock-deps.sh) agree with pyproject.toml:
every direct dependency is pinned, with hashes, inside its range; both locks pin the same stack."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from .helpers import ROOT

LOCKS = {"cpu": ROOT / "requirements" / "cpu.txt", "cuda": ROOT / "requirements" / "cuda.txt"}
PIN = re.compile(r"^([A-Za-z0-9_.\-\[\],]+)==(\S+)")


def pins(lock: str) -> dict[str, Version]:
    found = {}
    for line in LOCKS[lock].read_text().splitlines():
        if match := PIN.match(line):
            found[re.sub(r"\[.*\]", "", match[1]).lower().replace("_", "-")] = Version(match[2])
    return found


def direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *extras["dev"], *extras["tracking"]]]


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_direct_dependency_is_pinned_inside_its_range(lock: str):
    pinned = pins(lock)
    for requirement in direct_requirements():
        name = requirement.name.lower().replace("_", "-")
        assert name in pinned, f"{LOCKS[lock].name} lacks {name}: run scripts/lock-deps.sh"
        # a local version label (+cpu) is not part of the range check
        assert requirement.specifier.contains(Version(pinned[name].public), prereleases=True), (
            f"{LOCKS[lock].name} pins {name}=={pinned[name]} outside pyproject's {requirement}: run scripts/lock-deps.sh"
        )


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_pin_carries_hashes(lock: str):
    text = LOCKS[lock].read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    unhashed = [b.split()[0] for b in blocks if PIN.match(b) and "--hash=sha256:" not in b]
    assert not unhashed, f"{LOCKS[lock].name}: pins without a hash: {unhashed}"


def test_both_locks_pin_the_same_stack_and_torch_build():
    cpu, cuda = pins("cpu"), pins("cuda")
    for name in ("transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "textual", "tokenizers"):
        assert cpu[name] == cuda[name], name
    assert cpu["torch"].local == "cpu" and cuda["torch"].local is None
    assert cpu["torch"].public == cuda["torch"].public
    assert cpu["bitsandbytes"] < Version("0.49")  # 0.49.0-0.50.2 break QLoRA on AVX-512 CPUs (tests/test_qlora_cpu.py)
