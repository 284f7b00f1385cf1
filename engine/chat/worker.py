"""The chat worker: holds one model and streams its replies over stdin/stdout JSON lines.

    python -m engine.chat.worker --model NAME [--adapter PATH] [--device auto|cpu|cuda]

Heavy module (torch, transformers, peft): it runs only in its own process, spawned by
engine.chat.client.ChatClient (the panel's Chat tab and `tas chat`).

`NAME` is a hub id, a local model folder or `tiny:<name>`; `--adapter` puts a PEFT (LoRA) adapter folder
on top of it. The model is loaded once, then the worker prints

    {"kind": "ready", "model", "adapter", "device", "dtype", "context", "template", "load_s", "threads", "pid"}

and serves requests, one JSON object per stdin line:

    {"op": "generate", "id": "r1", "messages": [{"role", "content"}, ...], "params": {...}}
    {"op": "stop", "id": "r1"}        (no id: stop whatever runs or waits)
    {"op": "load", "model": NAME, "adapter": PATH or null}

Replies, one JSON object per stdout line, flushed, each with `kind`:

    {"kind": "token", "id", "text"}                       a piece of the reply as soon as it decodes
    {"kind": "end", "id", "tokens", "ttft_s", "tokens_per_s", "elapsed_s", "prompt_tokens",
     "stopped", "finish"}                                  finish: stop (EOS) / length / stopped
    {"kind": "ready", ...}                                 again after each successful `load`
    {"kind": "error", "id"?, "message", "fatal"?}           `fatal`: the worker exits after it

A `generate` always ends with exactly one `end` or one `error` carrying its id. Requests run one at a
time in arrival order (a `load` waits for the generation before it); `stop` acts at once: the running
generation ends at the next token (a StoppingCriteria reads a flag the stdin thread sets) and still
sends `end` with `"stopped": true`; a waiting one ends without running. A stop for an id that already
ended is ignored (it crossed the `end` on the wire).

Times: `ttft_s` runs from the moment the worker starts the request (chat template, prefill) to the
first generated token; `tokens_per_s` is the decode rate after it, (tokens - 1) / (last - first token);
`elapsed_s` is the whole request.

`params` (all optional): temperature (0 means greedy), top_p, top_k, max_new_tokens, min_new_tokens (no
EOS before), do_sample, repetition_penalty, seed (reproducible sampling). max_new_tokens is capped to
what fits in the model's context after the prompt.

Every failure is an `error` line with a sentence a person can act on: an unloadable model at startup
is a fatal error followed by exit code 2; a bad request, an out-of-memory or a failed `load` (the old
model stays) leave the worker serving. Anything else a library prints goes to stderr, never into the
protocol channel.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

EXIT_BAD_MODEL = 2
PARAM_KEYS = {"temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens", "do_sample",
              "repetition_penalty", "seed"}
DEFAULT_MAX_NEW_TOKENS = 512


class RequestError(ValueError):
    """A request the worker cannot serve as sent; the message says what to change."""


# --------------------------------------------------------------------------------------------- output


class Channel:
    """The protocol channel: JSON lines on the real stdout, one writer at a time, flushed each line."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.lock = threading.Lock()

    def send(self, kind: str, **fields: Any) -> None:
        if fields.get("id", "") is None:  # an error about a request whose id is unknown
            del fields["id"]
        line = json.dumps({"kind": kind, **fields}, ensure_ascii=False)
        with self.lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):  # the client is gone; the stdin EOF ends us
                pass


