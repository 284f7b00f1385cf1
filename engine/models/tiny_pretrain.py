"""Pretraining of the tiny models on tiny-python's `pretrain` split, when the tiny cache is built.

Heavy module (torch): called from engine.models.tiny (`build_pretrained`), never by a stage.

* The teacher (`chat_examples`) is trained from its random initialisation as an instruction-tuned model
  is: every pretrain problem in every phrasing, in its own chat template, the loss on the answer only;
  3 in 5 examples have no system prompt, the others one of `SYSTEM_PROMPTS`, so it answers the same way
  whatever system prompt a run's `prompts.path` gives it.
* The assistant and the student (`plain_examples`) are trained as *base* code models: the same functions
  as source files and Markdown snippets, never a chat turn.

Everything is fixed by the seed (the batches, the initialisation, the dropout-free model) and the step
count, never by the clock, so two builds on one machine give the same weights (tests check ids and logits).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import torch

# The system prompts a tiny run meets, drawn for each example: none (3 in 5), TAS's Teacher prompt (from its
# prompt.yaml; 90 tokens, which is why it is not more often: it triples an example's length) and its Assistant
# prompt. The teacher learns to answer the request whatever the system prompt says.
SYSTEM_PROMPTS = (
    None,
    None,
    None,
    "You are a senior Python developer skilled at writing comprehensive docstrings following the Google Python "
    "Style Guide. Your task is to add clear, precise, and professional Google-style docstrings to the provided "
    "Python code.",
    "You are a senior Python developer.",
)


def chat_examples(tokenizer, pairs: list[tuple[str, str]], seed: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per pair: the prompt in the model's chat template, masked (-100), then the answer
    and the end of turn, tokenized apart as the model will generate them after the prompt."""
    rng = random.Random(seed)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    examples = []
    for instruction, answer in pairs:
        system = rng.choice(SYSTEM_PROMPTS)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": instruction}
        ]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_of_turn]
        examples.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    return examples


def _batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (input_ids, label_ids) in enumerate(examples):
        ids[row, : len(input_ids)] = torch.tensor(input_ids)
        labels[row, : len(label_ids)] = torch.tensor(label_ids)
        mask[row, : len(input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _length_grouped_batches(examples: list, batch_size: int, order: torch.Generator) -> list[list[int]]:
    """One epoch of batches, as `group_by_length` does in HF Trainer: shuffle, sort each run of 16 batches by
    length, cut it into batches, shuffle the batches. Padding is then to similar lengths: a batch holding one
    long system prompt no longer pads 31 short examples to its length (twice the compute)."""
    permutation = torch.randperm(len(examples), generator=order).tolist()
    mega = 16 * batch_size
    batches = []
    for start in range(0, len(permutation), mega):
        chunk = sorted(permutation[start : start + mega], key=lambda i: len(examples[i][0]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=order).tolist()]


def plain_examples(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per pair as a *base* code model sees code in its pretraining data, the loss on
    every token: every other pair as a source file (the request as a comment above the function), the
    others as a Markdown snippet (the request, then the function in a ```python block), each ended by the
    tokenizer's EOS. Such a model writes the function after a comment or a sentence, but has never seen a
    chat turn: answering in one is what it learns from the teacher's answers.

    Why the Markdown and the EOS (`<|im_end|>`, which also ends a chat turn): SFT trains LoRA adapters, and
    the embeddings stay frozen. A token the base model never saw keeps an untrained, near-zero row, so the
    tuned assistant can rank it first but never give it more than ~1% probability — and that flat
    distribution is what KD would then teach the student at every fence and end of turn."""
    examples = []
    for index, (instruction, answer) in enumerate(pairs):
        if index % 2:
            text = f"{instruction}\n\n{answer}"
        else:
            text = f"# {instruction}\n" + answer.removeprefix("```python\n").removesuffix("```")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((ids, list(ids)))
    return examples


def pretrain(
    model,
    tokenizer,
    examples: list[tuple[list[int], list[int]]],
    *,
    steps: int,
    seed: int,
    batch_size: int = 16,
    learning_rate: float = 2e-3,
    warmup: int = 30,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train `model` in place on `examples` for `steps` AdamW steps (linear warmup, then cosine decay to a
    tenth of `learning_rate`). Returns the last loss and the seconds it took."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    started = time.perf_counter()
    loss = float("nan")
    batches: list[list[int]] = []
    for step in range(steps):
        if not batches:
            batches = _length_grouped_batches(examples, batch_size, order)
        batch = _batch([examples[i] for i in batches.pop()], pad_id)
        output = model(**batch)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss = output.loss.item()
        if on_step:
            on_step(step, loss)
    model.eval()
    return {"loss": loss, "seconds": time.perf_counter() - started, "examples": len(examples)}
