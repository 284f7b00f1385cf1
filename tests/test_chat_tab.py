"""The Chat tab's conversation model (plain pytest, no Textual), its run picker, side by side and its worker
processes (Pilot, against tests/fake_chat_worker.py: a real process per column, no model), and snapshots.

tests/test_chat.py has the worker, the client and the single chat against the tiny models.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest

from engine.chat.client import ChatClient
from engine.chat.protocol import EndReply, ReadyReply, TokenReply
from engine.chat.targets import ChatTarget
from engine.chat.transcript import columns, load, make_record, save, to_markdown
from engine.config.load import load_config
from tui.chat_session import MAX_COLUMNS, ChatSession, ChatState, Conversation

from .helpers import wait_until

FAKE_WORKER = Path(__file__).resolve().parent / "fake_chat_worker.py"
KD = ChatTarget("KD student", "runs/r1/Student", None)
CE = ChatTarget("CE-only student", "runs/r1/Student_ce", None)
BASE = ChatTarget("Base assistant", "tiny:assistant", None)
TEACHER = ChatTarget("Teacher", "tiny:teacher", None)


def _ready(model: str = "m") -> ReadyReply:
    return ReadyReply(model=model, device="cpu", dtype="float32", template="chat", load_s=0.5, threads=1, pid=1)


def _end(rid: str, tokens: int = 3, stopped: bool = False) -> EndReply:
    return EndReply(
        id=rid,
        tokens=tokens,
        ttft_s=0.01,
        tokens_per_s=30.0,
        elapsed_s=0.1,
        prompt_tokens=5,
        stopped=stopped,
        finish="stopped" if stopped else "stop",
    )


# ------------------------------------------------------------------------------------ the session model


def test_a_session_walks_a_turn_through_its_states():
    session = ChatSession(KD)
    assert session.state == ChatState.IDLE and "starts with the first message" in session.status
    rid, messages = session.ask("hi", "Be brief.", {"temperature": 0})
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    session.starting(KD)
    assert session.state == ChatState.STARTING and session.tone == "busy"
    session.ready(_ready("runs/r1/Student"))
    assert session.state == ChatState.STREAMING  # the question waited in the worker's queue
    assert not session.token("another", "x") and session.token(rid, "Hel") and session.token(rid, "lo")
    assert session.reply.text == "Hello" and session.tokens_per_s(now=session.reply.first_at + 1) == 1.0
    session.stopping()
    assert session.state == ChatState.STOPPING
    assert session.end(_end("another")) is None
    assert session.end(_end(rid, stopped=True)) == "Hello"
    assert session.state == ChatState.READY and session.reply is None
    assert session.history[-1] == {"role": "assistant", "content": "Hello"}
    assert "stopped" in session.reply_meta[1]["stats"] and session.reply_meta[1]["label"] == "KD student"
    assert "runs/r1/Student on cpu │ 3 tokens" in session.status
    # the next turn streams at once, and a worker that dies drops the question it was answering
    rid, messages = session.ask("and?", None, {})
    assert session.state == ChatState.STREAMING and len(messages) == 3
    session.client = object()
    session.failed("the chat worker exited unexpectedly\nlog tail")
    assert session.state == ChatState.FAILED and session.client is None and session.reply is None
    assert session.status == "✗ the chat worker exited unexpectedly" and session.tone == "error"
    assert [m["role"] for m in session.history] == ["user", "assistant"]


def test_a_conversation_holds_up_to_four_columns_and_saves_every_one():
    conversation = Conversation(run_id="r1")
    for target in (KD, CE, TEACHER):
        conversation.add(target)
    assert conversation.current == 2 and conversation.next_target([KD, CE, BASE, TEACHER]) == BASE
    conversation.add(BASE)
    assert len(conversation.sessions) == MAX_COLUMNS and conversation.add(KD) is None
    assert conversation.next_target([KD, CE, BASE, TEACHER]) is None  # every model has its column
    conversation.remove(3)
    assert conversation.current == 2 and conversation.record("s", {}) is None  # nothing said yet
    conversation.started = time.time()
    for n, session in enumerate(conversation.sessions):
        session.device = "cpu"
        rid, _ = session.ask("compare", "s", {"temperature": 0.5})
        session.token(rid, f"reply {n}")
        if n != 1:  # the CE column was stopped mid-way: saved as what came so far
            session.end(_end(rid))
    assert conversation.streaming
    record = conversation.record("s", {"temperature": 0.5})
    assert record["target"]["label"] == "KD student" and record["run"] == "r1"
    assert [c["target"]["label"] for c in record["columns"]] == ["KD student", "CE-only student", "Teacher"]
    ce = record["columns"][1]["messages"]
    assert ce[0] == {"role": "system", "content": "s"} and ce[-1]["partial"] and ce[-1]["content"] == "reply 1"
    assert record["messages"] == record["columns"][0]["messages"]  # a single-chat reader reads the first column
    conversation.clear()
    assert not conversation.streaming and conversation.started is None and conversation.sessions[0].history == []


def test_transcripts_old_and_side_by_side_read_as_columns(tmp_path):
    old = make_record([{"role": "user", "content": "hi"}], label="KD student", model="m", device="cpu")
    assert "columns" not in old  # a single chat is written as before
    assert columns(old) == [{"target": old["target"], "device": "cpu", "messages": old["messages"]}]
    sides = [
        {
            "target": {"label": label, "model": label.lower(), "adapter": None},
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a {label}"}],
        }
        for label in ("KD student", "Teacher")
    ]
    record = make_record(sides[0]["messages"], label="KD student", model="kd student", columns=sides)
    md_path, _ = save(record, tmp_path / "c.md")
    assert [c["target"]["label"] for c in columns(load(md_path))] == ["KD student", "Teacher"]
    markdown = to_markdown(record)
    assert markdown.startswith("# Side by side: KD student · Teacher")
    assert "# Column 2: Teacher" in markdown and "## Teacher\n\na Teacher" in markdown


def test_ending_a_client_never_blocks_and_the_worker_goes(tmp_path):
    client = ChatClient("m", python=str(_fake_python(tmp_path)), log_path=tmp_path / "w.log").start()
    assert client.wait_ready(timeout=20).model == "m"
    started = time.monotonic()
    client.end()  # what the tab does on the event loop: SIGTERM, EOF; no wait
    assert time.monotonic() - started < 0.5
    deadline = time.monotonic() + 10
    while client.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.process.poll() is not None  # gone though nobody reaped it
    client.reap()
    assert client.returncode is not None


# ------------------------------------------------------------------------------------------- Pilot


def _fake_python(tmp_path: Path) -> Path:
    """An executable that ChatClient runs as its `python`: it starts the fake worker with our interpreter."""
    wrapper = tmp_path / "fake-python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_WORKER}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture
def fake_workers(tmp_path, monkeypatch):
    """Every chat worker the tab starts is a fake_chat_worker.py process; the list holds their clients."""
    import tui.tabs.chat as chat_tab

    monkeypatch.setenv("FAKE_CHAT_TOKEN_S", "0.005")
    python = str(_fake_python(tmp_path))
    clients: list[ChatClient] = []

    def client(*args, **kwargs) -> ChatClient:
        clients.append(ChatClient(*args, python=python, log_path=tmp_path / f"worker{len(clients)}.log", **kwargs))
        return clients[-1]

    monkeypatch.setattr(chat_tab, "ChatClient", client)
    yield clients
    for c in clients:
        c.close(timeout=2)


def _run(project: Path, name: str, ce: bool = False):
    """A run in the project's store whose KD student (and CE control) exists: a config.json each."""
    from engine.store.runs import RunStore

    run = RunStore(project / "runs").create(load_config("configs/tiny.yaml"), "configs/tiny.yaml", name=name)
    for folder in ("Student", "Student_ce") if ce else ("Student",):
        (run.path / ".model/tiny/student" / folder).mkdir(parents=True)
        (run.path / ".model/tiny/student" / folder / "config.json").write_text("{}")
    return run


