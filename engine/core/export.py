"""Export a run's model as a servable Hugging Face folder, and push it to the hub: the light half.

Light module (stdlib, PyYAML; huggingface_hub only inside `push_folder`). It knows what can be exported
(`export_source`), where it goes (`default_out_dir`), what the model card says (`model_card`), the checks
made before any model is loaded, and the upload. The heavy half, which loads, merges and saves the
weights, is `engine.models.export`; `tas export` and the panel run it in a process of its own
(`export_command`), so neither imports torch.

    runs/<run>/export/<target>/   model.safetensors, config.json, generation_config.json, tokenizer files,
                                  README.md (model card: eval report + the run's config, secrets redacted)
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml

from engine.core.config import TASConfig, load_config
from engine.core.fsio import read_json
from engine.core.render import number
from engine.core.runs import FROZEN_CONFIG, Run, RunIsLive
from engine.core.secrets import load_dotenv_secrets, redact

EXPORT_TARGETS = ("kd", "ce", "assistant")
TARGET_LABELS = {
    "kd": "KD student",
    "ce": "CE-only control student",
    "assistant": "fine-tuned assistant (LoRA merged)",
}
REPORT_NAMES = {"kd": "student_kd", "ce": "student_ce", "assistant": "assistant"}
"""The name each target has in runs/<run>/eval/report.json."""
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
CARD_MARKER = "<!-- exported by tas export -->"
"""Marks a folder as ours: only such a folder (or an empty one) is replaced by a new export."""

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)$", re.IGNORECASE)
_SECRET_FLAG = re.compile(r"^--?[\w-]*(key|token|secret|password)$", re.IGNORECASE)


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
    label = TARGET_LABELS[target]
    if target == "assistant":
        adapter = Path(config.train.sft.save_path)
        if not (adapter / "adapter_config.json").is_file():
            raise ExportRefused(_missing(run, stages, "sft", label, adapter / "adapter_config.json"))
        base = config.assistant.model.name
        tokenizer = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base
        return ExportSource(target, label, base, str(adapter), tokenizer, base)
    kd = config.train.distillation
    if target == "ce" and not kd.ce_only_control:
        raise ExportRefused(
            f"run {run.id} trained no CE-only control student "
            "(train.distillation.ce_only_control was off); export --target kd instead"
        )
    folder = Path(kd.output_dir if target == "kd" else f"{kd.output_dir}_ce")
    tokenizer = str(folder) if (folder / "tokenizer_config.json").is_file() else config.assistant.model.name
    if (folder / "config.json").is_file() and any((folder / name).is_file() for name in _WEIGHTS):
        return ExportSource(target, label, str(folder), None, tokenizer, config.student.base_model_name)
    if (folder / "adapter_config.json").is_file():  # a student trained through LoRA (train.distillation.peft)
        adapter_config = read_json(folder / "adapter_config.json") or {}
        base = adapter_config.get("base_model_name_or_path") or config.student.base_model_name
        return ExportSource(target, label, str(base), str(folder), tokenizer, config.student.base_model_name)
    raise ExportRefused(_missing(run, stages, "distill", label, folder / "config.json"))


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


# ------------------------------------------------------------------------------------------- the card


def redacted_config(config: TASConfig) -> dict[str, Any]:
    """The config as plain data with secrets replaced by ***: values of keys named like a secret (env
    entries such as HF_TOKEN), the value after a flag like --api-key, passwords and key-like query
    parameters in URLs, and anything `engine.core.secrets.redact` recognises."""
    return _scrub(config.model_dump(mode="json"))


def _scrub(value: Any, name: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        out, hide_next = [], False
        for item in value:
            if hide_next and isinstance(item, str):
                out.append("***")
                hide_next = False
                continue
            hide_next = False
            if isinstance(item, str) and "=" in item and _SECRET_FLAG.match(item.split("=", 1)[0]):
                out.append(item.split("=", 1)[0] + "=***")
                continue
            if isinstance(item, str) and _SECRET_FLAG.match(item):
                hide_next = True
            out.append(_scrub(item))
        return out
    if isinstance(value, str):
        if value and _SECRET_NAME.search(name):
            return "***"
        return redact(_scrub_url(value))
    return value


def _scrub_url(text: str) -> str:
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = "***@" + netloc.rsplit("@", 1)[1]
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if _SECRET_NAME.search(k) else v) for k, v in pairs], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return text


def teacher_name(config: TASConfig) -> str:
    source = config.teacher.source
    if source == "closed":
        return config.teacher.closed.model.name
    if source == "download":
        return config.teacher.open.data.download.repo or "downloaded teacher answers"
    return config.teacher.open.model.name


def _hub_id(name: str | None) -> str | None:
    """`name` when it looks like a hub id (owner/model), not a tiny model or a local folder."""
    if not name or name.startswith(("tiny:", ".", "/", "~")) or name.count("/") != 1 or Path(name).exists():
        return None
    return name


def _what_it_is(config: TASConfig, source: ExportSource) -> str:
    assistant = config.assistant.model.name
    kd = config.train.distillation
    teacher = f"`{teacher_name(config)}` (teacher.source: {config.teacher.source})"
    if source.target == "assistant":
        lora = config.train.sft.peft.lora
        quant = config.assistant.quantization
        how = (
            "trained on a 4-bit (bitsandbytes " + quant.bnb_4bit_quant_type + ") base, i.e. QLoRA"
            if quant.load_in_4bit
            else "trained on the unquantized base"
        )
        return (
            f"`{assistant}` fine-tuned with LoRA (r={lora.r}, alpha={lora.lora_alpha}, "
            f"target_modules={lora.target_modules}) on the answers of the teacher {teacher}; the adapter was "
            f"{how}. Here it is merged into a full-precision copy of the base, so the folder loads "
            f"like any `transformers` model, without `peft` or `bitsandbytes`."
        )
    loss = kd.knowledgedistillation
    if source.target == "kd":
        return (
            f"A student distilled from the fine-tuned assistant (`{assistant}` + LoRA) with answer-only "
            f"knowledge distillation: loss = (1 − w)·CE + w·T²·KL(assistant ‖ student), w = {loss.weight}, "
            f"T = {loss.loss.temperature}, on the answers of the teacher {teacher}. "
            f"Student initialisation: {kd.student_init}."
        )
    return (
        f"The control student: the same student as the KD student of this run, trained on the answers of "
        f"the teacher {teacher} with cross-entropy only (no distillation from `{assistant}`). "
        "It tells whether KD helped."
    )


def model_card(run: Run, source: ExportSource, repo: str | None = None, report: dict[str, Any] | None = None) -> str:
    """README.md of an export: what the model is, how to load it, the run's eval report and its frozen config
    as written (output paths relative to the run, not this machine's folders), secrets redacted."""
    config = load_config(run.path / FROZEN_CONFIG)
    if report is None:
        report = read_json(run.stage_dir("eval") / "report.json")
    base = _hub_id(source.base_name) if source.target == "assistant" else None
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["tas-panel", "distillation", *(["knowledge-distillation"] if source.target == "kd" else [])],
    }
    if base:
        front["base_model"] = base
    title = repo or run.name or run.id
    where = repo or "path/to/this/folder"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        CARD_MARKER,
        "",
        f"# {title}: {source.label}",
        "",
        _what_it_is(config, source),
        "",
        f"Exported with `tas export --target {source.target}` from run `{run.id}`"
        + (f" ({run.name})" if run.name else "")
        + f" of TAS Panel "
        f"(Teacher → Assistant → Student distillation) on {time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        'messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]',
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",'
        " return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=128)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "## Evaluation",
        "",
        *_report_section(run, report, REPORT_NAMES[source.target]),
        "",
        "## Training configuration",
        "",
        f"The run's frozen config (`runs/{run.id}/config.yaml`, secrets redacted):",
        "",
        "```yaml",
        yaml.safe_dump(redacted_config(config), sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]
    return redact("\n".join(lines))


