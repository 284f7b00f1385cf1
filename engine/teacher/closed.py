"""The closed (API) teacher: an OpenAI or OpenAI-compatible model answers the prompts.

Called by the teacher stage with the prompts not yet in the output store. Two ways to ask, picked by
`teacher.closed.pipeline.use_batch_api`:

* Chat calls: concurrent `chat.completions` requests, exactly `max_concurrency` in flight from the first
  prompt to the last (a new request starts as soon as one ends; nothing waits for a slow one to drain).
  Prompts are counted in waves of `batch_size` for the failure report and the unreachable-server check.
  Answers are appended to the output store every few seconds and when a wave has ended, so a killed
  worker loses little. Retries on 429 / 5xx / timeouts / connection errors are the
  openai client's own (`max_retries`, exponential backoff, honours Retry-After).
* The Batch API: one job of at most `batch_size` prompts at a time (upload the requests, create the
  batch, poll it, download the results). The job's id is kept in `<stage_dir>/batch_state.json` until its
  results are stored, so a re-run after a kill collects the same job instead of paying for it twice:

      {"batch_id": "...", "input_file_id": "...", "model": "...", "ids": ["p...", ...], "submitted": 1.7e9}

A prompt that gets no usable answer (an error after the retries, a malformed body, an empty answer) is a
failure: it is never written to the output store but to `<stage_dir>/failures.jsonl`
(`{"id", "error", "ts"}`), and since it is not in the output store the next run asks it again. Errors
that would fail every prompt the same way (a rejected key, a missing model, an unreachable server) stop
the stage at once with a StageError that says what to fix.

The API key is read from OPENAI_API_KEY and handed to the client only; no message, event or file we
write contains it (and every message passes through `redact` as well).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from engine.config.schema import ClosedTeacher, ClosedTeacherPipeline
from engine.core.fsio import append_jsonl, atomic_write, dumps_line, parse_line
from engine.core.secrets import clip, redact
from engine.runner.context import StageContext, StageError
from engine.teacher.output import TeacherOutput

FAILURES_FILE = "failures.jsonl"
BATCH_STATE_FILE = "batch_state.json"
PLACEHOLDER_KEY = "not-needed"
"""Sent to a local server (base_url set, no OPENAI_API_KEY): `vllm serve` and the like ignore it."""

FLUSH_EVERY_S = 2.0
"""The chat path stores answers at least this often, so a kill loses at most a few seconds of work."""
CANCEL_CHECK_S = 0.2
DETAILED_FAILURE_LOGS = 5
"""Log this many failures one by one; after that, one summary line per wave."""

BATCH_ENDPOINT = "/v1/chat/completions"
BATCH_DONE = ("completed", "failed", "expired", "cancelled")


def answer_closed(
    ctx: StageContext,
    prompts: list[dict],
    output: TeacherOutput,
    system_prompt: str | None,
    extra_body: dict[str, Any] | None = None,
) -> dict:
    """Answer `prompts` ({"id", "instruction", ...}) with the closed teacher, appending to `output`.

    `extra_body`: server-specific request fields (our vLLM server's `stop_token_ids`), chat requests only.

    Returns {"answered", "failed", "prompt_tokens", "completion_tokens", "truncated", "seconds"}.
    Raises StageError for problems every prompt would hit, StageCancelled after a cancel request.
    """
    closed = ctx.config.teacher.closed
    prompts = list({p["id"]: p for p in prompts}.values())  # one answer per id, even if asked twice
    ledger = _Ledger(ctx, output, total=len(prompts))
    if not prompts:
        return ledger.summary()
    endpoint = closed_endpoint(closed)
    ctx.check_cancelled()
    mode = "Batch API jobs" if closed.pipeline.use_batch_api else "chat requests"
    ctx.events.log(f"closed teacher {closed.model.name} at {endpoint.where}: {len(prompts)} prompts by {mode}")
    asking = _Asking(ctx, closed, endpoint, system_prompt, ledger)
    if closed.pipeline.use_batch_api:
        _answer_by_batches(asking, prompts)
    else:
        asyncio.run(_answer_by_chat(asking, prompts, extra_body))
    summary = ledger.summary()
    ctx.events.log(
        f"closed teacher: {summary['answered']} answered, {summary['failed']} failed"
        + (f" (in {FAILURES_FILE}; the next run asks them again)" if summary["failed"] else "")
        + f", {summary['completion_tokens']} answer tokens in {summary['seconds']:.1f}s",
        level="warning" if summary["failed"] else "info",
    )
    return summary


# ------------------------------------------------------------------------------------------ endpoint


@dataclass(frozen=True)
class _Endpoint:
    base_url: str | None
    api_key: str = field(repr=False)
    key_is_placeholder: bool

    @property
    def where(self) -> str:
        return self.base_url or "the OpenAI API"


def closed_endpoint(closed: ClosedTeacher) -> _Endpoint:
    """Base URL from the config, else OPENAI_BASE_URL, else OpenAI; the key from OPENAI_API_KEY (a StageError
    when OpenAI itself is asked without one: the teacher stage checks this before it touches its answers)."""
    base_url = closed.base_url or os.environ.get("OPENAI_BASE_URL") or None
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if key:
        return _Endpoint(base_url, key, key_is_placeholder=False)
    if base_url is None:
        raise StageError("OPENAI_API_KEY is not set: put it in .env or the environment (see .env.example)")
    return _Endpoint(base_url, PLACEHOLDER_KEY, key_is_placeholder=True)


def _client_options(endpoint: _Endpoint, pipeline: ClosedTeacherPipeline) -> dict[str, Any]:
    return {
        "api_key": endpoint.api_key,
        "base_url": endpoint.base_url,
        "max_retries": pipeline.max_retries,
        "timeout": pipeline.timeout_s,
    }


@dataclass(frozen=True)
class _Asking:
    """One answer_closed call: what both ways of asking (chat calls, Batch API jobs) work with."""

    ctx: StageContext
    closed: ClosedTeacher
    endpoint: _Endpoint
    system_prompt: str | None
    ledger: _Ledger

    def request(self, instruction: str) -> dict[str, Any]:
        """The body of one chat completion: the same for chat calls and Batch API lines."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": instruction})
        pipeline = self.closed.pipeline
        request = {
            "model": self.closed.model.name,
            "messages": messages,
            "temperature": pipeline.temperature,
            "top_p": pipeline.top_p,
        }
        if pipeline.max_tokens is not None:
            request["max_tokens"] = pipeline.max_tokens
        return request


