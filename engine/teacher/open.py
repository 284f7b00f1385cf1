"""The open teacher: answers prompts with a Hugging Face causal LM, batched, with the KV cache.

Heavy module. Differences from the original TAS loop, all for throughput without changing outputs:

* the KV cache is on by default (`use_cache`); TAS had it off, so each new token recomputed attention
  over the whole sequence;
* batches are sorted by prompt length (longest first: an out-of-memory shows up in the first batch,
  not after hours), so little compute goes to padding;
* generation stops at EOS / <|im_end|> instead of always running to max_new_tokens.

Under torchrun each rank answers every world_size-th prompt of the sorted list (balanced shards) into its
own shard file; the stage merges the shards when every rank is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from engine.models.device import (
    free_accelerator_memory,
    is_out_of_memory,
    peak_memory,
    pick_attention,
    pick_device,
    pick_dtype,
)
from engine.models.loading import encode_prompts, load_causal_lm, load_tokenizer, stop_token_ids
from engine.runner.context import StageContext, StageError
from engine.teacher.output import TeacherOutput


@dataclass
class Batch:
    prompts: list[dict[str, Any]]
    answers: list[str]
    new_tokens: int  # generated tokens, up to and including the stop token, padding excluded
    seconds: float


def load_teacher(ctx: StageContext):
    """Model + tokenizer as `teacher.open.model` says, on the stage's device, in eval mode."""
    cfg = ctx.config.teacher.open
    device = pick_device(ctx.config)
    attention, warning = pick_attention(cfg.model.attn_implementation, device)
    if warning:
        ctx.events.log(warning, level="warning")
    if cfg.model.trust_remote_code:
        ctx.events.log(
            "teacher.open.model.trust_remote_code is on: running code from the model repository", level="warning"
        )
    tokenizer = load_tokenizer(
        cfg.model.name,
        key="teacher.open.model.name",
        padding_side=cfg.tokenizer.padding_side,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    # on the one GPU the stage picked, also in one process that sees several: device_map="auto" split the
    # model layer by layer over all of them, each GPU waiting for the one before (slower than one GPU).
    # More GPUs: launch.nproc_per_node (one copy per rank, each answering a shard) or teacher.source vllm.
    model = load_causal_lm(
        cfg.model.name,
        key="teacher.open.model.name",
        dtype=pick_dtype(cfg.model.bfloat16, device),
        attn_implementation=attention,
        trust_remote_code=cfg.model.trust_remote_code,
        device_map={"": device} if device.type == "cuda" else None,
    )
    return model.to(device).eval(), tokenizer


def cleanup_applies(tokenizer) -> bool:
    """Whether `clean_up_tokenization_spaces` changes what this tokenizer decodes. transformers 5 skips it for
    BPE tokenizers (Qwen, StableLM, GPT-2 ...: it would strip real spaces before punctuation) and warns each
    time it is asked; asking only where it applies gives the same text without the warning."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE":
        return True
    return bool(getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))


def chat_texts(
    tokenizer, prompts: list[dict[str, Any]], system_prompt: str | None, add_generation_prompt: bool
) -> list[str]:
    """The prompt each model sees: its own chat template with the TAS system prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return [p["instruction"] for p in prompts]
    texts = []
    for prompt in prompts:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt["instruction"]})
        texts.append(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        )
    return texts


def generation_kwargs(ctx: StageContext, tokenizer, model) -> dict[str, Any]:
    pipe = ctx.config.teacher.open.pipeline
    sample = pipe.do_sample and pipe.temperature > 0
    kwargs: dict[str, Any] = dict(
        max_new_tokens=pipe.max_new_tokens,
        do_sample=sample,
        use_cache=pipe.use_cache,
        eos_token_id=stop_token_ids(tokenizer, model, ctx.config.teacher.open.tokenizer.additional_special_tokens),
        pad_token_id=tokenizer.pad_token_id,
    )
    if sample:
        kwargs.update(temperature=pipe.temperature, top_p=pipe.top_p, top_k=pipe.top_k or None)
    return kwargs


