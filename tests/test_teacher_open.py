"""Stage `teacher`, open (HF) path, in-process on the tiny profile: batching, resume, torn lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config.load import load_config
from engine.runner.context import StageError
from engine.stages import data, teacher
from engine.store.events import read_events
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
    assert (
        text
        == "<|im_start|>system\nSYSTEM<|im_end|>\n<|im_start|>user\nReverse a list<|im_end|>\n<|im_start|>assistant\n"
    )


def test_missing_prompts_file_says_run_data_first(config, project: Path):
    Path(config.data.output_path).unlink()
    with pytest.raises(StageError, match=r"data\.output_path: .* does not exist; run the data stage first"):
        teacher.run(make_context(config, "teacher", project))


@pytest.mark.parametrize("resume", [True, False])
def test_missing_model_fails_before_the_answers_are_touched(config, project: Path, resume: bool):
    """A mistyped teacher.open.model.name fails the stage before repair or resume-off move any answer:
    answers made with other settings stay where they are, byte for byte."""
    output = Path(config.teacher.base.output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    old = [{"id": i, "instruction": "old", "output": "old answer", "fp": "other-settings"} for i in prompt_ids(config)]
    output.write_text("".join(json.dumps(record) + "\n" for record in old))
    before = output.read_bytes()
    config.teacher.open.model.name = str(project / "models" / "no-such-teacher")
    config.teacher.open.pipeline.resume = resume
    with pytest.raises(StageError, match=r"^teacher\.open\.model\.name: .*no-such-teacher: no such model folder"):
        teacher.run(make_context(config, "teacher", project))
    assert output.read_bytes() == before
    assert sorted(p.name for p in output.parent.iterdir() if p.name.startswith(output.name)) == [output.name]


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
    monkeypatch.setattr(
        transformers.GenerationMixin,
        "generate",
        lambda self, *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")),
    )
    with pytest.raises(StageError, match=r"single prompt.*teacher\.open\.pipeline\.max_new_tokens"):
        teacher.run(make_context(config, "teacher", project))


# ------------------------------------------------------------------ the hand-over across two tokenizers
# The teacher (a StableLM model, GPT-NeoX-style tokenizer, as stable-code-instruct-3b) and the assistant
# (Qwen2) share no token ids: the teacher's answers are decoded with the teacher's tokenizer, cut at the
# teacher's stop tokens, stored as text, and re-tokenized by the assistant's tokenizer.


class _Script:
    """A logits processor that makes every row emit `script` token by token, then anything: a random tiny
    model only rarely says a given token, so the tokens a stop test needs are forced."""

    def __init__(self, script: list[int]):
        self.script, self.start = script, None

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[1] if self.start is None else self.start
        step = input_ids.shape[1] - self.start
        if step < len(self.script):
            scores[:] = float("-inf")
            scores[:, self.script[step]] = 0.0
        return scores


def _scripted_answer(ctx, model, tokenizer, script: list[int]):
    from transformers import LogitsProcessorList

    prompts = [{"id": "p", "instruction": "Write a function that squares x."}]
    texts = chat_texts(tokenizer, prompts, "You are a senior Python developer.", True)
    kwargs = dict(
        generation_kwargs(ctx, tokenizer, model),
        do_sample=False,
        max_new_tokens=len(script),
        logits_processor=LogitsProcessorList([_Script(script)]),
    )
    kwargs.pop("temperature", None), kwargs.pop("top_p", None), kwargs.pop("top_k", None)
    [batch] = generate_batches(model, tokenizer, prompts, texts, 1, kwargs)
    return batch.answers[0], batch.new_tokens


def test_teacher_answers_stop_at_the_teachers_own_stop_tokens(config, project: Path):
    from engine.models.loading import load_tokenizer

    ctx = make_context(config, "teacher", project)
    model, tokenizer = load_teacher(ctx)
    assistant = load_tokenizer("tiny:assistant")
    assert model.config.model_type == "stablelm"
    eos, im_end = tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    fim = tokenizer.convert_tokens_to_ids("<fim_prefix>")
    # the stop ids are the teacher's: its EOS (generation config and tokenizer) and, from configs/tiny.yaml's
    # additional_special_tokens, its <|im_end|>; the assistant's <|im_end|> id is another teacher token
    assert config.teacher.open.tokenizer.additional_special_tokens == ["<|im_end|>"]
    assert generation_kwargs(ctx, tokenizer, model)["eos_token_id"] == sorted({eos, im_end})
    assert assistant.convert_tokens_to_ids("<|im_end|>") == fim != im_end

    words = tokenizer("def square(x):\n    return x * x", add_special_tokens=False)["input_ids"]
    assert len(words) >= 6 and not set(words) & {eos, im_end, fim}
    text = lambda ids: tokenizer.decode(ids).strip()  # noqa: E731

    # the turn ends at <|im_end|>: nothing after it is kept, and the stop token is counted, not shown
    answer, new_tokens = _scripted_answer(ctx, model, tokenizer, words[:3] + [im_end] + words[3:])
    assert answer == text(words[:3]) and new_tokens == 4
    # and at the model's own EOS, <|endoftext|>
    answer, _ = _scripted_answer(ctx, model, tokenizer, words[:2] + [eos] + words[2:])
    assert answer == text(words[:2])
    # the assistant's <|im_end|> id is the teacher's <fim_prefix>: not a stop; special tokens are dropped
    answer, _ = _scripted_answer(ctx, model, tokenizer, words[:2] + [fim] + words[2:5] + [im_end] + words[5:])
    assert answer == text(words[:5]) and "<fim_prefix>" not in answer

    # without the config's <|im_end|> the turn still ends there: the chat template's end-of-turn token is
    # found in the template (the generation config's EOS alone would run past the end of the turn)
    config.teacher.open.tokenizer.additional_special_tokens = []
    assert generation_kwargs(ctx, tokenizer, model)["eos_token_id"] == sorted({eos, im_end})
    answer, _ = _scripted_answer(ctx, model, tokenizer, words[:3] + [im_end] + words[3:])
    assert answer == text(words[:3])


def test_teacher_answers_hand_over_to_the_assistants_tokenizer(config, project: Path):
    """The stored answers hold no teacher special token, and the assistant's tokenizer re-tokenizes each to
    the same text (decode(encode(x)) == x), in ids of its own, and its chat template marks exactly the
    answer (+ its own <|im_end|>) as what SFT learns."""
    from engine.models.loading import load_tokenizer

    config.teacher.open.pipeline.max_new_tokens = 32
    teacher.run(make_context(config, "teacher", project))
    records = answers(config)
    assert len(records) == 40
    teacher_tok = load_tokenizer("tiny:teacher")
    assistant = load_tokenizer("tiny:assistant")
    specials = set(teacher_tok.all_special_tokens) | set(assistant.all_special_tokens)
    differ = 0
    for record in records:
        answer = record["output"]
        assert answer == answer.strip() and answer
        assert not any(token in answer for token in specials), answer
        ids = assistant(answer, add_special_tokens=False)["input_ids"]
        assert assistant.decode(ids) == answer
        differ += ids != teacher_tok(answer, add_special_tokens=False)["input_ids"]
        messages = [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": answer}]
        out = assistant.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
        assert assistant.decode(marked) == answer + "<|im_end|>"
    assert differ == len(records)  # the same text, other ids


def test_replies_end_at_the_chat_templates_end_of_turn_everywhere(config):
    """The tiny teacher's generation config names only <|endoftext|> (as stable-code-instruct-3b's does); its
    ChatML template ends turns with <|im_end|>: every path that generates (teacher stage, vLLM requests, the
    chat worker, HumanEval) stops at both, each model at its own ids."""
    from engine.models.loading import load_causal_lm, load_tokenizer, stop_token_ids
    from engine.teacher.vllm import teacher_stop_ids

    teacher_tok = load_tokenizer("tiny:teacher")
    teacher = load_causal_lm("tiny:teacher")
    im_end, eos = teacher_tok.convert_tokens_to_ids("<|im_end|>"), teacher_tok.eos_token_id
    assert teacher.generation_config.eos_token_id == eos != im_end
    assert stop_token_ids(teacher_tok, teacher) == sorted({eos, im_end})  # found in the template, not configured
    assert teacher_stop_ids(config, "tiny:teacher") == sorted({eos, im_end})
    assistant_tok = load_tokenizer("tiny:assistant")
    assistant_ids = stop_token_ids(assistant_tok, load_causal_lm("tiny:assistant"))
    assert assistant_tok.convert_tokens_to_ids("<|im_end|>") in assistant_ids and im_end not in assistant_ids
