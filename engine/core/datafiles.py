"""Read records from local JSONL / JSON / CSV / Parquet files, with errors that name file and line.

Used by every stage that reads a dataset; light (stdlib; pyarrow only for Parquet, imported lazily).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.core.fsio import CorruptLine, iter_jsonl

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


class DataFileError(ValueError):
    """A dataset file that cannot be read as records; the message says which file, which line, and why."""


def dataset_files(path: Path) -> list[Path]:
    """The data files of a file or folder (folders: every supported file, sorted, recursively)."""
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataFileError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(sorted(SUFFIXES))}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataFileError(f"{path}: folder has no {'/'.join(sorted(SUFFIXES))} files")
        return files
    raise DataFileError(f"{path}: no such file or folder")


def read_stage_input(path: str | Path, key: str, made_by: str) -> list[dict[str, Any]]:
    """Every record of a file that one stage writes and the next reads, for instance the prompts
    (`data.output_path`). Errors name the config key; a missing file says which stage to run first."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{key}: {path} does not exist; run the {made_by} stage first (tas run {made_by})")
    try:
        return [record for _, record in iter_records(path)]
    except DataFileError as exc:
        raise DataFileError(f"{key}: {exc}") from None


def iter_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line or row number, record) pairs of one file."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind == "jsonl":
        yield from _iter_jsonl(path)
    elif kind == "json":
        yield from _iter_json(path)
    elif kind in ("csv", "tsv"):
        yield from _iter_csv(path, delimiter="," if kind == "csv" else "\t")
    elif kind == "parquet":
        yield from _iter_parquet(path)
    else:
        raise DataFileError(f"{path}: unsupported file type {path.suffix!r}")


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8", newline="")
    except OSError as exc:
        raise DataFileError(f"{path}: cannot read: {exc.strerror}") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # a user's file need not end with a newline; a corrupt line is an error naming file and line
    try:
        yield from iter_jsonl(path, final_line_may_lack_newline=True)
    except CorruptLine as exc:
        raise DataFileError(str(exc)) from None


def _iter_json(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}:{exc.lineno}: bad JSON: {exc.msg} (column {exc.colno})") from None
        except UnicodeDecodeError:
            raise DataFileError(f"{path}: not UTF-8 text") from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}: take the only list value
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataFileError(f"{path}: expected a JSON list of objects (or JSON lines)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataFileError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataFileError(f"{path}: item {index} is a JSON {type(record).__name__}, not an object")
        yield index + 1, record


def _iter_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            for record in reader:
                yield reader.line_num, record
        except UnicodeDecodeError:
            line, byte = _first_undecodable_line(path)
            raise DataFileError(f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x})") from None
        except csv.Error as exc:
            raise DataFileError(f"{path}:{reader.line_num}: bad CSV: {exc}") from None


def _first_undecodable_line(path: Path) -> tuple[int, int]:
    """The real line of the first non-UTF-8 byte (the text reader fails a whole buffer ahead of it)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return number, raw[exc.start]
    return 0, 0


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataFileError(f"{path}: not a readable Parquet file: {exc}") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield row, record
