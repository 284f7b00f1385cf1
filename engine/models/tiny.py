"""The offline tiny profile's models, built locally: a StableLM teacher, a Qwen2 assistant and student.

Heavy module (transformers, tokenizers, torch): import it only in worker processes and tests.

The tiny models mirror the real plan's families. `tiny:assistant` and `tiny:student` are two sizes of one
Qwen2-architecture family sharing one tokenizer (`tiny:tokenizer`), as Qwen2.5-Coder-1.5B and -0.5B do.
`tiny:teacher` is a StableLM model (`StableLmForCausalLM`, like stabilityai/stable-code-instruct-3b) with a
tokenizer of its own: a GPT-NeoX-style byte-level BPE with a smaller, different vocabulary, its own special
tokens (`<|endoftext|>` is id 0 and its BOS = EOS = UNK = PAD, `<|padding|>`, the FIM tokens, ChatML's
`<|im_start|>` / `<|im_end|>` at ids of their own) and its own ChatML template. Like the real teacher its
EOS is `<|endoftext|>` (generation config `eos_token_id: 0`), while a chat turn ends in `<|im_end|>`: the
config's `teacher.open.tokenizer.additional_special_tokens` is what stops an answer there. So the teacher
only hands *text* to the assistant, across two tokenizers, templates and stop tokens, as in a real run.

The build: each tokenizer is trained on the shipped prompt set + code corpus + tiny-python's pretrain split
(BPE training is deterministic), each model is initialised from a fixed seed and pretrained on that split
(`build_pretrained`, engine.models.tiny_pretrain: the teacher learns to code, the assistant and the student
become base code models; about 6 minutes in all on one thread), then saved like any Hugging Face checkpoint.
The project ships the result (`engine/assets/tiny/`, written by `python -m engine.models.tiny build`), so a
first run builds nothing and every machine starts from the same weights: float arithmetic differs across
CPUs and thread counts, so a build is reproducible on one machine, not across machines. Only when the
shipped models are of another recipe version (a developer changed the recipe and has not rebuilt them yet)
are they built on first use into the cache folder (`TAS_TINY_CACHE`, default `~/.cache/tas-panel/tiny`).
Every stage loads them with `from_pretrained` exactly as it loads a real model from the hub, so the tiny
profile exercises the real code path.

Both BPEs are trained with *exactly* the normalizer and pre-tokenizer transformers 5 rebuilds the saved
class with (Qwen2Tokenizer: NFC + Qwen2's split regex + byte level; GPTNeoXTokenizer: NFC + byte level with
GPT-2's regex): training with anything else would change token ids after a reload. (AutoTokenizer loads a
StableLM checkpoint's tokenizer.json as it is, as a TokenizersBackend, as it does stable-code-instruct-3b's;
GPTNeoXTokenizer.from_pretrained gives the same ids.) The assistant's ChatML
template has `{% generation %}` markers so TRL can compute the loss on assistant tokens only; the teacher
is never trained, so its template has none.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from engine.core.fsio import file_lock
from engine.models.shipped import ASSETS, SHIPPED_DATASETS, TOKENIZER_CORPUS, is_tiny, tiny_name

TINY_VERSION = "v6"  # bump when the recipe changes: old caches are then rebuilt, never reused
TOKENIZER_VOCAB = 2048  # the assistant's and student's tokenizer
TEACHER_VOCAB = 1536  # the teacher's own: smaller, as stable-code's 50k is next to Qwen2.5's 151k
SEED = 1234

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# the teacher's, in GPT-NeoX / stable-code style: `<|endoftext|>` is id 0 (BOS = EOS = UNK = PAD, as in
# stable-code-instruct-3b's special_tokens_map.json), GPT-NeoX's `<|padding|>` (in the vocabulary, not the
# pad token), the fill-in-the-middle tokens, and ChatML's turn markers at ids that differ from the assistant's
TEACHER_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|padding|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<|im_start|>",
    "<|im_end|>",
]
TEACHER_EXTRA_SPECIAL_TOKENS = TEACHER_SPECIAL_TOKENS[1:]

# Sizes roughly in the ratio of a 3B teacher, a 1.5B assistant and a smaller student. Every matrix
# dimension is a multiple of 64: bitsandbytes' CPU 4-bit kernels quantize in blocks of 64 input features.
# The teacher has full multi-head attention (as many key/value heads as heads), as stable-code-3b has.
TINY_SPECS: dict[str, dict[str, int]] = {
    "teacher": dict(
        hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6
    ),
    "assistant": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
    ),
    "student": dict(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
}
MAX_POSITIONS = 1024

# How each tiny model is pretrained on tiny-python's `pretrain` split when the cache is built (see
# build_pretrained). Fixed step counts, never a time budget, so that a build is reproducible.
PRETRAIN: dict[str, dict] = {
    "teacher": dict(steps=1400, batch_size=16, learning_rate=2e-3),
    "assistant": dict(steps=300, batch_size=16, learning_rate=2e-3),
    "student": dict(steps=1000, batch_size=16, learning_rate=2e-3),
}

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# stable-code-instruct-3b's kind of template: ChatML, no generation markers (the teacher is never trained)
TEACHER_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


SHIPPED = ASSETS / "tiny"  # the built models the project ships, one folder per name, each with READY
BUILD_THREADS = 1  # torch threads while building: the shipped build is re-made identically on one machine


def cache_root() -> Path:
    base = os.environ.get("TAS_TINY_CACHE") or Path.home() / ".cache" / "tas-panel" / "tiny"
    return Path(base) / TINY_VERSION


def shipped(key: str) -> Path | None:
    """The shipped folder of `key` when it is of the current recipe (its READY holds TINY_VERSION)."""
    ready = SHIPPED / key / "READY"
    return ready.parent if ready.is_file() and ready.read_text().strip() == TINY_VERSION else None


def resolve(name: str) -> Path:
    """Local folder of `tiny:<name>` (`tiny:tokenizer` for the tokenizer alone): the shipped one, or else
    the cache's, building it there if needed."""
    key = tiny_name(name) if is_tiny(name) else name
    if key != "tokenizer" and key not in TINY_SPECS:
        known = ", ".join(f"tiny:{k}" for k in TINY_SPECS)
        raise ValueError(f"unknown tiny model {name!r}; there are: {known}")
    if (folder := shipped(key)) is not None:
        return folder
    return _resolve_in(cache_root(), key)


