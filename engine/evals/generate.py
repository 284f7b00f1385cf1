"""Completions for a code benchmark from a Hugging Face model: batched with the KV cache, left padding.

Heavy module (torch), used by the eval stage. The prompt format follows the model: a chat model gets the
chat template and its reply is read back with `extract_code`; a base model continues the prompt and is
cut at HumanEval's stop sequences. What comes out is scored by engine.evals.code in the sandbox.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.config.schema import CodeEvalConfig
from engine.evals.code import chat_messages, extract_code, truncate_completion
from engine.models.loading import encode_prompts, max_positions, stop_token_ids


def prompt_format(tokenizer, wanted: str) -> str:
    if wanted != "auto":
        return wanted
    return "chat" if getattr(tokenizer, "chat_template", None) else "base"


def prompt_text(tokenizer, problem: dict, fmt: str, system: str | None) -> str:
    if fmt == "chat":
        return tokenizer.apply_chat_template(chat_messages(problem, system), tokenize=False, add_generation_prompt=True)
    return problem["prompt"]


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    problems: dict[str, dict],
    cfg: CodeEvalConfig,
    system: str | None,
    on_progress: Callable[[int], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
) -> list[dict]:
    """One record {"task_id", "completion", "raw"} per sample (n_samples per problem), in problem order."""
    fmt = prompt_format(tokenizer, cfg.prompt_format)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = max_positions(model)
    sampled = cfg.n_samples > 1
    kwargs = {
        "max_new_tokens": min(cfg.max_new_tokens, limit - 1),
        "do_sample": sampled,
        "num_return_sequences": cfg.n_samples,
        "pad_token_id": tokenizer.pad_token_id,
        "use_cache": True,
        "eos_token_id": stop_token_ids(tokenizer, model),
    }  # a chat reply ends with its turn (<|im_end|>)
    if sampled:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    items = list(problems.values())
    # longest prompts first: similar lengths share a batch, and an out-of-memory shows up at once
    items.sort(key=lambda p: -len(p["prompt"]))
    out: dict[str, list[dict]] = {}
    for start in range(0, len(items), cfg.batch_size):
        if check_cancelled:
            check_cancelled()
        batch = items[start : start + cfg.batch_size]
        texts = [prompt_text(tokenizer, p, fmt, system) for p in batch]
        tokenizer.truncation_side = "left"  # keep the end of an over-long prompt: the signature to complete
        encoded = encode_prompts(tokenizer, texts, model, cfg.max_new_tokens, add_special_tokens=fmt == "base")
        generated = model.generate(**encoded, **kwargs)
        new_tokens = generated[:, encoded["input_ids"].shape[1] :]
        replies = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for index, reply in enumerate(replies):
            problem = batch[index // cfg.n_samples]
            if fmt == "chat":
                completion = extract_code(reply, problem["prompt"], problem["entry_point"])
            else:
                completion = truncate_completion(reply)
            out.setdefault(problem["task_id"], []).append(
                {"task_id": problem["task_id"], "completion": completion, "raw": reply}
            )
        if on_progress:
            on_progress(min(start + cfg.batch_size, len(items)))
    return [record for task_id in problems for record in out.get(task_id, [])]
