"""Runs own their outputs: where a run's stage outputs live, and when another run's teacher answers may be reused.

Light module. Two rules:

* **Outputs live under the run.** A relative output path of the config (`data.output_path`,
  `teacher.base.output_path`, `train.sft.save_path`, `train.distillation.output_dir`) is relative to the
  run directory, so `.data/tiny/prompts.jsonl` of run R is `runs/R/.data/tiny/prompts.jsonl`. The TAS
  config keeps loading unchanged; a new run never reads or resumes what another run wrote. An absolute
  path is used as written: that is an explicit choice to share a location between runs.
* **Teacher answers carry a fingerprint** of what produced them (source, model, generation parameters,
  system prompt). A run resumes only answers with its own fingerprint, and `tas run --reuse teacher=RUN`
  copies another run's answers only when the fingerprints match; otherwise it says what differs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from engine.config.keys import get_key, set_key
from engine.config.prompts import load_system_prompts
from engine.config.schema import TASConfig
from engine.core.fsio import atomic_write_json, read_json

RUN_OUTPUT_KEYS = (
    "data.output_path",
    "teacher.base.output_path",
    "train.sft.save_path",
    "train.distillation.output_dir",
)
"""Config keys naming a stage's output; relative values resolve against the run directory."""

FINGERPRINT_FILE = "fingerprint.json"
REUSABLE_STAGES = ("teacher",)


class ReuseRefused(ValueError):
    """Another run's outputs do not fit this run (different fingerprint, nothing to reuse)."""


def resolve_outputs(config: TASConfig, run_path: Path) -> TASConfig:
    """A copy of `config` whose relative output paths point inside `run_path`."""
    resolved = config.model_copy(deep=True)
    for key in RUN_OUTPUT_KEYS:
        value = get_key(resolved, key)
        if value and not Path(value).expanduser().is_absolute():
            set_key(resolved, key, str(Path(run_path).resolve() / value))
    return resolved


# ------------------------------------------------------------------------------------- fingerprint


def teacher_fingerprint(config: TASConfig, workdir: str | Path) -> dict[str, Any]:
    """What decides the teacher's answers, as readable components (compared key by key on reuse)."""
    teacher = config.teacher
    source = teacher.source
    parts: dict[str, Any] = {"teacher.source": source}
    if source == "open":
        pipeline = teacher.open.pipeline
        parts["teacher.open.model.name"] = teacher.open.model.name
        for name in ("max_new_tokens", "temperature", "top_p", "top_k", "do_sample"):
            parts[f"teacher.open.pipeline.{name}"] = getattr(pipeline, name)
    elif source == "closed":
        pipeline = teacher.closed.pipeline
        parts["teacher.closed.model.name"] = teacher.closed.model.name
        parts["teacher.closed.base_url"] = teacher.closed.base_url
        for name in ("temperature", "top_p", "max_tokens"):
            parts[f"teacher.closed.pipeline.{name}"] = getattr(pipeline, name)
    elif source == "vllm":  # the closed client sends these three sampling settings to the vLLM server
        parts["teacher.open.model.name"] = teacher.open.model.name
        for name in ("max_new_tokens", "temperature", "top_p"):
            parts[f"teacher.open.pipeline.{name}"] = getattr(teacher.open.pipeline, name)
    else:  # download: the answers are whatever the hub dataset holds
        section = teacher.download_from
        download = getattr(teacher, section).data.download
        parts["teacher.download_from"] = section
        for name in ("repo", "size", "revision"):
            parts[f"teacher.{section}.data.download.{name}"] = getattr(download, name)
        return parts
    parts["Teacher system prompt"] = _system_prompt_digest(config, workdir)
    return parts


def fingerprint_id(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _system_prompt_digest(config: TASConfig, workdir: str | Path) -> str | None:
    path = Path(config.prompts.path)
    if not path.is_absolute():
        path = Path(workdir) / path
    try:
        text = load_system_prompts(path).get("Teacher")
    except (OSError, ValueError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text else None


def differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Human-readable list of the components that differ: 'key: theirs (RUN) vs ours (this run)'."""
    keys = sorted(set(ours) | set(theirs))
    return [f"{k}: {theirs.get(k)!r} vs {ours.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)]


def write_fingerprint(stage_dir: Path, parts: dict[str, Any]) -> str:
    ident = fingerprint_id(parts)
    atomic_write_json(stage_dir / FINGERPRINT_FILE, {"id": ident, "parts": parts})
    return ident


def read_fingerprint(stage_dir: Path) -> dict[str, Any] | None:
    data = read_json(stage_dir / FINGERPRINT_FILE)
    return data.get("parts") if data and isinstance(data.get("parts"), dict) else None


# ------------------------------------------------------------------------------------------- reuse


def reuse_teacher(
    target_config: TASConfig,
    target_run_path: Path,
    target_workdir: str | Path,
    source_config: TASConfig,
    source_run_path: Path,
    source_run_id: str,
) -> str:
    """Copy `source`'s teacher answers into the target run when the fingerprints match.

    Returns a one-line summary; raises ReuseRefused naming every difference otherwise.
    """
    source_parts = read_fingerprint(Path(source_run_path) / "teacher")
    if source_parts is None:
        raise ReuseRefused(f"run {source_run_id} has no teacher answers to reuse (its teacher stage never ran)")
    ours = teacher_fingerprint(target_config, target_workdir)
    diff = differences(ours, source_parts)
    if diff:
        raise ReuseRefused(
            f"cannot reuse the teacher answers of run {source_run_id}: they were made differently "
            f"(its value vs this run's): " + "; ".join(diff)
        )
    source_file = Path(get_key(source_config, "teacher.base.output_path"))
    if not source_file.exists():
        raise ReuseRefused(f"run {source_run_id}: {source_file} (teacher.base.output_path) does not exist")
    target_file = Path(get_key(target_config, "teacher.base.output_path"))
    target_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source_file, target_file)
    (Path(target_run_path) / "teacher").mkdir(parents=True, exist_ok=True)
    write_fingerprint(Path(target_run_path) / "teacher", ours)
    lines = sum(1 for _ in source_file.open("rb"))
    return f"reused {lines} teacher answers of run {source_run_id} (same fingerprint {fingerprint_id(ours)})"