def _resolve_in(root: Path, key: str) -> Path:
    target = root / key
    if (target / "READY").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    if _global_rank() > 0:
        # under torchrun only global rank 0 may build: transformers' save_pretrained writes nothing on the
        # other ranks once the process group is up, which would publish a folder without its weights
        return _wait_until_ready(target)
    # the assistant's family shares the tokenizer folder (built first, before taking the lock); the
    # teacher's tokenizer is its own and is built with the teacher
    tokenizer_dir = _resolve_in(root, "tokenizer") if key in ("assistant", "student") else None
    with file_lock(root / ".build.lock"):  # two workers starting at once build it once
        if not (target / "READY").exists():
            if key == "tokenizer":
                _publish(target, lambda tmp: build_tokenizer().save_pretrained(tmp))
            else:
                _publish(target, lambda tmp: _save_model(key, tokenizer_dir, tmp))
    return target


def _global_rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _wait_until_ready(target: Path, timeout_s: float = 900.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while not (target / "READY").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target}: rank 0 did not build this tiny model within {timeout_s:g}s")
        time.sleep(0.2)
    return target


def _publish(target: Path, write) -> None:
    """Build into a temp folder, then rename: a half-built model is never visible."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        (tmp / "READY").write_text(TINY_VERSION)
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def training_texts() -> list[str]:
    """What the tokenizer learns from: the shipped prompts, the shipped Python code corpus and tiny-python's
    pretraining pairs (never its held-out problems)."""
    from engine.models.tiny_python import pretraining_pairs

    texts = [text for pair in pretraining_pairs() for text in pair]
    for path in SHIPPED_DATASETS.values():
        with open(path, encoding="utf-8") as f:
            texts += [json.loads(line)["instruction"] for line in f if line.strip()]
    texts += TOKENIZER_CORPUS.read_text(encoding="utf-8").split("\n# ----\n")
    return texts


def _train_bpe(pre_tokenizer, vocab_size: int, special_tokens: list[str]):
    """(vocab, merges) of a byte-level BPE trained on `training_texts()`: NFC, then `pre_tokenizer`, as the
    transformers class that wraps it rebuilds it on reload."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    bpe = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizer
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,  # ids 0.. in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: no unknowns, ever
        show_progress=False,
    )
    bpe.train_from_iterator(training_texts(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def build_tokenizer():
    """Train the assistant's tiny byte-level BPE and wrap it as the Qwen2Tokenizer transformers reloads."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    vocab, merges = _train_bpe(split, TOKENIZER_VOCAB, SPECIAL_TOKENS)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        padding_side="left",  # must be a constructor argument, or it is not saved
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def build_teacher_tokenizer():
    """Train the teacher's own byte-level BPE (GPT-NeoX style) and wrap it as a GPTNeoXTokenizer."""
    from tokenizers import pre_tokenizers
    from transformers import GPTNeoXTokenizer

    # GPT-2's split regex inside the byte-level step: other token boundaries than Qwen2's
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    vocab, merges = _train_bpe(split, TEACHER_VOCAB, TEACHER_SPECIAL_TOKENS)
    return GPTNeoXTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",  # padding is EOS, as in stable-code-instruct-3b
        extra_special_tokens=TEACHER_EXTRA_SPECIAL_TOKENS,
        padding_side="left",
        chat_template=TEACHER_CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def padded_vocab(tokenizer) -> int:
    """Embedding rows: the tokenizer's size rounded up to 64, as Qwen and stable-code pad their vocab."""
    return (len(tokenizer) + 63) // 64 * 64


def qwen2_config(tokenizer, **sizes):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=padded_vocab(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def stablelm_config(tokenizer, **sizes):
    """stable-code-instruct-3b's settings at a tiny size: LayerNorm, SiLU MLP, rotary on a quarter of each
    head, untied embeddings, BOS = EOS = `<|endoftext|>` (id 0)."""
    from transformers import StableLmConfig

    return StableLmConfig(
        vocab_size=padded_vocab(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        hidden_act="silu",
        layer_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.25},
        use_qkv_bias=False,
        qk_layernorm=False,
        use_parallel_residual=False,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sizes,
    )


def build_model(key: str, tokenizer):
    """A freshly initialised tiny model; the same weights on every machine for the same seed.

    `tokenizer` is the model's own: `build_teacher_tokenizer()`'s for the teacher, `build_tokenizer()`'s
    (or `tiny:tokenizer`) for the assistant and the student.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if key == "teacher":
        config = stablelm_config(tokenizer, **TINY_SPECS[key])
    else:
        config = qwen2_config(tokenizer, **TINY_SPECS[key])
    torch.manual_seed(SEED + sorted(TINY_SPECS).index(key))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if key == "teacher":
        # as stable-code-instruct-3b's generation_config.json: BOS = EOS = `<|endoftext|>`, nothing else
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = None
    else:
        model.generation_config.eos_token_id = [
            tokenizer.convert_tokens_to_ids("<|im_end|>"),
            tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        ]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_pretrained(key: str, tokenizer, steps: int | None = None):
    """`build_model`, then pretrained on tiny-python's `pretrain` split (engine.models.tiny_pretrain): the
    teacher as an instruction-tuned model (its chat template, loss on the answers), the assistant and the
    student as *base* code models (source files and Markdown snippets, never a chat turn). `steps` overrides
    PRETRAIN's count (tests build short, otherwise identical, recipes). Deterministic for a seed."""
    from engine.models import tiny_pretrain
    from engine.models.tiny_python import pretraining_pairs

    model = build_model(key, tokenizer)
    recipe = dict(PRETRAIN[key])
    if steps is not None:
        recipe["steps"] = steps
    pairs = pretraining_pairs()
    if key == "teacher":
        examples = tiny_pretrain.chat_examples(tokenizer, pairs, SEED)
    else:
        examples = tiny_pretrain.plain_examples(tokenizer, pairs)

    def report(step: int, loss: float) -> None:
        if step % 50 == 0 or step == recipe["steps"] - 1:  # the build takes minutes: show it is moving
            print(
                f"tiny:{key}: pretraining step {step + 1}/{recipe['steps']}, loss {loss:.3f}",
                file=sys.stderr,
                flush=True,
            )

    tiny_pretrain.pretrain(model, tokenizer, examples, seed=SEED, on_step=report, **recipe)
    return model


def _save_model(key: str, tokenizer_dir: Path | None, out: Path) -> None:
    """The model and its tokenizer into `out`; the teacher's tokenizer is trained here (`tokenizer_dir`
    None), saved first and reloaded, so the model is sized by the tokenizer every stage will load."""
    from transformers import AutoTokenizer

    if tokenizer_dir is None:
        build_teacher_tokenizer().save_pretrained(out)
        tokenizer_dir = out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    build_pretrained(key, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_all(into: Path) -> None:
    """Build every tiny model into `into` (the tokenizer first: the assistant and the student share it),
    replacing what is there: how `engine/assets/tiny/` is made after a recipe change."""
    import torch

    torch.set_num_threads(BUILD_THREADS)
    into.mkdir(parents=True, exist_ok=True)
    for key in ["tokenizer", *TINY_SPECS]:
        target = into / key
        if target.exists():
            shutil.rmtree(target)
        started = time.monotonic()
        _resolve_in(into, key)
        print(f"tiny:{key}: built in {time.monotonic() - started:.0f}s -> {target}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m engine.models.tiny",
        description="Rebuild the tiny models the project ships (after a recipe change).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build every tiny model (about 6 minutes: one thread, BUILD_THREADS)")
    build.add_argument("--into", type=Path, default=SHIPPED, help=f"target folder (default: {SHIPPED})")
    args = parser.parse_args(argv)
    build_all(args.into)
    return 0


if __name__ == "__main__":
    sys.exit(main())