def generate_batches(
    model,
    tokenizer,
    prompts: list[dict[str, Any]],
    texts: list[str],
    batch_size: int,
    gen_kwargs: dict[str, Any],
    sort_by_length: bool = True,
    skip_special_tokens: bool = True,
    clean_up_tokenization_spaces: bool = True,
    on_out_of_memory: Callable[[int, int], None] | None = None,
) -> Iterator[Batch]:
    """Yield answered batches; with `sort_by_length`, longest prompts first.

    A batch that runs out of memory is split: the batch size halves (and stays halved: the longest prompts
    come first, so later batches fit too), `on_out_of_memory(old, new)` is told, and the same prompts are
    generated again in smaller batches — the idea of accelerate's `find_executable_batch_size`. Only a
    single prompt that does not fit is an error (the caller says what to lower).
    """
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = list(range(len(texts)))
    if sort_by_length:
        order.sort(key=lambda i: -lengths[i])
    stop_ids = torch.tensor(gen_kwargs["eos_token_id"] or [-1])

    def answer(chunk: list[int]) -> Batch:
        """The prompts at `chunk` answered in one batch: a frame of its own, so that dropping an out-of-memory
        exception frees the batch's tensors with it."""
        encoded = encode_prompts(tokenizer, [texts[i] for i in chunk], model, gen_kwargs["max_new_tokens"])
        began = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(**encoded, **gen_kwargs)
        seconds = time.perf_counter() - began
        new = output[:, encoded["input_ids"].shape[1] :].cpu()
        answers, counted = [], 0
        for row in new:
            stops = torch.isin(row, stop_ids).nonzero()
            length = int(stops[0]) + 1 if len(stops) else len(row)
            counted += length
            answers.append(
                tokenizer.decode(
                    row[:length],
                    skip_special_tokens=skip_special_tokens,
                    clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                ).strip()
            )
        return Batch([prompts[i] for i in chunk], answers, counted, seconds)

    start = 0
    while start < len(order):
        chunk = order[start : start + batch_size]
        try:
            batch = answer(chunk)
        except Exception as exc:
            if not is_out_of_memory(exc) or batch_size == 1:
                raise
            del exc  # its traceback holds the failed batch's tensors
            free_accelerator_memory()
            old, batch_size = batch_size, max(1, batch_size // 2)
            if on_out_of_memory is not None:
                on_out_of_memory(old, batch_size)
            continue  # the same prompts, in smaller batches
        start += len(chunk)
        yield batch


def answer_open(
    ctx: StageContext, prompts: list[dict[str, Any]], output: TeacherOutput, system_prompt: str | None, progress
) -> dict[str, Any]:
    """Answer `prompts` (this rank's share) into `output`; `progress(n)` reports n more answered."""
    cfg = ctx.config.teacher.open
    model, tokenizer = load_teacher(ctx)
    gen_kwargs = generation_kwargs(ctx, tokenizer, model)
    texts = chat_texts(tokenizer, prompts, system_prompt, cfg.tokenizer.add_generation_prompt)
    ctx.events.log(
        f"{cfg.model.name} on {model.device} ({model.dtype}); {len(prompts)} prompts, "
        f"batch {cfg.pipeline.batch_size}, max_new_tokens {cfg.pipeline.max_new_tokens}, "
        f"KV cache {'on' if cfg.pipeline.use_cache else 'off'}"
    )
    torch.manual_seed(1234 + ctx.rank)
    totals = {"answered": 0, "failed": 0, "tokens": 0, "seconds": 0.0}

    def halved(old: int, new: int) -> None:
        ctx.events.log(
            f"out of memory with a batch of {old} prompts: going on with batches of {new} "
            f"(teacher.open.pipeline.batch_size: {new} fits from the start)",
            level="warning",
        )

    batches = generate_batches(
        model,
        tokenizer,
        prompts,
        texts,
        cfg.pipeline.batch_size,
        gen_kwargs,
        skip_special_tokens=cfg.tokenizer.skip_special_tokens,
        clean_up_tokenization_spaces=cfg.tokenizer.clean_up_tokenization_spaces and cleanup_applies(tokenizer),
        on_out_of_memory=halved,
    )
    step = 0
    while True:
        ctx.check_cancelled()
        try:
            batch = next(batches)
        except StopIteration:
            break
        except Exception as exc:
            if is_out_of_memory(exc):
                raise StageError(
                    f"out of memory generating the answer to a single prompt with teacher.open.pipeline."
                    f"max_new_tokens={cfg.pipeline.max_new_tokens}; lower max_new_tokens, use a smaller or "
                    f"quantized teacher, or more GPUs (answers so far are kept: {totals['answered']} in this run)"
                ) from None
            raise
        step += 1
        records, empty = [], []
        for prompt, answer in zip(batch.prompts, batch.answers):
            if answer:
                records.append(
                    {
                        "id": prompt["id"],
                        "instruction": prompt["instruction"],
                        "output": answer,
                        "model": cfg.model.name,
                    }
                )
            else:
                empty.append(prompt["id"])
        output.append(records)
        totals["answered"] += len(records)
        totals["failed"] += len(empty)
        totals["tokens"] += batch.new_tokens
        totals["seconds"] += batch.seconds
        if empty:
            ctx.events.log(
                f"{len(empty)} empty answers (will be retried next run): {', '.join(empty[:5])}", level="warning"
            )
        progress(len(batch.prompts))
        # the stage's average so far, not the last batch (the last batch is often a short tail)
        ctx.events.metric("tokens_per_s", round(totals["tokens"] / max(totals["seconds"], 1e-9), 2), step=step)
        ctx.events.metric("tokens", totals["tokens"], step=step)
        ctx.events.memory(peak_memory())
    return totals
