"""The chat worker for a model behind an OpenAI-compatible server: the teacher, to compare with the student.

    python -m engine.chat.api_worker --base-url URL --model NAME          # any OpenAI-compatible endpoint
    TAS_CHAT_BASE_URL=URL python -m engine.chat.api_worker --model NAME   # the same, URL not in argv
    python -m engine.chat.api_worker --vllm-config CONFIG [--workdir DIR]  # starts the teacher's vLLM server

It speaks exactly the protocol of engine.chat.worker (engine.chat.protocol: `generate`, `stop`, `load` in;
`ready`, `token`, `end`, `error` out), so the Chat tab and `tas chat` use it like the local worker; only
where the tokens come from differs: a streamed `/v1/chat/completions` (server-sent events).

With `--vllm-config` it first starts the vLLM server the teacher stage would start for the config
(`teacher.open.model.name`, `teacher.vllm.*`: engine.teacher.vllm.server_settings), in its own process
group, and stops it when the worker ends (EOF on stdin, SIGTERM; the kernel ends it if the worker is
killed). Loading takes what the server takes to become healthy (~45 s on a 2-core CPU).

The API key comes from $OPENAI_API_KEY (the project's .env is read) for an endpoint, a placeholder for our
own server; it never appears in a reply or the log. A `stop` closes the HTTP stream: the server stops
generating for it. Sampling params map to the API's (temperature, top_p, max_tokens, seed); vLLM's own
(top_k, min_tokens, repetition_penalty) go along only to our vLLM server, where they are known.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from engine.chat.protocol import ErrorReply, GenerateRequest, LoadRequest, ReadyReply, encode_token
from engine.chat.wire import BASE_URL_ENV, EXIT_BAD_MODEL, Channel, end_reply, protocol_channel, read_requests
from engine.core.secrets import load_dotenv_secrets, redact
from engine.teacher.vllm import PLACEHOLDER_KEY  # our own vLLM server checks no key; the client insists on one


def where(base_url: str) -> str:
    """scheme://host[:port] of an endpoint: what the status line shows (never a user:password part)."""
    parts = urlsplit(base_url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


class ApiChat:
    """One endpoint and model; serves requests one at a time, streaming each reply as `token` lines."""

    def __init__(self, base_url: str, model: str, api_key: str, vllm_extras: dict | None, channel: Channel):
        """`vllm_extras`: request fields only our vLLM server knows (its `stop_token_ids`), or None."""
        import openai

        self.base_url = base_url
        self.model = model
        self.vllm_extras = vllm_extras
        self.channel = channel
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=600.0, max_retries=1)
        self.stop_ids: set[str | None] = set()
        self.lock = threading.Lock()

    def check(self, started: float) -> ReadyReply:
        """One cheap call (the model list) proves the endpoint answers and the key is accepted."""
        self.client.models.list()
        return ReadyReply(
            model=self.model,
            device=f"server {where(self.base_url)}",
            dtype="server",
            template="chat",
            load_s=round(time.monotonic() - started, 2),
            threads=0,
            pid=os.getpid(),
        )

    def stop(self, request_id: str | None) -> None:
        with self.lock:
            self.stop_ids.add(request_id)

    def _stopped(self, request_id: str) -> bool:
        with self.lock:
            return request_id in self.stop_ids or None in self.stop_ids

    def generate(self, request: GenerateRequest) -> None:
        with self.lock:
            self.stop_ids.discard(request.id)
            self.stop_ids.discard(None)
        params = request.params
        body = {
            "model": self.model,
            "messages": [m.model_dump() for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature if params.do_sample is not False else 0.0,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if self.vllm_extras:
            extra = {
                "top_k": params.top_k,
                "min_tokens": params.min_new_tokens,
                "repetition_penalty": params.repetition_penalty,
            }
            body["extra_body"] = {**self.vllm_extras, **{k: v for k, v in extra.items() if v is not None}}
        began = time.monotonic()
        first = last = None
        pieces = 0
        usage = None
        finish = "stop"
        stopped = False
        stream = self.client.chat.completions.create(**body)
        try:
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    text = choice.delta.content if choice.delta else None
                    if text:
                        now = time.monotonic()
                        first = first or now
                        last = now
                        pieces += 1
                        self.channel.write(encode_token(request.id, text))
                    if choice.finish_reason:
                        finish = "length" if choice.finish_reason == "length" else "stop"
                if self._stopped(request.id):
                    stopped, finish = True, "stopped"
                    break
        finally:
            stream.close()  # a stop closes the connection: the server ends the generation
        self.channel.send(
            end_reply(
                request.id,
                finish,
                tokens=usage.completion_tokens if usage is not None and not stopped else pieces,
                prompt_tokens=usage.prompt_tokens if usage is not None else 0,
                began=began,
                first=first,
                last=last,
                ended=time.monotonic(),
            )
        )


def describe(exc: BaseException) -> str:
    """One line a person can act on; the key is never in it (redacted however the library quoted it)."""
    import openai

    if isinstance(exc, openai.AuthenticationError):
        return "the server refused the API key (401): check OPENAI_API_KEY (environment or .env)"
    if isinstance(exc, openai.NotFoundError):
        return f"the server does not serve this model (404): {redact(str(exc))[:300]}"
    if isinstance(exc, openai.APIConnectionError):
        return "cannot connect to the server: is it running, and is the base URL right?"
    return redact(f"{type(exc).__name__}: {exc}")[:500]


def start_vllm(config_path: str, workdir: str):
    """The teacher's vLLM server for `config_path` (as the teacher stage starts it): (server, served name,
    the ids its answers end at)."""
    from engine.config.load import load_config
    from engine.teacher.vllm import server_settings, teacher_stop_ids
    from engine.teacher.vllm_server import VllmServer

    config = load_config(config_path)
    settings = server_settings(config, workdir)
    log_dir = Path(workdir) / ".chats"
    log_dir.mkdir(parents=True, exist_ok=True)
    server = VllmServer(settings).start(log_dir / "vllm-chat.log")
    try:
        server.wait_healthy(timeout_s=config.teacher.vllm.startup_timeout_s)  # VllmError quotes the server's log
    except BaseException:
        server.stop()  # a server that never became healthy is not left behind
        raise
    return server, settings.served_model_name or settings.model, teacher_stop_ids(config, settings.model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base-url",
        default=os.environ.get(BASE_URL_ENV),
        help=f"an OpenAI-compatible endpoint (…/v1); or ${BASE_URL_ENV}",
    )
    parser.add_argument("--model", help="the model name the endpoint serves")
    parser.add_argument("--vllm-config", help="start the teacher's vLLM server of this config")
    parser.add_argument("--workdir", default=".", help="where the config's relative paths count from")
    args = parser.parse_args(argv)

    channel = protocol_channel()
    started = time.monotonic()
    server = None
    try:
        if args.vllm_config:
            server, model, stops = start_vllm(args.vllm_config, args.workdir)
            base_url, api_key, extras = server.base_url, PLACEHOLDER_KEY, {"stop_token_ids": stops}
        else:
            if not args.base_url or not args.model:
                parser.error("give --base-url and --model, or --vllm-config")
            load_dotenv_secrets()
            base_url, model, extras = args.base_url, args.model, None
            api_key = os.environ.get("OPENAI_API_KEY", "").strip() or PLACEHOLDER_KEY  # as the teacher sends it
        chat = ApiChat(base_url, model, api_key, extras, channel)
        channel.send(chat.check(started))
    except Exception as exc:  # any failure to start is reported, then exit 2
        message = describe(exc) if not isinstance(exc, RuntimeError) else redact(str(exc))
        channel.send(ErrorReply(message=f"cannot chat with {args.model or args.vllm_config}: {message}", fatal=True))
        if server is not None:
            server.stop()
        return EXIT_BAD_MODEL

    work: queue.Queue = queue.Queue()

    def read_stdin() -> None:
        read_requests(sys.stdin.buffer, channel, chat.stop, work.put)
        work.put(None)  # EOF: the client is gone

    threading.Thread(target=read_stdin, name="api-chat-stdin", daemon=True).start()
    try:
        while (request := work.get()) is not None:
            if isinstance(request, LoadRequest):
                channel.send(
                    ErrorReply(
                        id=request.id,
                        op="load",
                        message="this worker serves one endpoint; choose the target again to start a new one",
                    )
                )
                continue
            if chat._stopped(request.id):
                channel.send(end_reply(request.id))
                continue
            try:
                chat.generate(request)
            except Exception as exc:  # the worker keeps serving after a failed request
                channel.send(ErrorReply(id=request.id, message=describe(exc)))
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
