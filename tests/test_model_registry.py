"""engine.pipeline.models: the one registry of the pipeline's models, and the guard that keeps it the only one.

The guard reads the source of engine/ and tui/ (ast: string constants, docstrings left out) and fails where a
model is spelled outside the registry, so a new place that lists the models has to read them from it.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.config.load import load_config
from engine.pipeline import models
from engine.pipeline.models import (
    ASSISTANT,
    ASSISTANT_BASE,
    MODELS,
    STUDENT_CE,
    STUDENT_KD,
    STUDENTS,
    TEACHER,
    best_first,
    by_target,
    label_of,
    order_key,
)

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ROOT / "engine" / "pipeline" / "models.py"

# "teacher" and "assistant" are also stage names (engine.pipeline.stages), config sections (config.teacher,
# config.assistant, the config tab's SECTION_ORDER), tiny model names (engine.models.tiny) and system prompt
# names ("Teacher", "Assistant" in prompt.yaml): a constant cannot say which it means, so those two are only
# caught in a literal that lists them with another model (a second registry).
SHARED_WORDS = {"teacher", "assistant"}
OWN_NAMES = [m.name for m in MODELS if m.name not in SHARED_WORDS]  # student_kd, student_ce, assistant_base
OWN_LABELS = {text for m in MODELS for text in (m.label, m.title, m.chat_label) if text.lower() not in SHARED_WORDS}
MODEL_WORDS = {m.name for m in MODELS} | {m.target for m in MODELS}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that stand alone as a statement: docstrings (they may name models)."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }


def _strings(node: ast.AST) -> list[str]:
    """The string constants of a collection literal (a dict: its keys), in order."""
    if isinstance(node, ast.Dict):
        items = node.keys
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = node.elts
    else:
        return []
    return [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]


def spelled_models(source: str) -> list[str]:
    """Where `source` spells a model instead of reading engine.pipeline.models: "line: what"."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            found += [f"{node.lineno}: {name!r} in {text!r}" for name in OWN_NAMES if name in text]
            if text in OWN_LABELS:
                found.append(f"{node.lineno}: the label {text!r}")
        listed = [s for s in _strings(node) if s in MODEL_WORDS]
        if len(set(listed)) >= 2 and set(listed) - SHARED_WORDS:  # a second registry: names or --target names
            found.append(f"{node.lineno}: a list of models {listed}")
    return found


def test_models_are_spelled_only_in_the_registry():
    offenders = []
    for path in sorted([*ROOT.joinpath("engine").rglob("*.py"), *ROOT.joinpath("tui").rglob("*.py")]):
        if path == REGISTRY:
            continue
        for where in spelled_models(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(ROOT)}:{where}")
    assert not offenders, "read these from engine.pipeline.models:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "source",
    [
        'ORDER = ("teacher", "assistant", "student_kd")',
        'metric = f"student_ce/{name}"',
        'LABELS = {"assistant_base": "base"}',
        'legend = "KD student"',
        'TARGETS = ("kd", "ce", "assistant")',
        'load_4bit = key in ("assistant", "base")',
    ],
)
def test_the_guard_sees_a_model_spelled_out(source: str):
    assert spelled_models(source)


@pytest.mark.parametrize(
    "source",
    [
        '"""The KD student and the CE-only control student (student_kd, student_ce)."""',
        'def f():\n    """assistant_base is the assistant before SFT."""\n    return ctx.system_prompt("Teacher")',
        'PIPELINE = ("data", "teacher", "sft", "distill", "eval")',
        'SECTION_ORDER = ("teacher", "assistant", "student", "train", "datasets")',
        'config.stage_dir("teacher"); help = "kd: KD student (default)"',
    ],
)
def test_the_guard_lets_prose_and_other_names_be(source: str):
    assert spelled_models(source) == []


# --------------------------------------------------------------------------------------------- registry