# ------------------------------------------------------------------------------------ answers, errors


class _BadResponse(Exception):
    """A response arrived but holds no usable answer: malformed, empty or refused."""


@dataclass
class _Answer:
    text: str
    finish_reason: str | None
    model: str | None
    prompt_tokens: int
    completion_tokens: int


def _parse_completion(body: Any) -> _Answer:
    """A chat completion body (a dict) → its answer; anything unusable raises _BadResponse."""
    try:
        choice = body["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise _BadResponse("malformed response: no choices[0].message in the body") from None
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str) or not text.strip():
        refusal = message.get("refusal") if isinstance(message, dict) else None
        if refusal:
            raise _BadResponse(clip(f"the model refused: {refusal}", 200))
        raise _BadResponse(f"empty answer (finish_reason={choice.get('finish_reason')})")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return _Answer(
        text=text.strip(),
        finish_reason=choice.get("finish_reason"),
        model=body.get("model") if isinstance(body.get("model"), str) else None,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
    )


def _count(value: Any) -> int:
    """A token count from a server we do not control: anything odd counts as 0, never as an error."""
    return value if isinstance(value, int) and value >= 0 else 0


def _describe(exc: BaseException, pipeline: ClosedTeacherPipeline) -> str:
    """One line saying why a prompt failed (goes to failures.jsonl and the log)."""
    retries = f"after {pipeline.max_retries} retries"
    return clip(_reason(exc, pipeline, retries), 500)


