"""Run store and event stream: derived stage states, torn lines, pid reuse, secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.core.process import ProcessRecord, write_pid_file
from engine.store.events import EventTail, EventWriter, read_events
from engine.store.lineage import resolve_outputs
from engine.store.runs import RunNotFound, RunStore, stage_status


@pytest.fixture
def store(project: Path) -> RunStore:
    return RunStore(project / "runs")


@pytest.fixture
def run(store: RunStore, project: Path):
    return store.create(load_config(project / "configs" / "tiny.yaml"), "configs/tiny.yaml")


def test_create_freezes_the_config(run, project: Path):
    frozen = run.config()
    assert frozen == resolve_outputs(
        load_config(project / "configs" / "tiny.yaml"), run.path
    )  # outputs live in the run
    assert run.id.endswith("-tiny") and run.workdir == str(project)
    assert [s.state for s in run.stages()] == ["pending"] * 5


def test_torn_last_line_is_skipped_and_completed_later(run):
    path = run.stage_dir("data") / "events.jsonl"
    writer = EventWriter(path)
    writer.status("running")
    writer.close()
    with open(path, "a") as f:
        f.write('{"ts": 1, "kind": "log", "msg": "half')
    assert [e["kind"] for e in read_events(path)] == ["status"]
    tail = EventTail(path)
    assert [e["kind"] for e in tail.poll()] == ["status"]
    with open(path, "a") as f:
        f.write(' written"}\n')
    assert [e["msg"] for e in tail.poll()] == ["half written"]


def test_stage_states_from_events(run):
    data_dir = run.stage_dir("data")
    writer = EventWriter(data_dir / "events.jsonl")
    writer.status("running")
    writer.progress(5, 10, "prompts")
    writer.metric("loss", 2.5, step=3)
    writer.metric("loss", 2.0, step=4)
    # no live pid: a running stage without a final status died
    status = stage_status(data_dir, "data")
    assert status.state == "died" and "run the stage again" in status.error
    assert status.fraction == 0.5 and status.metrics["loss"]["value"] == 2.0
    # our own pid is alive: running
    write_pid_file(data_dir / "pid", ProcessRecord.of(os.getpid()))
    assert stage_status(data_dir, "data").state == "running"
    writer.status("failed", error="boom")
    status = stage_status(data_dir, "data")
    assert (status.state, status.error) == ("failed", "boom")
    # a re-run starts clean
    writer.status("running")
    assert stage_status(data_dir, "data").error is None


@pytest.mark.e2e  # spawns a process
def test_reused_pid_is_not_our_worker(tmp_path: Path):
    record = ProcessRecord.of(os.getpid())
    assert record.is_alive()
    assert not ProcessRecord(record.pid, record.create_time - 100).is_alive()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not ProcessRecord(child.pid, 0.0).is_alive()


def test_queued_while_supervisor_alive(run):
    write_pid_file(run.path / "supervisor.json", ProcessRecord.of(os.getpid()), stages=["data", "teacher"])
    states = {s.name: s.state for s in run.stages()}
    assert states == {"data": "queued", "teacher": "queued", "sft": "pending", "distill": "pending", "eval": "pending"}
    assert run.is_live()


def test_get_by_prefix_suffix_and_last(store: RunStore, project: Path):
    config = load_config(project / "configs" / "tiny.yaml")
    a = store.create(config, "configs/tiny.yaml")
    b = store.create(config, "configs/tiny.yaml")
    assert store.get("last").id == b.id and store.get(None).id == b.id
    assert store.get(a.id).id == a.id
    with pytest.raises(RunNotFound, match="matches 2 runs"):
        store.get(a.id[:8])
    with pytest.raises(RunNotFound, match="no run 'zzz'"):
        store.get("zzz")
    (store.root / "junk").mkdir()
    (store.root / "broken").mkdir()
    (store.root / "broken" / "run.json").write_text("{not json")
    assert {r.id for r in store.list()} == {a.id, b.id}


def test_secrets_never_reach_the_event_stream(run, monkeypatch):
    secret = "sk-test-" + "Z9" * 20
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "a1b2" * 8)
    path = run.stage_dir("teacher") / "events.jsonl"
    writer = EventWriter(path)
    writer.status("failed", error=f"401 Unauthorized: key {secret} rejected")
    writer.log(f"token hf_{'a1b2' * 8} and another sk-abcdefghijklmnopqrstuvwx")
    writer.emit("metric", name="x", value=1, extra={"nested": [secret]})
    text = path.read_text()
    assert secret not in text and "hf_a1b2" not in text and "sk-abcdefghij" not in text
    assert "***" in json.loads(text.splitlines()[0])["error"]


@pytest.mark.e2e  # spawns a process
def test_sigterm_while_writing_events_never_deadlocks(tmp_path: Path):
    """The cancel handler runs in the main thread, possibly inside EventWriter.emit: it must not wait
    on the writer's lock. A child process writes events in a tight loop while SIGTERMs rain on it."""
    script = (
        "import os, signal, threading, time\n"
        "from engine.store.events import EventWriter\n"
        "from engine.runner.worker import install_cancel_handler\n"
        f"events = EventWriter({str(tmp_path / 'events.jsonl')!r})\n"
        "cancel = threading.Event()\n"
        "install_cancel_handler(events, cancel)\n"
        "def rain():\n"
        "    for _ in range(200):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.002)\n"
        "threading.Thread(target=rain).start()\n"
        "end = time.monotonic() + 1.5\n"
        "while time.monotonic() < end:\n"
        "    events.metric('loss', 1.0, step=1)\n"
        "print('FINISHED', cancel.is_set(), flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "FINISHED True" in result.stdout, result.stderr
    logs = [e for e in read_events(tmp_path / "events.jsonl") if e["kind"] == "log"]
    assert len(logs) == 1 and "cancel requested" in logs[0]["msg"]


def test_a_new_writer_starts_after_a_torn_line(run):
    path = run.stage_dir("data") / "events.jsonl"
    writer = EventWriter(path)
    writer.status("failed", error="old")
    writer.close()
    with open(path, "a") as f:
        f.write('{"ts": 1, "kind": "log", "msg": "to')  # a writer killed mid-line
    writer = EventWriter(path)
    writer.status("running")
    writer.close()
    events = read_events(path)
    assert [e.get("state") for e in events] == ["failed", "running"]
    status = stage_status(run.stage_dir("data"), "data")
    assert status.state == "died" and status.error != "old"  # the new attempt, not the old failure


@pytest.mark.e2e  # spawns a process
def test_a_queued_stage_does_not_show_the_last_attempts_error(run):
    writer = EventWriter(run.stage_dir("data") / "events.jsonl")
    writer.status("running")
    writer.progress(3, 10, "records")
    writer.status("failed", error="boom")
    writer.close()
    supervisor = subprocess.Popen(["sleep", "30"])  # started after the failure, like a new attempt's
    try:
        write_pid_file(run.path / "supervisor.json", ProcessRecord.of(supervisor.pid), stages=["data"])
        status = next(s for s in run.stages() if s.name == "data")
        assert status.state == "queued" and status.error is None and status.progress is None
    finally:
        supervisor.kill()
        supervisor.wait()


def test_read_events_sees_every_append_and_hands_out_its_own_list(run):
    path = run.stage_dir("data") / "events.jsonl"
    writer = EventWriter(path)
    writer.status("running")
    first = read_events(path)
    first.append({"kind": "log", "msg": "caller's own"})
    assert [e["kind"] for e in read_events(path)] == ["status"]  # the cache is not the caller's list
    writer.log("more")
    writer.close()
    assert [e["kind"] for e in read_events(path)] == ["status", "log"]
    path.unlink()
    assert read_events(path) == []
