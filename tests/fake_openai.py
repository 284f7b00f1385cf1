"""A local OpenAI-compatible HTTP server for tests: chat completions, files and the Batch API.

Stdlib only (`http.server.ThreadingHTTPServer` on 127.0.0.1, port 0, in a daemon thread), so the real
`openai` client is tested over real HTTP: its retries, timeouts, headers and multipart uploads included.

    with FakeOpenAI() as server:
        client = OpenAI(base_url=server.url, api_key="...")

Answers are deterministic: "ANSWER to: <user message>". Faults are scripted by markers in the user
message (ignored while `server.faults` is False, which simulates the fault going away):

    [[429x2]]      the first 2 attempts get 429 (retry-after-ms: 1, retry-after: 0)
    [[500x1]]      the first attempt gets 500 (retry-after-ms: 1)
    [[slow]]       the first attempt sleeps `slow_s` before answering (past the client's timeout)
    [[malformed]]  always: a 200 whose body is not valid JSON
    [[nochoices]]  always: a 200 with valid JSON but no `choices`
    [[empty]]      always: an empty answer
    [[batch-fail]] Batch API only: the item goes to the error file with status 400

With `"stream": true` a chat answer comes as server-sent events, a word per chunk (`stream_delay_s`
apart; `[[long]]` makes it 400 words); `GET /v1/models` lists one model.

Whole-server settings: `api_key` (when set, any other bearer token gets 401), `delay_s` (every chat
answer takes this long, so concurrency is observable), `batch_polls` (retrieves until a batch completes),
`batch_error` (every batch fails validation with this message).

What it records: every request (`requests`: method, path, lower-cased headers), the most chat requests
in flight at once (`max_in_flight`), attempts per user message (`attempts`), system prompts seen per user
message (`system_prompts`), uploaded files and batches.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_COUNTED_FAULT = re.compile(r"\[\[(429|500)x(\d+)\]\]")


class FakeOpenAI:
    def __init__(
        self,
        api_key: str | None = None,
        delay_s: float = 0.0,
        slow_s: float = 2.0,
        batch_polls: int = 2,
        batch_error: str | None = None,
    ):
        self.api_key = api_key
        self.delay_s = delay_s
        self.slow_s = slow_s
        self.batch_polls = batch_polls
        self.batch_error = batch_error  # when set, every batch fails validation with this message
        self.faults = True
        self.stream_delay_s = 0.0  # between the chunks of a streamed answer (stream: true)
        self.streams_closed_early = 0  # streamed answers the client stopped reading
        self.on_chat: Callable[[int], None] | None = None  # called with the number of chat requests so far

        self.requests: list[dict[str, Any]] = []
        self.attempts: Counter[str] = Counter()
        self.system_prompts: dict[str, str | None] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batches_created = 0
        self.batches_cancelled: list[str] = []
        self.chat_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0

        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAI:
        server = self

        class Handler(_Handler):
            fake = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def new_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}-{next(self._ids)}"

    # ------------------------------------------------------------------------------------- answers

    def completion(self, body: dict[str, Any], attempt: int, for_batch: bool = False) -> tuple[int, Any]:
        """(status, JSON-able body or raw bytes) for one chat request; `attempt` counts from 1."""
        messages = body.get("messages") or []
        user = self._user_of(body)
        faults = self.faults
        if faults:
            match = _COUNTED_FAULT.search(user)
            if match and attempt <= int(match.group(2)):
                code = int(match.group(1))
                return code, {"error": {"message": f"scripted {code}", "type": "fake", "code": str(code)}}
            if "[[malformed]]" in user:
                return 200, b'{"id": "chatcmpl-broken", "choices": [{"message": '
            if "[[nochoices]]" in user:
                return 200, {"id": "chatcmpl-nochoices", "object": "chat.completion", "created": 0}
            if for_batch and "[[batch-fail]]" in user:
                return 400, {"error": {"message": "scripted batch failure", "type": "invalid_request_error"}}
        content = "" if faults and "[[empty]]" in user else f"ANSWER to: {user}"
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        completion_tokens = len(content.split())
        return 200, {
            "id": self.new_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _user_of(self, body: dict[str, Any]) -> str:
        messages = body.get("messages") or []
        return next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")

    # ----------------------------------------------------------------------------------- batch API

    def batch_object(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in batch.items() if not key.startswith("_")}

    def advance(self, batch: dict[str, Any]) -> None:
        """One retrieve: validating → in_progress → ... → completed after `batch_polls` retrieves."""
        if batch["status"] == "cancelling":
            batch["status"] = "cancelled"
            batch["cancelled_at"] = int(time.time())
            return
        if batch["status"] not in ("validating", "in_progress"):
            return
        batch["_polls"] += 1
        if self.batch_error is not None:
            batch["status"] = "failed"
            batch["errors"] = {"object": "list", "data": [{"code": "invalid_request", "message": self.batch_error}]}
        elif batch["_polls"] >= self.batch_polls:
            self.complete(batch)
        else:
            batch["status"] = "in_progress"

    def complete(self, batch: dict[str, Any]) -> None:
        lines = self.files[batch["input_file_id"]]["content"].decode("utf-8").splitlines()
        outputs, errors = [], []
        for raw in lines:
            if not raw.strip():
                continue
            request = json.loads(raw)
            body = request["body"]
            with self._lock:
                self.attempts[self._user_of(body)] += 1
                attempt = self.attempts[self._user_of(body)]
            status, answer = self.completion(body, attempt, for_batch=True)
            if isinstance(answer, bytes):  # a malformed body: the batch line carries it as a string
                answer = answer.decode()
            line = {
                "id": self.new_id("batch_req"),
                "custom_id": request["custom_id"],
                "response": {"status_code": status, "request_id": self.new_id("req"), "body": answer},
                "error": None,
            }
            (outputs if status == 200 else errors).append(line)
        batch["status"] = "completed"
        batch["completed_at"] = int(time.time())
        total = len(outputs) + len(errors)
        batch["request_counts"] = {"total": total, "completed": len(outputs), "failed": len(errors)}
        if outputs:
            batch["output_file_id"] = self.store_file("batch_output.jsonl", "batch_output", _jsonl(outputs))
        if errors:
            batch["error_file_id"] = self.store_file("batch_errors.jsonl", "batch_output", _jsonl(errors))

    def store_file(self, filename: str, purpose: str, content: bytes) -> str:
        file_id = self.new_id("file")
        self.files[file_id] = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "content": content,
        }
        return file_id

    def create_batch(self, input_file_id: str, endpoint: str = "/v1/chat/completions") -> dict[str, Any]:
        batch_id = self.new_id("batch")
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": "24h",
            "status": "validating",
            "created_at": int(time.time()),
            "output_file_id": None,
            "error_file_id": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "_polls": 0,
        }
        with self._lock:
            self.batches[batch_id] = batch
            self.batches_created += 1
        return batch


def _jsonl(items: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in items).encode("utf-8")


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """multipart/form-data → {field name: (filename or None, bytes)}, via the stdlib email parser."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    if not message.is_multipart():
        return fields
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        payload = part.get_payload(decode=True) or b""
        fields[str(name)] = (part.get_filename(), payload)
    return fields


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    # ------------------------------------------------------------------------------------ plumbing

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: Any, headers: dict[str, str] | None = None, content_type: str = "application/json"
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer

    def _record(self, method: str) -> bool:
        """Log the request; False (after answering 401) when the bearer token is wrong."""
        fake = self.fake
        with fake._lock:
            fake.requests.append(
                {"method": method, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}
            )
        if fake.api_key is not None and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
            self._read_body()
            error = {"message": "Incorrect API key provided.", "code": "invalid_api_key"}
            self._send(401, {"error": error})
            return False
        return True

    # ------------------------------------------------------------------------------------- routes

    def do_GET(self) -> None:
        if not self._record("GET"):
            return
        fake = self.fake
        if match := re.fullmatch(r"/v1/files/([^/]+)/content", self.path):
            file = fake.files.get(match.group(1))
            if file is None:
                return self._send(404, {"error": {"message": "no such file"}})
            return self._send(200, file["content"], content_type="application/octet-stream")
        if match := re.fullmatch(r"/v1/batches/([^/]+)", self.path):
            batch = fake.batches.get(match.group(1))
            if batch is None:
                return self._send(404, {"error": {"message": "no such batch"}})
            with fake._lock:
                fake.advance(batch)
                return self._send(200, fake.batch_object(batch))
        if self.path == "/v1/models":
            return self._send(
                200,
                {"object": "list", "data": [{"id": "gpt-fake", "object": "model", "created": 0, "owned_by": "fake"}]},
            )
        self._send(404, {"error": {"message": f"no route GET {self.path}"}})

    def do_POST(self) -> None:
        if not self._record("POST"):
            return
        fake = self.fake
        body = self._read_body()
        if self.path == "/v1/chat/completions":
            return self._chat(json.loads(body or b"{}"))
        if self.path == "/v1/files":
            fields = parse_multipart(self.headers.get("Content-Type", ""), body)
            if "file" not in fields:
                return self._send(400, {"error": {"message": "no file part in the upload"}})
            filename, content = fields["file"]
            purpose = fields.get("purpose", (None, b"batch"))[1].decode()
            file_id = fake.store_file(filename or "upload.jsonl", purpose, content)
            return self._send(200, {k: v for k, v in fake.files[file_id].items() if k != "content"})
        if self.path == "/v1/batches":
            request = json.loads(body or b"{}")
            if request.get("input_file_id") not in fake.files:
                return self._send(400, {"error": {"message": "unknown input_file_id"}})
            batch = fake.create_batch(request["input_file_id"], request.get("endpoint", ""))
            return self._send(200, fake.batch_object(batch))
        if match := re.fullmatch(r"/v1/batches/([^/]+)/cancel", self.path):
            batch = fake.batches.get(match.group(1))
            if batch is None:
                return self._send(404, {"error": {"message": "no such batch"}})
            with fake._lock:
                fake.batches_cancelled.append(batch["id"])
                if batch["status"] in ("validating", "in_progress"):
                    batch["status"] = "cancelling"
                return self._send(200, fake.batch_object(batch))
        self._send(404, {"error": {"message": f"no route POST {self.path}"}})

    def _chat(self, body: dict[str, Any]) -> None:
        fake = self.fake
        user = fake._user_of(body)
        system = next((m.get("content") for m in body.get("messages", []) if m.get("role") == "system"), None)
        with fake._lock:
            fake.attempts[user] += 1
            attempt = fake.attempts[user]
            fake.system_prompts[user] = system
            fake.chat_requests += 1
            count = fake.chat_requests
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            if fake.on_chat is not None:
                fake.on_chat(count)
            if fake.delay_s:
                time.sleep(fake.delay_s)
            if fake.faults and "[[slow]]" in user and attempt == 1:
                time.sleep(fake.slow_s)
            status, answer = fake.completion(body, attempt)
        finally:
            with fake._lock:
                fake.in_flight -= 1
        headers = {"retry-after-ms": "1", "retry-after": "0"} if status in (429, 500) else {}
        if status == 200 and body.get("stream"):
            return self._stream(body, answer)
        self._send(status, answer, headers)

    def _stream(self, body: dict[str, Any], answer: dict[str, Any]) -> None:
        """The answer as server-sent events, a word per chunk (`stream_delay_s` apart), then the finish
        reason, the usage (with stream_options.include_usage) and [DONE]; ends early when the client closes."""
        fake = self.fake
        text = answer["choices"][0]["message"]["content"]
        user = fake._user_of(body)
        if "[[long]]" in user:
            text = " ".join(f"word{i}" for i in range(400))
        words = re.findall(r"\S+\s*", text)
        limit = body.get("max_tokens") or len(words)
        base = {
            "id": answer.get("id", "chatcmpl-fake"),
            "object": "chat.completion.chunk",
            "created": 0,
            "model": body.get("model"),
        }
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        sent = 0

        def event(payload: dict[str, Any]) -> None:
            self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
            self.wfile.flush()

        try:
            for word in words[:limit]:
                event(dict(base, choices=[{"index": 0, "delta": {"content": word}, "finish_reason": None}]))
                sent += 1
                if fake.stream_delay_s:
                    time.sleep(fake.stream_delay_s)
            finish = "length" if len(words) > limit else "stop"
            event(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": finish}]))
            if (body.get("stream_options") or {}).get("include_usage"):
                event(
                    dict(
                        base,
                        choices=[],
                        usage={"prompt_tokens": 7, "completion_tokens": sent, "total_tokens": 7 + sent},
                    )
                )
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            with fake._lock:
                fake.streams_closed_early += 1  # the client stopped reading: a `stop`