def _reason(exc: BaseException, pipeline: ClosedTeacherPipeline, retries: str) -> str:
    if isinstance(exc, _BadResponse):
        return str(exc)
    if isinstance(exc, openai.APITimeoutError):
        return f"timed out ({pipeline.timeout_s:g}s per attempt) {retries}"
    if isinstance(exc, openai.APIConnectionError):
        return f"connection error {retries}: {exc.__cause__ or exc}"
    if isinstance(exc, openai.APIStatusError):
        retried = exc.status_code in (408, 409, 429) or exc.status_code >= 500
        return f"HTTP {exc.status_code}{' ' + retries if retried else ''}: {exc.message}"
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed response: the body is not valid JSON ({exc})"
    if isinstance(exc, (openai.APIResponseValidationError, ValueError)):
        return f"malformed response: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _fatal(exc: BaseException, endpoint: _Endpoint, model: str) -> StageError | None:
    """Errors that every prompt would hit the same way: stop the stage instead of failing each prompt."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    detail = clip(str(exc.message), 300)
    if exc.status_code == 401:
        if endpoint.key_is_placeholder:
            return StageError(
                f"{endpoint.where} requires an API key (401 Unauthorized); "
                "set OPENAI_API_KEY in .env or the environment"
            )
        return StageError("the API rejected the key (401 Unauthorized); check OPENAI_API_KEY")
    if exc.status_code == 403:
        return StageError(
            f"the API refused access (403 Forbidden): {detail}; "
            f"check that the key in OPENAI_API_KEY may use model {model!r}"
        )
    if exc.status_code == 404:
        return StageError(
            f"{endpoint.where} answered 404 Not Found for model {model!r}: {detail}; "
            "check teacher.closed.model.name and teacher.closed.base_url"
        )
    return None


# -------------------------------------------------------------------------------------------- ledger


class _Ledger:
    """Where outcomes go: answers to the output store, failures to failures.jsonl, totals to events."""

    def __init__(self, ctx: StageContext, output: TeacherOutput, total: int):
        self.ctx = ctx
        self.output = output
        self.total = total
        self.failures_path = ctx.stage_dir / FAILURES_FILE
        self.started = time.monotonic()
        self.last_flush = self.started
        self.answered = self.failed = self.truncated = 0
        self.prompt_tokens = self.completion_tokens = 0
        self._records: list[dict[str, Any]] = []
        self._failures: list[dict[str, Any]] = []

    def answer(self, prompt: dict[str, Any], answer: _Answer, model: str) -> None:
        self._records.append(
            {
                "id": prompt["id"],
                "instruction": prompt["instruction"],
                "output": answer.text,
                "model": answer.model or model,
                "finish_reason": answer.finish_reason,
            }
        )
        self.prompt_tokens += answer.prompt_tokens
        self.completion_tokens += answer.completion_tokens
        self.truncated += answer.finish_reason == "length"

    def fail(self, prompt_id: str, error: str) -> None:
        error = redact(error)
        self._failures.append({"id": prompt_id, "error": error, "ts": round(time.time(), 3)})
        self.failed += 1
        if self.failed <= DETAILED_FAILURE_LOGS:
            self.ctx.events.log(f"prompt {prompt_id} failed: {error}", level="error")

    def flush(self) -> None:
        """Store what arrived since the last flush (durably), then report progress and throughput."""
        if self._records:
            self.answered += self.output.append(self._records)
            self._records = []
        if self._failures:
            first = not self.failures_path.exists()
            append_jsonl(self.failures_path, self._failures, durable=False)
            self._failures = []
            if first:
                self.ctx.events.artifact(self.failures_path, "prompts the teacher failed to answer")
        self.last_flush = time.monotonic()
        done = self.answered + self.failed
        events = self.ctx.events
        events.progress(done, self.total, "prompts")
        events.metric("tokens_per_s", round(self.completion_tokens / self.seconds, 2), step=done)
        events.metric("prompt_tokens", self.prompt_tokens, step=done)
        events.metric("completion_tokens", self.completion_tokens, step=done)

    @property
    def seconds(self) -> float:
        return max(time.monotonic() - self.started, 1e-6)

    def summary(self) -> dict[str, Any]:
        return {
            "answered": self.answered,
            "failed": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "truncated": self.truncated,
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------------------------------- chat calls


async def _answer_by_chat(asking: _Asking, prompts: list[dict], extra_body: dict[str, Any] | None = None) -> None:
    closed, endpoint = asking.closed, asking.endpoint
    async with openai.AsyncOpenAI(**_client_options(endpoint, closed.pipeline)) as client:

        async def ask(prompt: dict) -> _Answer:
            request = asking.request(prompt["instruction"])
            if extra_body:
                request["extra_body"] = extra_body
            response = await client.chat.completions.create(**request)
            if not hasattr(response, "model_dump"):  # a body that is not JSON comes back as text
                raise _BadResponse(f"malformed response: not a chat completion: {clip(str(response), 100)!r}")
            return _parse_completion(response.model_dump())

        await _feed(asking, prompts, ask)
    asking.ctx.check_cancelled()


@dataclass
class _Wave:
    """`batch_size` consecutive prompts: what ended of them, and how the failed ones failed."""

    number: int
    size: int
    ended: int = 0
    errors: list[BaseException] = field(default_factory=list)


async def _feed(asking: _Asking, prompts: list[dict], ask: Callable[[dict], Awaitable[_Answer]]) -> None:
    """Ask every prompt with `max_concurrency` requests in flight, starting the next as soon as one ends.

    Waits in short slices so a cancel request stops new requests within CANCEL_CHECK_S; whatever
    happens (cancel, fatal error), the answers already received are stored before leaving.
    """
    ctx, closed, ledger = asking.ctx, asking.closed, asking.ledger
    pipeline = closed.pipeline
    sizes = range(0, len(prompts), pipeline.batch_size)
    waves = [_Wave(n, min(pipeline.batch_size, len(prompts) - start)) for n, start in enumerate(sizes, 1)]
    queue = iter(enumerate(prompts))
    tasks: dict[asyncio.Task, tuple[int, dict]] = {}
    try:
        while not ctx.cancel_requested:
            for index, prompt in itertools.islice(queue, pipeline.max_concurrency - len(tasks)):
                tasks[asyncio.create_task(ask(prompt))] = (index, prompt)
            if not tasks:
                break
            done, _ = await asyncio.wait(set(tasks), timeout=CANCEL_CHECK_S, return_when=asyncio.FIRST_COMPLETED)
            fatal, ended = None, []
            for task in done:  # every finished task is read, so none is left holding an unread exception
                index, prompt = tasks.pop(task)
                wave = waves[index // pipeline.batch_size]
                wave.ended += 1
                if wave.ended == wave.size:
                    ended.append(wave)
                if (exc := task.exception()) is None:
                    ledger.answer(prompt, task.result(), closed.model.name)
                elif (stop := _fatal(exc, asking.endpoint, closed.model.name)) is not None:
                    fatal = fatal or stop  # every prompt would fail the same way: not a per-prompt failure
                else:
                    wave.errors.append(exc)
                    ledger.fail(prompt["id"], _describe(exc, pipeline))
            if fatal is not None:
                raise fatal from None
            if ended or time.monotonic() - ledger.last_flush >= FLUSH_EVERY_S:
                ledger.flush()
            for wave in ended:
                _report_wave(asking, wave, len(waves))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # retrieved: asyncio prints nothing
        ledger.flush()


def _report_wave(asking: _Asking, wave: _Wave, waves: int) -> None:
    """Log a wave's failures; stop the stage when not one prompt of it reached the server."""
    if wave.errors:
        asking.ctx.events.log(
            f"wave {wave.number}/{waves}: {len(wave.errors)} of {wave.size} prompts failed "
            f"(details in {FAILURES_FILE}); the next run asks them again",
            level="error",
        )
    if _all_unreachable(wave.errors, wave.size):
        raise StageError(
            f"cannot reach {asking.endpoint.where}: {_describe(wave.errors[0], asking.closed.pipeline)}; "
            "check teacher.closed.base_url (or OPENAI_BASE_URL) and that the server is running"
        )


