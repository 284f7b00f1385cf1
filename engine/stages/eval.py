"""Stage `eval`: how well each model predicts the held-out teacher answers, and how close the students
are to the assistant they were distilled from.

The held-out answers are the `train.sft.dataset` split that neither `sft` nor `distill` trained on.
For each model that exists (the fine-tuned assistant, the base assistant before SFT when
`eval.include_base_assistant`, the KD student in `train.distillation.output_dir`, the CE-only control in
`<output_dir>_ce`), over answer tokens only:

* loss: mean cross-entropy per answer token, and perplexity = exp(loss);
* kl_to_assistant: mean KL(assistant ‖ model) per answer token at temperature 1 (0 for the assistant).

Writes `runs/<run>/eval/report.json`, which the panel shows, and one metric event per number.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from engine.core.fsio import atomic_write_json
from engine.evals.code import load_problems, score_completions, write_results
from engine.evals.generate import generate_completions
from engine.evals.sandbox import UNSANDBOXED, isolation_level, isolation_problem
from engine.models.device import peak_memory, pick_device, pick_dtype
from engine.models.loading import load_causal_lm, load_tokenizer
from engine.models.tiny_python import BENCHMARK as TINY_PYTHON
from engine.pipeline.models import ASSISTANT, ASSISTANT_BASE, STUDENT_KD, STUDENTS, TEACHER
from engine.runner.context import StageContext, StageError
from engine.train.assistant import load_tuned_assistant
from engine.train.callbacks import report_to
from engine.train.kd_loss import chunked_kd_loss
from engine.train.kd_trainer import KDCollator, last_hidden_state
from engine.train.pairs import load_split_pairs, tokenize_pair
from engine.train.student import token_columns
from engine.train.tracking import log_report


def students(ctx: StageContext) -> dict[str, Path]:
    found = {}
    for student in STUDENTS:
        path = student.output(ctx.config)
        if (path / student.proof).exists():
            found[student.name] = path
    if not found:
        ctx.events.log(
            f"no trained student in {STUDENT_KD.output(ctx.config)} ({STUDENT_KD.output_key}); "
            "scoring the assistant only",
            level="warning",
        )
    return found


@torch.no_grad()
def score(ctx: StageContext, model, assistant, batches: list[dict[str, torch.Tensor]], vocab: int) -> dict[str, float]:
    """Token-weighted CE and KL to the assistant over all batches."""
    ce_sum = kl_sum = 0.0
    tokens = 0
    for batch in batches:
        ctx.check_cancelled()
        inputs = {k: v.to(model.device) for k, v in batch.items()}
        hidden = last_hidden_state(model, inputs)
        teacher_hidden = teacher_head = None
        weight = 0.0
        if assistant is not None and assistant is not model:
            teacher_hidden = last_hidden_state(assistant, inputs)
            teacher_head = assistant.get_output_embeddings().weight
            weight = 1.0
        out = chunked_kd_loss(
            hidden,
            model.get_output_embeddings().weight,
            teacher_hidden,
            teacher_head,
            inputs["labels"],
            weight=weight,
            temperature=1.0,
            reduction="sum",
            vocab_size=vocab,
        )
        ce_sum += float(out.ce_loss)
        kl_sum += float(out.kd_loss)
        tokens += out.tokens
    if tokens == 0:
        raise StageError(
            "the held-out answers have no answer tokens left after truncation; raise train.distillation.max_length"
        )
    loss = ce_sum / tokens
    return {
        "loss": round(loss, 5),
        "perplexity": round(math.exp(min(loss, 50)), 3),
        "kl_to_assistant": round(kl_sum / tokens, 5),
        "tokens": tokens,
    }


def run(ctx: StageContext) -> None:
    config = ctx.config
    device = pick_device(config)
    split = config.train.sft.dataset
    _, held_out, system = load_split_pairs(ctx)
    if config.eval.max_examples:
        held_out = held_out[: config.eval.max_examples]

    assistant, tokenizer = load_tuned_assistant(ctx, device)
    max_length = min(config.train.distillation.max_length, config.student.max_position_embeddings)
    examples = [tokenize_pair(tokenizer, p, system, max_length) for p in held_out]
    collate = KDCollator(tokenizer.pad_token_id)
    size = config.eval.batch_size
    batches = [collate(examples[i : i + size]) for i in range(0, len(examples), size)]
    vocab = token_columns(tokenizer)  # the real tokens: checkpoints of one family pad their rows differently
    ctx.events.log(f"scoring {len(examples)} held-out answers (split seed {split.seed}, test_size {split.test_size})")

    results: dict[str, Any] = {}
    student_dtype = pick_dtype(config.train.distillation.bf16, device)  # as the students were trained
    candidates: dict[str, Path | str | None] = {}  # in pipeline order: the report lists them so
    if config.eval.include_base_assistant and (ASSISTANT.output(config) / ASSISTANT.proof).exists():
        candidates[ASSISTANT_BASE.name] = "base"  # the assistant before SFT: what the fine-tuning changed
    candidates[ASSISTANT.name] = None
    candidates.update(students(ctx))
    problems = code_problems(ctx)
    for done, (name, path) in enumerate(candidates.items()):
        started = time.perf_counter()
        if path is None:
            model = assistant
        elif path == "base":
            model, _ = load_tuned_assistant(ctx, device, with_adapter=False)
        else:
            model = load_causal_lm(str(path), key=name, dtype=student_dtype).to(device).eval()
        results[name] = score(ctx, model, assistant, batches, vocab)
        results[name]["path"] = {None: config.train.sft.save_path, "base": config.assistant.model.name}.get(
            path, str(path)
        )
        results[name]["seconds"] = round(time.perf_counter() - started, 2)
        for metric in ("loss", "perplexity", "kl_to_assistant"):
            ctx.events.metric(f"{name}/{metric}", results[name][metric])
        ctx.events.log(
            f"{name:<11} loss {results[name]['loss']:.4f}  ppl {results[name]['perplexity']:.2f}  "
            f"KL to assistant {results[name]['kl_to_assistant']:.4f}"
        )
        if problems:
            results[name].update(code_eval(ctx, name, model, tokenizer, problems, system))
        ctx.events.progress(done + 1, len(candidates), "models")
        if model is not assistant:
            del model
    teacher_name = config.teacher.open.model.name
    if problems and config.eval.code.include_teacher and config.teacher.source == "open":
        # the teacher has its own tokenizer and template: only the code benchmark compares it
        teacher_tokenizer = load_tokenizer(teacher_name, key="teacher.open.model.name")
        teacher = (
            load_causal_lm(
                teacher_name,
                key="teacher.open.model.name",
                dtype=pick_dtype(config.teacher.open.model.bfloat16, device),
            )
            .to(device)
            .eval()
        )
        results = {
            TEACHER.name: {
                "path": teacher_name,
                **code_eval(ctx, TEACHER.name, teacher, teacher_tokenizer, problems, ctx.system_prompt("Teacher")),
            },
            **results,
        }
        del teacher
    ctx.events.memory(peak_memory())

    report = {
        "examples": len(examples),
        "split": {"seed": split.seed, "test_size": split.test_size},
        "models": results,
        "created": time.time(),
    }
    if problems:
        code = config.eval.code
        report["code"] = {
            "benchmark": code.benchmark,
            "problems": len(problems),
            "n_samples": code.n_samples,
            "max_new_tokens": code.max_new_tokens,
            "results_dir": str(ctx.stage_dir / "code"),
            "isolation": sandbox_isolation(code.sandbox)[0],
        }
    path = ctx.stage_dir / "report.json"
    atomic_write_json(path, report)
    ctx.events.artifact(path, "eval report")
    kd = config.train.distillation
    if "mlflow" in report_to(ctx, kd.report_to):
        log_report(
            ctx,
            kd.experiment,
            path,
            {
                f"{model}/{name}": value
                for model, numbers in results.items()
                for name, value in numbers.items()
                if name in ("loss", "perplexity", "kl_to_assistant") or name.startswith("pass@")
            },
        )


def code_problems(ctx: StageContext) -> dict[str, dict]:
    """The benchmark's problems (eval.code), or none when it is switched off."""
    code = ctx.config.eval.code
    if code.benchmark == "none":
        return {}
    problems = load_problems(code.benchmark, code.limit)
    isolation = code_isolation(ctx)  # refuse now, before a model is loaded, when the sandbox cannot isolate
    which = f"{code.benchmark} (held-out split)" if code.benchmark == TINY_PYTHON else code.benchmark
    ctx.events.log(
        f"code benchmark: {which}, {len(problems)} problems × {code.n_samples} samples, "
        f"up to {code.max_new_tokens} new tokens; sandbox isolation: {isolation}"
    )
    return problems


