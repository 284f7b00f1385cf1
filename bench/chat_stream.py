"""Chat streaming: the panel's path (ChatClient → worker subprocess → JSON lines) vs in-process generation.

    python bench/chat_stream.py                       # tiny:student, CPU
    python bench/chat_stream.py --model tiny:assistant --max-new-tokens 256 --reps 7
    python bench/chat_stream.py --model Qwen/Qwen2.5-Coder-1.5B-Instruct --device cuda

Same model, prompt (system + user, chat template), greedy decoding and exactly max_new_tokens new tokens
(min_new_tokens = max_new_tokens, so an early EOS cannot make one path look faster) on every path:

* "panel": ChatClient.generate → engine.chat.worker worker → token replies read back by the client. Times are
  taken in this process, as the panel sees them: ttft = generate() call → first token reply;
  decode tokens/s = (tokens - 1) / (last token reply - first token reply); total tokens/s = tokens /
  (generate() → end reply). The worker's own figures (its `end` reply) are reported alongside.
* "raw_generate": model.generate in this process, no streamer. ttft is a 1-token generate (prefill +
  first token); total tokens/s = tokens / generate time.
* "inprocess_streamer": model.generate in a thread with a TextIteratorStreamer, read in this thread
  (the transformers streaming recipe); timed like the panel path.

CPU time per token is reported beside the rates (worker process and this process for the panel path, this
process for raw generate): on a shared machine it varies much less than wall-clock rates, and
`panel_vs_raw.cpu_per_token_ratio` (raw / worker, both per token) is the share of the worker's CPU that goes
to generating.

Both copies use the same number of torch CPU threads (engine.chat.worker.cpu_threads(): all cores but one
unless $OMP_NUM_THREADS says otherwise). Both copies of the model stay loaded; each repetition runs the
three paths one after the other (only one computes at a time, in an order that rotates), so a slow patch
of a shared machine hits all alike. Medians over --reps rounds after one warm-up round; `paired_total_tokens_per_s_ratio` is the median of the per-round ratios (the
two paths of one round run within a second of each other: a load that drifts between rounds cancels out).
Prints one JSON object; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.chat.client import ChatClient  # light: no torch yet
from engine.chat.protocol import EndReply, TokenReply, make_params

MESSAGES = [
    {"role": "system", "content": "You are a senior Python developer."},
    {"role": "user", "content": "Write a Python function that merges two sorted lists, with a docstring."},
]


def process_cpu_s(pid: int) -> float:
    """CPU seconds of a process, all its threads: the scheduler's nanosecond count (Linux), else psutil's
    (clock-tick resolution)."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        import psutil

        times = psutil.Process(pid).cpu_times()
        return times.user + times.system


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def medians(runs: list[dict], keys: tuple[str, ...]) -> dict:
    return {key: median([r[key] for r in runs]) for key in keys}


class PanelPath:
    """ChatClient → engine.chat.worker worker subprocess → token replies, timed in this process."""

    def __init__(self, model: str, device: str, max_new: int):
        self.client = ChatClient(model, device=device)
        spawned = time.perf_counter()
        self.client.start()
        self.ready = self.client.wait_ready(timeout=600)
        self.startup_s = time.perf_counter() - spawned
        self.params = make_params(temperature=0.0, max_new_tokens=max_new, min_new_tokens=max_new)

    def once(self) -> dict:
        worker_pid = self.client.process.pid
        worker_cpu0, client_cpu0 = process_cpu_s(worker_pid), time.process_time()
        t0 = time.perf_counter()
        rid = self.client.generate(MESSAGES, self.params)
        first = last = None
        pieces = 0
        while True:
            reply = self.client.next_reply(timeout=600)
            now = time.perf_counter()
            if getattr(reply, "id", None) != rid:
                continue
            if isinstance(reply, TokenReply):
                first = first or now
                last = now
                pieces += 1
            elif isinstance(reply, EndReply):
                break
            else:
                raise RuntimeError(reply)
        tokens = reply.tokens
        worker_cpu, client_cpu = process_cpu_s(worker_pid) - worker_cpu0, time.process_time() - client_cpu0
        return {
            "tokens": tokens,
            "token_replies": pieces,
            "worker_cpu_ms_per_token": 1000 * worker_cpu / tokens,
            "client_cpu_ms_per_token": 1000 * client_cpu / tokens,
            "ttft_s": first - t0,
            "decode_tokens_per_s": (tokens - 1) / (last - first) if tokens > 1 and last > first else None,
            "total_tokens_per_s": tokens / (now - t0),
            "worker_ttft_s": reply.ttft_s,
            "worker_tokens_per_s": reply.tokens_per_s,
        }


