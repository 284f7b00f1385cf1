"""The cached teacher of `distill`: the assistant's sparse distribution over the training answers, computed
once per run and read back on every epoch instead of running the assistant beside the student.

Heavy module (torch, safetensors): import it only in worker processes and tests.

`train.distillation.knowledgedistillation.teacher_cache.mode`:

* `topk`: per response token, the assistant's k most likely tokens at the KD temperature T and their
  log-probabilities (DistillKit's, Axolotl's and Megatron's offline logits);
* `sampled`: per response token, `samples` tokens drawn from the assistant's distribution at T, each
  distinct token kept once with its count (Sparse Logit Sampling, ACL 2025), which makes the KL an unbiased
  estimate. `engine.train.kd_loss.sparse_kd_loss` says how each mode enters the loss.

The file lives under the run, `<run>/distill/teacher_cache/`: `teacher-cache.v<FORMAT>.safetensors`
(tensors below) and `manifest.json` (the fingerprint, the file's size, the covered mass). It is complete
only when the manifest names it: the manifest is removed before a rebuild and written after the data file,
each with `engine.core.fsio.atomic_write`, so a stage killed halfway leaves no manifest and the next attempt
rebuilds. A re-run of the stage (resume) reuses the cache when the fingerprint - what decides its content:
assistant, SFT adapter bytes, tokenizer, tokenized data, mode, k / samples, T, seed, format - is unchanged,
and rebuilds it, saying which part changed, when it is not.

Tensors: `offsets` (E + 1) the first row of each example (train examples, then eval); `ids` (R, k) int32;
`logprobs` (R, k) float32, log p_T(id) of the full distribution; `counts` (R, k) int32 (sampled mode only:
draws of each id, 0 in padding slots); `mass` (R,) the assistant's probability mass the row covers.
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from engine.core.fsio import atomic_write, atomic_write_json, read_json
from engine.models.device import barrier, init_distributed
from engine.models.loading import resolve_model_path
from engine.runner.context import StageContext
from engine.train.assistant import load_tuned_assistant
from engine.train.kd_loss import IGNORE_INDEX, response_positions, teacher_logits
from engine.train.kd_trainer import KDCollator, last_hidden_state
from engine.train.student import embedding_rows, vocab_fingerprint

FORMAT_VERSION = 1
"""Bump when the file's layout or meaning changes: older caches are then rebuilt, never misread."""
DATA_FILE = f"teacher-cache.v{FORMAT_VERSION}.safetensors"
MANIFEST = "manifest.json"
KEY = "train.distillation.knowledgedistillation.teacher_cache"


@dataclass
class TeacherCache:
    """A loaded cache: the sparse teacher rows of each example, as the loss wants them."""

    mode: str
    samples: int
    assistant_rows: int  # the assistant's embedding rows (its padded vocab), for the vocab check
    mean_mass: float
    tensors: dict[str, torch.Tensor]

    def rows(self, example: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, log p, weights) of one example's response tokens, in the form `sparse_kd_loss` reads."""
        start, end = self.tensors["offsets"][example : example + 2].tolist()
        ids = self.tensors["ids"][start:end]
        logprobs = self.tensors["logprobs"][start:end]
        if self.mode == "sampled":
            return ids, logprobs, self.tensors["counts"][start:end].float() / self.samples
        renormalised = logprobs - self.tensors["mass"][start:end].log().unsqueeze(1)
        return ids, renormalised, renormalised.exp()


class CachedKDCollator(KDCollator):
    """KDCollator plus the cached teacher rows of the batch's examples (each carries its `cache_row`),
    concatenated in `response_positions` order: example by example, position by position."""

    def __init__(self, pad_token_id: int, cache: TeacherCache):
        super().__init__(pad_token_id)
        self.cache = cache

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        parts = [self.cache.rows(e["cache_row"]) for e in examples]
        for name, column in zip(("teacher_ids", "teacher_logprobs", "teacher_weights"), zip(*parts)):
            batch[name] = torch.cat(column)
        return batch


# ------------------------------------------------------------------------------------- fingerprint


def _file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def fingerprint(ctx: StageContext, tokenizer, examples: list[dict[str, list[int]]], vocab: int) -> dict[str, Any]:
    """What decides the cache's content, as readable parts (compared part by part)."""
    config = ctx.config
    kd = config.train.distillation
    cache = kd.knowledgedistillation.teacher_cache
    q = config.assistant.quantization
    adapter = Path(config.train.sft.save_path)
    adapter_files = sorted(adapter.glob("adapter_*")) if (adapter / "adapter_config.json").exists() else []
    data = hashlib.sha256(json.dumps([[e["input_ids"], e["labels"]] for e in examples]).encode()).hexdigest()[:16]
    return {
        "format": FORMAT_VERSION,
        "mode": cache.mode,
        "k": cache.k if cache.mode == "topk" else None,
        "samples": cache.samples if cache.mode == "sampled" else None,
        "seed": kd.effective_seed if cache.mode == "sampled" else None,
        "temperature": kd.knowledgedistillation.loss.temperature,
        "assistant": config.assistant.model.name,
        "assistant_precision": "4bit-" + q.bnb_4bit_quant_type
        if q.load_in_4bit
        else str(config.assistant.model.bfloat16),
        "adapter": _file_digest(adapter_files) if adapter_files else "none",
        "tokenizer": vocab_fingerprint(tokenizer),
        "vocab": vocab,
        "data": data,
        "examples": len(examples),
    }