def code_isolation(ctx: StageContext) -> str:
    """The sandbox's isolation on this host (engine.evals.sandbox); a StageError (a message, no traceback)
    when there is none and eval.code.allow_unsandboxed is off. A probe of a fraction of a second."""
    isolation, problem = sandbox_isolation(ctx.config.eval.code.sandbox)
    if problem and not ctx.config.eval.code.allow_unsandboxed:
        raise StageError(f"{problem}; or set eval.code.allow_unsandboxed: true")
    if problem:
        ctx.events.log(f"code sandbox: NOT isolated (allowed by eval.code.allow_unsandboxed): {problem}", "warning")
    return isolation


def sandbox_isolation(backend: str) -> tuple[str, str | None]:
    """(the isolation level eval.code.sandbox gives here, None), or (UNSANDBOXED, what is missing)."""
    problem = isolation_problem(backend)
    return (UNSANDBOXED if problem else isolation_level(backend)), problem


def code_eval(
    ctx: StageContext, name: str, model, tokenizer, problems: dict[str, dict], system: str | None
) -> dict[str, Any]:
    """Generate completions, run them in the sandbox, write eval/code/<name>.jsonl; returns pass@k figures."""
    code = ctx.config.eval.code
    started = time.perf_counter()
    records = generate_completions(model, tokenizer, problems, code, system, check_cancelled=ctx.check_cancelled)
    workers = code.workers or os.cpu_count() or 1
    scored, summary = score_completions(
        records,
        problems,
        workers=workers,
        timeout_s=code.timeout_s,
        ks=code.ks,
        allow_unsandboxed=code.allow_unsandboxed,
        sandbox=code.sandbox,
    )
    path = ctx.stage_dir / "code" / f"{name}.jsonl"
    write_results(path, scored)
    figures = {key: value for key, value in summary.items() if key.startswith("pass@")}
    for key, value in figures.items():
        ctx.events.metric(f"{name}/{key}", value)
    ctx.events.log(
        f"{name:<11} {code.benchmark} "
        + "  ".join(f"{k} {v:.3f}" for k, v in figures.items())
        + f"  ({summary['n_passed']}/{summary['n_samples']} passed, {time.perf_counter() - started:.0f}s, "
        + f"isolation {summary['sandbox']['isolation']})"
    )
    return {**figures, "code_results": str(path)}