def _all_unreachable(errors: list[BaseException], wave_size: int) -> bool:
    """Every prompt of the wave failed to connect (not a timeout: a slow server is still a server)."""
    return (
        len(errors) == wave_size
        and wave_size > 0
        and all(isinstance(e, openai.APIConnectionError) and not isinstance(e, openai.APITimeoutError) for e in errors)
    )


# ----------------------------------------------------------------------------------------- Batch API


def _answer_by_batches(asking: _Asking, prompts: list[dict]) -> None:
    """Collect a job left by an earlier run, then submit and collect one job per `batch_size` prompts."""
    ctx, closed, endpoint = asking.ctx, asking.closed, asking.endpoint
    state_path = ctx.stage_dir / BATCH_STATE_FILE
    pending = {p["id"]: p for p in prompts}
    with _batch_api_errors(endpoint, closed), openai.OpenAI(**_client_options(endpoint, closed.pipeline)) as client:
        state = _read_state(ctx, state_path)
        if state is not None and state.get("model") != closed.model.name:
            ctx.events.log(
                f"batch {state['batch_id']} was submitted for model {state.get('model')!r}, the config now names "
                f"{closed.model.name!r}: cancelling it and asking again",
                level="warning",
            )
            _cancel_batch(ctx, client, state["batch_id"])
            state_path.unlink(missing_ok=True)
            state = None
        if state is not None:
            ctx.events.log(f"resuming batch {state['batch_id']} ({len(state['ids'])} prompts) from an earlier run")
            _collect_batch(asking, client, state, pending, resumed=True)
        while pending:
            ctx.check_cancelled()
            chunk = list(pending.values())[: closed.pipeline.batch_size]
            state = _submit_batch(asking, client, chunk)
            _collect_batch(asking, client, state, pending, resumed=False)