def _app(project: Path):
    from tui.app import TASPanel

    return TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)


async def _chat_tab(pilot):
    """Switch the panel to its Chat tab (F4, built on first show) and return the tab."""
    from tui.tabs.chat import ChatTab

    await pilot.press("f4")
    await pilot.pause()
    return pilot.app.query_one(ChatTab)


async def _send(app, pilot, text: str) -> None:
    from tui.widgets.message_input import MessageInput

    box = app.query_one("#chat-input", MessageInput)
    box.focus()
    box.insert(text)
    await box.action_submit()  # not pilot.press: that waits for an idle loop, which comes when the streams end


async def test_side_by_side_streams_one_prompt_to_three_workers_and_stops_one(project, fake_workers, monkeypatch):
    from textual import events

    monkeypatch.setenv("FAKE_CHAT_TOKEN_S", "0.03")  # about a real worker's pace (a line per 20 ms window)
    run = _run(project, "distilled", ce=True)
    app = _app(project)
    async with app.run_test(size=(120, 40)) as pilot:
        tab = await _chat_tab(pilot)
        assert tab.run_id == run.id
        assert [t.label for t in tab.targets] == ["KD student", "CE-only student", "Base assistant", "Teacher"]
        await pilot.press("ctrl+t", "ctrl+t")  # two more columns: the next models of the run
        sessions = tab.conversation.sessions
        assert [s.target.label for s in sessions] == ["KD student", "CE-only student", "Base assistant"]
        assert len(tab.columns) == 3 and all(c.region.width >= 24 for c in tab.columns)
        app.query_one("#chat-max-new-tokens").value = "100000"  # each streams until it is stopped
        await _send(app, pilot, "which is better?")

        def streaming() -> bool:
            return all(s.reply is not None and len(s.reply.pieces) >= 3 for s in sessions)

        streaming.debug = lambda: [(s.state, s.status) for s in sessions]
        await wait_until(pilot, streaming, step=0.01, drain=False)
        pids = {s.client.process.pid for s in sessions}
        assert len(pids) == 3 and all(s.state == ChatState.STREAMING for s in sessions)  # a process each

        def live_rates() -> bool:  # each column's own tokens/s, in its header
            return all("tok/s" in c.border_subtitle for c in tab.columns)

        await wait_until(pilot, live_rates, step=0.01, drain=False)

        # Esc in the focused (middle) column stops that column only; the others stream on
        tab.columns[1].focus()
        await wait_until(pilot, lambda: tab.conversation.current == 1, step=0.01, drain=False)
        assert tab.session.target.label == "CE-only student"
        app.post_message(events.Key("escape", None))  # not pilot.press: it waits for an idle loop
        await wait_until(pilot, lambda: sessions[1].reply is None, step=0.01, drain=False)
        ce_tokens = int(sessions[1].reply_meta[1]["stats"].split()[0])
        assert "stopped" in sessions[1].reply_meta[1]["stats"] and sessions[1].state == ChatState.READY

        def others_went_on() -> bool:
            return all(s.reply is not None and len(s.reply.pieces) > ce_tokens + 5 for s in (sessions[0], sessions[2]))

        await wait_until(pilot, others_went_on, step=0.01, drain=False)
        # Esc from the message box stops every column
        box = tab.query_one("#chat-input")
        box.focus()
        await wait_until(pilot, lambda: app.focused is box, step=0.01, drain=False)
        app.post_message(events.Key("escape", None))
        await wait_until(pilot, lambda: not tab.conversation.streaming, timeout=30, step=0.01, drain=False)
        tokens = [int(s.reply_meta[1]["stats"].split()[0]) for s in sessions]
        assert tokens[0] > ce_tokens + 5 and tokens[2] > ce_tokens + 5
        assert all("stopped" in s.figures for s in sessions)
        assert sessions[0].history[1]["content"].startswith("Student:1 ")  # each column has its own reply
        assert sessions[2].history[1]["content"].startswith("tiny:assistant:1 ")

        # ctrl+s: the transcript holds every column, in the run's chat/ folder
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: tab.last_saved is not None)
        record = json.loads(tab.last_saved[1].read_text())
        assert Path(tab.last_saved[0]).resolve().parent == (run.path / "chat").resolve()
        assert [c["target"]["label"] for c in record["columns"]] == ["KD student", "CE-only student", "Base assistant"]
        assert [len(c["messages"]) for c in record["columns"]] == [3, 3, 3]  # system, you, the reply

        # ctrl+o closes the current column (and ends its worker)
        ce_client = sessions[1].client
        await pilot.press("ctrl+o")
        assert [s.target.label for s in tab.conversation.sessions] == ["KD student", "Base assistant"]
        assert len(tab.columns) == 2
        await wait_until(pilot, lambda: ce_client.process.poll() is not None, timeout=10)


