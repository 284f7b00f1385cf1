"""Teacher throughput through vLLM: the managed server (what `teacher.source: vllm` asks) against vLLM's own
offline `LLM.chat`, same model, prompts and sampling. The numbers to set beside bench/teacher_throughput.py.

    python bench/vllm_teacher_probe.py                          # both, tiny teacher, .venv-vllm, CPU
    python bench/vllm_teacher_probe.py --only server --eager    # no torch.compile: starts faster
    python bench/vllm_teacher_probe.py --model /path/to/model --dtype bfloat16 --vllm-python /venv/bin/python

server: started by engine/teacher/vllm_server.py as the teacher stage starts it (`--max-num-seqs`), then
N chat prompts (the shipped python-instructions, with the teacher's system prompt) through AsyncOpenAI,
`--in-flight` requests at once (default: the stage's, max_num_seqs), a new one as soon as one ends.
offline: the vLLM venv's python runs this file with `--offline-worker`: `LLM(...)` with the same engine
settings, then one `LLM.chat` over the same conversations.
Both greedy, and `ignore_eos` so every answer is exactly `--max-tokens` long: runs compare equal work.
Start-up and one untimed full round (lazy initialisation, the batch shapes' first runs) are not counted; each path is then timed `--repeat` times.
Prints one JSON object: per path the tokens/s of each repeat and their median, start-up seconds, and
`vllm_server_vs_offline`, the ratio of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PROMPT = "You are a senior Python developer."


def conversations(count: int) -> list[list[dict]]:
    from engine.models.shipped import SHIPPED_DATASETS

    with open(SHIPPED_DATASETS["python-instructions"], encoding="utf-8") as f:
        prompts = [json.loads(line)["instruction"] for line in f if line.strip()]
    prompts = (prompts * (count // len(prompts) + 1))[:count]
    return [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p}] for p in prompts]


def model_folder(name: str) -> str:
    """A local folder for `name`; `tiny:<name>` is built (in this venv) like the stages build it."""
    if name.startswith("tiny:"):
        from engine.models.tiny import resolve

        return str(resolve(name))
    return name


def settings_of(args: argparse.Namespace):
    from engine.teacher.vllm_server import VllmSettings

    return VllmSettings(
        model=model_folder(args.model),
        python=args.vllm_python,
        served_model_name="teacher",
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        enforce_eager=args.eager,
        env={"VLLM_CPU_KVCACHE_SPACE": args.kv_cache_gib},
    )


def summary(rates: list[float], tokens: int, startup_s: float) -> dict:
    return {
        "tokens_per_s": round(statistics.median(rates), 1),
        "repeats": [round(rate, 1) for rate in rates],
        "completion_tokens": tokens,
        "startup_s": round(startup_s, 1),
    }


# ------------------------------------------------------------------------------------------- server


async def send_all(base_url: str, chats: list[list[dict]], args: argparse.Namespace) -> dict:
    from openai import AsyncOpenAI

    # the stage's client: no retries needed here, one connection pool, no streaming
    client = AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(args.in_flight or args.max_num_seqs)

    async def ask(messages: list[dict]) -> int:
        async with gate:
            reply = await client.chat.completions.create(
                model="teacher",
                messages=messages,
                max_tokens=args.max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True},  # vLLM's sampling parameter: equal-length answers
            )
            return reply.usage.completion_tokens

    async def round_(batch: list[list[dict]]) -> tuple[int, float]:
        began = time.perf_counter()
        tokens = sum(await asyncio.gather(*(ask(messages) for messages in batch)))
        return tokens, tokens / (time.perf_counter() - began)

    await round_(chats)  # warm-up
    rounds = [await round_(chats) for _ in range(args.repeat)]
    await client.close()
    return {"rates": [rate for _, rate in rounds], "tokens": rounds[0][0]}


def measure_server(args: argparse.Namespace, chats: list[list[dict]], log: Path) -> dict:
    from engine.teacher.vllm_server import VllmServer

    began = time.perf_counter()
    with VllmServer(settings_of(args)).start(log) as server:
        server.wait_healthy(timeout_s=900)
        startup = time.perf_counter() - began
        done = asyncio.run(send_all(server.base_url, chats, args))
    return dict(summary(done["rates"], done["tokens"], startup), in_flight=args.in_flight or args.max_num_seqs)


# ------------------------------------------------------------------------------------------ offline


def measure_offline(args: argparse.Namespace, chats: list[list[dict]], log: Path) -> dict:
    """Run this file with the vLLM venv's python (`--offline-worker`), the server's environment and settings."""
    from engine.teacher.vllm_server import server_env

    settings = settings_of(args)
    spec = {
        "model": settings.model,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "enforce_eager": args.eager,
        "max_tokens": args.max_tokens,
        "repeat": args.repeat,
        "chats": chats,
    }
    spec_file, result_file = log.with_name("offline-spec.json"), log.with_name("offline-result.json")
    spec_file.write_text(json.dumps(dict(spec, result=str(result_file))))
    with open(log, "ab") as out:  # vLLM logs to stdout, from several processes: the result goes to a file
        done = subprocess.run(
            [args.vllm_python, __file__, "--offline-worker", str(spec_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=server_env(settings),
        )
    if done.returncode != 0:
        raise SystemExit(f"the offline vLLM run failed (exit code {done.returncode}); see {log}")
    result = json.loads(result_file.read_text())
    return summary(result["rates"], result["tokens"], result["startup_s"])


def offline_worker(spec_file: str) -> None:
    """In the vLLM venv (vllm and the standard library only): LLM.chat, warm-up first, then timed rounds."""
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_file).read_text())
    chats = spec["chats"]
    began = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        max_num_seqs=spec["max_num_seqs"],
        enforce_eager=spec["enforce_eager"],
    )
    startup = time.perf_counter() - began
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    llm.chat(chats, params, use_tqdm=False)  # warm-up
    rates, tokens = [], 0
    for _ in range(spec["repeat"]):
        began = time.perf_counter()
        outputs = llm.chat(chats, params, use_tqdm=False)
        tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
        rates.append(tokens / (time.perf_counter() - began))
    Path(spec["result"]).write_text(json.dumps({"rates": rates, "tokens": tokens, "startup_s": startup}))


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    if sys.argv[1:2] == ["--offline-worker"]:
        return offline_worker(sys.argv[2])
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny:teacher")
    parser.add_argument(
        "--vllm-python", default=os.environ.get("TAS_VLLM_PYTHON") or str(ROOT / ".venv-vllm/bin/python")
    )
    parser.add_argument("--only", choices=["server", "offline"], default=None, help="measure one path only")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256, help="as teacher.vllm.max_num_seqs")
    parser.add_argument("--in-flight", type=int, default=None, help="requests at once (default: max_num_seqs)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds per path")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--kv-cache-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE (CPU builds)")
    parser.add_argument("--eager", action="store_true", help="--enforce-eager: no torch.compile")
    parser.add_argument("--log-dir", default=None, help="where the vLLM logs go (default: a temporary folder)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    chats = conversations(args.prompts)
    logs = Path(args.log_dir or tempfile.mkdtemp(prefix="vllm-probe-"))
    logs.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": args.model, "prompts": len(chats), "max_tokens": args.max_tokens, "eager": args.eager}
    if args.only in (None, "offline"):
        result["offline"] = measure_offline(args, chats, logs / "offline.log")
    if args.only in (None, "server"):
        result["server"] = measure_server(args, chats, logs / "server.log")
    if args.only is None:
        ratio = result["server"]["tokens_per_s"] / result["offline"]["tokens_per_s"]
        result["vllm_server_vs_offline"] = round(ratio, 2)
    result["logs"] = str(logs)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