def differences(ours: dict[str, Any], theirs: dict[str, Any] | None) -> list[str]:
    if theirs is None:
        return ["no complete cache"]
    return [f"{key} {theirs.get(key)!r} -> {value!r}" for key, value in ours.items() if theirs.get(key) != value]


# -------------------------------------------------------------------------------------------- build


@torch.no_grad()
def sparse_rows(logits: torch.Tensor, temperature: float, mode: str, width: int, generator=None):
    """(ids, log p_T, counts or None, covered mass) of a chunk of the assistant's logits (n, V)."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    if mode == "topk":
        logprobs, ids = logp.topk(min(width, logp.shape[-1]), dim=-1)
        return ids, logprobs, None, logprobs.exp().sum(-1)
    p = logp.exp()
    draws = torch.multinomial(p, width, replacement=True, generator=generator)
    counts = torch.zeros_like(p, dtype=torch.int32).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.int32))
    counts, ids = counts.topk(width, dim=-1)  # the distinct drawn ids first; slots past them have count 0
    logprobs = logp.gather(1, ids)
    return ids, logprobs, counts, (logprobs.exp() * (counts > 0)).sum(-1)


@torch.no_grad()
def build(teacher, examples, pad_token_id: int, vocab: int, temperature: float, mode: str, width: int, **opts):
    """Run the assistant once over `examples` and return the cache's tensors (see the module docstring).

    opts: batch_size, chunk_size, device, seed (sampled mode)."""
    device = opts["device"]
    generator = torch.Generator(device=device).manual_seed(opts.get("seed", 0))
    head = teacher.get_output_embeddings().weight[:vocab]
    collate = KDCollator(pad_token_id)
    parts: dict[str, list[torch.Tensor]] = {"ids": [], "logprobs": [], "counts": [], "mass": []}
    lengths = []
    for start in range(0, len(examples), opts["batch_size"]):
        batch = examples[start : start + opts["batch_size"]]
        inputs = {name: t.to(device) for name, t in collate(batch).items()}
        hidden = last_hidden_state(teacher, inputs)
        rows, _ = response_positions(inputs["labels"])
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        for chunk in hidden.split(opts["chunk_size"]):
            ids, logprobs, counts, mass = sparse_rows(teacher_logits(chunk, head), temperature, mode, width, generator)
            parts["ids"].append(ids.to("cpu", torch.int32))
            parts["logprobs"].append(logprobs.cpu())
            parts["mass"].append(mass.cpu())
            if counts is not None:
                parts["counts"].append(counts.cpu())
        lengths += [sum(1 for label in e["labels"][1:] if label != IGNORE_INDEX) for e in batch]
    tensors = {name: torch.cat(chunks) for name, chunks in parts.items() if chunks}
    tensors["offsets"] = torch.tensor([0, *lengths]).cumsum(0)
    return tensors


# --------------------------------------------------------------------------------------- on disk


def cache_dir(ctx: StageContext) -> Path:
    return ctx.stage_dir / "teacher_cache"


def check(directory: Path, parts: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """(manifest, []) when `directory` holds a complete cache made with `parts`, else (None, why not)."""
    manifest = read_json(directory / MANIFEST)
    diff = differences(parts, manifest and manifest.get("fingerprint"))
    data = directory / DATA_FILE
    if not diff and (not data.exists() or data.stat().st_size != manifest["bytes"]):
        diff = [f"{DATA_FILE} is missing or not the size its manifest says"]
    return (None, diff) if diff else (manifest, [])


def load(directory: Path, parts: dict[str, Any]) -> tuple[TeacherCache | None, list[str]]:
    """The complete cache in `directory` when it was made with `parts`, else (None, why not)."""
    from safetensors.torch import load_file

    manifest, diff = check(directory, parts)
    if manifest is None:
        return None, diff
    data = directory / DATA_FILE
    cache = TeacherCache(
        mode=parts["mode"],
        samples=parts["samples"] or 0,
        assistant_rows=manifest["assistant_rows"],
        mean_mass=manifest["mean_mass"],
        tensors=load_file(str(data)),
    )
    return cache, []


def write(directory: Path, tensors: dict[str, torch.Tensor], parts: dict[str, Any], assistant_rows: int) -> dict:
    """Data file, then manifest, each atomically; the old manifest goes first, so a half-written cache is never
    taken for complete. Returns the manifest."""
    from safetensors.torch import save

    (directory / MANIFEST).unlink(missing_ok=True)
    data = save(tensors, metadata={"fingerprint": json.dumps(parts, sort_keys=True)})
    atomic_write(directory / DATA_FILE, data, key=KEY)
    manifest = {
        "fingerprint": parts,
        "bytes": len(data),
        "rows": int(tensors["ids"].shape[0]),
        "assistant_rows": assistant_rows,
        "mean_mass": float(tensors["mass"].mean()) if tensors["mass"].numel() else 1.0,
    }
    atomic_write_json(directory / MANIFEST, manifest, key=KEY)
    return manifest


def copy_from_reused_run(ctx: StageContext, directory: Path, parts: dict[str, Any]) -> str | None:
    """Copy a cache made with `parts` from a run this run reused outputs of (`tas run --reuse teacher=RUN`,
    then an identical SFT adapter); returns that run's id, or None when none has one."""
    for source in dict.fromkeys(ctx.run.reused.values()):
        theirs = ctx.run.path.parent / source / ctx.stage / directory.name
        manifest, _ = check(theirs, parts)
        if manifest is not None:
            (directory / MANIFEST).unlink(missing_ok=True)
            atomic_write(directory / DATA_FILE, (theirs / DATA_FILE).read_bytes(), key=KEY)
            atomic_write_json(directory / MANIFEST, manifest, key=KEY)
            return source
    return None