async def test_the_run_picker_offers_every_runs_models(project, fake_workers):
    from textual.widgets import Select

    older = _run(project, "first")
    newer = _run(project, "second", ce=True)
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        tab = await _chat_tab(pilot)
        runs = app.query_one("#chat-run", Select)
        assert [o.run_id for o in tab.offers] == [newer.id, older.id, None]  # newest first, then no run
        assert tab.offers[0].label == "second (KD student, CE student)"  # the registry's labels, its order
        assert runs.value == 0 and tab.run_id == newer.id
        await _send(app, pilot, "hi")
        await wait_until(pilot, lambda: len(tab.history) == 2)
        first_client = tab.client
        assert str(newer.path) in first_client.model

        runs.value = 1  # the older run: its models; the worker of the newer one ends
        await wait_until(pilot, lambda: tab.run_id == older.id)
        assert [t.label for t in tab.targets] == ["KD student", "Base assistant", "Teacher"]
        assert tab.session.target.model.startswith(str(older.path)) and tab.client is None and tab.history == []
        await wait_until(pilot, lambda: first_client.process.poll() is not None, timeout=10)
        await _send(app, pilot, "hi")
        await wait_until(pilot, lambda: len(tab.history) == 2)
        assert str(older.path) in tab.client.model

        runs.value = 2  # no run: the config's own paths (no student there), the base assistant first
        await wait_until(pilot, lambda: tab.run_id is None)
        assert [t.label for t in tab.targets] == ["Base assistant", "Teacher"]