@contextlib.contextmanager
def _batch_api_errors(endpoint: _Endpoint, closed: ClosedTeacher) -> Iterator[None]:
    """Batch API calls have no per-prompt failure: an API error after retries stops the stage."""
    try:
        yield
    except openai.APIError as exc:
        fatal = _fatal(exc, endpoint, closed.model.name)
        if fatal is not None:
            raise fatal from None
        raise StageError(
            f"Batch API request to {endpoint.where} failed: {redact(_describe(exc, closed.pipeline))}; "
            "run the stage again to resume (a submitted job is picked up where it was)"
        ) from None


def _read_state(ctx: StageContext, path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        state = None
    if not (isinstance(state, dict) and isinstance(state.get("batch_id"), str) and isinstance(state.get("ids"), list)):
        ctx.events.log(f"{path.name} is unreadable: ignoring it (a job it named is not collected)", level="warning")
        path.unlink(missing_ok=True)
        return None
    return state


def _submit_batch(asking: _Asking, client: openai.OpenAI, chunk: list[dict]) -> dict[str, Any]:
    """Upload the requests, create the job, and remember it before anything else can go wrong."""
    ctx = asking.ctx
    lines = [
        {"custom_id": p["id"], "method": "POST", "url": BATCH_ENDPOINT, "body": asking.request(p["instruction"])}
        for p in chunk
    ]
    data = "".join(dumps_line(line) for line in lines).encode("utf-8")
    upload = client.files.create(file=("tas-teacher-batch.jsonl", data, "application/jsonl"), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=BATCH_ENDPOINT, completion_window="24h")
    state = {
        "batch_id": batch.id,
        "input_file_id": upload.id,
        "model": asking.closed.model.name,
        "ids": [p["id"] for p in chunk],
        "submitted": round(time.time(), 3),
    }
    atomic_write(ctx.stage_dir / BATCH_STATE_FILE, json.dumps(state, indent=1).encode("utf-8"))
    ctx.events.log(f"submitted batch {batch.id} with {len(chunk)} prompts")
    return state


def _collect_batch(
    asking: _Asking, client: openai.OpenAI, state: dict[str, Any], pending: dict[str, dict], resumed: bool
) -> None:
    """Wait for the job, store its answers and failures, then forget it.

    Prompts of the job without any result line are failures, except in a job resumed from an earlier
    run that was cancelled or expired: those were never tried, so they go into the next job instead.
    """
    ctx, closed, ledger = asking.ctx, asking.closed, asking.ledger
    batch_id = state["batch_id"]
    failed_before = ledger.failed
    batch = _wait_for_batch(ctx, client, batch_id, closed.pipeline.batch_poll_interval_s, ledger)
    results: dict[str, dict[str, Any]] = {}
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            results.update(_download_results(ctx, client, file_id))
    for prompt_id in state["ids"]:
        prompt = pending.get(prompt_id)
        if prompt is None:
            continue  # answered meanwhile, or no longer asked for
        line = results.get(prompt_id)
        if line is None:
            if resumed and batch.status in ("cancelled", "expired"):
                continue
            ledger.fail(prompt_id, f"batch {batch_id} ended {batch.status} without a result for this prompt")
        else:
            try:
                ledger.answer(prompt, _batch_answer(line), closed.model.name)
            except _BadResponse as exc:
                ledger.fail(prompt_id, str(exc))
        del pending[prompt_id]
    ledger.flush()
    (ctx.stage_dir / BATCH_STATE_FILE).unlink(missing_ok=True)
    failed = ledger.failed - failed_before
    ctx.events.log(
        f"batch {batch_id} {batch.status}: "
        + (f"{failed} prompts failed (details in {FAILURES_FILE}); " if failed else "")
        + f"{ledger.answered} answered so far",
        level="error" if failed else "info",
    )
    if batch.status == "failed":
        errors = batch.errors.data if batch.errors and batch.errors.data else []
        reasons = "; ".join(redact(f"{e.code}: {e.message}") for e in errors)
        raise StageError(
            f"batch {batch_id} failed: {reasons or 'no reason given'}; "
            "check teacher.closed.model.name and the Batch API limits of the account"
        )


def _wait_for_batch(ctx: StageContext, client: openai.OpenAI, batch_id: str, interval: float, ledger: _Ledger):
    """Poll until the job ends. A cancel request cancels the job too; batch_state.json is kept so a
    re-run stores whatever the job finished before it stopped."""
    seen = None
    while True:
        batch = client.batches.retrieve(batch_id)
        counts = batch.request_counts
        now = (batch.status, counts.completed if counts else 0, counts.failed if counts else 0)
        if now != seen:
            seen = now
            if counts:
                ended = counts.completed + counts.failed
                done = f"{ended}/{counts.total} done, {counts.failed} failed"
                ctx.events.log(f"batch {batch_id}: {batch.status} ({done})")
                ctx.events.progress(ledger.answered + ledger.failed + ended, ledger.total, "prompts")
            else:
                ctx.events.log(f"batch {batch_id}: {batch.status}")
        if batch.status in BATCH_DONE:
            return batch
        if ctx.cancel_event.wait(interval):
            _cancel_batch(ctx, client, batch_id)
            ctx.check_cancelled()


def _cancel_batch(ctx: StageContext, client: openai.OpenAI, batch_id: str) -> None:
    try:
        client.batches.cancel(batch_id)
    except openai.APIError as exc:
        ctx.events.log(f"could not cancel batch {batch_id}: {clip(str(exc), 200)}", level="warning")
        return
    ctx.events.log(f"asked the API to cancel batch {batch_id}; a re-run stores what it finished", level="warning")


def _download_results(ctx: StageContext, client: openai.OpenAI, file_id: str) -> dict[str, dict[str, Any]]:
    """A Batch API output or error file → {custom_id: result line}; unreadable lines are skipped."""
    text = client.files.content(file_id).read().decode("utf-8", errors="replace")
    results, unreadable = {}, 0
    for raw in text.splitlines():
        if not raw.strip():
            continue
        line = parse_line(raw)
        if line is None or "custom_id" not in line:
            unreadable += 1
            continue
        results[str(line["custom_id"])] = line
    if unreadable:
        ctx.events.log(f"{unreadable} unreadable lines in batch result file {file_id}", level="warning")
    return results


def _batch_answer(line: dict[str, Any]) -> _Answer:
    """One result line → its answer; an error, a non-200 status or an unusable body raises _BadResponse."""
    if line.get("error"):
        error = line["error"]
        detail = f"{error.get('code')}: {error.get('message')}" if isinstance(error, dict) else str(error)
        raise _BadResponse(clip(f"batch item error: {detail}", 300))
    response = line.get("response") if isinstance(line.get("response"), dict) else {}
    status, body = response.get("status_code"), response.get("body")
    if status != 200:
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else body
        raise _BadResponse(clip(f"HTTP {status}: {message}", 300))
    if not isinstance(body, dict):
        raise _BadResponse("malformed response: the batch result body is not a JSON object")
    return _parse_completion(body)
