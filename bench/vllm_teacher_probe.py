"""Teacher throughput through the managed vLLM server: the number to set beside bench/teacher_throughput.py.

    python bench/vllm_teacher_probe.py                          # tiny teacher, .venv-vllm, CPU
    python bench/vllm_teacher_probe.py --eager                  # no torch.compile: starts faster
    python bench/vllm_teacher_probe.py --model /path/to/model --dtype bfloat16 --vllm-python /venv/bin/python

Starts the server (engine/teacher/vllm_server.py) for the model, sends one warm-up request, then N
chat prompts (the shipped python-instructions, with the teacher's system prompt) at once through
AsyncOpenAI, at most `--concurrency` in flight. Greedy, and `ignore_eos` so every answer is exactly
`--max-tokens` long: runs compare equal work. Server start-up is timed apart and not counted.
Prints one JSON object: tokens_per_s, wall_s, prompts, completion_tokens (+ start-up and settings).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.models.shipped import SHIPPED_DATASETS
from engine.teacher.vllm_server import VllmServer, VllmSettings

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PROMPT = "You are a senior Python developer."


def model_folder(name: str) -> str:
    """A local folder for `name`; `tiny:<name>` is built (in this venv) like the stages build it."""
    if name.startswith("tiny:"):
        from engine.models.tiny import resolve

        return str(resolve(name))
    return name


def load_prompts(count: int) -> list[str]:
    with open(SHIPPED_DATASETS["python-instructions"], encoding="utf-8") as f:
        prompts = [json.loads(line)["instruction"] for line in f if line.strip()]
    return (prompts * (count // len(prompts) + 1))[:count]


async def send_all(base_url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def ask(prompt: str) -> int:
        async with gate:
            reply = await client.chat.completions.create(
                model=model,
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True},  # vLLM's sampling parameter: equal-length answers
            )
            return reply.usage.completion_tokens

    await ask(prompts[0])  # warm-up: the first request pays for lazy initialisation
    began = time.perf_counter()
    tokens = await asyncio.gather(*(ask(p) for p in prompts))
    wall = time.perf_counter() - began
    await client.close()
    total = sum(tokens)
    return {
        "tokens_per_s": round(total / wall, 1),
        "wall_s": round(wall, 3),
        "prompts": len(prompts),
        "completion_tokens": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny:teacher")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--kv-cache-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE (CPU builds)")
    parser.add_argument("--eager", action="store_true", help="--enforce-eager: no torch.compile")
    parser.add_argument("--log", default=None, help="server log (default: a temporary file)")
    args = parser.parse_args()

    settings = VllmSettings(
        model=model_folder(args.model),
        python=args.vllm_python,
        served_model_name="teacher",
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        enforce_eager=args.eager,
        env={"VLLM_CPU_KVCACHE_SPACE": args.kv_cache_gib},
    )
    log = Path(args.log) if args.log else Path(tempfile.mkdtemp(prefix="vllm-probe-")) / "vllm.log"
    began = time.perf_counter()
    with VllmServer(settings).start(log) as server:
        server.wait_healthy(timeout_s=900)
        startup = time.perf_counter() - began
        result = asyncio.run(
            send_all(server.base_url, "teacher", load_prompts(args.prompts), args.max_tokens, args.concurrency)
        )
    result.update(
        startup_s=round(startup, 1),
        model=args.model,
        eager=args.eager,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        log=str(log),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