async def test_leaving_the_panel_ends_a_streaming_chat_worker(project, fake_workers):
    """The tab's workers are cancelled when the app exits; the chat worker processes must go all the same."""
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        tab = await _chat_tab(pilot)
        await pilot.press("ctrl+t")
        app.query_one("#chat-max-new-tokens").value = "100000"  # streams for as long as it is let
        await _send(app, pilot, "go on")
        await wait_until(pilot, lambda: all(s.state == ChatState.STREAMING for s in tab.conversation.sessions))
        pids = [c.process.pid for c in fake_workers]
        assert len(pids) == 2
        app.exit()
    for client in fake_workers:
        for _ in range(100):
            if client.process.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert client.process.poll() is not None, "the chat worker outlived the panel"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ------------------------------------------------------------------------------------------ snapshots


class _ScriptedClient:
    """An in-process ChatClient stand-in whose replies and figures never vary (for snapshots): the CE-only
    student's reply is stopped after two tokens, the others end."""

    def __init__(self, model, adapter=None, *, on_reply=None, **_):
        self.model, self.adapter, self.on_reply, self.endpoint = model, adapter, on_reply, None
        self.queued: list[str] = []  # generate ids sent before start: answered once "loaded"

    def start(self):
        self.on_reply(_ready(self.model))
        for request_id in self.queued:
            self._answer(request_id)
        self.queued = None
        return self

    def generate(self, messages, params=None, request_id=None):
        if self.queued is not None:
            self.queued.append(request_id)
        else:
            self._answer(request_id)
        return request_id

    def _answer(self, request_id):
        stopped = self.model.endswith("Student_ce")
        words = ["Use", " `sum`:", "\n\n```python\nsum(xs)\n```"] if not stopped else ["A loop", " adds"]
        for word in words:
            self.on_reply(TokenReply(id=request_id, text=word))
        self.on_reply(_end(request_id, tokens=len(words) * 4, stopped=stopped))

    def stop(self, request_id=None):
        pass

    def end(self):
        pass

    def reap(self, timeout=5.0):
        pass


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_snapshot_side_by_side(project, monkeypatch, snap_compare, size):
    import tui.tabs.chat as chat_tab

    monkeypatch.setattr(chat_tab, "ChatClient", _ScriptedClient)
    _run(project, "distilled", ce=True)
    app = _app(project)

    async def three_columns(pilot):
        await pilot.press("f4")
        await pilot.pause()
        await pilot.press("ctrl+t", "ctrl+t")
        tab = app.query_one(chat_tab.ChatTab)
        tab.query_one("#chat-target").value = 3  # the third column: the teacher
        await pilot.pause()
        await _send(app, pilot, "Sum a list?")
        await wait_until(pilot, lambda: not tab.conversation.streaming)
        tab.query_one("#chat-input").cursor_blink = False  # a snapshot must not catch the cursor mid-blink
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=three_columns)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_snapshot_run_picker(project, snap_compare, size):
    _run(project, "first")
    _run(project, "second", ce=True)
    app = _app(project)

    async def open_picker(pilot):
        await pilot.press("f4")
        await pilot.pause()
        app.query_one("#chat-run").focus()
        await pilot.press("enter")
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=open_picker)
