"""The Chat tab: talk to a run's models, one at a time or several side by side, and watch them stream.

Light: each model lives in a chat worker process of its own (engine.chat.worker, or engine.chat.api_worker
for a served teacher) behind an engine.chat.client.ChatClient; this tab only sends JSON lines and renders
replies. What is said and where each worker stands is plain data (tui.chat_session.Conversation, held in
the `conversation` reactive); the columns (tui.widgets.chat_column.ChatColumn) render it. A worker starts
on the first message (or ctrl+r), so opening the tab costs nothing; its replies arrive on the client's
reader thread and are posted here as ChatReply messages, so every widget is touched on the event loop only.

Keys: Enter sends (to every column); shift+enter or ctrl+j adds a line; Esc stops the replies (only the
focused column's when a column has the focus: Tab or a click); ctrl+t adds a column (side by side, up to
four: the next model of the run), ctrl+o closes the current one; ctrl+s saves the conversation, every
column (Markdown + JSON, engine.chat.transcript) under the run's `chat/` folder, or `.chats/` without a
run; ctrl+r reloads the runs and targets and restarts the models (also the way out of a failed start);
ctrl+n starts a new conversation. The run picker offers every run that made a model, newest first.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, HorizontalScroll, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Button, Input, Label, Select, Static

from engine.chat.client import ChatClient, ChatWorkerGone, printable
from engine.chat.protocol import (
    DEFAULT_PARAMS,
    AnyReply,
    EndReply,
    ErrorReply,
    GenerationParams,
    ProtocolError,
    ReadyReply,
    TokenReply,
    make_params,
    param_bounds,
)
from engine.chat.targets import ChatTarget, RunModels, runs_models, system_prompt
from engine.chat.transcript import message_text
from tui.chat_session import ChatSession, ChatState, Conversation, short
from tui.widgets.chat_column import ChatColumn
from tui.widgets.message_input import MessageInput

PLACEHOLDER = "Enter sends · ctrl+j (or shift+enter): new line · ctrl+s saves"
HINT = (
    "Ask the model something. The reply streams as Markdown; the model loads in its own process on the first "
    "message (or ctrl+r). ctrl+t puts another model beside it: one prompt, every column answers."
)

BAR_PARAMS = (
    # (param, its label, its type, its tooltip: {} stands for its bounds)
    ("temperature", "temp", float, "temperature {} (0 = greedy)"),
    ("top_p", "top-p", float, "nucleus sampling threshold, {}"),
    ("max_new_tokens", "max", int, "max new tokens per reply, {}"),
)
"""The generation params the chat bar edits, in its order; the others come from DEFAULT_PARAMS (+ extra_params)."""


def _param_id(name: str) -> str:
    """The id of a param's box in the chat bar: `chat-top-p` for top_p."""
    return "chat-" + name.replace("_", "-")


class ChatReply(Message):
    """A reply of a chat worker, posted from its client's reader thread."""

    def __init__(self, client: ChatClient, reply: AnyReply):
        super().__init__()
        self.client = client
        self.reply = reply


class ChatStartFailed(Message):
    """The worker process could not even be spawned (posted by the spawning worker)."""

    def __init__(self, client: ChatClient, error: str):
        super().__init__()
        self.client = client
        self.error = error


class ChatSaved(Message):
    """The save worker is done: the (Markdown, JSON) paths, or why it could not write them."""

    def __init__(self, paths: tuple[Path, Path] | None, error: str = ""):
        super().__init__()
        self.paths = paths
        self.error = error