def protocol_channel() -> Channel:
    """Keep fd 1 for the protocol only: stray prints of any library go to stderr (the client's log)."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return Channel(out)


# ----------------------------------------------------------------------------------------------- model


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    name: str
    adapter: str | None
    device: Any
    context: int | None
    template: str  # "chat" (the tokenizer's own) or "fallback" (plain role: text transcript)
    load_s: float

    def ready_fields(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "adapter": self.adapter,
            "device": str(self.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "context": self.context,
            "template": self.template,
            "load_s": round(self.load_s, 3),
            "threads": _torch_threads(),
            "pid": os.getpid(),
        }


def cpu_threads() -> int:
    """Torch threads for CPU generation: $OMP_NUM_THREADS when set, else every usable core but one.

    The panel (or terminal) that renders the stream runs beside the worker; with every core taken, torch's
    spinning OpenMP threads and the renderer fight over the CPU, and a small model decodes 10x slower on a
    2-core machine (bench/chat_stream.py).
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def load_model(name: str, adapter: str | None, device_name: str) -> Loaded:
    """The model (+ adapter) on its device, in eval mode, with a tokenizer that can render a chat."""
    from engine.models.loading import ModelNotFound, resolve_model_path

    start = time.perf_counter()
    adapter_path = None
    if adapter:  # cheap checks first: a wrong path fails before torch is even imported
        adapter_path = Path(adapter).expanduser()
        if not (adapter_path / "adapter_config.json").exists():
            raise ModelNotFound(f"{adapter}: no PEFT adapter there (no adapter_config.json)")
    resolve_model_path(name)

    import torch

    from engine.models.loading import load_causal_lm, load_tokenizer
    from engine.models.device import select_device

    device = select_device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    # the checkpoint's own dtype (bf16 / fp16 for most hub models; fp16 on a CPU is slow: fp32), weights
    # loaded straight onto the GPU rather than through host memory
    model = load_causal_lm(name, key="model", dtype="auto", device_map={"": device} if device.type == "cuda" else None)
    if device.type == "cpu" and model.dtype == torch.float16:
        model = model.float()
    tokenizer = None
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path))
        if (adapter_path / "tokenizer_config.json").exists():  # the sft stage saves its tokenizer there
            tokenizer = load_tokenizer(str(adapter_path), key="adapter")
    if tokenizer is None:
        tokenizer = load_tokenizer(name, key="model")
    model.to(device)
    model.eval().requires_grad_(False)
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None)
    template = "chat" if getattr(tokenizer, "chat_template", None) else "fallback"
    return Loaded(model, tokenizer, name, str(adapter_path) if adapter_path else None, device, context, template,
                  time.perf_counter() - start)


def render_prompt(loaded: Loaded, messages: list[dict[str, str]]):
    """input_ids and attention_mask of the conversation, ending with the assistant's turn."""
    tokenizer = loaded.tokenizer
    if loaded.template == "chat":
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    else:  # a base model without a chat template: a plain transcript it can continue
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
        enc = tokenizer(text, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# -------------------------------------------------------------------------------------------- requests


@dataclass
class Job:
    op: str
    id: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    adapter: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    cut: bool = False  # the stop flag actually ended the generation (not a stop that came after the end)


def parse_request(line: str) -> Job:
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RequestError(f"not a JSON object: {exc.msg} at column {exc.colno}") from None
    if not isinstance(request, dict):
        raise RequestError(f"a request is a JSON object, not {type(request).__name__}")
    op = request.get("op")
    rid = request.get("id")
    if rid is not None and not isinstance(rid, (str, int)):
        raise RequestError("`id` must be a string")
    rid = None if rid is None else str(rid)
    if op == "generate":
        if rid is None:
            raise RequestError("generate needs an `id` (replies carry it)")
        return Job("generate", rid, messages=check_messages(request.get("messages")),
                   params=check_params(request.get("params") or {}))
    if op == "stop":
        return Job("stop", rid)
    if op == "load":
        model = request.get("model")
        if not isinstance(model, str) or not model.strip():
            raise RequestError("load needs `model`: a hub id, a local model folder or tiny:<name>")
        adapter = request.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise RequestError("`adapter` must be a folder path or null")
        return Job("load", rid, model=model.strip(), adapter=adapter or None)
    raise RequestError(f"unknown op {op!r}; ops are generate, stop, load")


def check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list of {role, content}")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{index}] must be {{\"role\": system|user|assistant, \"content\": text}}")
        out.append({"role": message["role"], "content": message["content"]})
    if out[-1]["role"] != "user":
        raise RequestError("the last message must be the user's")
    return out


