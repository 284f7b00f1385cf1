"""The chat worker: holds one model and streams its replies over stdin/stdout JSON lines.

    python -m engine.chat.worker --model NAME [--adapter PATH] [--device auto|cpu|cuda]

Heavy module (torch, transformers, peft): it runs only in its own process, spawned by
engine.chat.client.ChatClient (the panel's Chat tab and `tas chat`).

`NAME` is a hub id, a local model folder or `tiny:<name>`; `--adapter` puts a PEFT (LoRA) adapter folder
on top of it. The model is loaded once, then the worker prints

    {"kind": "ready", "model", "adapter", "device", "dtype", "context", "template", "load_s", "threads", "pid"}

and serves requests, one JSON object per stdin line (engine.chat.protocol has every field, type and bound):

    {"op": "generate", "id": "r1", "messages": [{"role", "content"}, ...], "params": {...}}
    {"op": "stop", "id": "r1"}        (no id: stop whatever runs or waits)
    {"op": "load", "model": NAME, "adapter": PATH or null}

Replies, one JSON object per stdout line, each with `kind`:

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
`elapsed_s` is the whole request (engine.chat.wire.end_reply, for both workers).

`params` (all optional, bounds in engine.chat.protocol.GenerationParams): temperature (0 means greedy),
top_p, top_k, max_new_tokens, min_new_tokens (no EOS before), do_sample, repetition_penalty, seed
(reproducible sampling). max_new_tokens is capped to what fits in the model's context after the prompt.

Streaming: the first piece of a reply goes out the moment it decodes; after it, pieces that decode within
TOKEN_WINDOW_S (20 ms) of the last `token` line are held back and go out together with the first piece
after the window (or at the end), so at most one line per window: a fast model on a small CPU would
otherwise spend a good part of its time on JSON, pipe writes and the client's wake-ups (each line wakes
the client's reader thread, and the panel re-renders). A model slower than one token per window sends
every piece at once. The generation thread writes the lines itself: a helper thread would have to take
the GIL from it, which on a busy machine costs more than the writes. Text is decoded incrementally (a
few tokens per step, never the whole reply again).

Every failure is an `error` line with a sentence a person can act on: an unloadable model at startup
is a fatal error followed by exit code 2; a bad request, an out-of-memory or a failed `load` (the old
model stays) leave the worker serving. Anything else a library prints goes to stderr, never into the
protocol channel.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.chat.protocol import (
    DEFAULT_PARAMS,
    ErrorReply,
    GenerateRequest,
    GenerationParams,
    LoadRequest,
    ReadyReply,
    encode_token,
)
from engine.chat.wire import EXIT_BAD_MODEL, Channel, end_reply, protocol_channel, read_requests

DEFAULT_MAX_NEW_TOKENS = DEFAULT_PARAMS.max_new_tokens
TOKEN_WINDOW_S = 0.02
"""After a `token` line, text that decodes within this long is held back and goes out with the first piece
after it: at most 50 lines a second (a screen refreshes every 16.7 ms), whatever the model's speed; the
first piece of a reply is never held back."""


class RequestError(ValueError):
    """A request the worker cannot serve as sent; the message says what to change."""


# --------------------------------------------------------------------------------------------- output


class TokenStream:
    """The `token` lines of one generation, written by the generation thread itself (no thread hand-off).

    The first piece goes out at once; after it, a piece goes out, together with what was held back, as
    soon as `window` has passed since the last line, and is held back until then. What is held when the
    generation ends goes out on `close`, before the `end` line.
    """

    def __init__(self, channel: Channel, request_id: str, window: float = TOKEN_WINDOW_S):
        self.channel = channel
        self.id = request_id
        self.window = window
        self.pending: list[str] = []
        self.sent_at = -math.inf

    def push(self, text: str) -> None:
        self.pending.append(text)
        now = time.monotonic()
        if now - self.sent_at >= self.window:
            self._send(now)

    def close(self) -> None:
        if self.pending:
            self._send(time.monotonic())

    def _send(self, now: float) -> None:
        text = self.pending[0] if len(self.pending) == 1 else "".join(self.pending)
        self.pending.clear()
        self.sent_at = now
        self.channel.write(encode_token(self.id, text))


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
    eos_ids: list[int] = field(
        default_factory=list
    )  # EOS + the chat template's end of turn: a reply ends with its turn

    def ready(self, request_id: str | None = None) -> ReadyReply:
        return ReadyReply(
            id=request_id,
            model=self.name,
            adapter=self.adapter,
            device=str(self.device),
            dtype="nf4 (4-bit)"
            if getattr(self.model, "is_loaded_in_4bit", False)
            else str(self.model.dtype).removeprefix("torch."),
            context=self.context,
            template=self.template,
            load_s=round(self.load_s, 3),
            threads=_torch_threads(),
            pid=os.getpid(),
        )


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


MODEL_KEY = "assistant.model.name (or --model)"
"""Where a hub id the chat worker is given comes from, unless told (--key): the chat targets that are hub ids
are the base assistant and the assistant + LoRA, both `assistant.model.name`; anything else is `--model`."""


def load_model(
    name: str, adapter: str | None, device_name: str, key: str = MODEL_KEY, load_in_4bit: bool = False
) -> Loaded:
    """The model (+ adapter) on its device, in eval mode, with a tokenizer that can render a chat.

    `device_name`: cpu, cuda, cuda:N (one GPU of the visible ones), or auto: the GPU when there is one;
    with several GPUs visible, `device_map="auto"` (TAS's meaning): a model larger than one GPU is split
    over them, a small one lands on the first. `load_in_4bit`: bitsandbytes NF4, the way QLoRA trained the
    assistant (a 7B model in ~5 GB)."""
    from engine.models.loading import ModelNotFound, check_hub_model, is_hub_id, resolve_model_path, stop_token_ids

    start = time.perf_counter()
    adapter_path = None
    if adapter:  # cheap checks first: a wrong path fails before torch is even imported
        adapter_path = Path(adapter).expanduser()
        if not (adapter_path / "adapter_config.json").exists():
            raise ModelNotFound(f"{adapter}: no PEFT adapter there (no adapter_config.json)")
    resolve_model_path(name)
    if is_hub_id(name):  # offline and not cached: fails within a second, naming the config key
        check_hub_model(name, key)

    import torch

    from engine.models.device import select_device
    from engine.models.loading import load_causal_lm, load_tokenizer

    device = select_device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    split = device_name == "auto" and device.type == "cuda" and torch.cuda.device_count() > 1
    quantization = None
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        from engine.models.device import pick_dtype

        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=pick_dtype(True, device)
        )
    # the checkpoint's own dtype (bf16 / fp16 for most hub models; fp16 on a CPU is slow: fp32), weights
    # loaded straight onto the GPU(s) rather than through host memory
    device_map = "auto" if split else ({"": device} if device.type == "cuda" or quantization else None)
    model = load_causal_lm(name, key="model", dtype="auto", device_map=device_map, quantization_config=quantization)
    if device.type == "cpu" and model.dtype == torch.float16 and quantization is None:
        model = model.float()
    tokenizer = None
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path))
        if (adapter_path / "tokenizer_config.json").exists():  # the sft stage saves its tokenizer there
            tokenizer = load_tokenizer(str(adapter_path), key="adapter")
    if tokenizer is None:
        tokenizer = load_tokenizer(name, key="model")
    if split:
        device = model.device  # inputs go where the first layers are
    elif quantization is None:
        model.to(device)
    model.eval().requires_grad_(False)
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None)
    template = "chat" if getattr(tokenizer, "chat_template", None) else "fallback"
    return Loaded(
        model,
        tokenizer,
        name,
        str(adapter_path) if adapter_path else None,
        device,
        context,
        template,
        time.perf_counter() - start,
        stop_token_ids(tokenizer, model),
    )


def render_prompt(loaded: Loaded, messages: list[dict[str, str]]):
    """input_ids and attention_mask of the conversation, ending with the assistant's turn."""
    tokenizer = loaded.tokenizer
    if loaded.template == "chat":
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:  # a base model without a chat template: a plain transcript it can continue
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
        enc = tokenizer(text, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# -------------------------------------------------------------------------------------------- requests


@dataclass
class Job:
    """A generate or load request, queued for the runner thread."""

    request: GenerateRequest | LoadRequest
    stop: threading.Event = field(default_factory=threading.Event)
    cut: bool = False  # the stop flag actually ended the generation (not a stop that came after the end)

    @property
    def id(self) -> str | None:
        return self.request.id


def generation_kwargs(params: GenerationParams, max_new_tokens: int) -> dict[str, Any]:
    temperature = params.temperature
    do_sample = params.do_sample
    if do_sample is None:
        do_sample = temperature is None or temperature > 0
    if temperature == 0:
        do_sample = False
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        kwargs["temperature"] = temperature if temperature is not None else 1.0
        kwargs["top_p"] = params.top_p if params.top_p is not None else 1.0
        kwargs["top_k"] = params.top_k if params.top_k is not None else 0
    else:  # greedy: neutralise sampling knobs a model's generation_config may carry (no warnings)
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if params.repetition_penalty is not None:
        kwargs["repetition_penalty"] = params.repetition_penalty
    if params.min_new_tokens:
        kwargs["min_new_tokens"] = min(params.min_new_tokens, max_new_tokens)
    return kwargs


# ------------------------------------------------------------------------------------------- streaming


class Detokenizer:
    """Token ids → text, incrementally: each step decodes the last few tokens only, never the whole reply.

    The text of the new tokens is decode(window) minus decode(window without them), where the window
    starts one piece back (so a tokenizer that drops a leading space at the start of a decode does it to
    both); text ending in U+FFFD is half a UTF-8 character and waits for the rest.
    """

    def __init__(self, tokenizer):
        self._decode_ids = _fast_decode(tokenizer) or (
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )
        self.ids: list[int] = []
        self.start = 0  # the window: ids[start:]; ids[start:done] were already given out
        self.done = 0

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids) if ids else ""

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        return self._take(final=False)

    def flush(self) -> str:
        """What is left at the end (a dangling partial character included)."""
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        before = self._decode(self.ids[self.start : self.done])
        text = self._decode(self.ids[self.start :])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.start, self.done = self.done, len(self.ids)
        return text[len(before) :]


def _fast_decode(tokenizer):
    """The Rust decoder of a fast tokenizer whose class keeps transformers' own decoding: what
    tokenizer.decode would call, without its Python layers (a fifth of the cost); None for any other."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        not isinstance(tokenizer, TokenizersBackend)
        or type(tokenizer)._decode is not TokenizersBackend._decode
        or backend is None
    ):
        return None
    return lambda ids: backend.decode(ids, skip_special_tokens=True)


def make_streamer(tokenizer, tokens: TokenStream):
    """A transformers streamer: decodes each new token (after the prompt) into `tokens`, times the first."""
    from transformers.generation.streamers import BaseStreamer

    class ReplyStreamer(BaseStreamer):
        def __init__(self):
            self.prompt = True  # generate() puts the prompt first
            self.detokenizer = Detokenizer(tokenizer)
            self.tokens = 0
            self.first: float | None = None
            self.last: float | None = None

        def put(self, value):
            if self.prompt:
                self.prompt = False
                return
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            self.last = now
            ids = value.reshape(-1).tolist()
            self.tokens += len(ids)
            text = self.detokenizer.add(ids)
            if text:
                tokens.push(text)

        def end(self):
            text = self.detokenizer.flush()
            if text:
                tokens.push(text)
            tokens.close()

    return ReplyStreamer()


def make_stop_criteria(job: Job):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopFlag(StoppingCriteria):
        """Ends the generation at the next token once the job's stop flag is set (read each step)."""

        def __init__(self):
            self.go_on: Any = None  # a cached all-False answer (one batch, one device): no tensor per token

        def __call__(self, input_ids, scores, **kwargs):
            if job.stop.is_set():
                job.cut = True
                return torch.ones((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)
            if self.go_on is None:
                self.go_on = torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)
            return self.go_on

    return StoppingCriteriaList([StopFlag()])


# ------------------------------------------------------------------------------------------------ server


class ChatServer:
    def __init__(self, loaded: Loaded, channel: Channel, device_name: str = "auto", load_in_4bit: bool = False):
        self.loaded = loaded
        self.channel = channel
        self.device_name = device_name  # a `load` places the next model as the first was placed
        self.load_in_4bit = load_in_4bit
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.current: Job | None = None
        self.waiting: dict[str, Job] = {}

    # ---- stdin side (main thread, engine.chat.wire.read_requests): never blocks on the model
    def enqueue(self, request: GenerateRequest | LoadRequest) -> None:
        job = Job(request)
        if isinstance(request, GenerateRequest):
            with self.lock:
                self.waiting[request.id] = job
        self.jobs.put(job)

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
                if isinstance(job.request, GenerateRequest):
                    self.waiting.pop(job.request.id, None)
                self.current = job
            try:
                if isinstance(job.request, GenerateRequest):
                    self.generate(job, job.request)
                else:
                    self.load(job.request)
            except Exception as exc:  # every failure becomes an error line, the worker lives on
                traceback.print_exc()
                self.channel.send(ErrorReply(id=job.id, message=describe_failure(exc, self.loaded)))
                free_cuda_cache()
            finally:
                with self.lock:
                    self.current = None

    def generate(self, job: Job, request: GenerateRequest) -> None:
        start = time.perf_counter()
        if job.stop.is_set():  # stopped while it waited
            self.channel.send(end_reply(request.id))
            return
        import torch

        loaded = self.loaded
        params = request.params
        inputs = render_prompt(loaded, [m.model_dump() for m in request.messages])
        prompt_tokens = int(inputs["input_ids"].shape[1])
        max_new = params.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        if loaded.context:
            room = loaded.context - prompt_tokens
            if room < 1:
                raise RequestError(
                    f"the conversation is {prompt_tokens} tokens, the model's context is {loaded.context}: "
                    "start a new conversation (ctrl+n in the panel, /reset in tas chat) or shorten the system prompt"
                )
            max_new = min(max_new, room)
        inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
        tokens_out = TokenStream(self.channel, request.id)
        streamer = make_streamer(loaded.tokenizer, tokens_out)
        kwargs = generation_kwargs(params, max_new)
        eos = loaded.eos_ids
        if eos:
            kwargs["eos_token_id"] = eos  # the template's end of turn too, not only the config's EOS
        if params.seed is not None:
            torch.manual_seed(params.seed)
        try:
            with torch.inference_mode():
                out = loaded.model.generate(
                    **inputs,
                    **kwargs,
                    streamer=streamer,
                    stopping_criteria=make_stop_criteria(job),
                    pad_token_id=_pad_id(loaded),
                )
        finally:
            tokens_out.close()  # every token line goes out before the end (or error) line
        end = time.perf_counter()
        tokens = int(out.shape[1]) - prompt_tokens
        if job.cut:
            finish = "stopped"
        elif tokens and int(out[0, -1]) in eos:
            finish = "stop"
        else:
            finish = "length"
        self.channel.send(
            end_reply(
                request.id,
                finish,
                tokens=tokens,
                prompt_tokens=prompt_tokens,
                began=start,
                first=streamer.first,
                last=streamer.last,
                ended=end,
            )
        )

    def load(self, request: LoadRequest) -> None:
        try:
            loaded = load_model(request.model, request.adapter, self.device_name, load_in_4bit=self.load_in_4bit)
        except Exception as exc:
            traceback.print_exc()
            free_cuda_cache()
            self.channel.send(
                ErrorReply(
                    id=request.id,
                    op="load",
                    model=request.model,
                    message=f"{describe_failure(exc, None)} (still serving {self.loaded.name})",
                )
            )
            return
        old, self.loaded = self.loaded, loaded
        del old
        free_cuda_cache()
        self.channel.send(loaded.ready(request.id))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _pad_id(loaded: Loaded):
    tok = loaded.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def free_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
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
        return (
            f"out of memory{where}: lower max_new_tokens, start a new conversation, or chat with a smaller "
            f"model ({text.splitlines()[0][:200]})"
        )
    first = text.splitlines()[0][:400]
    if type(exc).__name__ == "ModelNotFound":
        return text.splitlines()[0][:800]  # ours: what is wrong, which key, what to do (the offline one is long)
    if type(exc).__name__ in ("ValueError", "RuntimeError", "FileNotFoundError", "OSError"):
        return first  # our own loaders already say what is wrong and where
    return f"{type(exc).__name__}: {first}" if type(exc).__name__ not in first else first


# -------------------------------------------------------------------------------------------------- main


def device_choice(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use auto, cpu, cuda or cuda:N (N: a GPU index among the visible ones)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.chat.worker", description="TAS chat worker (JSON lines)")
    parser.add_argument("--model", required=True, help="hub id, local model folder or tiny:<name>")
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder to put on top of --model")
    parser.add_argument(
        "--device",
        type=device_choice,
        default="auto",
        help="auto (the GPU if any; several: split a large model over them), cpu, cuda, cuda:N",
    )
    parser.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 weights (QLoRA's)")
    parser.add_argument(
        "--key", default=MODEL_KEY, help="the config key --model came from, named when it cannot be loaded"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    channel = protocol_channel()
    # Ctrl-C in the terminal of `tas chat` is meant for the reply, not for us: the client sends `stop`
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine.core.secrets import load_dotenv_secrets

    load_dotenv_secrets()  # HF_TOKEN for a gated model, as the stages get it
    try:
        loaded = load_model(args.model, args.adapter, args.device, args.key, load_in_4bit=args.load_in_4bit)
    except Exception as exc:
        traceback.print_exc()
        reason = describe_failure(exc, None).removeprefix(f"{args.model}: ")
        if reason.startswith(f"{args.key}: cannot load "):  # says it all already (the offline check)
            message = reason
        else:
            message = (
                f"cannot load {args.model}" + (f" + adapter {args.adapter}" if args.adapter else "") + f": {reason}"
            )
        channel.send(ErrorReply(fatal=True, model=args.model, message=message))
        return EXIT_BAD_MODEL
    channel.send(loaded.ready())
    server = ChatServer(loaded, channel, device_name=args.device, load_in_4bit=args.load_in_4bit)
    runner = threading.Thread(target=server.run_jobs, name="chat-runner", daemon=True)
    runner.start()
    read_requests(sys.stdin.buffer, channel, server.stop, server.enqueue)
    server.jobs.put(None)
    runner.join(timeout=10)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # a generation thread stuck in a kernel must not keep the process alive
