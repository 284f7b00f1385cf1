"""The offline tiny profile's models: Qwen2-architecture models and a tokenizer, built locally.

Heavy module (transformers, tokenizers, torch): import it only in worker processes and tests.

`tiny:teacher`, `tiny:assistant` and `tiny:student` name three sizes of one family. On first use the
shared tokenizer is trained on the shipped prompt set + code corpus and each model is initialised from
a fixed seed, then saved like any Hugging Face checkpoint under the cache folder (`TAS_TINY_CACHE`,
default `~/.cache/tas-panel/tiny`). After that, every stage loads them with `from_pretrained` exactly as
it loads a real model from the hub, so the tiny profile exercises the real code path.

The tokenizer is a byte-level BPE trained with *exactly* Qwen2's normalizer (NFC) and pre-tokenizer
(Qwen2's split regex + byte level): transformers 5 rebuilds a saved Qwen2 tokenizer with that pipeline,
so training with anything else would change token ids after a reload. Its ChatML chat template has
`{% generation %}` markers so TRL can compute the loss on assistant tokens only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from engine.models.shipped import SHIPPED_DATASETS, TOKENIZER_CORPUS, is_tiny, tiny_name

TINY_VERSION = "v2"  # bump when the recipe changes: old caches are then rebuilt, never reused
TOKENIZER_VOCAB = 2048
SEED = 1234

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Sizes roughly in the ratio of a 3B teacher, a 1.5B assistant and a smaller student. Every matrix
# dimension is a multiple of 64: bitsandbytes' CPU 4-bit kernels quantize in blocks of 64 input features.
TINY_SPECS: dict[str, dict[str, int]] = {
    "teacher": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2),
    "assistant": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    "student": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
MAX_POSITIONS = 1024

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


def cache_root() -> Path:
    base = os.environ.get("TAS_TINY_CACHE") or Path.home() / ".cache" / "tas-panel" / "tiny"
    return Path(base) / TINY_VERSION


def resolve(name: str) -> Path:
    """Local folder of `tiny:<name>` (`tiny:tokenizer` for the tokenizer alone), building it if needed."""
    key = tiny_name(name) if is_tiny(name) else name
    if key != "tokenizer" and key not in TINY_SPECS:
        known = ", ".join(f"tiny:{k}" for k in TINY_SPECS)
        raise ValueError(f"unknown tiny model {name!r}; there are: {known}")
    root = cache_root()
    target = root / key
    if (target / "READY").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    if _global_rank() > 0:
        # under torchrun only global rank 0 may build: transformers' save_pretrained writes nothing on the
        # other ranks once the process group is up, which would publish a folder without its weights
        return _wait_until_ready(target)
    tokenizer_dir = resolve("tiny:tokenizer") if key != "tokenizer" else None  # before taking the lock
    with _locked(root / ".build.lock"):  # two workers starting at once build it once
        if not (target / "READY").exists():
            if tokenizer_dir is None:
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


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    """What the tokenizer learns from: the shipped prompts and the shipped Python code corpus."""
    texts = []
    for path in SHIPPED_DATASETS.values():
        with open(path, encoding="utf-8") as f:
            texts += [json.loads(line)["instruction"] for line in f if line.strip()]
    texts += TOKENIZER_CORPUS.read_text(encoding="utf-8").split("\n# ----\n")
    return texts


def build_tokenizer():
    """Train the tiny byte-level BPE and wrap it as the Qwen2Tokenizer transformers will reload it as."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: no unknowns, ever
        show_progress=False,
    )
    bpe.train_from_iterator(training_texts(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        padding_side="left",  # must be a constructor argument, or it is not saved
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def padded_vocab(tokenizer) -> int:
    """Embedding rows: the tokenizer's size rounded up to 64, as Qwen pads its vocab."""
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


def build_model(key: str, tokenizer):
    """A freshly initialised tiny model; the same weights on every machine for the same seed."""
    import torch
    from transformers import AutoModelForCausalLM

    config = qwen2_config(tokenizer, **TINY_SPECS[key])
    torch.manual_seed(SEED + sorted(TINY_SPECS).index(key))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _save_model(key: str, tokenizer_dir: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    build_model(key, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
