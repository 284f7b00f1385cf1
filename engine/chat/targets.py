"""What there is to chat with: the students a run distilled, the fine-tuned assistant, the base assistant,
and the teacher (to compare the student with where it came from).

Light module: stdlib (+ the light prompt loader), never torch or transformers. Used by the Chat tab and
`tas chat`; the paths come from the config (the same keys the stages write to).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

TARGET_KEYS = ("kd", "ce", "assistant", "base", "teacher")
TARGET_LABELS = {
    "kd": "KD student",
    "ce": "CE-only student",
    "assistant": "Assistant + LoRA",
    "base": "Base assistant",
    "teacher": "Teacher",
}
CONFIG_KEYS = {
    "kd": "train.distillation.output_dir",
    "ce": "train.distillation.output_dir (+ _ce)",
    "assistant": "assistant.model.name",
    "base": "assistant.model.name",
    "teacher": "teacher.open.model.name",
}
VLLM = "vllm"
"""`ChatTarget.endpoint` for the teacher's own vLLM server, which the chat worker starts from the config."""


class ChatTarget(NamedTuple):
    label: str
    model: str
    adapter: str | None
    endpoint: str | None = None  # None: a local model (engine.chat.worker); a URL or VLLM: engine.chat.api_worker

    @property
    def key(self) -> str:
        return next((k for k, v in TARGET_LABELS.items() if v == self.label), "model")

    @property
    def config_key(self) -> str:
        """The config key the model comes from: named when it cannot be loaded."""
        return CONFIG_KEYS.get(self.key, "--model")


def _target_paths(config, root: Path | None) -> dict[str, tuple[str, str | None, Path, str]]:
    """key → (model, adapter, the path whose file proves it exists, that file)."""

    def at(path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() or root is None else root / p

    out_dir = config.train.distillation.output_dir
    base = config.assistant.model.name
    sft = config.train.sft.save_path
    return {
        "kd": (str(at(out_dir)), None, at(out_dir), "config.json"),
        "ce": (str(at(f"{out_dir}_ce")), None, at(f"{out_dir}_ce"), "config.json"),
        "assistant": (base, str(at(sft)), at(sft), "adapter_config.json"),
        "base": (base, None, Path(), ""),
    }


def chat_targets(config, root: str | os.PathLike[str] | None = None) -> list[ChatTarget]:
    """What can be chatted with, best first: KD student, CE-only student, fine-tuned assistant (base +
    LoRA adapter), base assistant, teacher. Each only when its files exist, except the base assistant and
    the teacher (always). Relative paths of the config count from `root` (default: the working directory,
    as for the stages)."""
    targets = []
    for key, (model, adapter, path, proof) in _target_paths(config, Path(root) if root else None).items():
        if key == "base" or (path / proof).exists():
            targets.append(ChatTarget(TARGET_LABELS[key], model, adapter))
    return targets + [teacher_target(config)]


def teacher_target(config) -> ChatTarget:
    """The teacher as the config runs it: the open model loaded here (`open`, `download`), its vLLM server
    (`vllm`: started for the chat), or the API model at its endpoint (`closed`)."""
    teacher = config.teacher
    if teacher.source == "closed":
        base_url = teacher.closed.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        return ChatTarget(TARGET_LABELS["teacher"], teacher.closed.model.name, None, base_url)
    if teacher.source == VLLM:
        return ChatTarget(TARGET_LABELS["teacher"], teacher.open.model.name, None, VLLM)
    return ChatTarget(TARGET_LABELS["teacher"], teacher.open.model.name, None)


def chat_target(config, key: str, root: str | os.PathLike[str] | None = None) -> ChatTarget:
    """The target named kd / ce / assistant / base; ValueError saying which stage makes it when missing."""
    if key == "teacher":
        return teacher_target(config)
    paths = _target_paths(config, Path(root) if root else None)
    if key not in paths:
        raise ValueError(f"unknown target {key!r}; targets are {', '.join(TARGET_KEYS)}")
    model, adapter, path, proof = paths[key]
    if key != "base" and not (path / proof).exists():
        made_by = {
            "kd": "the distill stage (train.distillation.output_dir)",
            "ce": "the distill stage with train.distillation.ce_only_control: true",
            "assistant": "the sft stage (train.sft.save_path)",
        }[key]
        raise ValueError(f"no {TARGET_LABELS[key]} yet: {path / proof} is missing; it is made by {made_by}")
    return ChatTarget(TARGET_LABELS[key], model, adapter)


def with_run_outputs(config, config_path: str | os.PathLike[str] | None, run_ref: str | None = None):
    """The config whose output paths point at a run's models (outputs live under their run).

    `run_ref` names the run (id, name, unique part, last); without it, the newest run that has a trained
    student or assistant. Returns (config, run id or None when no run has one yet).
    """
    from engine.store.runs import RunStore, runs_root

    store = RunStore(runs_root(str(config_path) if config_path else None))
    if run_ref:
        run = store.get(run_ref)
        return run.config(), run.id
    for run in store.list():
        try:
            resolved = run.config()
        except Exception:  # an unreadable frozen config: skip that run
            continue
        if any(t.label not in (TARGET_LABELS["base"], TARGET_LABELS["teacher"]) for t in chat_targets(resolved)):
            return resolved, run.id
    return config, None


def system_prompt(config) -> str | None:
    """The "Assistant" system prompt of prompts.path (prompt.yaml), or None when there is none."""
    from engine.config.prompts import load_system_prompts

    try:
        return load_system_prompts(config.prompts.path).get("Assistant")
    except (OSError, ValueError):
        return None