class ChatTab(Vertical):
    AUTO_FOCUS = "#chat-input"  # typing goes to the message box when the tab is switched to (tui.app)
    DEFAULT_CSS = """
    ChatTab {
        height: 1fr;
        min-height: 12;
        padding: 0 1;
    }
    ChatTab #chat-bar, ChatTab #chat-system-row, ChatTab #chat-status-row {
        height: 1;
        width: 1fr;
    }
    ChatTab #chat-input-row { height: auto; width: 1fr; }
    ChatTab #chat-target { width: 1fr; min-width: 20; max-width: 64; }
    ChatTab #chat-run { width: 1fr; min-width: 16; max-width: 48; }
    ChatTab .chat-param-label { width: auto; padding: 0 1; color: $text-muted; }
    ChatTab .chat-param { width: 6; }
    ChatTab #chat-max-new-tokens { width: 7; }
    ChatTab #chat-run-label, ChatTab #chat-you-label { width: 6; color: $text-muted; }
    ChatTab #chat-system-label { width: auto; padding: 0 1; color: $text-muted; }
    ChatTab #chat-system { width: 1fr; }
    ChatTab #chat-columns { height: 1fr; }
    ChatTab #chat-status { width: 1fr; color: $text-muted; }
    ChatTab #chat-status.-error { color: $text-error; }
    ChatTab #chat-status.-busy { color: $text-warning; }
    ChatTab #chat-retry { display: none; min-width: 0; width: auto; height: 1; border: none; padding: 0 1; }
    ChatTab.-failed #chat-retry { display: block; }
    ChatTab #chat-input { width: 1fr; }
    """

    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+t", "add_column", "Add model"),
        Binding("ctrl+o", "close_column", "Close column"),
        Binding("ctrl+r", "restart", "Reload"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+s", "save", "Save"),
    ]

    conversation: reactive[Conversation] = reactive(Conversation, always_update=True, init=False)
    """Every column's session: mutated in place, then `mutate_reactive` re-renders the headers and status."""

    def __init__(self, config_path: str, *, name: str | None = None, id: str | None = None, classes: str | None = None):
        super().__init__(name=name, id=id, classes=classes)
        self.config_path = config_path
        self.offers: list[RunModels] = []  # the run picker: every run that made a model, then the config's paths
        self.config_error: str | None = None
        self.system = ""
        self.device = "auto"
        self.visible_devices: str | None = None
        self.assistant_4bit = False
        self.max_new_tokens = DEFAULT_PARAMS.max_new_tokens
        self.extra_params: dict[str, Any] = {}  # more generation params (seed, min_new_tokens, ...), checked alike
        self.last_saved: tuple[Path, Path] | None = None  # (Markdown, JSON) of the last save
        self.set_reactive(ChatTab.conversation, Conversation())
        self._read_config()
        self.conversation.add(self.targets[0] if self.targets else None)
        if self.config_error:
            self.conversation.session.set_status(f"config error: {self.config_error}", "error")

    # ------------------------------------------------------------------------------------------ config
    def _read_config(self, run_id: str | None = None) -> None:
        """The config's settings and every run's models; the run offered first is `run_id` when still there,
        else the newest that made a model."""
        from engine.config.errors import ConfigError
        from engine.config.load import load_config

        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            self.config_error = str(exc).splitlines()[0]
            self.offers = []
            return
        self.config_error = None
        self.offers = runs_models(config, self.config_path)
        ids = [o.run_id for o in self.offers]
        self.conversation.run_id = run_id if run_id is not None and run_id in ids else ids[0]
        self.system = system_prompt(config) or ""
        self.device = config.device.type
        self.visible_devices = config.launch.cuda_visible_devices
        self.assistant_4bit = config.assistant.quantization.load_in_4bit  # served as QLoRA trained it
        self.max_new_tokens = config.assistant.inference.max_new_tokens

    @property
    def offer(self) -> RunModels | None:
        return next((o for o in self.offers if o.run_id == self.conversation.run_id), None)

    @property
    def targets(self) -> list[ChatTarget]:
        """The picked run's models, best first (engine.pipeline.models orders and labels them)."""
        return self.offer.targets if self.offer else []

    @property
    def run_id(self) -> str | None:
        return self.conversation.run_id

    def _run_options(self) -> list[tuple[str, int]]:
        return [(offer.label, i) for i, offer in enumerate(self.offers)]

    def _target_options(self) -> list[tuple[str, int]]:
        return [(f"{t.label} · {short(t.adapter or t.model, 20)}", i) for i, t in enumerate(self.targets)]

    # ---- the current column's view, as the single chat had it
    @property
    def session(self) -> ChatSession:
        return self.conversation.session

    @property
    def column(self) -> ChatColumn:
        return self.columns[self.conversation.current]

    @property
    def columns(self) -> list[ChatColumn]:
        return list(self.query(ChatColumn).results(ChatColumn))

    @property
    def state(self) -> ChatState:
        return self.session.state

    @property
    def status(self) -> str:
        return self.session.status

    @property
    def history(self) -> list[dict[str, str]]:
        return self.session.history

    @property
    def client(self) -> ChatClient | None:
        return self.session.client

    @property
    def client_target(self) -> ChatTarget | None:
        """What the current column's worker holds (or is loading)."""
        return self.session.target if self.session.client is not None else None

    @property
    def current_id(self) -> str | None:
        return self.session.reply.id if self.session.reply else None

    @property
    def current_box(self):
        return self.column.box

    # ----------------------------------------------------------------------------------------- compose
    def compose(self) -> ComposeResult:
        options = self._target_options()
        with Horizontal(id="chat-bar"):
            yield Select(
                options,
                id="chat-target",
                compact=True,
                allow_blank=not options,
                value=0 if options else Select.NULL,
                prompt="no model (config error)",
                tooltip="the model of the current column",
            )
            # the boxes start from DEFAULT_PARAMS, max_new_tokens from the config
            first = {**DEFAULT_PARAMS.given(), "max_new_tokens": self.max_new_tokens}
            for name, label, cast, tooltip in BAR_PARAMS:
                yield Label(label, classes="chat-param-label")
                yield Input(
                    str(first[name]),
                    id=_param_id(name),
                    type="integer" if cast is int else "number",
                    compact=True,
                    classes="chat-param",
                    tooltip=tooltip.format(param_bounds(name)),
                )
        with Horizontal(id="chat-system-row"):
            yield Label("run", id="chat-run-label")
            runs = self._run_options()
            yield Select(
                runs,
                id="chat-run",
                compact=True,
                allow_blank=not runs,
                value=self._run_index() if runs else Select.NULL,
                prompt="no run",
                tooltip="whose models: every run that made one, newest first",
            )
            yield Label("system", id="chat-system-label")
            yield Input(self.system, id="chat-system", compact=True, placeholder="(no system prompt)")
        with HorizontalScroll(id="chat-columns"):
            yield ChatColumn(self.session, self._hint())
        with Horizontal(id="chat-status-row"):
            yield Static(id="chat-status")
            yield Button("Retry (ctrl+r)", id="chat-retry", compact=True, variant="warning")
        with Horizontal(id="chat-input-row"):
            yield Label("you ›", id="chat-you-label")
            yield MessageInput(id="chat-input", placeholder=PLACEHOLDER)

    def _run_index(self) -> int:
        return next((i for i, o in enumerate(self.offers) if o.run_id == self.conversation.run_id), 0)

    def _hint(self) -> str:
        if self.config_error:
            return f"Cannot read the config: {self.config_error}\nFix it (Config tab), then ctrl+r."
        return HINT

    def on_mount(self) -> None:
        # the app's config file (switched in the Config tab) decides what there is to chat with
        self.watch(self.app, "config_path", self._config_path_changed, init=False)
        self.watch_conversation()

    def on_show(self) -> None:
        """Shown (tab switched to): typing goes to the message box."""
        self.query_one("#chat-input", MessageInput).focus()

    def on_unmount(self) -> None:
        for session in self.conversation.sessions:
            self._drop_client(session)

    def watch_conversation(self) -> None:
        """Render the sessions: each column's header, the current column's status, the retry button."""
        for index, column in enumerate(self.columns):
            column.set_class(index == self.conversation.current and len(self.columns) > 1, "-current")
            column.show()
        session = self.session
        status = self.query_one("#chat-status", Static)
        status.update(Text(session.status))
        status.set_class(session.tone == "error", "-error")
        status.set_class(session.tone == "busy", "-busy")
        self.set_class(
            bool(self.config_error) or any(s.state == ChatState.FAILED for s in self.conversation.sessions), "-failed"
        )
        self.refresh_bindings()

    def _changed(self) -> None:
        self.mutate_reactive(ChatTab.conversation)

    def _set_status(self, text: str, tone: str = "") -> None:
        self.session.set_status(text, tone)
        self._changed()

    # -------------------------------------------------------------------------------------------- send
    @on(MessageInput.Submitted, "#chat-input")
    async def send_message(self, event: MessageInput.Submitted) -> None:
        """One prompt to every column: each session records it and its worker (started if need be) answers."""
        text = message_text(event.value)
        if not text:
            return
        if self.conversation.streaming:
            self._set_status("a reply is still streaming: wait, or Esc to stop it", "busy")
            return
        if self._selected_target() is None:
            self._set_status("no model to chat with: fix the config, then ctrl+r", "error")
            return
        try:
            params = self._params()
        except ProtocolError as exc:
            self._set_status(str(exc), "error")
            return
        event.message_input.clear()
        system = self.query_one("#chat-system", Input).value.strip() or None
        if self.conversation.started is None:
            self.conversation.started = time.time()
        for session, column in zip(self.conversation.sessions, self.columns):
            if session.target is None:
                continue
            rid, messages = session.ask(text, system, params.given())
            await column.add_turn(text)
            if session.client is None:
                self._start_client(session, session.target)
                session.set_status(
                    f"loading {session.target.label} ({short(session.target.model)}) … the reply follows", "busy"
                )
            try:
                session.client.generate(messages, params, request_id=rid)  # queued: the worker runs it once loaded
            except ChatWorkerGone as exc:
                await column.fail(str(exc))
                self._fail(session, str(exc))
        self._changed()

    def _params(self) -> GenerationParams:
        """The generation params of the bar (+ extra_params), checked against the protocol's bounds:
        ProtocolError naming the param when one is out of them or not a number."""

        def read(widget_id: str, name: str, cast) -> Any:
            raw = self.query_one(widget_id, Input).value.strip()
            try:
                return cast(raw)
            except ValueError:
                raise ProtocolError(f"{name} must be a number, got {raw!r}", field=name) from None

        return make_params(
            DEFAULT_PARAMS,
            **{name: read(f"#{_param_id(name)}", name, cast) for name, _, cast, _ in BAR_PARAMS},
            **self.extra_params,
        )

    def _selected_target(self) -> ChatTarget | None:
        value = self.query_one("#chat-target", Select).value
        if isinstance(value, int) and 0 <= value < len(self.targets):
            return self.targets[value]
        return None

    # ------------------------------------------------------------------------------------------ workers
    def _start_client(self, session: ChatSession, target: ChatTarget) -> None:
        client = ChatClient(
            target.model,
            target.adapter,
            device=self.device,
            endpoint=target.endpoint,
            config_path=self.config_path,
            visible_devices=self.visible_devices,
            load_in_4bit=self.assistant_4bit and target.is_assistant,
            key=target.config_key,
            on_reply=lambda reply: self.post_message(ChatReply(client, reply)),
        )
        session.client = client
        session.starting(target)
        self._spawn(client)

    @work(thread=True, group="chat-spawn")
    def _spawn(self, client: ChatClient) -> None:
        try:
            client.start()
        except Exception as exc:  # e.g. no python, fork failed
            self.post_message(ChatStartFailed(client, f"cannot start the chat worker: {exc}"))

    def _drop_client(self, session: ChatSession) -> None:
        """Forget the session's worker and end it: SIGTERM and EOF now, on the event loop (client.end never
        blocks), so it ends even when the reaper below never runs (a worker started while the tab unmounts or
        the app exits is cancelled before it starts); the reaper waits for the exit, then KILLs."""
        client, session.client = session.client, None
        if client is not None:
            client.end()
            self._reap(client)

    @work(thread=True, group="chat-reap")
    def _reap(self, client: ChatClient) -> None:
        client.reap()

    def _switch_to(self, session: ChatSession, target: ChatTarget) -> None:
        """The session's worker serves `target` from now on: the same worker loads it (op load), or a new one
        starts (a served teacher is another kind of worker)."""
        client = session.client
        assert client is not None
        if target.endpoint or client.endpoint:
            self._drop_client(session)
            self._start_client(session, target)
            session.starting(target, "starting")
            return
        try:
            client.load(target.model, target.adapter)
        except ChatWorkerGone:
            self._drop_client(session)
            self._start_client(session, target)
            return
        session.starting(target, "switching to")

    def _fail(self, session: ChatSession, message: str) -> None:
        self._drop_client(session)
        session.failed(message)
        self._changed()

    # ----------------------------------------------------------------------------------------- replies
    def _find(self, client: ChatClient) -> tuple[ChatSession, ChatColumn] | None:
        for session, column in zip(self.conversation.sessions, self.columns):
            if session.client is client:
                return session, column
        return None  # a worker we already dropped

    async def on_chat_reply(self, message: ChatReply) -> None:
        found = self._find(message.client)
        if found is None:
            return
        session, column = found
        reply = message.reply
        if isinstance(reply, TokenReply):
            if session.token(reply.id, reply.text):
                await column.write(printable(reply.text))
            return
        if isinstance(reply, ReadyReply):
            session.ready(reply)
        elif isinstance(reply, EndReply):
            text = session.end(reply)
            if text is not None:
                await column.finish(text)
        elif isinstance(reply, ErrorReply):
            await self._on_error(session, column, reply)
        self._changed()

    async def _on_error(self, session: ChatSession, column: ChatColumn, reply: ErrorReply) -> None:
        message = reply.message
        first, _, rest = message.partition("\n")
        if reply.fatal:
            if session.reply is not None:  # its bubble says what happened; the log tail goes below
                await column.fail(first)
                if rest.strip():
                    await column.note(rest, error=True)
            else:
                await column.note(message, error=True)
            self._fail(session, message)
            return
        if session.reply is not None and reply.id == session.reply.id:
            await column.fail(message)
            session.drop_reply()
        elif reply.op == "load":  # the old model is still served: show it as selected again
            client = session.client
            old = next((t for t in self.targets if (t.model, t.adapter) == (client.model, client.adapter)), None)
            if old is not None:
                session.target = old
                if session is self.session:
                    self.query_one("#chat-target", Select).value = self.targets.index(old)
            session.state = ChatState.STREAMING if session.reply else ChatState.READY
            await column.note(message, error=True)
        session.set_status(f"error: {first}", "error")

    async def on_chat_start_failed(self, message: ChatStartFailed) -> None:
        found = self._find(message.client)
        if found is None:
            return
        session, column = found
        if session.reply is not None:
            await column.fail(message.error)
        self._fail(session, message.error)

    def on_chat_saved(self, message: ChatSaved) -> None:
        if message.paths is None:
            self.notify(f"Cannot save the conversation: {message.error}", severity="error", timeout=10)
            return
        self.last_saved = message.paths
        self.notify(f"Saved {message.paths[0]}\n(and {message.paths[1].name})", title="Conversation saved")

    # ----------------------------------------------------------------------------------------- columns
    def on_descendant_focus(self, event) -> None:
        """A column focused (Tab, a click): it is the current one, which the target picker shows and sets."""
        if isinstance(event.widget, ChatColumn) and event.widget in self.columns:
            self._make_current(self.columns.index(event.widget))

    def _make_current(self, index: int) -> None:
        self.conversation.current = index
        target = self.session.target
        select = self.query_one("#chat-target", Select)
        if target in self.targets and select.value != self.targets.index(target):
            with select.prevent(Select.Changed):
                select.value = self.targets.index(target)
        self._changed()

    async def action_add_column(self) -> None:
        """Side by side: one more column (up to four), with the next model of the run no column shows yet."""
        target = self.conversation.next_target(self.targets)
        if target is None:
            self.notify("Every model of this run has a column already.", severity="warning")
            return
        session = self.conversation.add(target)
        if session is None:
            self.notify("Four columns at most.", severity="warning")
            return
        if len(self.columns) == 1 and self.session is not None:
            await self.columns[0].query(".chat-hint").remove()
        column = ChatColumn(session)
        await self.query_one("#chat-columns", HorizontalScroll).mount(column)
        if self.conversation.sessions[0].history:
            await column.note("— joined here: it answers from the next message on —")
        self._make_current(len(self.conversation.sessions) - 1)

    async def action_close_column(self) -> None:
        if len(self.conversation.sessions) < 2:
            return
        index = self.conversation.current
        session = self.conversation.remove(index)
        self._drop_client(session)
        await self.columns[index].remove()
        self._make_current(self.conversation.current)

    @on(Select.Changed, "#chat-target")
    async def target_changed(self, event: Select.Changed) -> None:
        target = self._selected_target()
        session = self.session
        if target is None or target == session.target:
            return
        if session.client is None:
            session.target = target
            self._changed()
            return
        self._switch_to(session, target)
        await self.column.note(f"— now chatting with {target.label} ({short(target.adapter or target.model)}) —")
        self._changed()

    @on(Select.Changed, "#chat-run")
    async def run_changed(self, event: Select.Changed) -> None:
        """Another run's models: every column ends its worker and takes the same kind of model of that run."""
        if not isinstance(event.value, int) or self.offers[event.value].run_id == self.conversation.run_id:
            return
        old = [session.target for session in self.conversation.sessions]
        self.conversation.run_id = self.offers[event.value].run_id
        await self._retarget(old, restart=False, same_kind=True)
        await self.action_new_chat()
        label = self.offer.label if self.offer else "no run"
        await self.column.note(f"— the models of {label} —")

    async def _retarget(self, old: list[ChatTarget | None], restart: bool, same_kind: bool = False) -> None:
        """After the targets changed (another run, a reload): each column drops its worker and keeps its target
        if it is still offered (same_kind: the one of the same kind, by label), else takes the best one;
        restart: its worker starts at once."""
        select = self.query_one("#chat-target", Select)
        with select.prevent(Select.Changed):
            select.set_options(self._target_options())
        kept = {(t.label if same_kind else t): t for t in self.targets}
        for session, column, was in zip(self.conversation.sessions, self.columns, old):
            if session.reply is not None:  # its reply will never come from the new worker
                await column.fail("restarted")
                session.drop_reply()
            self._drop_client(session)
            session.target = kept.get(was.label if same_kind else was) if was else None
            session.target = session.target or (self.targets[0] if self.targets else None)
            session.state = ChatState.IDLE
            session.set_status("model not loaded · it starts with the first message")
            if restart and session.target is not None:
                self._start_client(session, session.target)
        if self.session.target in self.targets:
            with select.prevent(Select.Changed):
                select.value = self.targets.index(self.session.target)
        self._changed()

    # ----------------------------------------------------------------------------------------- actions
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":  # Esc means "stop" only while a reply streams; otherwise it passes on
            return self.conversation.streaming
        if action == "close_column":
            return len(self.conversation.sessions) > 1
        return True

    def action_stop(self) -> None:
        """Stop the focused column's reply, or every column's when the focus is elsewhere (the message box)."""
        focused = self.app.focused
        sessions = self.conversation.sessions
        if isinstance(focused, ChatColumn) and focused in self.columns:
            sessions = [sessions[self.columns.index(focused)]]
        for session in sessions:
            if session.reply is not None and session.client is not None:
                session.client.stop(session.reply.id)
                session.stopping()
        self._changed()

    @on(Button.Pressed, "#chat-retry")
    async def retry_pressed(self) -> None:
        await self.action_restart()

    async def _config_path_changed(self, path: str) -> None:
        self.config_path = path
        await self.action_restart()

    async def action_restart(self) -> None:
        """Reload the runs and targets and (re)start every column's worker."""
        old = [session.target for session in self.conversation.sessions]
        self._read_config(self.conversation.run_id)  # the run picked stays; "no run" gives way to a new run
        for hint in self.query(".chat-hint").results(Static):
            hint.update(self._hint())
        if self.config_error:  # keep what runs (if anything): only the config is broken
            self._set_status(f"config error: {self.config_error}", "error")
            return
        run_select = self.query_one("#chat-run", Select)
        with run_select.prevent(Select.Changed):
            run_select.set_options(self._run_options())
            run_select.value = self._run_index()
        await self._retarget(old, restart=True)

    async def action_new_chat(self) -> None:
        for session, column in zip(self.conversation.sessions, self.columns):
            if session.reply is not None and session.client is not None:
                session.client.stop(session.reply.id)
                await column.fail("stopped: new chat")
                session.drop_reply()
            await column.clear("New conversation.")
        self.conversation.clear()
        self.last_saved = None
        self._changed()
        self.query_one("#chat-input", MessageInput).focus()

    def action_save(self) -> None:
        """Write the conversation, every column, as Markdown + JSON (engine.chat.transcript): `<run>/chat/`
        when the models are a run's, else `.chats/`; one pair of files per conversation, replaced on each save."""
        from engine.chat.transcript import new_name

        system = self.query_one("#chat-system", Input).value.strip() or None
        try:
            params = self._params().given()
        except ProtocolError:
            params = {}
        record = self.conversation.record(system, params)
        if record is None:
            self.notify("Nothing to save yet: the conversation is empty.", severity="warning")
            return
        self._save(record, self.config_path, self.conversation.run_id, new_name(self.conversation.started))

    @work(thread=True, group="chat-save")
    def _save(self, record: dict[str, Any], config_path: str, run_id: str | None, name: str) -> None:
        """Off the event loop: finding the run store reads the config; each file is fsynced."""
        from engine.chat.transcript import chat_dir, save
        from engine.store.runs import runs_root

        try:
            run_path = runs_root(config_path) / run_id if run_id else None
            self.post_message(ChatSaved(save(record, chat_dir(run_path) / f"{name}.md")))
        except OSError as exc:  # FileWriteError names the path and what to do
            self.post_message(ChatSaved(None, str(exc)))
