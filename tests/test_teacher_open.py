"""Stage `teacher`, open (HF) path, in-process on the tiny profile: batching, resume, torn lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.core.config import load_config
from engine.core.events import read_events
from engine.runner.context import StageError
from engine.stages import data, teacher
from engine.teacher.open import chat_texts, generate_batches, generation_kwargs, load_teacher
from engine.teacher.output import TeacherOutput

from .helpers import make_context


@pytest.fixture
def config(project: Path):
    cfg = load_config(project / "configs" / "tiny.yaml")
    cfg.data.limit = 40
    cfg.teacher.open.pipeline.max_new_tokens = 12
    cfg.teacher.open.pipeline.batch_size = 16
    data.run(make_context(cfg, "data", project))
    return cfg


def answers(cfg) -> list[dict]:
    return [json.loads(line) for line in Path(cfg.teacher.base.output_path).read_text().splitlines()]


def prompt_ids(cfg) -> list[str]:
    return [json.loads(line)["id"] for line in Path(cfg.data.output_path).read_text().splitlines()]


def test_every_prompt_answered_once(config, project: Path):
    ctx = make_context(config, "teacher", project)
    teacher.run(ctx)
    records = answers(config)
    assert sorted(r["id"] for r in records) == sorted(prompt_ids(config))
    assert all(r["output"].strip() and r["instruction"] for r in records)
    events = read_events(ctx.stage_dir / "events.jsonl")
    progress = [e for e in events if e["kind"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == 40
    assert any(e["kind"] == "metric" and e["name"] == "tokens_per_s" and e["value"] > 0 for e in events)
    assert any(e["kind"] == "memory" for e in events)


def test_rerun_skips_answered_prompts(config, project: Path):
    teacher.run(make_context(config, "teacher", project))
    before = Path(config.teacher.base.output_path).read_bytes()
    ctx = make_context(config, "teacher", project)
    teacher.run(ctx)
    assert Path(config.teacher.base.output_path).read_bytes() == before
    logs = [e["msg"] for e in read_events(ctx.stage_dir / "events.jsonl") if e["kind"] == "log"]
    assert "40 prompts: 40 already answered, 0 to go" in logs


def test_torn_last_line_is_regenerated_not_duplicated(config, project: Path):
    teacher.run(make_context(config, "teacher", project))
    path = Path(config.teacher.base.output_path)
    lines = path.read_text().splitlines(keepends=True)
    # keep 10 complete answers and half of the 11th, as a kill mid-write leaves it
    path.write_text("".join(lines[:10]) + lines[10][: len(lines[10]) // 2])
    teacher.run(make_context(config, "teacher", project))
    records = answers(config)
    assert sorted(r["id"] for r in records) == sorted(prompt_ids(config))
    assert [json.dumps(r, ensure_ascii=False) + "\n" for r in records[:10]] == lines[:10]


def test_resume_off_keeps_the_old_answers_as_backup(config, project: Path):
    teacher.run(make_context(config, "teacher", project))
    config.teacher.open.pipeline.resume = False
    teacher.run(make_context(config, "teacher", project))
    backups = list(Path(config.teacher.base.output_path).parent.glob("teacher.jsonl.*.bak"))
    assert len(backups) == 1 and len(backups[0].read_text().splitlines()) == 40
    assert len(answers(config)) == 40


def test_sorted_batches_with_cache_match_the_seed_style_loop_greedy(config, project: Path):
    """KV cache + length sorting change speed, not answers (greedy decoding)."""
    ctx = make_context(config, "teacher", project)
    model, tokenizer = load_teacher(ctx)
    prompts = [json.loads(line) for line in Path(config.data.output_path).read_text().splitlines()][:12]
    texts = chat_texts(tokenizer, prompts, "You are a senior Python developer.", True)
    config.teacher.open.pipeline.do_sample = False
    fast = generation_kwargs(ctx, tokenizer, model)
    slow = dict(fast, use_cache=False)
    by_id = lambda batches: {p["id"]: a for b in batches for p, a in zip(b.prompts, b.answers)}  # noqa: E731
    # batch size 1: no padding, so both loops see identical inputs
    fast_answers = by_id(generate_batches(model, tokenizer, prompts, texts, 1, fast, sort_by_length=True))
    slow_answers = by_id(generate_batches(model, tokenizer, prompts, texts, 1, slow, sort_by_length=False))
    assert fast_answers == slow_answers


def test_system_prompt_and_chat_template(config, project: Path):
    ctx = make_context(config, "teacher", project)
    _, tokenizer = load_teacher(ctx)
    text = chat_texts(tokenizer, [{"id": "x", "instruction": "Reverse a list"}], "SYSTEM", True)[0]
    assert text == "<|im_start|>system\nSYSTEM<|im_end|>\n<|im_start|>user\nReverse a list<|im_end|>\n<|im_start|>assistant\n"


def test_missing_prompts_file_says_run_data_first(config, project: Path):
    Path(config.data.output_path).unlink()
    with pytest.raises(StageError, match=r"data\.output_path: .* does not exist; run the data stage first"):
        teacher.run(make_context(config, "teacher", project))


def test_output_store_never_stores_empty_answers(tmp_path: Path):
    store = TeacherOutput(tmp_path / "t.jsonl")
    with pytest.raises(ValueError, match="empty answer"):
        store.append([{"id": "a", "output": "  "}])
    assert not store.path.exists()


def test_resume_off_does_not_merge_old_shards(config, project: Path):
    output = Path(config.teacher.base.output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    stale = {"id": "p-stale", "instruction": "old", "output": "old answer", "model": "x"}
    Path(f"{output}.rank1").write_text(json.dumps(stale) + "\n")
    config.teacher.open.pipeline.resume = False
    teacher.run(make_context(config, "teacher", project))
    assert "p-stale" not in {r["id"] for r in answers(config)}
    assert list(output.parent.glob("teacher.jsonl.rank1.*.bak"))


def test_out_of_memory_halves_the_batch_and_answers_every_prompt_once(config, project: Path, monkeypatch):
    """A CUDA out-of-memory (injected: batches over 3 prompts do not "fit") halves the batch until it fits,
    says so, and still answers every prompt exactly once; only a single prompt that does not fit fails."""
    import transformers

    config.teacher.open.pipeline.batch_size = 16
    real_generate = transformers.GenerationMixin.generate
    sizes: list[int] = []

    def generate(self, *args, **kwargs):
        rows = kwargs["input_ids"].shape[0]
        sizes.append(rows)
        if rows > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 86.00 GiB (injected)")
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", generate)
    ctx = make_context(config, "teacher", project)
    teacher.run(ctx)
    ids = [r["id"] for r in answers(config)]
    assert sorted(ids) == sorted(prompt_ids(config)) and len(ids) == len(set(ids)) == 40
    assert sizes[:3] == [16, 8, 4] and set(sizes[3:]) <= {2}  # 16 → 8 → 4 → 2, then 2 from there on
    logs = [e["msg"] for e in read_events(ctx.stage_dir / "events.jsonl") if e["kind"] == "log"]
    assert sum("out of memory with a batch of" in m for m in logs) == 3
    assert any("going on with batches of 2" in m for m in logs)

    # nothing fits: one prompt alone is a clear error, and what was answered stays
    Path(config.teacher.base.output_path).unlink()
    monkeypatch.setattr(transformers.GenerationMixin, "generate",
                        lambda self, *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(StageError, match=r"single prompt.*teacher\.open\.pipeline\.max_new_tokens"):
        teacher.run(make_context(config, "teacher", project))
