"""Stage `data`: extract the prompts the teacher will answer.

Reads every entry of `datasets` (a hub id when the hub is reachable, `external_local_path` or a local
JSONL/JSON/CSV/Parquet file or folder otherwise, or a shipped `tiny:` prompt set), takes the `key`
column, and keeps prompts of at most `teacher.base.prompt_length` words (the TAS filter). Then it drops
repeats, shuffles with `data.seed` and cuts to `data.limit`.

Output: `data.output_path`, JSONL, one `{"id", "instruction", "source", "words"}` per prompt, written
atomically (a killed stage never leaves half a file). The id is a hash of the normalised prompt text,
so the same prompt gets the same id in every run and the teacher can resume by id.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.config.prompts import normalise, prompt_id
from engine.config.schema import DatasetSource
from engine.core.datafiles import DataFileError, dataset_files, iter_records
from engine.core.fsio import atomic_write_jsonl
from engine.core.secrets import clip
from engine.models.shipped import is_tiny, shipped_dataset
from engine.runner.context import StageContext, StageError


def run(ctx: StageContext) -> None:
    config = ctx.config
    max_words = config.teacher.base.prompt_length
    options = config.data
    counts: Counter[str] = Counter()
    kept: list[dict[str, Any]] = []
    seen: Counter[str] = Counter()

    for index, source in enumerate(config.datasets):
        where = f"datasets[{index}]"
        source_counts: Counter[str] = Counter()
        for text in _texts(source, where, ctx, source_counts):
            words = len(text.split())
            if words > max_words:
                source_counts["too_long"] += 1
                continue
            key = normalise(text)
            seen[key] += 1
            if seen[key] > 1 and options.dedupe:
                source_counts["duplicate"] += 1
                continue
            pid = prompt_id(text) + (f"-{seen[key]}" if seen[key] > 1 else "")
            kept.append({"id": pid, "instruction": text.strip(), "source": source.name, "words": words})
        ctx.events.log(f"{where} {source.name}: {_summary(source_counts)}")
        counts.update(source_counts)

    if not kept:
        raise StageError(
            f"no prompts left: {_summary(counts)}. "
            f"Raise teacher.base.prompt_length (now {max_words} words) or check datasets[].key."
        )
    if options.shuffle:
        random.Random(options.seed).shuffle(kept)
    if options.limit is not None and len(kept) > options.limit:
        counts["over_limit"] = len(kept) - options.limit
        kept = kept[: options.limit]

    output = Path(options.output_path)
    atomic_write_jsonl(output, kept, key="data.output_path")
    ctx.events.progress(counts["read"], counts["read"], "records")
    ctx.events.metric("prompts", len(kept))
    ctx.events.log(f"kept {len(kept)} prompts of {counts['read']} records ({_summary(counts)})")
    ctx.events.artifact(output, "prompts")


def _summary(counts: Counter[str]) -> str:
    parts = [f"{counts['read']} read"]
    labels = {
        "empty": "empty",
        "not_text": "not text",
        "too_long": "over the word limit",
        "duplicate": "duplicates",
        "over_limit": "over data.limit",
    }
    parts += [f"{counts[k]} {label}" for k, label in labels.items() if counts[k]]
    return ", ".join(parts)


def _texts(source: DatasetSource, where: str, ctx: StageContext, counts: Counter[str]) -> Iterator[str]:
    """Prompt texts of one source, reporting progress and honouring cancel."""
    last_report = time.monotonic()
    for number, (origin, record) in enumerate(_records(source, where), start=1):
        counts["read"] += 1
        if number == 1 and source.key not in record:
            columns = ", ".join(map(str, list(record)[:12])) or "none"
            raise StageError(f"{where}.key: column {source.key!r} is not in {origin} (columns: {columns})")
        value = record.get(source.key)
        if value is None or (isinstance(value, str) and not value.strip()):
            counts["empty"] += 1
        elif not isinstance(value, str):
            counts["not_text"] += 1
        else:
            yield value
        if number % 2000 == 0:
            ctx.check_cancelled()
            if time.monotonic() - last_report > 0.5:
                ctx.events.progress(counts["read"], None, "records")
                last_report = time.monotonic()


def _records(source: DatasetSource, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(origin, record) pairs; origin is `file:line` for local files."""
    local = source.external_local_path
    if local is None and is_tiny(source.name):
        try:
            local = str(shipped_dataset(source.name))
        except KeyError as exc:
            raise StageError(f"{where}.name: {exc.args[0]}") from None
    if local is None and Path(source.name).exists():
        local = source.name
    if local is not None:
        field = f"{where}.external_local_path" if source.external_local_path else f"{where}.name"
        try:
            for path in dataset_files(Path(local)):
                empty = True
                for line, record in iter_records(path):
                    empty = False
                    yield f"{path}:{line}", record
                if empty:
                    raise StageError(f"{field}: {path} has no records (empty file)")
        except DataFileError as exc:
            raise StageError(f"{field}: {exc}") from None
        return
    yield from _hub_records(source, where)


def _hub_records(source: DatasetSource, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        from datasets import load_dataset

        subset = None if source.subset in (None, "default") else source.subset
        dataset = load_dataset(source.name, subset, split=source.split)
    except Exception as exc:  # offline, unknown id, gated, bad split: all end the same way for the user
        reason = clip(str(exc).strip().splitlines()[0], 300) if str(exc).strip() else type(exc).__name__
        raise StageError(
            f"{where}.name: cannot load {source.name!r} from the Hugging Face hub ({reason}). "
            f"If this machine is offline, download the dataset elsewhere and set {where}.external_local_path "
            f"to its JSONL/Parquet/CSV file or folder."
        ) from None
    for row, record in enumerate(dataset, start=1):
        yield f"{source.name}[{source.split}] row {row}", record
