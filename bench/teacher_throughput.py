"""Teacher generation throughput: our HF loop vs the original TAS loop vs the vLLM server vs vLLM offline,
same model, prompts and token counts.

    python bench/teacher_throughput.py                      # tiny teacher, CPU, shipped prompts
    python bench/teacher_throughput.py --vllm               # also the vLLM paths (the vLLM venv), with the ratios
    python bench/teacher_throughput.py --model Qwen/Qwen2.5-Coder-1.5B-Instruct --device cuda --batch-size 64

"stage": KV cache on, batches sorted by prompt length (engine/teacher/open.py).
"seed-style": KV cache off (TAS `use_cache: False`), batches in file order; otherwise identical.
"vllm" (--vllm): bench/vllm_teacher_probe.py, in its own process: the managed vLLM server of
`teacher.source: vllm` ("server", as many requests in flight as the stage keeps) and vLLM's own offline
`LLM.chat` in the vLLM venv ("offline"), start-up not counted; `vllm_server_vs_offline` is the ratio of
their medians over --vllm-repeat rounds.
Every path does the same work: greedy, exactly --max-new-tokens new tokens per prompt (HF: min_new_tokens;
vLLM: ignore_eos), so an early EOS cannot make one path look faster. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from engine.models.loading import load_causal_lm, load_tokenizer, stop_token_ids
from engine.models.shipped import SHIPPED_DATASETS
from engine.teacher.open import chat_texts, generate_batches


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
    parser.add_argument("--vllm", action="store_true", help="also measure the vLLM server path")
    parser.add_argument("--vllm-python", default=None, help="python of the vLLM venv (default: the probe's)")
    parser.add_argument("--vllm-repeat", type=int, default=3, help="timed rounds per vLLM path")
    parser.add_argument("--skip-seed", action="store_true", help="skip the (slow) seed-style loop")
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
        min_new_tokens=args.max_new_tokens,  # equal work on every path (vLLM: ignore_eos)
        do_sample=False,
        eos_token_id=stop_token_ids(tokenizer, model, ["<|im_end|>"]),
        pad_token_id=tokenizer.pad_token_id,
    )
    measure(model, tokenizer, prompts[:4], texts[:4], 4, dict(kwargs, use_cache=True), True)  # warm-up
    stage = measure(model, tokenizer, prompts, texts, args.batch_size, dict(kwargs, use_cache=True), True)
    seed = (
        None
        if args.skip_seed
        else measure(model, tokenizer, prompts, texts, args.batch_size, dict(kwargs, use_cache=False), False)
    )
    result = {
        "model": args.model,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "stage": stage,
        "seed_style": seed,
        "speedup": round(stage["tokens_per_s"] / seed["tokens_per_s"], 2) if seed else None,
    }
    if args.vllm:
        del model  # the server gets the memory (and, on CPU, the cores) to itself
        vllm = measure_vllm(args)
        result["vllm"] = vllm
        if "server" in vllm:
            result["vllm_vs_stage"] = round(vllm["server"]["tokens_per_s"] / stage["tokens_per_s"], 2)
            result["vllm_offline_vs_stage"] = round(vllm["offline"]["tokens_per_s"] / stage["tokens_per_s"], 2)
            result["vllm_server_vs_offline"] = vllm["vllm_server_vs_offline"]
    print(json.dumps(result, indent=2))


def measure_vllm(args: argparse.Namespace) -> dict:
    """The vLLM paths, measured in their own processes by the probe (server, then offline)."""
    command = [
        sys.executable,
        str(Path(__file__).with_name("vllm_teacher_probe.py")),
        "--model",
        args.model,
        "--prompts",
        str(args.prompts),
        "--max-tokens",
        str(args.max_new_tokens),
        "--repeat",
        str(args.vllm_repeat),
    ]
    if args.vllm_python:
        command += ["--vllm-python", args.vllm_python]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
