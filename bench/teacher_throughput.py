"""Teacher generation throughput: this stage's loop vs the original TAS loop, same model and prompts.

    python bench/teacher_throughput.py                      # tiny teacher, CPU, shipped prompts
    python bench/teacher_throughput.py --model Qwen/Qwen2.5-Coder-1.5B-Instruct --device cuda --batch-size 64

"stage": KV cache on, batches sorted by prompt length, stop at EOS (engine/teacher_open.py).
"seed-style": KV cache off (TAS `use_cache: False`), batches in file order; otherwise identical
(greedy decoding, same max_new_tokens, batch size, prompts). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from engine.models.loading import load_causal_lm, load_tokenizer
from engine.models.shipped import SHIPPED_DATASETS
from engine.teacher.open import chat_texts, generate_batches, stop_token_ids


def measure(model, tokenizer, prompts, texts, batch_size, kwargs, sort_by_length) -> dict:
    began = time.perf_counter()
    tokens = 0
    for batch in generate_batches(model, tokenizer, prompts, texts, batch_size, kwargs, sort_by_length=sort_by_length):
        tokens += batch.new_tokens
    seconds = time.perf_counter() - began
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny:teacher")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.model, padding_side="left")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = load_causal_lm(args.model, dtype=dtype).to(args.device).eval()
    with open(SHIPPED_DATASETS["python-instructions"], encoding="utf-8") as f:
        prompts = [dict(json.loads(line), id=str(i)) for i, line in enumerate(f)][: args.prompts]
    texts = chat_texts(tokenizer, prompts, "You are a senior Python developer.", True)
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        eos_token_id=stop_token_ids(tokenizer, model, ["<|im_end|>"]),
        pad_token_id=tokenizer.pad_token_id,
    )
    measure(model, tokenizer, prompts[:4], texts[:4], 4, dict(kwargs, use_cache=True), True)  # warm-up
    stage = measure(model, tokenizer, prompts, texts, args.batch_size, dict(kwargs, use_cache=True), True)
    seed = measure(model, tokenizer, prompts, texts, args.batch_size, dict(kwargs, use_cache=False), False)
    print(json.dumps({
        "model": args.model,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "stage": stage,
        "seed_style": seed,
        "speedup": round(stage["tokens_per_s"] / seed["tokens_per_s"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