class InProcess:
    """The same model loaded here: plain model.generate, and generate + TextIteratorStreamer in a thread."""

    def __init__(self, model_name: str, device: str, max_new: int):
        import torch

        from engine.chat.worker import load_model, render_prompt

        self.torch = torch
        self.loaded = load_model(model_name, None, device)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.inputs = {k: v.to(self.loaded.device) for k, v in render_prompt(self.loaded, MESSAGES).items()}
        self.prompt_len = int(self.inputs["input_ids"].shape[1])
        self.kwargs = dict(
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def _sync(self) -> None:
        if self.loaded.device.type == "cuda":
            self.torch.cuda.synchronize()

    def raw_once(self) -> dict:
        with self.torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            self.model.generate(**self.inputs, **dict(self.kwargs, max_new_tokens=1, min_new_tokens=1))
            self._sync()
            t1 = time.perf_counter()
            cpu1 = time.process_time()
            out = self.model.generate(**self.inputs, **self.kwargs)
            self._sync()
            t2 = time.perf_counter()
            cpu2 = time.process_time()
        tokens = int(out.shape[1]) - self.prompt_len
        return {
            "tokens": tokens,
            "ttft_s": t1 - t0,
            "total_tokens_per_s": tokens / (t2 - t1),
            "cpu_ms_per_token": 1000 * (cpu2 - cpu1) / tokens,
        }

    def streamer_once(self) -> dict:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result = {}

        def run():
            with self.torch.inference_mode():
                result["out"] = self.model.generate(**self.inputs, **self.kwargs, streamer=streamer)

        t0 = time.perf_counter()
        thread = threading.Thread(target=run)
        thread.start()
        first = last = None
        pieces = 0
        for text in streamer:
            now = time.perf_counter()
            if text:
                first = first or now
                last = now
                pieces += 1
        thread.join()
        t_end = time.perf_counter()
        tokens = int(result["out"].shape[1]) - self.prompt_len
        return {
            "tokens": tokens,
            "text_pieces": pieces,
            "ttft_s": first - t0,
            "decode_tokens_per_s": (tokens - 1) / (last - first),
            "total_tokens_per_s": tokens / (t_end - t0),
        }

    def env(self) -> dict:
        return {
            "device": str(self.loaded.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "torch": self.torch.__version__,
            "torch_threads": self.torch.get_num_threads(),
            "prompt_tokens": self.prompt_len,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:student")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()

    # the worker starts first (it loads while this process does), then the paths take turns each
    # repetition, so a slow patch of a shared machine hits all three alike; one warm-up round
    path = PanelPath(args.model, args.device, args.max_new_tokens)
    local = InProcess(args.model, args.device, args.max_new_tokens)
    runs: dict[str, list[dict]] = {"panel": [], "raw": [], "streamer": []}
    try:
        paths = [("panel", path.once), ("raw", local.raw_once), ("streamer", local.streamer_once)]
        for rep in range(args.reps + 1):
            # a rotating order: each path follows each other one as often (a small model's weights stay in the
            # CPU caches, warm for the path that runs after its own copy)
            for name, once in paths[rep % 3 :] + paths[: rep % 3]:
                result = once()
                if rep:
                    runs[name].append(result)
    finally:
        path.client.close()
    panel = {
        "startup_s": round(path.startup_s, 3),
        "worker_load_s": path.ready.load_s,
        "worker_threads": path.ready.threads,
        "tokens": runs["panel"][0]["tokens"],
        "token_replies": runs["panel"][0]["token_replies"],
        **medians(
            runs["panel"],
            (
                "ttft_s",
                "decode_tokens_per_s",
                "total_tokens_per_s",
                "worker_ttft_s",
                "worker_tokens_per_s",
                "worker_cpu_ms_per_token",
                "client_cpu_ms_per_token",
            ),
        ),
    }
    raw = {
        "tokens": runs["raw"][0]["tokens"],
        **medians(runs["raw"], ("ttft_s", "total_tokens_per_s", "cpu_ms_per_token")),
    }
    streamer = {
        "tokens": runs["streamer"][0]["tokens"],
        "text_pieces": runs["streamer"][0]["text_pieces"],
        **medians(runs["streamer"], ("ttft_s", "decode_tokens_per_s", "total_tokens_per_s")),
    }
    env = local.env()
    result = {
        "model": args.model,
        "max_new_tokens": args.max_new_tokens,
        "reps": args.reps,
        "decoding": "greedy",
        **env,
        "cpu_count": os.cpu_count(),
        "panel": panel,
        "raw_generate": raw,
        "inprocess_streamer": streamer,
        "panel_vs_raw": {
            "total_tokens_per_s_ratio": round(panel["total_tokens_per_s"] / raw["total_tokens_per_s"], 3),
            "paired_total_tokens_per_s_ratio": median(
                [p["total_tokens_per_s"] / r["total_tokens_per_s"] for p, r in zip(runs["panel"], runs["raw"])]
            ),
            "ttft_extra_s": round(panel["ttft_s"] - raw["ttft_s"], 4),
            "cpu_per_token_ratio": round(raw["cpu_ms_per_token"] / panel["worker_cpu_ms_per_token"], 3),
        },
        "panel_vs_streamer": {
            "decode_tokens_per_s_ratio": round(panel["decode_tokens_per_s"] / streamer["decode_tokens_per_s"], 3),
            "ttft_extra_s": round(panel["ttft_s"] - streamer["ttft_s"], 4),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
