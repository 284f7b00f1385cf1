"""Stage `data`: prompt extraction from local files and the shipped set, with TAS filtering."""

from __future__ import annotations

import csv
import errno
import json
import os
from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.core.fsio import FileWriteError
from engine.models.tiny_python import problems
from engine.runner.context import StageError
from engine.stages import data
from engine.store.events import read_events

from .helpers import make_context


@pytest.fixture
def tiny_config(project: Path):
    return load_config(project / "configs" / "tiny.yaml")


def _prompts(config) -> list[dict]:
    with open(config.data.output_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _use_local(config, path: Path, key: str = "instruction", max_words: int = 40):
    config.datasets[0].name = "local"
    config.datasets[0].external_local_path = str(path)
    config.datasets[0].key = key
    config.teacher.base.prompt_length = max_words
    return config


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_shipped_prompt_set(tiny_config, project: Path):
    ctx = make_context(tiny_config, "data", project)
    data.run(ctx)
    prompts = _prompts(tiny_config)
    assert tiny_config.data.limit is None  # the profile keeps every prompt of tiny-python's prompts split
    assert sorted(p["instruction"] for p in prompts) == sorted(p["instruction"] for p in problems("prompts").values())
    assert all(p["words"] <= tiny_config.teacher.base.prompt_length for p in prompts)
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert len({data.normalise(p["instruction"]) for p in prompts}) == len(prompts)
    events = read_events(ctx.stage_dir / "events.jsonl")
    assert {"kind": "artifact", "path": tiny_config.data.output_path, "what": "prompts"}.items() <= events[-1].items()
    assert any(e["kind"] == "metric" and e["name"] == "prompts" and e["value"] == len(prompts) for e in events)


def test_filter_dedupe_shuffle_limit_and_stable_ids(tiny_config, project: Path):
    rows = [{"instruction": "Sort a list of numbers"}, {"instruction": "  sort a LIST of numbers "}]
    rows += [{"instruction": f"Write function number {i} please"} for i in range(50)]
    rows += [{"instruction": "word " * 41}, {"instruction": ""}, {"instruction": None}, {"instruction": 42}]
    _use_local(tiny_config, _write_jsonl(project / "in.jsonl", rows))
    tiny_config.data.limit = 30
    data.run(make_context(tiny_config, "data", project))
    first = _prompts(tiny_config)
    assert len(first) == 30
    kept_sort = [p for p in first if data.normalise(p["instruction"]) == "sort a list of numbers"]
    assert len(kept_sort) <= 1  # the repeat is gone
    log = [e["msg"] for e in read_events(Path("runs").glob("*/data/events.jsonl").__next__()) if e["kind"] == "log"]
    assert "56 read, 2 empty, 1 not text, 1 over the word limit, 1 duplicates" in log[0]

    # same seed → same order and ids; ids do not depend on order
    data.run(make_context(tiny_config, "data", project))
    assert _prompts(tiny_config) == first
    tiny_config.data.seed = 7
    tiny_config.data.limit = None
    data.run(make_context(tiny_config, "data", project))
    reordered = _prompts(tiny_config)
    assert [p["id"] for p in reordered] != [p["id"] for p in first][: len(reordered)]
    by_text = {p["instruction"]: p["id"] for p in reordered}
    assert all(by_text[p["instruction"]] == p["id"] for p in first)


def test_word_filter_is_inclusive(tiny_config, project: Path):
    _use_local(
        tiny_config,
        _write_jsonl(project / "in.jsonl", [{"q": "one two three"}, {"q": "one two three four"}]),
        key="q",
        max_words=3,
    )
    data.run(make_context(tiny_config, "data", project))
    assert [p["instruction"] for p in _prompts(tiny_config)] == ["one two three"]


def test_csv_parquet_and_folder(tiny_config, project: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = project / "mixed"
    folder.mkdir()
    with open(folder / "a.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "other"])
        writer.writeheader()
        writer.writerow({"prompt": "Parse a CSV, with quotes", "other": "x"})
    pq.write_table(pa.table({"prompt": ["Read a parquet file", "Write a parquet file"]}), folder / "b.parquet")
    _write_jsonl(folder / "c.jsonl", [{"prompt": "Count words in a file"}])
    _use_local(tiny_config, folder, key="prompt")
    tiny_config.data.shuffle = False
    data.run(make_context(tiny_config, "data", project))
    assert [p["instruction"] for p in _prompts(tiny_config)] == [
        "Parse a CSV, with quotes",
        "Read a parquet file",
        "Write a parquet file",
        "Count words in a file",
    ]


def test_local_file_given_as_name(tiny_config, project: Path):
    path = _write_jsonl(project / "mine.jsonl", [{"instruction": "Reverse a string"}])
    tiny_config.datasets[0].name = str(path)
    data.run(make_context(tiny_config, "data", project))
    assert _prompts(tiny_config)[0]["instruction"] == "Reverse a string"


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            '{"instruction": "ok"}\n{"instruction": "also ok"}\n{"instruction": broken}\n',
            r"in\.jsonl:3: bad JSON: Expecting value",
        ),
        ("", r"has no records \(empty file\)"),
        ('{"instruction": "ok"}\n[1, 2]\n', r"in\.jsonl:2: a JSON list, not an object"),
        (b'{"instruction": "ok"}\n{"instruction": "caf\xe9"}\n', r"in\.jsonl:2: not UTF-8"),
    ],
    ids=["malformed line", "empty", "not an object", "not utf-8"],
)
def test_bad_files_name_file_and_line(tiny_config, project: Path, content, expected):
    path = project / "in.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    _use_local(tiny_config, path)
    with pytest.raises(StageError, match=r"datasets\[0\]\.external_local_path: .*" + expected):
        data.run(make_context(tiny_config, "data", project))
    assert not Path(tiny_config.data.output_path).exists()


