"""The whole pipeline from the command line, as the README's second command runs it, and what it proves:
on tiny-python the teacher can code, SFT teaches the assistant, and KD beats the CE-only control, for a
reason (a KD loss on a shuffled teacher distribution loses the advantage)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.store.runs import RunStore

from .helpers import tas


@pytest.mark.e2e
def test_tas_run_all_on_the_tiny_profile(project: Path, monkeypatch: pytest.MonkeyPatch):
    """Runs README step 2 in a fresh project, or, where TAS_E2E_RUN_FROM names a folder in which it has just
    been run as typed (.ci/run: the checkout, after step 2), checks that run instead of spending minutes
    on a second identical one."""
    if shared := os.environ.get("TAS_E2E_RUN_FROM"):
        project = Path(shared).resolve()
        monkeypatch.chdir(project)
    else:
        result = tas("run", "all", "--config", "configs/tiny.yaml", cwd=project, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = RunStore(project / "runs").get("last")
    assert json.loads((run.path / "run.json").read_text())["config_source"] == "configs/tiny.yaml"
    assert [s.state for s in run.stages()] == ["done"] * 5
    report = json.loads((run.stage_dir("eval") / "report.json").read_text())
    models = report["models"]
    # teacher: code eval only (its own tokenizer); the base assistant: before SFT
    assert set(models) == {"teacher", "assistant_base", "assistant", "student_kd", "student_ce"}
    status = tas("status", cwd=project)
    assert status.stdout.count("✓ done") == 5

    assert report["code"]["benchmark"] == "tiny-python" and report["code"]["problems"] == 87
    pass1 = {name: numbers["pass@1"] for name, numbers in models.items()}
    assert pass1["teacher"] >= 0.9, pass1  # pretrained on its split, never on the held-out problems
    assert pass1["assistant"] > pass1["assistant_base"] + 0.3, pass1  # SFT on the teacher's answers taught it
    # same student, steps and data; only the loss differs
    assert pass1["student_kd"] > pass1["student_ce"], pass1
    assert models["student_kd"]["kl_to_assistant"] < models["student_ce"]["kl_to_assistant"], models

    # The comparison can fail: distill again with the KD term aimed at a shuffled assistant distribution
    # (the same probabilities on permuted tokens); that student must lose the KD student's advantage.
    broken = _distill_with_shuffled_teacher(run, project, monkeypatch)
    assert broken < pass1["student_kd"] and broken <= pass1["student_ce"], (broken, pass1)


def _distill_with_shuffled_teacher(run, project: Path, monkeypatch: pytest.MonkeyPatch) -> float:
    """Run the distill stage in this process on `run`'s data and assistant, with `chunked_kd_loss` given a
    teacher lm head whose token rows are permuted; return the new student's pass@1 on tiny-python."""
    import torch

    from engine.models.loading import load_causal_lm, load_tokenizer
    from engine.runner.context import StageContext
    from engine.stages import distill
    from engine.stages import eval as eval_stage
    from engine.store.events import EventWriter
    from engine.train import kd_trainer

    real_loss = kd_trainer.chunked_kd_loss

    def shuffled_teacher_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels, **kwargs):
        if teacher_head is not None:
            vocab = kwargs["vocab_size"]
            order = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
            teacher_head = torch.cat([teacher_head[:vocab][order], teacher_head[vocab:]])
        return real_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels, **kwargs)

    monkeypatch.setattr(kd_trainer, "chunked_kd_loss", shuffled_teacher_loss)
    config = run.config()
    config.train.distillation.output_dir = str(run.path / "broken" / "Student")
    config.train.distillation.ce_only_control = False
    config.train.distillation.report_to = "none"
    ctx = StageContext("distill-broken", run, config, EventWriter(run.stage_dir("distill-broken") / "events.jsonl"))
    distill.run(ctx)

    student = load_causal_lm(config.train.distillation.output_dir, key="broken").eval()
    tokenizer = load_tokenizer(config.assistant.model.name, key="assistant.model.name")
    figures = eval_stage.code_eval(
        ctx, "student_broken", student, tokenizer, eval_stage.code_problems(ctx), ctx.system_prompt("Assistant")
    )  # as the eval stage scores the others
    return figures["pass@1"]
