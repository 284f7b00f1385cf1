"""The model card of an exported model: what it is, how it was made, its eval report and the run's config.

Light (stdlib, PyYAML). Secrets never reach the card: the config is written through `redacted_config`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from engine.config.load import load_config
from engine.config.schema import TASConfig
from engine.core.fsio import read_json
from engine.core.secrets import redact, redact_data
from engine.export.plan import CARD_MARKER, ExportSource
from engine.pipeline.models import ASSISTANT, STUDENT_KD, by_target, order_key
from engine.store.render import number
from engine.store.runs import FROZEN_CONFIG, Run


def redacted_config(config: TASConfig) -> dict[str, Any]:
    """The config as plain data with secrets replaced by *** (engine.core.secrets.redact_data)."""
    return redact_data(config.model_dump(mode="json"))


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
    if source.target == ASSISTANT.target:
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
    divergence = "KL(assistant ‖ student)" if loss.loss.divergence == "forward_kl" else f"D, D = {loss.loss.label}"
    if source.target == STUDENT_KD.target:
        return (
            f"A student distilled from the fine-tuned assistant (`{assistant}` + LoRA) with answer-only "
            f"knowledge distillation: loss = (1 − w)·CE + w·T²·{divergence}, w = {loss.weight}, "
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
    base = _hub_id(source.base_name) if source.target == ASSISTANT.target else None
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": [
            "tas-panel",
            "distillation",
            *(["knowledge-distillation"] if source.target == STUDENT_KD.target else []),
        ],
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
        *_report_section(run, report, by_target(source.target).name, _scored_assistant(config, source)),
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


def _scored_assistant(config: TASConfig, source: ExportSource) -> str:
    """Which assistant the eval report scored, when that is not the model an export holds.

    The eval stage scores the assistant as the pipeline trained and used it: with a 4-bit base, the 4-bit
    base + LoRA adapter. An assistant export is that adapter merged into the unquantized base: close, but
    not the model the eval scored, so the card says which one its scores are of."""
    quant = config.assistant.quantization
    if not quant.load_in_4bit:
        return ""
    note = (
        f"The assistant rows were measured on `{config.assistant.model.name}` loaded in 4-bit (bitsandbytes "
        f"{quant.bnb_4bit_quant_type}) with its LoRA adapter, as `sft` trained it and `distill` distilled from "
        "it; KL to assistant is to that model."
    )
    if source.target == ASSISTANT.target:
        note += (
            " This folder is the adapter merged into the unquantized base, which the eval did not score: "
            "its own loss and pass@k can differ slightly from the assistant row."
        )
    return note


def _report_section(run: Run, report: dict[str, Any] | None, ours: str, note: str = "") -> list[str]:
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
    names = sorted(models, key=order_key)
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
    return [*lines, "", note] if note else lines


def _cell(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.5g}"
    return number(value) if isinstance(value, (int, float)) else str(value)


# -------------------------------------------------------------------------------------------- running