def assistant_stand_in(name: str):
    """What `build_student` reads of the assistant (config, generation_config) without loading its weights."""
    from transformers import AutoConfig, GenerationConfig

    path = resolve_model_path(name, key="assistant.model.name")
    try:
        generation = GenerationConfig.from_pretrained(path)
    except OSError:
        generation = None
    return SimpleNamespace(config=AutoConfig.from_pretrained(path), generation_config=generation)


def build_and_write(ctx: StageContext, directory: Path, parts, tokenizer, examples, vocab: int, device) -> dict:
    """Load the tuned assistant, run it once over `examples`, free it, and write the cache; returns the manifest."""
    kd = ctx.config.train.distillation
    settings = kd.knowledgedistillation.teacher_cache
    teacher, _ = load_tuned_assistant(ctx, device)
    tensors = build(
        teacher,
        examples,
        tokenizer.pad_token_id,
        vocab,
        kd.knowledgedistillation.loss.temperature,
        settings.mode,
        settings.k if settings.mode == "topk" else settings.samples,
        batch_size=kd.per_device_train_batch_size,
        chunk_size=kd.loss_chunk_size,
        device=device,
        seed=kd.effective_seed,
    )
    rows = embedding_rows(teacher)
    del teacher  # training never needs it again: its memory goes back before the student is built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return write(directory, tensors, parts, rows)


def prepare_cache(
    ctx: StageContext, tokenizer, examples: list[dict[str, list[int]]], vocab: int, device
) -> TeacherCache:
    """The run's cache for `examples` (train, then eval): reused when its fingerprint matches, else built by
    rank 0 (the others wait at a barrier) with the assistant loaded for this pass only, then freed."""
    settings = ctx.config.train.distillation.knowledgedistillation.teacher_cache
    parts = fingerprint(ctx, tokenizer, examples, vocab)
    directory = cache_dir(ctx)
    init_distributed()
    if ctx.is_main:
        _, why = check(directory, parts)
        if not why:
            ctx.events.log(f"teacher cache ({settings.mode}): reused {directory / DATA_FILE} (same fingerprint)")
        elif (source := copy_from_reused_run(ctx, directory, parts)) is not None:
            ctx.events.log(f"teacher cache ({settings.mode}): copied from run {source} (same fingerprint)")
        else:
            ctx.events.log(f"teacher cache ({settings.mode}): building in {directory} ({'; '.join(why)})")
            manifest = build_and_write(ctx, directory, parts, tokenizer, examples, vocab, device)
            ctx.events.artifact(directory / DATA_FILE, f"teacher cache: {manifest['rows']} answer tokens")
    barrier()
    cache, why = load(directory, parts)
    if cache is None:
        raise RuntimeError(f"the teacher cache in {directory} is not usable after it was built: {'; '.join(why)}")
    if ctx.is_main:
        ctx.events.metric("teacher_cache_mass", cache.mean_mass)
        ctx.events.log(
            f"teacher cache: the assistant's mass covered per answer token is {cache.mean_mass:.4f} on average "
            f"({settings.mode}; the rest is the tail the cache drops)"
        )
    return cache