def test_missing_key_lists_the_columns(tiny_config, project: Path):
    _use_local(tiny_config, _write_jsonl(project / "in.jsonl", [{"prompt": "a", "response": "b"}]))
    with pytest.raises(
        StageError,
        match=r"datasets\[0\]\.key: column 'instruction' is not in .*in\.jsonl:1 \(columns: prompt, response\)",
    ):
        data.run(make_context(tiny_config, "data", project))


def test_missing_file(tiny_config, project: Path):
    _use_local(tiny_config, project / "nope.jsonl")
    with pytest.raises(StageError, match=r"nope\.jsonl: no such file or folder"):
        data.run(make_context(tiny_config, "data", project))


def test_nothing_left_after_filtering(tiny_config, project: Path):
    _use_local(tiny_config, _write_jsonl(project / "in.jsonl", [{"instruction": "too many words here"}]), max_words=2)
    with pytest.raises(
        StageError,
        match=r"no prompts left: 1 read, 1 over the word limit.*teacher\.base\.prompt_length \(now 2 words\)",
    ):
        data.run(make_context(tiny_config, "data", project))


def test_unwritable_output_keeps_old_file(tiny_config, project: Path):
    data.run(make_context(tiny_config, "data", project))
    before = Path(tiny_config.data.output_path).read_bytes()
    tiny_config.data.output_path = str(project / "in.jsonl" / "sub" / "prompts.jsonl")
    (project / "in.jsonl").write_text("not a folder")
    with pytest.raises(FileWriteError, match=r"data\.output_path: .*in\.jsonl is a file where a folder is needed"):
        data.run(make_context(tiny_config, "data", project))
    assert Path(project / ".data/tiny/prompts.jsonl").read_bytes() == before


def test_read_only_output_names_the_configured_path_not_a_temp_file(tiny_config, project: Path, monkeypatch):
    """On a read-only mount the temp file next to the output cannot be created (EROFS, naming the temp file):
    the error names `data.output_path` and its file, which is what the user can change."""
    output = os.path.realpath(tiny_config.data.output_path)
    ctx = make_context(tiny_config, "data", project)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(FileWriteError) as info:
        data.run(ctx)
    message = str(info.value)
    assert message.startswith(f"data.output_path: cannot write {output}: Read-only file system; ")
    assert message.endswith("change the path in the config") and ".tmp" not in message


def test_hub_dataset_offline_gives_a_clear_error(tiny_config, project: Path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    tiny_config.datasets[0].name = "someone/python-prompts-not-cached"
    with pytest.raises(
        StageError,
        match=r"datasets\[0\]\.name: cannot load 'someone/python-prompts-not-cached' from the Hugging Face hub.*external_local_path",
    ):
        data.run(make_context(tiny_config, "data", project))
