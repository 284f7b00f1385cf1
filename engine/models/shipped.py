"""Files the project ships (the offline prompt set, the tokenizer corpus) and the `tiny:` name scheme.

`tiny:<name>` in a config means "the offline tiny profile's <name>": a shipped prompt set for
`datasets[].name`, a tiny model built locally for model names (see engine/tiny.py).
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_SCHEME = "tiny:"

SHIPPED_DATASETS = {
    "python-instructions": ASSETS / "prompts" / "python_instructions.jsonl",
}
TOKENIZER_CORPUS = ASSETS / "corpus" / "python_snippets.txt"


def is_tiny(name: str) -> bool:
    return name.startswith(TINY_SCHEME)


def tiny_name(name: str) -> str:
    return name[len(TINY_SCHEME) :]


def shipped_dataset(name: str) -> Path:
    """Path of a shipped prompt set named `tiny:<name>`; KeyError names the ones there are."""
    key = tiny_name(name)
    if key not in SHIPPED_DATASETS:
        known = ", ".join(TINY_SCHEME + k for k in SHIPPED_DATASETS)
        raise KeyError(f"no shipped dataset {name!r}; shipped: {known}")
    return SHIPPED_DATASETS[key]
