"""ARCHITECTURE.md stays the map of the tree: every package is on it, every module of the light packages is named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIGHT_PACKAGES = ("core", "config", "pipeline", "store", "runner", "export", "chat")


def layers_block() -> dict[str, str]:
    """The map's first code block: package name → its description (continuation lines joined)."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = text.split("```\n", 2)[1]
    entries: dict[str, str] = {}
    name = ""
    for line in block.splitlines():
        if line[:1].strip():
            name, _, rest = line.partition(" ")
            entries[name] = rest
        elif name:
            entries[name] += " " + line.strip()
    return entries


def test_every_package_is_on_the_map():
    packages = sorted(f"engine.{p.parent.name}" for p in (ROOT / "engine").glob("*/__init__.py")) + ["tui"]
    missing = [package for package in packages if package not in layers_block()]
    assert not missing, f"ARCHITECTURE.md's layers do not name {missing}"


def test_the_map_names_no_package_that_is_gone():
    gone = [name for name in layers_block() if not (ROOT / name.replace(".", "/") / "__init__.py").is_file()]
    assert not gone, f"ARCHITECTURE.md names packages that do not exist: {gone}"


@pytest.mark.parametrize("package", LIGHT_PACKAGES)
def test_every_module_of_a_light_package_is_named(package: str):
    described = layers_block()[f"engine.{package}"]
    modules = sorted(p.stem for p in (ROOT / "engine" / package).glob("*.py") if p.stem != "__init__")
    unnamed = [m for m in modules if not re.search(rf"\b{m}\b", described)]
    assert not unnamed, f"ARCHITECTURE.md's line for engine.{package} does not name {unnamed}"
