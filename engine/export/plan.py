"""Export a run's model as a servable Hugging Face folder, and push it to the hub: the light half.

Light module (stdlib, PyYAML; huggingface_hub only inside `push_folder`; the model card is
`engine.export.card`). It knows what can be exported (`export_source`; the models themselves are
engine.pipeline.models), where it goes (`default_out_dir`), the checks made before any model is loaded
(`prepare`), and the upload. The heavy half, which loads, merges and saves the weights, is
`engine.export.merge`; `tas export` and the panel run it in a process of its own (`run_export`), so
neither imports torch.

    runs/<run>/export/<target>/   model.safetensors, config.json, generation_config.json, tokenizer files,
                                  README.md (model card: eval report + the run's config, secrets redacted)
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.config.schema import TASConfig
from engine.core.fsio import read_json
from engine.core.secrets import load_dotenv_secrets
from engine.pipeline.models import ASSISTANT, STUDENT_KD, best_first, by_target
from engine.store.runs import Run, RunIsLive

EXPORT_TARGETS = tuple(m.target for m in best_first() if m.exportable)
"""kd, ce, assistant: the `--target` of `tas export` (engine.pipeline.models names them)."""
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
CARD_MARKER = "<!-- exported by tas export -->"
"""Marks a folder as ours: only such a folder (or an empty one) is replaced by a new export."""

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class ExportRefused(ValueError):
    """There is nothing to export (yet), or the export cannot go where it was asked to: says what to do."""


@dataclass(frozen=True)
class ExportSource:
    """What an export loads: a model folder, or a base model plus the LoRA adapter to merge into it."""

    target: str
    label: str
    model: str  # a model folder (students) or the base model's name (assistant)
    adapter: str | None  # LoRA adapter folder to merge into `model`
    tokenizer: str  # where the tokenizer is read from
    base_name: str | None = None  # the hub id / name the model derives from, for the card


def export_source(run: Run, target: str) -> ExportSource:
    """The model of `target` in `run`; RunIsLive while the run works, ExportRefused when it has no such model."""
    if target not in EXPORT_TARGETS:
        raise ExportRefused(f"unknown target {target!r}; targets are {', '.join(EXPORT_TARGETS)}")
    stages = run.stages()
    if run.is_live() or any(s.state == "running" for s in stages):
        raise RunIsLive(
            f"run {run.id} is running; export it when it has finished, or stop it first (tas cancel {run.id})"
        )
    config = run.config()
    model = by_target(target)
    label = model.title
    if model is ASSISTANT:
        adapter = ASSISTANT.output(config)
        if not (adapter / ASSISTANT.proof).is_file():
            raise ExportRefused(_missing(run, stages, ASSISTANT.stage, label, adapter / ASSISTANT.proof))
        base = config.assistant.model.name
        tokenizer = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base
        return ExportSource(target, label, base, str(adapter), tokenizer, base)
    if not model.enabled(config):
        raise ExportRefused(
            f"run {run.id} trained no {label} ({model.switch} was off); export --target {STUDENT_KD.target} instead"
        )
    folder = model.output(config)
    tokenizer = str(folder) if (folder / "tokenizer_config.json").is_file() else config.assistant.model.name
    if (folder / "config.json").is_file() and any((folder / name).is_file() for name in _WEIGHTS):
        return ExportSource(target, label, str(folder), None, tokenizer, config.student.base_model_name)
    if (folder / "adapter_config.json").is_file():  # a student trained through LoRA (train.distillation.peft)
        adapter_config = read_json(folder / "adapter_config.json") or {}
        base = adapter_config.get("base_model_name_or_path") or config.student.base_model_name
        return ExportSource(target, label, str(base), str(folder), tokenizer, config.student.base_model_name)
    raise ExportRefused(_missing(run, stages, model.stage, label, folder / model.proof))


def _missing(run: Run, stages, stage: str, label: str, proof: Path) -> str:
    state = next((s for s in stages if s.name == stage), None)
    how = (
        f"the {stage} stage has not run"
        if state is None or state.state == "pending"
        else (f"the {stage} stage is {state.state}" + (f" ({state.error})" if state.error else ""))
    )
    return (
        f"run {run.id} has no {label} to export: {proof} is missing ({how}); "
        f"run it with `tas run {stage} --run {run.id}`"
    )


def default_out_dir(run: Run, target: str) -> Path:
    """runs/<run>/export/<target>/"""
    return run.path / "export" / target


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The folder an export may (re)place: absent, empty, or an earlier export; ExportRefused otherwise."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportRefused(f"{out} is a file; give --out a folder")
    if out.is_dir() and any(out.iterdir()):
        card = out / "README.md"
        try:
            ours = CARD_MARKER in card.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise ExportRefused(
                f"{out} exists and holds something other than an export; choose another --out or empty it"
            )
    return out


def prepare(run: Run, target: str, out_dir: str | os.PathLike[str] | None = None) -> tuple[ExportSource, Path]:
    """The checks made before any model is loaded, and where the export goes: (what is exported, the absolute
    folder; default runs/<run>/export/<target>/). RunIsLive while the run works; ExportRefused otherwise."""
    source = export_source(run, target)
    return source, check_out_dir(out_dir if out_dir is not None else default_out_dir(run, target)).resolve()


# --------------------------------------------------------------------------------- the export process


def run_export(
    run: Run, target: str, out_dir: str | os.PathLike[str], repo: str | None = None, *, capture_errors: bool = False
) -> tuple[int, str]:
    """Export in a process of its own (`export_command`) and wait for it: (its exit code, why it failed).

    Its stdout (the folder) is dropped: the caller knows it. Its stderr (progress, then the error) goes to
    ours, where a terminal shows it; with `capture_errors` (the panel has no terminal) it is read instead,
    and its last line is why it failed."""
    result = subprocess.run(
        export_command(run, target, out_dir, repo),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if capture_errors else None,
        text=True,
        errors="replace",
    )
    if result.returncode == 0:
        return 0, ""
    return result.returncode, ((result.stderr or "").strip().splitlines() or [f"exit code {result.returncode}"])[-1]


def export_command(run: Run, target: str, out_dir: str | os.PathLike[str], repo: str | None = None) -> list[str]:
    """The command that exports in a process of its own (it loads the ML stack; `tas` and the panel never do)."""
    command = [
        sys.executable,
        "-m",
        "engine.export.merge",
        "--run",
        str(run.path.resolve()),
        "--target",
        target,
        "--out",
        str(Path(out_dir).expanduser().resolve()),
    ]
    return command + (["--repo", repo] if repo else [])


def push_repo(config: TASConfig, target: str, repo: str | None = None) -> str:
    """The hub repository of a push: `repo`, else student.repo (kd), <student.repo>-ce, <student.repo>-assistant."""
    if repo:
        return repo
    if not config.student.repo:
        raise ExportRefused(
            "student.repo is not set: put the hub repository (e.g. your-name/tas-student) under "
            "student.repo in the config, or pass --repo"
        )
    return config.student.repo if target == STUDENT_KD.target else f"{config.student.repo}-{target}"


def hub_token(workdir: str | os.PathLike[str] | None = None) -> str:
    """HF_TOKEN from the environment or the project's .env; ExportRefused when there is none (never echoed)."""
    load_dotenv_secrets()
    if workdir:
        load_dotenv_secrets(workdir)
    for name in TOKEN_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    raise ExportRefused(
        "no Hugging Face token: set HF_TOKEN in the environment or in the project's .env "
        "(a token with write access, https://huggingface.co/settings/tokens)"
    )


def push_folder(
    folder: str | os.PathLike[str], repo: str, token: str, private: bool | None = None, message: str | None = None
) -> str:
    """Create `repo` (if needed) and upload `folder` to it; returns the repository's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo,
        folder_path=str(folder),
        repo_type="model",
        commit_message=message or "Upload model exported by tas export",
    )
    return str(url) if isinstance(url, str) and url else f"https://huggingface.co/{repo}"
