"""`teacher.source: download`, offline: TAS's size → revision mapping, and real `datasets` loading from a
local folder in the hub layout (README.md + data/train-00000-of-00001.parquet).

The hub id itself cannot be loaded offline with its revision: datasets 5 in offline mode skips the hub
snapshot cache and falls back to its prepared-data cache, which ignores the revision. So the test of the
default repo wraps `datasets.load_dataset` to record the call (hub id, revision, split) and hands that
call to the local folder; every other test loads the folder through `repo` with no patching.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.config.prompts import prompt_id
from engine.runner.context import StageError
from engine.store.events import read_events
from engine.store.lineage import fingerprint_id, teacher_fingerprint
from engine.teacher.download import TAS_REPO, download_answers, plan_download
from engine.teacher.output import TeacherOutput

from .helpers import make_context

ROWS = [
    {"instruction": "Write a function that reverses a string.", "output": "def rev(s):\n    return s[::-1]\n"},
    {"instruction": "Sort a list of numbers", "output": "sorted(xs)"},
    {"instruction": "  sort a LIST of numbers ", "output": "xs.sort()"},  # a repeat: TAS keeps it
    {"instruction": "Add two numbers", "output": "   "},  # empty answer: never stored
    {"instruction": None, "output": "orphan"},  # no instruction
    {"instruction": "Compute a factorial", "output": "math.factorial(n)"},
]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`datasets` prepares what it loads under a temporary cache, never the user's ~/.cache."""
    import datasets

    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def hub_folder(tmp_path: Path) -> Path:
    """A dataset repo as `huggingface-cli download --repo-type dataset --local-dir` leaves it."""
    import datasets

    folder = tmp_path / "Stable-Code-Python-SFT"
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# test copy\n")
    datasets.Dataset.from_list(ROWS).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


@pytest.fixture
def config(project: Path):
    cfg = load_config(project / "configs" / "tiny.yaml")
    cfg.teacher.source = "download"
    return cfg


def _run_stage(cfg, project: Path):
    from engine.stages import teacher

    ctx = make_context(cfg, "teacher", project)
    teacher.run(ctx)
    return ctx


def _answers(cfg, project: Path) -> list[dict]:
    fingerprint = fingerprint_id(teacher_fingerprint(cfg, project))
    return TeacherOutput(cfg.teacher.base.output_path, fingerprint).records()


# ------------------------------------------------------------------------------------ TAS's mapping


@pytest.mark.parametrize(
    ("size", "teacher", "revision"),
    [
        ("16k", "open", "v3-GoogleDocString"),
        ("32k", "open", "v5-GoogleDocString"),
        ("64k", "open", "v7-GoogleDocString"),
        ("16k", "closed", "v3-NumpyDocString"),
        ("32k", "closed", "v5-NumpyDocString"),
        ("64k", "closed", "v7-NumpyDocString"),
    ],
)
def test_size_and_teacher_pick_tas_revision(config, size: str, teacher: str, revision: str):
    getattr(config.teacher, teacher).data.download.size = size
    other = "closed" if teacher == "open" else "open"
    getattr(config.teacher, other).data.download.size = "128k"  # the other section is never read
    plan = plan_download(config, teacher)
    assert (plan.repo, plan.revision, plan.split) == (TAS_REPO, revision, "train")
    assert plan.key == f"teacher.{teacher}.data.download"
    assert plan.label == f"{TAS_REPO}@{revision}"


def test_open_teacher_by_default_as_tas_main(config):
    config.teacher.closed.data.download.size = "16k"
    plan = plan_download(config)
    assert plan.teacher == "open" and plan.revision == "v7-GoogleDocString"


def test_download_from_closed_reads_closed_section(config):
    config.teacher.download_from = "closed"
    config.teacher.closed.data.download.size = "32k"
    plan = plan_download(config)
    assert (plan.teacher, plan.revision) == ("closed", "v5-NumpyDocString")


def test_explicit_revision_wins(config):
    config.teacher.open.data.download.repo = "someone/answers"
    config.teacher.open.data.download.revision = "main"
    plan = plan_download(config)
    assert (plan.repo, plan.revision) == ("someone/answers", "main")


@pytest.mark.parametrize("teacher", ["open", "closed"])
def test_unknown_size_names_key_and_valid_sizes(config, teacher: str):
    getattr(config.teacher, teacher).data.download.size = "128k"
    with pytest.raises(StageError) as err:
        plan_download(config, teacher)
    message = str(err.value)
    assert message.startswith(f"teacher.{teacher}.data.download.size: '128k' is not a size TAS publishes")
    style = "GoogleDocString" if teacher == "open" else "NumpyDocString"
    assert f"16k (v3-{style}), 32k (v5-{style}), 64k (v7-{style})" in message


