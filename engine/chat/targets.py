"""What there is to chat with: the students a run distilled, the fine-tuned assistant, the base assistant,
and the teacher (to compare the student with where it came from).

Light module: stdlib (+ the light prompt loader), never torch or transformers. Used by the Chat tab and
`tas chat`; the paths come from the config, by the keys engine.pipeline.models names (those the stages write to).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from engine.pipeline.models import (
    ASSISTANT,
    ASSISTANT_BASE,
    MODELS,
    STUDENT_CE,
    STUDENT_KD,
    TEACHER,
    best_first,
    by_target,
)

TARGET_KEYS = tuple(m.target for m in best_first() if m.chattable)
"""kd, ce, assistant, base, teacher: the `--target` of `tas chat` (engine.pipeline.models names them)."""
CONFIG_KEYS = {
    STUDENT_KD.target: STUDENT_KD.output_where,
    STUDENT_CE.target: STUDENT_CE.output_where,
    ASSISTANT.target: "assistant.model.name",  # the base its adapter goes on: what fails to load
    ASSISTANT_BASE.target: "assistant.model.name",
    TEACHER.target: "teacher.open.model.name",
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
        return next((m.target for m in MODELS if m.chat_label == self.label), "model")

    @property
    def is_assistant(self) -> bool:
        """The assistant, with or without its adapter: loaded in 4-bit when assistant.quantization says so."""
        return self.key in (ASSISTANT.target, ASSISTANT_BASE.target)

    @property
    def config_key(self) -> str:
        """The config key the model comes from: named when it cannot be loaded."""
        return CONFIG_KEYS.get(self.key, "--model")


def _target_paths(config, root: Path | None) -> dict[str, tuple[str, str | None, Path, str]]:
    """key → (model, adapter, the path whose file proves it exists, that file)."""

    def at(path: Path) -> Path:
        p = path.expanduser()
        return p if p.is_absolute() or root is None else root / p

    kd, ce, sft = (at(model.output(config)) for model in (STUDENT_KD, STUDENT_CE, ASSISTANT))
    base = config.assistant.model.name
    return {
        STUDENT_KD.target: (str(kd), None, kd, STUDENT_KD.proof),
        STUDENT_CE.target: (str(ce), None, ce, STUDENT_CE.proof),
        ASSISTANT.target: (base, str(sft), sft, ASSISTANT.proof),
        ASSISTANT_BASE.target: (base, None, Path(), ""),
    }


def chat_targets(config, root: str | os.PathLike[str] | None = None) -> list[ChatTarget]:
    """What can be chatted with, best first: KD student, CE-only student, fine-tuned assistant (base +
    LoRA adapter), base assistant, teacher. Each only when its files exist, except the base assistant and
    the teacher (always). Relative paths of the config count from `root` (default: the working directory,
    as for the stages)."""
    targets = []
    for key, (model, adapter, path, proof) in _target_paths(config, Path(root) if root else None).items():
        if key == ASSISTANT_BASE.target or (path / proof).exists():
            targets.append(ChatTarget(by_target(key).chat_label, model, adapter))
    return targets + [teacher_target(config)]


def teacher_target(config) -> ChatTarget:
    """The teacher as the config runs it: the open model loaded here (`open`, `download`), its vLLM server
    (`vllm`: started for the chat), or the API model at its endpoint (`closed`)."""
    teacher = config.teacher
    if teacher.source == "closed":
        base_url = teacher.closed.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        return ChatTarget(TEACHER.chat_label, teacher.closed.model.name, None, base_url)
    if teacher.source == VLLM:
        return ChatTarget(TEACHER.chat_label, teacher.open.model.name, None, VLLM)
    return ChatTarget(TEACHER.chat_label, teacher.open.model.name, None)


def chat_target(config, key: str, root: str | os.PathLike[str] | None = None) -> ChatTarget:
    """The target named kd / ce / assistant / base; ValueError saying which stage makes it when missing."""
    if key == TEACHER.target:
        return teacher_target(config)
    paths = _target_paths(config, Path(root) if root else None)
    if key not in paths:
        raise ValueError(f"unknown target {key!r}; targets are {', '.join(TARGET_KEYS)}")
    model, adapter, path, proof = paths[key]
    wanted = by_target(key)
    if wanted is not ASSISTANT_BASE and not (path / proof).exists():
        made_by = f"the {wanted.stage} stage " + (
            f"with {wanted.switch}: true" if wanted.switch else f"({wanted.output_key})"
        )
        raise ValueError(f"no {wanted.chat_label} yet: {path / proof} is missing; it is made by {made_by}")
    return ChatTarget(wanted.chat_label, model, adapter)


class RunModels(NamedTuple):
    """One run's offer in the Chat tab's run picker: its id (None: the config's own paths), a label, its
    config (output paths pointing into the run) and what there is to chat with."""

    run_id: str | None
    label: str
    config: object
    targets: list[ChatTarget]


def with_run_outputs(config, config_path: str | os.PathLike[str] | None, run_ref: str | None = None):
    """The config whose output paths point at a run's models (outputs live under their run).

    `run_ref` names the run (id, name, unique part, last); without it, the newest run that has a trained
    student or assistant. Returns (config, run id or None when no run has one yet).
    """
    if run_ref:
        from engine.store.runs import RunStore, runs_root

        run = RunStore(runs_root(str(config_path) if config_path else None)).get(run_ref)
        return run.config(), run.id
    newest = next(_run_offers(config_path), None)
    return (newest.config, newest.run_id) if newest else (config, None)


def runs_models(config, config_path: str | os.PathLike[str] | None) -> list[RunModels]:
    """Every run that made a model (newest first), then the config itself (no run: its paths from the working
    directory, always with the base assistant and the teacher): the Chat tab's run picker. Labels and order
    of the models come from engine.pipeline.models."""
    return [*_run_offers(config_path), RunModels(None, "no run (config paths)", config, chat_targets(config))]


def _run_offers(config_path: str | os.PathLike[str] | None) -> Iterator[RunModels]:
    """The runs that made a model, newest first (read one by one: the first is often all that is wanted)."""
    from engine.store.runs import RunStore, runs_root

    for run in RunStore(runs_root(str(config_path) if config_path else None)).list():
        try:
            resolved = run.config()
        except Exception:  # an unreadable frozen config: skip that run
            continue
        targets = chat_targets(resolved)
        made = [by_target(t.key).label for t in targets if t.key not in (ASSISTANT_BASE.target, TEACHER.target)]
        if made:
            yield RunModels(run.id, f"{run.name or run.id} ({', '.join(made)})", resolved, targets)


def system_prompt(config) -> str | None:
    """The "Assistant" system prompt of prompts.path (prompt.yaml), or None when there is none."""
    from engine.config.prompts import load_system_prompts

    try:
        return load_system_prompts(config.prompts.path).get("Assistant")
    except (OSError, ValueError):
        return None
