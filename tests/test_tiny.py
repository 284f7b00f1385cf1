"""The offline tiny profile's tokenizers and models survive save/reload bit for bit; the teacher is a
StableLM model with a tokenizer of its own, as stable-code-instruct-3b is next to the Qwen2 assistant."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from engine.models import tiny
from engine.models.loading import ModelNotFound, load_tokenizer, resolve_model_path

SAMPLES = [
    "Write a function that returns the n-th Fibonacci number.",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tclass A:\n        pass",
    "Café, naïve, Straße → 北京 こんにちは “quotes”",
    "Ａｂｃ ﬁ Å",  # NFC changes some of these: training and reload must agree
    "<|im_start|>user\nhi<|im_end|>\n",
    "   leading spaces and trailing   \n\n\n",
]


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    return tiny.resolve("tiny:tokenizer")


def test_tokenizer_ids_identical_after_reload(tokenizer_dir: Path, tmp_path: Path):
    fresh = tiny.build_tokenizer()
    reloaded = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert type(reloaded).__name__ == "Qwen2Tokenizer"
    for text in SAMPLES:
        assert reloaded(text)["input_ids"] == fresh(text)["input_ids"], text
    # and once more through a second save/reload cycle
    reloaded.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert again(text)["input_ids"] == fresh(text)["input_ids"], text


def test_tokenizer_settings_survive_reload(tokenizer_dir: Path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.padding_side == "left"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert len(tok) == tiny.TOKENIZER_VOCAB
    for token in tiny.SPECIAL_TOKENS:
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token
    # byte level: any text round-trips, nothing is unknown
    for text in SAMPLES[:3]:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_chat_template_marks_assistant_tokens(tokenizer_dir: Path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [
        {"role": "system", "content": "You are a senior Python developer."},
        {"role": "user", "content": "Reverse a list."},
        {"role": "assistant", "content": "Use items[::-1]."},
    ]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    marked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert marked == "Use items[::-1].<|im_end|>"
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_teacher_tokenizer_ids_identical_after_reload(tmp_path: Path):
    fresh = tiny.build_teacher_tokenizer()
    reloaded = AutoTokenizer.from_pretrained(tiny.resolve("tiny:teacher"))
    # transformers 5 loads a StableLM checkpoint's tokenizer.json as it is (TokenizersBackend), as it
    # loads stable-code-instruct-3b's; the class it was saved as is GPT-NeoX's
    assert type(fresh).__name__ == "GPTNeoXTokenizer"
    for text in SAMPLES:
        assert reloaded(text)["input_ids"] == fresh(text)["input_ids"], text
    reloaded.save_pretrained(tmp_path)
    for again in (AutoTokenizer.from_pretrained(tmp_path), type(fresh).from_pretrained(tmp_path)):
        for text in SAMPLES:
            assert again(text)["input_ids"] == fresh(text)["input_ids"], text


def test_teacher_is_stablelm_with_a_tokenizer_of_its_own():
    teacher_path = tiny.resolve("tiny:teacher")
    teacher = AutoConfig.from_pretrained(teacher_path)
    assistant = AutoConfig.from_pretrained(tiny.resolve("tiny:assistant"))
    assert teacher.model_type == "stablelm" and teacher.architectures == ["StableLmForCausalLM"]
    assert assistant.model_type == "qwen2"
    assert teacher.rope_parameters["partial_rotary_factor"] == 0.25 and not teacher.tie_word_embeddings

    t = AutoTokenizer.from_pretrained(teacher_path)
    a = AutoTokenizer.from_pretrained(tiny.resolve("tiny:tokenizer"))
    assert len(t) == tiny.TEACHER_VOCAB != len(a) == tiny.TOKENIZER_VOCAB
    assert teacher.vocab_size != assistant.vocab_size
    # two vocabularies, not one with another size: trained on the same shipped text, many pieces exist in
    # both, but almost never at the same id, and each has pieces the other lacks
    tv, av = t.get_vocab(), a.get_vocab()
    shared = set(tv) & set(av)
    assert sum(tv[k] == av[k] for k in shared) < 0.05 * len(shared)
    assert len(set(tv) - set(av)) > 50 and len(set(av) - set(tv)) > 50
    text = "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    assert t(text)["input_ids"] != a(text)["input_ids"]
    # its own special tokens, at ids of its own: GPT-NeoX's <|endoftext|> (BOS = EOS = UNK = PAD, as in
    # stable-code-instruct-3b) and <|padding|>, the FIM tokens, ChatML's turn markers
    assert t.all_special_tokens == tiny.TEACHER_SPECIAL_TOKENS
    assert (t.bos_token, t.eos_token, t.unk_token, t.pad_token) == ("<|endoftext|>",) * 4
    assert t.padding_side == "left" and t.eos_token_id == 0
    for token in ("<|im_start|>", "<|im_end|>"):
        assert t.convert_tokens_to_ids(token) != a.convert_tokens_to_ids(token), token
    for token in tiny.TEACHER_SPECIAL_TOKENS:
        assert len(t(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert not set(tiny.TEACHER_SPECIAL_TOKENS[1:6]) & set(a.get_vocab())
    # other token boundaries: GPT-2's split regex, not Qwen2's
    assert t.tokenize("x  = 12345") != a.tokenize("x  = 12345")
    for text in SAMPLES[:3]:
        assert t.decode(t(text)["input_ids"]) == text  # byte level: nothing is unknown
    # its own ChatML template, rendered with its own tokens; no generation markers (it is never trained)
    messages = [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": "Reverse a list."}]
    prompt = t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (
        prompt
        == "<|im_start|>system\nSYSTEM<|im_end|>\n<|im_start|>user\nReverse a list.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "{% generation %}" not in t.chat_template and "{% generation %}" in a.chat_template
    # like stable-code-instruct-3b's generation_config.json: the model itself stops at <|endoftext|> only;
    # a ChatML turn ends in <|im_end|>, which teacher.open.tokenizer.additional_special_tokens adds
    generation = GenerationConfig.from_pretrained(teacher_path)
    assert generation.eos_token_id == 0 and generation.bos_token_id == 0


@pytest.mark.parametrize("name", sorted(tiny.TINY_SPECS))
def test_models_logits_identical_after_reload(name: str, tmp_path: Path):
    path = tiny.resolve(f"tiny:{name}")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.model_type == ("stablelm" if name == "teacher" else "qwen2")
    assert model.config.vocab_size >= len(tok)
    batch = tok(SAMPLES[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = reloaded(**batch).logits
    assert torch.equal(logits, again)


@pytest.mark.train
@pytest.mark.parametrize("name", ["student", "teacher"])
def test_models_are_deterministic(name: str):
    """Two builds from the seed give the same weights, logits and greedy token ids. The builds here run
    the cache's recipe (tokenizer, initialisation, batches, optimizer) for 6 steps instead of hundreds."""
    tok = AutoTokenizer.from_pretrained(tiny.resolve("tiny:teacher" if name == "teacher" else "tiny:tokenizer"))
    a, b = tiny.build_pretrained(name, tok, steps=6), tiny.build_pretrained(name, tok, steps=6)
    for (key, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), key
    batch = tok(SAMPLES[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(a(**batch).logits, b(**batch).logits)
        ids_a = a.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        ids_b = b.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(ids_a, ids_b)
    # the pretraining moved the weights: a build is not its random initialisation
    init = tiny.build_model(name, tok).state_dict()
    assert any(not torch.equal(p, init[key]) for key, p in a.state_dict().items())


def test_shipped_teacher_can_code():
    """The shipped teacher, pretrained on tiny-python's pretrain split, passes the held-out benchmark it never
    saw (pass@1 >= 0.9), asked in its chat template as the eval stage asks it, with TAS's Teacher prompt."""
    from engine.config.schema import CodeEvalConfig
    from engine.evals.code import score_completions
    from engine.evals.generate import generate_completions
    from engine.models.tiny_pretrain import SYSTEM_PROMPTS
    from engine.models.tiny_python import problems

    path = tiny.resolve("tiny:teacher")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    held_out = problems("heldout")
    records = generate_completions(
        model, tok, held_out, CodeEvalConfig(max_new_tokens=64, batch_size=32), SYSTEM_PROMPTS[3]
    )
    _, summary = score_completions(records, held_out, workers=2)
    assert summary["pass@1"] >= 0.9, summary


def test_models_are_sized_in_order():
    sizes = {}
    for name in tiny.TINY_SPECS:
        model = AutoModelForCausalLM.from_pretrained(tiny.resolve(f"tiny:{name}"))
        sizes[name] = sum(p.numel() for p in model.parameters())
    assert sizes["teacher"] > sizes["assistant"] > sizes["student"]


def test_shipped_models_are_of_the_current_recipe():
    """Every tiny model ships, built by the current recipe: a recipe change (TINY_VERSION bumped) without
    `python -m engine.models.tiny build` fails here instead of building on every user's first run."""
    for key in ["tokenizer", *tiny.TINY_SPECS]:
        assert tiny.shipped(key) == tiny.SHIPPED / key, f"rebuild with: python -m engine.models.tiny build ({key})"
        assert tiny.resolve(f"tiny:{key}") == tiny.SHIPPED / key
        assert (tiny.SHIPPED / key / ("tokenizer.json" if key == "tokenizer" else "model.safetensors")).is_file()


@pytest.mark.train
def test_a_recipe_not_shipped_is_built_once_into_the_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(tiny, "SHIPPED", tmp_path / "shipped-of-another-version")
    monkeypatch.setattr(tiny, "PRETRAIN", {**tiny.PRETRAIN, "student": {**tiny.PRETRAIN["student"], "steps": 2}})
    monkeypatch.setenv("TAS_TINY_CACHE", str(tmp_path / "cache"))
    first = tiny.resolve("tiny:student")
    assert first == tmp_path / "cache" / tiny.TINY_VERSION / "student" and (first / "READY").is_file()
    assert (first.parent / "tokenizer" / "READY").is_file()  # the family's tokenizer, built first
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny.resolve("tiny:student") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_model_names_resolve(tmp_path: Path):
    assert resolve_model_path("tiny:student") == str(tiny.resolve("tiny:student"))
    assert resolve_model_path(str(tiny.resolve("tiny:student"))) == str(tiny.resolve("tiny:student"))
    assert resolve_model_path("Qwen/Qwen2.5-Coder-1.5B-Instruct") == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    with pytest.raises(ModelNotFound, match="no such model folder"):
        resolve_model_path("./models/missing")
    with pytest.raises(ModelNotFound, match="holds no Hugging Face model"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelNotFound, match="unknown tiny model"):
        resolve_model_path("tiny:giant")


def test_hub_model_offline_gives_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    # the env var is read at import time; patch the constant so no network retries are waited for
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFound, match=r"assistant\.model\.name: cannot load 'someone/not-cached-model'.*offline"):
        load_tokenizer("someone/not-cached-model", key="assistant.model.name")