def _report_section(run: Run, report: dict[str, Any] | None, ours: str) -> list[str]:
    models = (report or {}).get("models") or {}
    if not models:
        return [f"No eval report in this run: run the eval stage (`tas run eval --run {run.id}`) and export again."]
    metrics = [m for m in ("loss", "perplexity", "kl_to_assistant") if any(m in v for v in models.values())]
    passes = sorted(
        {m for v in models.values() for m in v if m.startswith("pass@")},
        key=lambda m: int(m[5:]) if m[5:].isdigit() else 0,
    )
    headers = {"loss": "loss", "perplexity": "perplexity", "kl_to_assistant": "KL to assistant"}
    columns = metrics + passes
    order = ("teacher", "assistant", "student_kd", "student_ce")
    names = sorted(models, key=lambda n: (order.index(n) if n in order else len(order), n))
    split = report.get("split") or {}
    lines = [
        f"From `runs/{run.id}/eval/report.json`: loss and perplexity per answer token on "
        f"{report.get('examples', '?')} held-out teacher answers (split seed {split.get('seed', '?')}, "
        f"test size {split.get('test_size', '?')}), KL(assistant ‖ model) per answer token"
        + (
            f", and {(report.get('code') or {}).get('benchmark', 'code')} pass@k "
            f"({(report.get('code') or {}).get('problems', '?')} problems)"
            if passes
            else ""
        )
        + ".",
        "",
        "| model | " + " | ".join(headers.get(c, c) for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name in names:
        values = models[name]
        cells = ["—" if values.get(c) is None else _cell(values[c]) for c in columns]
        label = f"**{name} (this model)**" if name == ours else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.5g}"
    return number(value) if isinstance(value, (int, float)) else str(value)


# -------------------------------------------------------------------------------------------- running


def export_command(run: Run, target: str, out_dir: str | os.PathLike[str], repo: str | None = None) -> list[str]:
    """The command that exports in a process of its own (it loads the ML stack; `tas` and the panel never do)."""
    command = [
        sys.executable,
        "-m",
        "engine.models.export",
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
    return config.student.repo if target == "kd" else f"{config.student.repo}-{target}"


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
