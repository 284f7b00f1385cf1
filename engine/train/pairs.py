"""Teacher answers as chat training data, split the same way by every stage that trains or evaluates.

Heavy-free module (stdlib; the tokenizer is passed in). `sft`, `distill` and `eval` all call
`split_pairs` with `train.sft.dataset.{seed,test_size}`, so the held-out answers that `eval` scores were
never seen by any training stage.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from engine.core.datafiles import DataFileError, iter_records, read_stage_input
from engine.runner.context import StageContext, StageError


class ChatDataError(ValueError):
    pass


def load_pairs(path: str | Path, key: str = "teacher.base.output_path") -> list[dict[str, Any]]:
    """Teacher records with non-empty instruction and output, in file order."""
    path = Path(path)
    try:
        records = read_stage_input(path, key, made_by="teacher")
    except DataFileError as exc:
        raise ChatDataError(str(exc)) from None
    pairs = [r for r in records if str(r.get("instruction", "")).strip() and str(r.get("output", "")).strip()]
    if len(pairs) < 2:
        raise ChatDataError(f"{key}: {path} has {len(pairs)} usable answers; training needs at least 2")
    return pairs


def split_pairs(pairs: list[dict[str, Any]], test_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train/eval split: by a seeded hash of the prompt id, independent of file order.

    A resumed teacher appends in a different order than a fresh one; hashing ids keeps every answer on
    the same side of the split either way.
    """

    def rank(record: dict[str, Any]) -> str:
        ident = str(record.get("id") or record["instruction"])
        return hashlib.sha256(f"{seed}:{ident}".encode()).hexdigest()

    ordered = sorted(pairs, key=rank)
    n_eval = min(len(ordered) - 1, max(1, math.ceil(len(ordered) * test_size)))
    return ordered[n_eval:], ordered[:n_eval]


def load_split_pairs(ctx: StageContext) -> tuple[list[dict], list[dict], str | None]:
    """The prologue of every stage that trains or scores: (train pairs, held-out pairs, Assistant system prompt).

    The split is `train.sft.dataset.{seed,test_size}` for all of them, so `eval` never scores an
    answer that `sft` or `distill` trained on.
    """
    split = ctx.config.train.sft.dataset
    try:
        pairs = load_pairs(ctx.config.teacher.base.output_path)
    except ChatDataError as exc:
        raise StageError(str(exc)) from None
    prompts = Path(ctx.config.data.output_path)
    downloaded = ctx.config.teacher.source == "download"  # TAS trains on the whole published set
    if (
        prompts.exists() and not downloaded
    ):  # only this run's prompts, even if the answers file holds more (reused answers)
        ids = {record.get("id") for _, record in iter_records(prompts)}
        kept = [p for p in pairs if p.get("id") in ids]
        if len(kept) < len(pairs):
            ctx.events.log(
                f"using {len(kept)} of {len(pairs)} teacher answers: the others answer prompts that are "
                f"not in this run's data.output_path"
            )
        pairs = kept
        if len(pairs) < 2:
            raise StageError(
                f"teacher.base.output_path: only {len(pairs)} answers match the prompts of "
                f"data.output_path ({prompts}); run the teacher stage of this run first"
            )
    train_pairs, held_out = split_pairs(pairs, split.test_size, split.seed)
    return train_pairs, held_out, ctx.system_prompt("Assistant")


def prompt_messages(instruction: str, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": instruction}]


def to_prompt_completion(record: dict[str, Any], system: str | None) -> dict[str, Any]:
    """TRL's conversational prompt–completion format: the loss is computed on the completion only."""
    return {
        "prompt": prompt_messages(record["instruction"], system),
        "completion": [{"role": "assistant", "content": record["output"]}],
    }


def tokenize_pair(tokenizer, record: dict[str, Any], system: str | None, max_length: int) -> dict[str, list[int]]:
    """input_ids of prompt + answer, and labels that are -100 on the prompt (loss on the answer only)."""
    messages = prompt_messages(record["instruction"], system)
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": record["output"]}], tokenize=False
    )
    if not full_text.startswith(prompt_text):  # templates that rewrite earlier turns: fall back to concatenation
        full_text = prompt_text + record["output"] + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"][:max_length]
    labels = [-100] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids) :]
    return {"input_ids": full_ids, "labels": labels[: len(full_ids)]}
