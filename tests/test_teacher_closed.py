"""The closed teacher against a local OpenAI-compatible server, with the real `openai` client over HTTP."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.runner.context import StageCancelled, StageContext, StageError
from engine.stages import teacher
from engine.store.events import read_events
from engine.teacher.closed import BATCH_STATE_FILE, FAILURES_FILE, answer_closed
from engine.teacher.output import TeacherOutput

from .fake_openai import FakeOpenAI
from .helpers import make_context, wait_for

KEY = "tas-test-key-7f3a9c1e5b2d"  # planted: must never show up in anything we write
SYSTEM = "You are a patient Python teacher."


@pytest.fixture
def server():
    with FakeOpenAI(delay_s=0.02) as fake:
        yield fake


@pytest.fixture(autouse=True)
def api_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    for name in ("OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)


def setup(project: Path, base_url: str | None, **pipeline):
    """A teacher-stage context over a fresh run, with fast retries and polls unless overridden."""
    config = load_config(project / "configs" / "tiny.yaml")
    config.teacher.source = "closed"
    config.teacher.base.output_path = str(project / "out" / "teacher.jsonl")
    closed = config.teacher.closed
    closed.base_url = base_url
    settings = {
        "max_retries": 3,
        "timeout_s": 5.0,
        "max_concurrency": 4,
        "batch_size": 8,
        "batch_poll_interval_s": 0.02,
    }
    settings.update(pipeline)
    for name, value in settings.items():
        setattr(closed.pipeline, name, value)
    ctx = make_context(config, "teacher", project)
    return ctx, TeacherOutput(config.teacher.base.output_path)


def make_prompts(texts: list[str]) -> list[dict]:
    return [{"id": f"p{i:03d}", "instruction": text, "source": "test"} for i, text in enumerate(texts)]


def plain(n: int, start: int = 0) -> list[str]:
    return [f"How do I reverse list number {i}?" for i in range(start, start + n)]


def unanswered(prompts: list[dict], output: TeacherOutput) -> list[dict]:
    done = output.done_ids()
    return [p for p in prompts if p["id"] not in done]


def failures(ctx) -> list[dict]:
    path = ctx.stage_dir / FAILURES_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_each_once(output: TeacherOutput, prompts: list[dict]) -> None:
    ids = [r["id"] for r in output.records()]
    assert sorted(ids) == sorted(p["id"] for p in prompts)
    by_id = {p["id"]: p for p in prompts}
    for record in output.records():
        assert record["output"] == f"ANSWER to: {by_id[record['id']]['instruction']}"


def assert_no_key_anywhere(project: Path) -> None:
    for path in project.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(errors="replace"), f"the API key leaked into {path}"


# ----------------------------------------------------------------------------------------- chat path


def test_chat_answers_every_prompt_concurrently(project: Path, server: FakeOpenAI) -> None:
    server.delay_s = 0.05
    ctx, output = setup(project, server.url, max_concurrency=4, batch_size=6)
    prompts = make_prompts(plain(14))

    summary = answer_closed(ctx, prompts, output, SYSTEM)

    assert summary["answered"] == 14 and summary["failed"] == 0
    assert summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0
    assert_each_once(output, prompts)
    assert all(r["model"] == "gpt-4o-mini" for r in output.records())
    assert all(server.system_prompts[p["instruction"]] == SYSTEM for p in prompts)
    assert all(server.attempts[p["instruction"]] == 1 for p in prompts)
    assert 2 <= server.max_in_flight <= 4
    chats = [r for r in server.requests if r["path"] == "/v1/chat/completions"]
    assert len(chats) == 14
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in chats)

    events = read_events(ctx.stage_dir / "events.jsonl")
    progress = [e for e in events if e["kind"] == "progress"]
    assert progress[-1]["done"] == 14 and progress[-1]["total"] == 14 and progress[-1]["unit"] == "prompts"
    metrics = {e["name"]: e["value"] for e in events if e["kind"] == "metric"}
    assert metrics["tokens_per_s"] > 0 and metrics["completion_tokens"] == summary["completion_tokens"]
    assert not (ctx.stage_dir / FAILURES_FILE).exists()
    assert_no_key_anywhere(project)


def test_chat_without_system_prompt_sends_only_the_instruction(project: Path, server: FakeOpenAI) -> None:
    ctx, output = setup(project, server.url)
    prompts = make_prompts(plain(2))
    answer_closed(ctx, prompts, output, None)
    assert all(server.system_prompts[p["instruction"]] is None for p in prompts)
    assert_each_once(output, prompts)


def test_chat_retries_rate_limits_server_errors_and_timeouts(project: Path, server: FakeOpenAI) -> None:
    server.slow_s = 2.5
    ctx, output = setup(project, server.url, timeout_s=1.0, max_retries=3)
    prompts = make_prompts(["[[429x2]] sort a dict", "[[500x1]] read a file", "[[slow]] parse json", "plain one"])

    summary = answer_closed(ctx, prompts, output, SYSTEM)

    assert summary == {**summary, "answered": 4, "failed": 0}
    assert_each_once(output, prompts)
    attempts = [server.attempts[p["instruction"]] for p in prompts]
    assert attempts == [3, 2, 2, 1]
    assert not (ctx.stage_dir / FAILURES_FILE).exists()


def test_bad_answers_become_failures_and_a_rerun_answers_exactly_those(project: Path, server: FakeOpenAI) -> None:
    ctx, output = setup(project, server.url, max_retries=1, batch_size=4)
    texts = plain(4) + ["[[malformed]] a", "[[nochoices]] b", "[[empty]] c", "[[429x9]] d", "[[500x9]] e"]
    prompts = make_prompts(texts)
    bad_ids = {p["id"] for p in prompts[4:]}

    summary = answer_closed(ctx, prompts, output, SYSTEM)

    assert summary["answered"] == 4 and summary["failed"] == 5
    assert output.done_ids() == {p["id"] for p in prompts[:4]}
    failed = failures(ctx)
    assert {f["id"] for f in failed} == bad_ids
    assert all(f["error"] and f["ts"] > 0 for f in failed)
    errors = {f["id"]: f["error"] for f in failed}
    assert "malformed" in errors["p004"] and "malformed" in errors["p005"]
    assert "empty answer" in errors["p006"]
    assert "429" in errors["p007"] and "retries" in errors["p007"]
    assert "500" in errors["p008"]
    assert server.attempts["[[429x9]] d"] == 2  # one try + max_retries=1
    logs = [e for e in read_events(ctx.stage_dir / "events.jsonl") if e["kind"] == "log" and e["level"] == "error"]
    assert any("p004" in e["msg"] for e in logs) and any("failed" in e["msg"] and "wave" in e["msg"] for e in logs)

    server.faults = False  # the trouble went away
    ctx2, _ = setup(project, server.url, max_retries=1)
    retry = unanswered(prompts, output)
    assert {p["id"] for p in retry} == bad_ids
    summary = answer_closed(ctx2, retry, output, SYSTEM)

    assert summary["answered"] == 5 and summary["failed"] == 0
    assert_each_once(output, prompts)
    assert_no_key_anywhere(project)


def test_rejected_key_stops_at_once_without_showing_it(project: Path) -> None:
    with FakeOpenAI(api_key="the-right-key-123456") as server:
        ctx, output = setup(project, server.url, max_concurrency=2, batch_size=4)
        prompts = make_prompts(plain(8))
        with pytest.raises(StageError) as info:
            answer_closed(ctx, prompts, output, SYSTEM)
    message = str(info.value)
    assert "401" in message and "OPENAI_API_KEY" in message and KEY not in message
    assert output.records() == []
    assert len([r for r in server.requests if r["path"] == "/v1/chat/completions"]) < 8  # it did not go on
    assert_no_key_anywhere(project)


def test_unknown_model_or_endpoint_stops_at_once(project: Path, server: FakeOpenAI) -> None:
    ctx, output = setup(project, server.url.replace("/v1", "/nothing-here"))
    with pytest.raises(StageError, match=r"404 Not Found for model 'gpt-4o-mini'.*teacher.closed.model.name"):
        answer_closed(ctx, make_prompts(plain(3)), output, None)
    assert not (ctx.stage_dir / FAILURES_FILE).exists()


def test_missing_key_without_base_url_is_a_clear_error(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    ctx, output = setup(project, None)
    with pytest.raises(StageError, match=r"OPENAI_API_KEY is not set: put it in .env or the environment"):
        answer_closed(ctx, make_prompts(plain(1)), output, None)


def test_missing_key_fails_the_stage_before_the_answers_are_touched(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    ctx, output = setup(project, None)
    prompts = project / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in make_prompts(plain(3))))
    ctx.config.data.output_path = str(prompts)
    output.path.parent.mkdir(parents=True)
    output.path.write_text(json.dumps({"id": "p000", "instruction": "q", "output": "a", "fp": "other"}) + "\n")
    before = output.path.read_bytes()
    with pytest.raises(StageError, match=r"OPENAI_API_KEY is not set"):
        teacher.run(ctx)
    assert output.path.read_bytes() == before and not output.stale_path.exists()


def test_local_server_without_key_gets_a_placeholder(
    project: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)  # the env base URL is used when the config has none
    ctx, output = setup(project, None)
    prompts = make_prompts(plain(2))
    assert answer_closed(ctx, prompts, output, None)["answered"] == 2
    assert all(r["headers"]["authorization"].startswith("Bearer ") for r in server.requests)


def test_unreachable_server_is_a_clear_error(project: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    ctx, output = setup(project, f"http://127.0.0.1:{port}/v1", max_retries=0)
    with pytest.raises(StageError, match="cannot reach http://127.0.0.1"):
        answer_closed(ctx, make_prompts(plain(3)), output, None)


def test_cancel_stops_new_requests_and_keeps_what_arrived(project: Path, server: FakeOpenAI) -> None:
    server.delay_s = 0.05
    ctx, output = setup(project, server.url, max_concurrency=2, batch_size=40)
    server.on_chat = lambda count: ctx.cancel_event.set() if count == 4 else None
    prompts = make_prompts(plain(40))

    with pytest.raises(StageCancelled):
        answer_closed(ctx, prompts, output, None)

    assert server.chat_requests < 12
    assert 1 <= len(output.records()) < 12  # answers that arrived before the cancel were stored
    assert not (ctx.stage_dir / FAILURES_FILE).exists()  # cancelled requests are not failures
    server.on_chat = None
    ctx2, _ = setup(project, server.url, max_concurrency=4, batch_size=40)
    answer_closed(ctx2, unanswered(prompts, output), output, None)
    assert_each_once(output, prompts)


# ----------------------------------------------------------------------------------------- Batch API


def batch_posts(server: FakeOpenAI) -> list[dict]:
    return [r for r in server.requests if r["method"] == "POST" and r["path"] == "/v1/batches"]


def uploaded_lines(server: FakeOpenAI) -> list[list[dict]]:
    return [
        [json.loads(line) for line in f["content"].decode().splitlines()]
        for f in server.files.values()
        if f["purpose"] == "batch"
    ]


def test_batch_api_answers_every_prompt(project: Path, server: FakeOpenAI) -> None:
    ctx, output = setup(project, server.url, use_batch_api=True, batch_size=5)
    prompts = make_prompts(plain(12))

    summary = answer_closed(ctx, prompts, output, SYSTEM)

    assert summary["answered"] == 12 and summary["failed"] == 0 and summary["completion_tokens"] > 0
    assert_each_once(output, prompts)
    assert len(batch_posts(server)) == 3  # at most batch_size prompts per job
    jobs = uploaded_lines(server)
    assert [len(job) for job in jobs] == [5, 5, 2]
    first = jobs[0][0]
    assert first["method"] == "POST" and first["url"] == "/v1/chat/completions"
    assert first["custom_id"] == "p000"
    assert first["body"]["messages"][0] == {"role": "system", "content": SYSTEM}
    assert first["body"]["model"] == "gpt-4o-mini"
    assert not server.batches_cancelled
    assert not (ctx.stage_dir / BATCH_STATE_FILE).exists()
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert_no_key_anywhere(project)


def test_batch_failures_are_not_stored_and_a_rerun_retries_them(project: Path, server: FakeOpenAI) -> None:
    ctx, output = setup(project, server.url, use_batch_api=True, batch_size=10)
    prompts = make_prompts(plain(3) + ["[[batch-fail]] x", "[[empty]] y", "[[nochoices]] z"])

    summary = answer_closed(ctx, prompts, output, None)

    assert summary["answered"] == 3 and summary["failed"] == 3
    assert output.done_ids() == {"p000", "p001", "p002"}
    errors = {f["id"]: f["error"] for f in failures(ctx)}
    assert set(errors) == {"p003", "p004", "p005"}
    assert "400" in errors["p003"] and "empty answer" in errors["p004"] and "malformed" in errors["p005"]

    server.faults = False
    ctx2, _ = setup(project, server.url, use_batch_api=True, batch_size=10)
    summary = answer_closed(ctx2, unanswered(prompts, output), output, None)
    assert summary["answered"] == 3 and summary["failed"] == 0
    assert_each_once(output, prompts)
    assert_no_key_anywhere(project)


def test_batch_in_flight_is_resumed_not_resubmitted(project: Path, server: FakeOpenAI) -> None:
    ctx, output = setup(project, server.url, use_batch_api=True, batch_size=10)
    prompts = make_prompts(plain(6))
    # an earlier run submitted the first four prompts and was killed while polling
    lines = [
        {
            "custom_id": p["id"],
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": p["instruction"]}]},
        }
        for p in prompts[:4]
    ]
    file_id = server.store_file("old.jsonl", "batch", "".join(json.dumps(line) + "\n" for line in lines).encode())
    old = server.create_batch(file_id)
    ids = [p["id"] for p in prompts[:4]]
    state = {"batch_id": old["id"], "input_file_id": file_id, "model": "gpt-4o-mini", "ids": ids}
    (ctx.stage_dir / BATCH_STATE_FILE).write_text(json.dumps(state))

    summary = answer_closed(ctx, prompts, output, None)

    assert summary["answered"] == 6
    assert_each_once(output, prompts)
    assert len(batch_posts(server)) == 1  # only the two prompts the old job did not hold
    assert [line["custom_id"] for line in uploaded_lines(server)[-1]] == ["p004", "p005"]
    assert all(server.attempts[p["instruction"]] == 1 for p in prompts)
    assert not (ctx.stage_dir / BATCH_STATE_FILE).exists()


def test_batch_cancel_cancels_the_job_and_a_rerun_collects_it(project: Path, server: FakeOpenAI) -> None:
    server.batch_polls = 10_000  # never finishes on its own
    ctx, output = setup(project, server.url, use_batch_api=True, batch_size=10)
    prompts = make_prompts(plain(4))
    state_path = ctx.stage_dir / BATCH_STATE_FILE

    def cancel_once_submitted():  # SIGTERM while the job is being polled
        try:
            wait_for(state_path.exists, timeout=30, interval=0.02, what="the batch job to be submitted")
        finally:
            ctx.cancel_event.set()

    canceller = threading.Thread(target=cancel_once_submitted, daemon=True)
    canceller.start()

    with pytest.raises(StageCancelled):
        answer_closed(ctx, prompts, output, None)
    canceller.join()

    assert len(server.batches_cancelled) == 1
    state = json.loads((ctx.stage_dir / BATCH_STATE_FILE).read_text())
    assert state["batch_id"] == server.batches_cancelled[0] and state["ids"] == [p["id"] for p in prompts]
    assert output.records() == []

    # the stage started again in the same run (a fresh worker): the cancelled job is collected (nothing
    # in it) and its prompts are asked anew
    server.batch_polls = 2
    again = StageContext(ctx.stage, ctx.run, ctx.config, ctx.events)
    summary = answer_closed(again, unanswered(prompts, output), output, None)
    assert summary["answered"] == 4 and summary["failed"] == 0
    assert_each_once(output, prompts)
    assert len(batch_posts(server)) == 2
    assert not (ctx.stage_dir / BATCH_STATE_FILE).exists()
    assert not (ctx.stage_dir / FAILURES_FILE).exists()


def test_no_prompts_makes_no_requests(project: Path, server: FakeOpenAI) -> None:
    ctx, output = setup(project, server.url)
    assert answer_closed(ctx, [], output, None)["answered"] == 0
    assert server.requests == []


def test_failed_batch_job_is_a_clear_error(project: Path) -> None:
    with FakeOpenAI(batch_error="model gpt-4o-mini is not available for batch") as server:
        ctx, output = setup(project, server.url, use_batch_api=True)
        prompts = make_prompts(plain(3))
        with pytest.raises(StageError, match="failed: invalid_request: model gpt-4o-mini is not available"):
            answer_closed(ctx, prompts, output, None)
    assert output.records() == []
    assert {f["id"] for f in failures(ctx)} == {p["id"] for p in prompts}  # asked again next run
    assert not (ctx.stage_dir / BATCH_STATE_FILE).exists()