def test_unknown_size_fails_the_stage_before_loading(config, project: Path, monkeypatch: pytest.MonkeyPatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("loaded despite a bad size"))
    config.teacher.open.data.download.size = "64"
    with pytest.raises(StageError, match=r"teacher\.open\.data\.download\.size: '64'"):
        _run_stage(config, project)


# ------------------------------------------------------------------------------- records and resume


def test_local_folder_loads_for_real_and_resumes(config, project: Path, hub_folder: Path):
    config.teacher.open.data.download.repo = str(hub_folder)
    ctx = _run_stage(config, project)

    answers = _answers(config, project)
    first = prompt_id(ROWS[1]["instruction"])
    assert [a["id"] for a in answers] == [
        prompt_id(ROWS[0]["instruction"]),
        first,
        first + "-2",
        prompt_id(ROWS[5]["instruction"]),
    ]
    assert [(a["instruction"], a["output"]) for a in answers] == [
        (row["instruction"], row["output"]) for row in (ROWS[0], ROWS[1], ROWS[2], ROWS[5])
    ]  # verbatim, as TAS
    assert {a["model"] for a in answers} == {str(hub_folder)}
    logs = [e["msg"] for e in read_events(ctx.stage_dir / "events.jsonl") if e["kind"] == "log"]
    assert any(
        "stored 4 answers, 0 were already there" in m
        and "1 skipped (empty answer)" in m
        and "1 skipped (no instruction)" in m
        for m in logs
    ), logs

    output = Path(config.teacher.base.output_path)
    before = output.read_bytes()
    ctx = _run_stage(config, project)  # resume: everything is there
    assert output.read_bytes() == before
    logs = [e["msg"] for e in read_events(ctx.stage_dir / "events.jsonl") if e["kind"] == "log"]
    assert any("stored 0 answers, 4 were already there" in m for m in logs), logs


def test_ids_match_the_data_stage(config, project: Path, hub_folder: Path):
    """The data stage over the same folder (repeats kept, no shuffle) gives the same ids."""
    from engine.stages import data

    config.datasets = config.datasets[:1]
    config.datasets[0].name = "local"
    config.datasets[0].external_local_path = str(hub_folder / "data")
    config.datasets[0].key = "instruction"
    config.teacher.base.prompt_length = 1000
    config.data.dedupe, config.data.shuffle, config.data.limit = False, False, None
    data.run(make_context(config, "data", project))
    prompts = [json.loads(line) for line in Path(config.data.output_path).read_text().splitlines()]

    config.teacher.open.data.download.repo = str(hub_folder)
    _run_stage(config, project)
    answers = _answers(config, project)
    answered = {a["id"] for a in answers}
    assert [p["id"] for p in prompts if p["id"] in answered] == [a["id"] for a in answers]
    assert answered == {p["id"] for p in prompts} - {prompt_id("Add two numbers")}  # the empty answer


def test_default_repo_is_loaded_with_tas_revision_and_split(
    config, project: Path, hub_folder: Path, monkeypatch: pytest.MonkeyPatch
):
    import datasets

    real_load, calls = datasets.load_dataset, []

    def offline_hub(path, **kwargs):
        calls.append((path, kwargs))
        return real_load(str(hub_folder), **kwargs)  # the hub id's files, from the local copy

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    config.teacher.open.data.download.repo = None
    config.teacher.open.data.download.size = "32k"
    _run_stage(config, project)
    assert calls == [(TAS_REPO, {"revision": "v5-GoogleDocString", "split": "train"})]
    assert {a["model"] for a in _answers(config, project)} == {f"{TAS_REPO}@v5-GoogleDocString"}


def test_load_failure_says_what_to_do_offline(config, project: Path, monkeypatch: pytest.MonkeyPatch):
    import datasets

    def unreachable(path, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(StageError) as err:
        _run_stage(config, project)
    message = str(err.value)
    assert f"cannot load '{TAS_REPO}' at revision 'v7-GoogleDocString', split 'train'" in message
    assert "Couldn't reach the Hugging Face Hub" in message
    assert "--revision v7-GoogleDocString --local-dir DIR" in message
    assert "teacher.open.data.download.repo: DIR" in message


def test_answers_of_another_revision_are_never_mixed(
    config, project: Path, hub_folder: Path, monkeypatch: pytest.MonkeyPatch
):
    import datasets

    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kwargs: real_load(str(hub_folder), **kwargs))
    output = TeacherOutput(project / "answers.jsonl")  # no fingerprint: only the record labels tell them apart
    download_answers(make_context(config, "teacher", project), output)
    config.teacher.open.data.download.size = "16k"
    with pytest.raises(StageError, match="already holds answers from .*v7-GoogleDocString.*downloads .*v3-Google"):
        download_answers(make_context(config, "teacher", project), output)