def test_models_in_pipeline_order_with_their_names_and_targets():
    assert [m.name for m in MODELS] == ["teacher", "assistant_base", "assistant", "student_kd", "student_ce"]
    assert [m.target for m in MODELS] == ["teacher", "base", "assistant", "kd", "ce"]
    assert STUDENTS == (STUDENT_KD, STUDENT_CE)
    assert [m.target for m in best_first()] == ["kd", "ce", "assistant", "base", "teacher"]
    assert [m.name for m in MODELS if m.exportable] == ["assistant", "student_kd", "student_ce"]
    assert all(m.chattable and m.evaluated for m in MODELS)
    assert all(len(m.label) <= 10 for m in MODELS)  # the eval table's model column
    assert len({m.name for m in MODELS}) == len({m.target for m in MODELS}) == len({m.chat_label for m in MODELS})


def test_lookups():
    assert models.model("student_ce") is STUDENT_CE and models.model("teacher") is TEACHER
    assert by_target("kd") is STUDENT_KD and by_target("base") is ASSISTANT_BASE
    with pytest.raises(KeyError, match="unknown model 'student'"):
        models.model("student")
    with pytest.raises(KeyError, match="unknown target 'student'; targets are kd, ce, assistant, base, teacher"):
        by_target("student")
    assert label_of("assistant_base") == "base asst." and label_of("student_kd") == "KD student"
    assert label_of("someone_else") == "someone_else"


def test_order_key_puts_unknown_names_last():
    names = ["zeta", "student_ce", "alpha", "assistant", "student_kd", "assistant_base", "teacher"]
    assert sorted(names, key=order_key) == [
        "teacher",
        "assistant_base",
        "assistant",
        "student_kd",
        "student_ce",
        "alpha",
        "zeta",
    ]


def test_output_paths_of_the_tiny_config():
    config = load_config(ROOT / "configs" / "tiny.yaml")
    assert STUDENT_KD.output(config) == Path(".model/tiny/student/Student")
    assert STUDENT_CE.output(config) == Path(".model/tiny/student/Student_ce")
    assert ASSISTANT.output(config) == Path(".model/tiny/assistant/Assistant")
    assert TEACHER.output(config) is None and ASSISTANT_BASE.output(config) is None
    assert STUDENT_CE.output_where == "train.distillation.output_dir (+ _ce)"
    assert STUDENT_CE.enabled(config)  # tiny trains the control
    config.train.distillation.ce_only_control = False
    assert not STUDENT_CE.enabled(config) and STUDENT_KD.enabled(config)


def test_export_and_chat_targets_come_from_the_registry():
    from engine.chat.targets import TARGET_KEYS, ChatTarget
    from engine.export.plan import EXPORT_TARGETS

    assert EXPORT_TARGETS == ("kd", "ce", "assistant")  # `tas export --target`, unchanged
    assert TARGET_KEYS == ("kd", "ce", "assistant", "base", "teacher")  # `tas chat --target`, unchanged
    targets = [ChatTarget(m.chat_label, "some/model", None) for m in MODELS]
    assert [t.key for t in targets] == [m.target for m in MODELS]
    assert [t.is_assistant for t in targets] == [False, True, True, False, False]  # loaded as assistant.quantization


# ------------------------------------------------------------------ the places that disagreed before it


def test_code_results_know_the_base_assistant(tmp_path: Path):
    from tui.screens.code_results import CodeResultsScreen, read_code_results

    for name in ("student_ce", "zzz_other", "assistant_base", "student_kd", "assistant", "teacher"):
        (tmp_path / f"{name}.jsonl").write_text('{"task_id": "t/0", "passed": true}\n')
    results = read_code_results(tmp_path)
    assert [r.model for r in results] == [
        "teacher",
        "assistant_base",
        "assistant",
        "student_kd",
        "student_ce",
        "zzz_other",
    ]
    assert CodeResultsScreen._model_label(results[1]) == "base asst. 1/1"


def test_model_card_lists_the_models_in_pipeline_order():
    from engine.export.card import _report_section

    report = {"models": {n: {"loss": 1.0} for n in ("student_ce", "student_kd", "assistant_base", "assistant")}}
    lines = _report_section(SimpleNamespace(id="r"), report, "student_kd")
    rows = [line.split("|")[1].strip() for line in lines if line.startswith("| ") and "loss" not in line]
    assert rows == ["assistant_base", "assistant", "**student_kd (this model)**", "student_ce"]