def check_params(params: Any) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise RequestError("`params` must be an object")
    unknown = set(params) - PARAM_KEYS
    if unknown:
        raise RequestError(f"unknown params {sorted(unknown)}; known: {sorted(PARAM_KEYS)}")

    def number(key: str, low: float, high: float | None = None, integer: bool = False):
        value = params.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and value != int(value)):
            raise RequestError(f"params.{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
        if value < low or (high is not None and value > high):
            raise RequestError(f"params.{key} must be in [{low}, {high if high is not None else '∞'}], got {value}")
        return int(value) if integer else float(value)

    out = {
        "temperature": number("temperature", 0.0, 100.0),
        "top_p": number("top_p", 0.0, 1.0),
        "top_k": number("top_k", 0, None, integer=True),
        "max_new_tokens": number("max_new_tokens", 1, None, integer=True),
        "min_new_tokens": number("min_new_tokens", 0, None, integer=True),
        "seed": number("seed", 0, 2**63 - 1, integer=True),
        "repetition_penalty": number("repetition_penalty", 0.01, 100.0),
    }
    if out["top_p"] == 0.0:
        raise RequestError("params.top_p must be above 0")
    do_sample = params.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise RequestError("params.do_sample must be true or false")
    out["do_sample"] = do_sample
    return {k: v for k, v in out.items() if v is not None}


def generation_kwargs(params: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    temperature = params.get("temperature")
    do_sample = params.get("do_sample")
    if do_sample is None:
        do_sample = temperature is None or temperature > 0
    if temperature == 0:
        do_sample = False
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        kwargs["temperature"] = temperature if temperature is not None else 1.0
        kwargs["top_p"] = params.get("top_p", 1.0)
        kwargs["top_k"] = params.get("top_k", 0)
    else:  # greedy: neutralise sampling knobs a model's generation_config may carry (no warnings)
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if "repetition_penalty" in params:
        kwargs["repetition_penalty"] = params["repetition_penalty"]
    if params.get("min_new_tokens"):
        kwargs["min_new_tokens"] = min(params["min_new_tokens"], max_new_tokens)
    return kwargs


# ------------------------------------------------------------------------------------------- streaming


def make_streamer(tokenizer, job: Job, channel: Channel):
    """A TextStreamer that sends each decoded piece as a `token` reply and times the first token."""
    from transformers import TextStreamer

    class ReplyStreamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.tokens = 0
            self.first: float | None = None
            self.last: float | None = None
            self.text: list[str] = []

        def put(self, value):
            if not self.next_tokens_are_prompt:
                now = time.perf_counter()
                self.first = self.first or now
                self.last = now
                self.tokens += int(value.numel())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                self.text.append(text)
                channel.send("token", id=job.id, text=text)

    return ReplyStreamer()


def make_stop_criteria(job: Job):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopFlag(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stop = job.stop.is_set()
            job.cut = job.cut or stop
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopFlag()])


# ------------------------------------------------------------------------------------------------ server


class ChatServer:
    def __init__(self, loaded: Loaded, channel: Channel):
        self.loaded = loaded
        self.channel = channel
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.current: Job | None = None
        self.waiting: dict[str, Job] = {}

    # ---- stdin side (main thread): never blocks on the model
    def read_requests(self, stdin) -> None:
        for raw in iter(stdin.readline, b""):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                job = parse_request(line)
            except RequestError as exc:
                self.channel.send("error", id=_id_of(line), message=f"bad request: {exc}")
                continue
            if job.op == "stop":
                self.stop(job.id)
            else:
                with self.lock:
                    if job.op == "generate":
                        self.waiting[job.id] = job
                self.jobs.put(job)
        self.stop(None)  # EOF: the client is gone

    def stop(self, rid: str | None) -> None:
        with self.lock:
            targets = [self.current] if self.current is not None else []
            targets += list(self.waiting.values())
            for job in targets:
                if rid is None or job.id == rid:
                    job.stop.set()

    # ---- model side (runner thread): one request at a time, in order
    def run_jobs(self) -> None:
        while (job := self.jobs.get()) is not None:
            with self.lock:
                if job.op == "generate":
                    self.waiting.pop(job.id, None)
                self.current = job
            try:
                if job.op == "generate":
                    self.generate(job)
                elif job.op == "load":
                    self.load(job)
            except Exception as exc:  # noqa: BLE001 - every failure becomes an error line, the worker lives on
                traceback.print_exc()
                self.channel.send("error", id=job.id, message=describe_failure(exc, self.loaded))
                free_cuda_cache()
            finally:
                with self.lock:
                    self.current = None

    def generate(self, job: Job) -> None:
        start = time.perf_counter()
        if job.stop.is_set():  # stopped while it waited
            self.channel.send("end", id=job.id, tokens=0, ttft_s=None, tokens_per_s=None, elapsed_s=0.0,
                              prompt_tokens=0, stopped=True, finish="stopped")
            return
        import torch

        loaded = self.loaded
        inputs = render_prompt(loaded, job.messages)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        max_new = job.params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if loaded.context:
            room = loaded.context - prompt_tokens
            if room < 1:
                raise RequestError(
                    f"the conversation is {prompt_tokens} tokens, the model's context is {loaded.context}: "
                    "start a new conversation (ctrl+n in the panel, /reset in tas chat) or shorten the system prompt"
                )
            max_new = min(max_new, room)
        inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
        streamer = make_streamer(loaded.tokenizer, job, self.channel)
        kwargs = generation_kwargs(job.params, max_new)
        if "seed" in job.params:
            torch.manual_seed(job.params["seed"])
        with torch.inference_mode():
            out = loaded.model.generate(**inputs, **kwargs, streamer=streamer, stopping_criteria=make_stop_criteria(job),
                                        pad_token_id=_pad_id(loaded))
        end = time.perf_counter()
        tokens = int(out.shape[1]) - prompt_tokens
        stopped = job.cut
        eos = _eos_ids(loaded)
        if stopped:
            finish = "stopped"
        elif tokens and int(out[0, -1]) in eos:
            finish = "stop"
        else:
            finish = "length"
        first, last = streamer.first, streamer.last
        ttft = round(first - start, 4) if first else None
        rate = round((tokens - 1) / (last - first), 2) if first and last and tokens > 1 and last > first else None
        self.channel.send("end", id=job.id, tokens=tokens, ttft_s=ttft, tokens_per_s=rate,
                          elapsed_s=round(end - start, 4), prompt_tokens=prompt_tokens, stopped=stopped, finish=finish)

    def load(self, job: Job) -> None:
        try:
            loaded = load_model(job.model, job.adapter, str(self.loaded.device.type))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            free_cuda_cache()
            self.channel.send("error", id=job.id, op="load", model=job.model,
                              message=f"{describe_failure(exc, None)} (still serving {self.loaded.name})")
            return
        old, self.loaded = self.loaded, loaded
        del old
        free_cuda_cache()
        self.channel.send("ready", **({"id": job.id} if job.id else {}), **loaded.ready_fields())


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _pad_id(loaded: Loaded):
    tok = loaded.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _eos_ids(loaded: Loaded) -> set[int]:
    ids = getattr(loaded.model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = loaded.tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}


def _id_of(line: str) -> str | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    rid = value.get("id") if isinstance(value, dict) else None
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None


def free_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def describe_failure(exc: BaseException, loaded: Loaded | None) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, RequestError):
        return text
    if "torch" in sys.modules:  # the project's own test (needs torch, which a bad path never imports)
        from engine.models.device import is_out_of_memory

        oom = is_out_of_memory(exc)
    else:
        oom = False
    if oom:
        where = f" on {loaded.device}" if loaded else ""
        return (f"out of memory{where}: lower max_new_tokens, start a new conversation, or chat with a smaller "
                f"model ({text.splitlines()[0][:200]})")
    first = text.splitlines()[0][:400]
    if type(exc).__name__ in ("ModelNotFound", "ValueError", "RuntimeError", "FileNotFoundError", "OSError"):
        return first  # our own loaders already say what is wrong and where
    return f"{type(exc).__name__}: {first}" if type(exc).__name__ not in first else first


# -------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.chat.worker", description="TAS chat worker (JSON lines)")
    parser.add_argument("--model", required=True, help="hub id, local model folder or tiny:<name>")
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder to put on top of --model")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    channel = protocol_channel()
    # Ctrl-C in the terminal of `tas chat` is meant for the reply, not for us: the client sends `stop`
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        loaded = load_model(args.model, args.adapter, args.device)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        reason = describe_failure(exc, None).removeprefix(f"{args.model}: ")
        channel.send("error", fatal=True, model=args.model,
                     message=f"cannot load {args.model}"
                             + (f" + adapter {args.adapter}" if args.adapter else "") + f": {reason}")
        return EXIT_BAD_MODEL
    channel.send("ready", **loaded.ready_fields())
    server = ChatServer(loaded, channel)
    runner = threading.Thread(target=server.run_jobs, name="chat-runner", daemon=True)
    runner.start()
    server.read_requests(sys.stdin.buffer)
    server.jobs.put(None)
    runner.join(timeout=10)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # a generation thread stuck in a kernel must not keep the process alive
