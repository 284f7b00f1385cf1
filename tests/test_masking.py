"""SFT masks the prompt with TRL's completion mask; distill and eval use `tokenize_pair`. Both must train
and score exactly the same tokens of the same records, or the KD student and the eval would see other
targets than the assistant was tuned on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.stages import sft
from engine.train.pairs import load_split_pairs, tokenize_pair
from tests.helpers import PROMPTS, TINY_CONFIG, make_context

RECORDS = [
    ("Write a function that adds two numbers.", "def add(a, b):\n    return a + b"),
    ("Reverse a string.", "def reverse(s):\n    return s[::-1]"),
    ("Explain list comprehensions in one line.", "They build a list from an iterable: [x * 2 for x in xs]."),
    ("Déjà vu: return the length of a unicode string.", "def n(s):\n    return len(s)  # ü counts as 1"),
    ("Print hello.", "print('hello')"),
    ("Sort a list of numbers.", "sorted(numbers)"),
    ("Return the maximum.", "def biggest(xs):\n    return max(xs)"),
    ("Check for an even number.", "def even(n):\n    return n % 2 == 0"),
]


@pytest.fixture
def sft_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    shutil.copy(PROMPTS, tmp_path / "prompt.yaml")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY_CONFIG)
    answers = tmp_path / "teacher.jsonl"
    answers.write_text(
        "".join(json.dumps({"id": f"p{i}", "instruction": q, "output": a}) + "\n" for i, (q, a) in enumerate(RECORDS))
    )
    cfg.teacher.base.output_path = str(answers)
    cfg.train.sft.save_path = str(tmp_path / "adapter")
    cfg.train.sft.dataset.test_size = 0.25
    ctx = make_context(cfg, "sft", tmp_path)
    return ctx, sft.prepare(ctx)


def test_distill_masks_exactly_what_sft_trains_on(sft_setup):
    ctx, setup = sft_setup
    train_pairs, _, system = load_split_pairs(ctx)
    dataset = setup.trainer.train_dataset
    assert len(dataset) == len(train_pairs) >= 4
    for example, record in zip(dataset, train_pairs, strict=True):
        ours = tokenize_pair(setup.tokenizer, record, system, max_length=10_000)
        if "completion_mask" in example:
            trl_mask = [bool(m) for m in example["completion_mask"]]
        else:
            trl_mask = [label != -100 for label in example["labels"]]
        assert ours["input_ids"] == list(example["input_ids"]), record["instruction"]
        assert [label != -100 for label in ours["labels"]] == trl_mask, record["instruction"]
        assert any(trl_mask) and not all(trl_mask)
