"""The Chat tab: talk to the freshly distilled student (or the assistant) and watch it stream.

Light: the model lives in a chat worker process (engine.chat.worker) behind engine.chat.client.ChatClient;
this tab only sends JSON lines and renders replies. The worker starts on the first message (or ctrl+r),
so opening the tab costs nothing; its replies arrive on the client's reader thread and are posted to
this widget as messages, so every widget is touched on the event loop only.

Keys: Enter sends; shift+enter or ctrl+j adds a line (ctrl+j works in every terminal: it is the newline
character; shift+enter and ctrl+enter only where the terminal reports them, e.g. kitty's keyboard protocol);
a paste keeps all its lines; Esc stops the reply; ctrl+s saves the conversation (Markdown + JSON, see
engine.chat.transcript) under the run's `chat/` folder, or `.chats/` when no run's model is offered; ctrl+r
reloads the targets and restarts the model (also the way out of a failed start); ctrl+n starts a new
conversation. The target list comes from the config: KD student, CE-only student, assistant + LoRA
adapter, base assistant (those that exist).
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Input, Label, Markdown, Select, Static, TextArea

from engine.chat.client import ChatClient, ChatWorkerGone, build_messages, format_stats, printable
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
from engine.chat.targets import ChatTarget, chat_targets, system_prompt, with_run_outputs
from engine.chat.transcript import message_text

_request_ids = itertools.count(1)
PLACEHOLDER = "Enter sends · ctrl+j (or shift+enter): new line · ctrl+s saves"

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
    """A reply of a chat worker, posted from the client's reader thread."""

    def __init__(self, client: ChatClient, reply: AnyReply):
        super().__init__()
        self.client = client
        self.reply = reply


class ChatStartFailed(Message):
    """The worker process could not even be spawned."""

    def __init__(self, client: ChatClient, error: str):
        super().__init__()
        self.client = client
        self.error = error


NEWLINE_KEYS = frozenset({"shift+enter", "ctrl+enter", "ctrl+j", "shift+\r", "ctrl+\r"})
"""Keys that add a line to the message: ctrl+j is the newline character itself (every terminal sends it, tmux
too); shift+enter / ctrl+enter arrive only from terminals that tell them apart from Enter (kitty keyboard
protocol: kitty, WezTerm, foot, Ghostty, iTerm2 with CSI u; Textual names xterm's modifyOtherKeys form
"shift+\\r" / "ctrl+\\r"); elsewhere they arrive as plain Enter and send."""


class MessageInput(TextArea):
    """The message box: multi-line, one row tall, growing with its content to 6 rows (then it scrolls).

    Enter sends (posts Submitted); a NEWLINE_KEYS key adds a line; a paste inserts all of its lines."""

    DEFAULT_CSS = """
    MessageInput { height: auto; min-height: 1; max-height: 6; padding: 0; }
    MessageInput:focus { background-tint: $foreground 5%; }
    """

    class Submitted(Message):
        """Enter in the message box: `value` is its whole text."""

        def __init__(self, message_input: MessageInput, value: str):
            super().__init__()
            self.message_input = message_input
            self.value = value

        @property
        def control(self) -> MessageInput:
            return self.message_input

    def __init__(self, *, placeholder: str = "", id: str | None = None):
        super().__init__(
            id=id,
            compact=True,
            placeholder=placeholder,
            soft_wrap=True,
            tab_behavior="focus",
            show_line_numbers=False,
            highlight_cursor_line=False,
        )

    async def _on_key(self, event: events.Key) -> None:
        # runs before TextArea._on_key (handlers run down the MRO); prevent_default keeps TextArea's from
        # inserting the Enter as a newline
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            await self.action_submit()
        elif event.key in NEWLINE_KEYS and not self.read_only:
            event.stop()
            event.prevent_default()
            self.replace("\n", *self.selection, maintain_selection_offset=False)

    def _on_paste(self, event: events.Paste) -> None:
        # TextArea._on_paste (next in the MRO) inserts the text, every line of it; consumed here, so a Paste
        # posted to this widget does not bubble to the app, which would forward it here a second time
        event.stop()

    async def action_submit(self) -> None:
        self.post_message(self.Submitted(self, self.text))


class ChatTab(Vertical):
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
    ChatTab #chat-bar { margin-bottom: 0; }
    ChatTab #chat-target { width: 1fr; min-width: 20; max-width: 64; }
    ChatTab .chat-param-label { width: auto; padding: 0 1; color: $text-muted; }
    ChatTab .chat-param { width: 6; }
    ChatTab #chat-max-new-tokens { width: 7; }
    ChatTab #chat-system-label, ChatTab #chat-you-label { width: 8; color: $text-muted; }
    ChatTab #chat-system { width: 1fr; }
    ChatTab #chat-log {
        height: 1fr;
        border: round $panel-lighten-2;
        border-title-color: $text-muted;
        padding: 0 1;
        margin: 0;
    }
    ChatTab #chat-hint { color: $text-muted; }
    ChatTab .chat-user {
        border-left: thick $accent;
        padding: 0 1;
        margin: 0 0 1 0;
        height: auto;
    }
    ChatTab .chat-assistant {
        border-left: thick $success;
        padding: 0 1;
        margin: 0 0 1 0;
    }
    ChatTab .chat-assistant > MarkdownParagraph:last-child { margin: 0; }
    ChatTab .chat-assistant.-error { border-left: thick $error; }
    ChatTab .chat-note { color: $text-muted; text-style: italic; margin: 0 0 1 0; }
    ChatTab .chat-error { color: $text-error; margin: 0 0 1 0; }
    ChatTab #chat-status { width: 1fr; color: $text-muted; }
    ChatTab #chat-status.-error { color: $text-error; }
    ChatTab #chat-status.-busy { color: $text-warning; }
    ChatTab #chat-retry { display: none; min-width: 0; width: auto; height: 1; border: none; padding: 0 1; }
    ChatTab.-failed #chat-retry { display: block; }
    ChatTab #chat-input { width: 1fr; }
    """

    BINDINGS = [
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+r", "restart", "Reload model"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+s", "save", "Save chat"),
    ]

    def __init__(self, config_path: str, *, name: str | None = None, id: str | None = None, classes: str | None = None):
        super().__init__(name=name, id=id, classes=classes)
        self.config_path = config_path
        self.targets: list[ChatTarget] = []
        self.config_error: str | None = None
        self.system = ""
        self.device = "auto"
        self.visible_devices: str | None = None
        self.assistant_4bit = False
        self.max_new_tokens = DEFAULT_PARAMS.max_new_tokens
        self.run_id: str | None = None  # the run whose models are offered (the newest with one)
        self._read_config()
        self.client: ChatClient | None = None
        self.client_target: ChatTarget | None = None  # what the worker holds (or is loading)
        self.state = "idle"  # idle / loading / ready / failed
        self.history: list[dict[str, str]] = []
        self.current_id: str | None = None
        self.current_box: Markdown | None = None
        self.current_stream = None
        self.current_text: list[str] = []
        self.last_stats: str | None = None
        self.ready_line = ""
        self.status = self._idle_status()  # the status line's text
        self.extra_params: dict[str, Any] = {}  # more generation params (seed, min_new_tokens, ...), checked alike
        # the conversation as saved by ctrl+s: when it started (names its files), who answered each reply
        self.chat_started: float | None = None
        self.reply_meta: dict[int, dict[str, Any]] = {}  # index in history → label, model, params, stats
        self.current_meta: dict[str, Any] = {}
        self.ready_device: str | None = None
        self.last_saved: tuple[Path, Path] | None = None  # (Markdown, JSON) of the last save

    # ------------------------------------------------------------------------------------------ config
    def _read_config(self) -> None:
        from engine.config.errors import ConfigError
        from engine.config.load import load_config

        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            self.config_error = str(exc).splitlines()[0]
            self.targets = []
            return
        self.config_error = None
        config, self.run_id = with_run_outputs(config, self.config_path)  # the newest run's models
        self.targets = chat_targets(config)
        self.system = system_prompt(config) or ""
        self.device = config.device.type
        self.visible_devices = config.launch.cuda_visible_devices
        self.assistant_4bit = config.assistant.quantization.load_in_4bit  # served as QLoRA trained it
        self.max_new_tokens = config.assistant.inference.max_new_tokens

    def _target_options(self) -> list[tuple[str, int]]:
        return [(f"{t.label} · {_short(t.adapter or t.model)}", i) for i, t in enumerate(self.targets)]

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
            yield Label("system", id="chat-system-label")
            yield Input(self.system, id="chat-system", compact=True, placeholder="(no system prompt)")
        log = VerticalScroll(id="chat-log")
        log.border_title = "conversation"
        log.can_focus = False
        with log:
            yield Static(self._hint(), id="chat-hint")
        with Horizontal(id="chat-status-row"):
            yield Static(self._idle_status(), id="chat-status")
            yield Button("Retry (ctrl+r)", id="chat-retry", compact=True, variant="warning")
        with Horizontal(id="chat-input-row"):
            yield Label("you ›", id="chat-you-label")
            yield MessageInput(id="chat-input", placeholder=PLACEHOLDER)

    def _hint(self) -> str:
        if self.config_error:
            return f"Cannot read the config: {self.config_error}\nFix it (Config tab), then ctrl+r."
        return (
            "Ask the model something. The reply streams as Markdown; the model loads in its own "
            "process on the first message (or ctrl+r)."
        )

    def _idle_status(self) -> str:
        return "model not loaded · it starts with the first message"

    def on_mount(self) -> None:
        self.query_one("#chat-log", VerticalScroll).anchor()
        # the app's config file (switched in the Config tab) decides what there is to chat with
        self.watch(self.app, "config_path", self._config_path_changed, init=False)
        if self.config_error:
            self._set_status(f"config error: {self.config_error}", "error")
            self.add_class("-failed")

    def on_show(self) -> None:
        """Shown (tab switched to): typing goes to the message box."""
        self.query_one("#chat-input", MessageInput).focus()

    def on_unmount(self) -> None:
        self._drop_client()

    # -------------------------------------------------------------------------------------------- send
    @on(MessageInput.Submitted, "#chat-input")
    async def send_message(self, event: MessageInput.Submitted) -> None:
        text = message_text(event.value)
        if not text:
            return
        if self.current_id is not None:
            self._set_status("a reply is still streaming: wait, or Esc to stop it", "busy")
            return
        target = self._selected_target()
        if target is None:
            self._set_status("no model to chat with: fix the config, then ctrl+r", "error")
            return
        try:
            params = self._params()
        except ProtocolError as exc:
            self._set_status(str(exc), "error")
            return
        event.message_input.clear()
        system = self.query_one("#chat-system", Input).value.strip() or None
        if not self.history:
            self.chat_started = time.time()
        self.history.append({"role": "user", "content": text})
        self.current_meta = {"label": target.label, "model": _where(target), "params": params.given()}
        messages = build_messages(system, self.history)
        await self._mount_turn(text)
        rid = f"chat{next(_request_ids)}"
        self.current_id = rid
        self.refresh_bindings()
        if self.client is None:
            self._start_client(target)
            self._set_status(f"loading {target.label} ({_short(target.model)}) … the reply follows", "busy")
        elif self.client_target != target:
            self._switch_to(target)
        else:
            self._set_status("generating …  (Esc stops)", "busy")
        try:
            self.client.generate(messages, params, request_id=rid)  # queued: the worker runs it once loaded
        except ChatWorkerGone as exc:
            await self._finish_failed(str(exc))
            self._failed(str(exc))

    async def _mount_turn(self, text: str) -> None:
        log = self.query_one("#chat-log", VerticalScroll)
        hint = self.query("#chat-hint")
        if hint:
            await hint.remove()
        box = Markdown("", classes="chat-assistant")
        await log.mount_all([Static(Text(text), classes="chat-user"), box])
        self.current_box = box
        self.current_stream = Markdown.get_stream(box)
        self.current_text = []

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

    # ------------------------------------------------------------------------------------------ worker
    def _start_client(self, target: ChatTarget) -> None:
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
        self.client = client
        self.client_target = target
        self.state = "loading"
        self.remove_class("-failed")
        self._spawn(client)

    @work(thread=True, group="chat-spawn")
    def _spawn(self, client: ChatClient) -> None:
        try:
            client.start()
        except Exception as exc:  # e.g. no python, fork failed
            self.post_message(ChatStartFailed(client, f"cannot start the chat worker: {exc}"))

    def _switch_to(self, target: ChatTarget) -> None:
        assert self.client is not None
        if target.endpoint or self.client.endpoint:  # a server is another kind of worker: start that one
            self._drop_client()
            self._start_client(target)
            self._set_status(f"starting {target.label} ({_short(target.model)}) …", "busy")
            return
        try:
            self.client.load(target.model, target.adapter)
        except ChatWorkerGone:
            self._drop_client()
            self._start_client(target)
            return
        self.client_target = target
        self.state = "loading"
        self._set_status(f"switching to {target.label} ({_short(target.model)}) …", "busy")

    def _drop_client(self) -> None:
        """Forget the client and end its worker process off the event loop (close waits for it to exit).

        A plain daemon thread, not a Textual worker: it touches no widget, and it must run even when called
        from on_unmount or at app exit, where Textual cancels this node's workers (a thread worker cancelled
        before it starts never runs, which would leave the chat worker process behind)."""
        client, self.client = self.client, None
        self.client_target = None
        if client is not None:
            threading.Thread(target=client.close, name="chat-client-close", daemon=True).start()

    @on(Select.Changed, "#chat-target")
    async def target_changed(self, event: Select.Changed) -> None:
        target = self._selected_target()
        if target is None or self.client is None or target == self.client_target:
            return
        self._switch_to(target)
        await self._note(f"— now chatting with {target.label} ({_short(target.adapter or target.model)}) —")

    async def _note(self, text: str, error: bool = False) -> None:
        log = self.query_one("#chat-log", VerticalScroll)
        await log.mount(Static(Text(text), classes="chat-error" if error else "chat-note"))

    # ----------------------------------------------------------------------------------------- replies
    async def on_chat_reply(self, message: ChatReply) -> None:
        if message.client is not self.client:
            return  # a reply of a worker we already dropped
        reply = message.reply
        if isinstance(reply, TokenReply):
            if reply.id == self.current_id and self.current_stream is not None:
                self.current_text.append(reply.text)
                await self.current_stream.write(printable(reply.text))
        elif isinstance(reply, ReadyReply):
            self.state = "ready"
            self.ready_device = reply.device
            where = f"{_short(reply.model)}" + (" + LoRA" if reply.adapter else "")
            self.ready_line = f"{where} on {reply.device}"
            if self.current_id is not None:
                self._set_status(f"{self.ready_line} · generating …  (Esc stops)", "busy")
            else:
                self._set_status(f"{self.ready_line} · ready (loaded in {reply.load_s:.1f} s)")
        elif isinstance(reply, EndReply):
            if reply.id == self.current_id:
                await self._finish_reply(reply)
        elif isinstance(reply, ErrorReply):
            await self._on_error(reply)

    async def _finish_reply(self, end: EndReply) -> None:
        text = "".join(self.current_text)
        if self.current_stream is not None:
            await self.current_stream.stop()
        if not text.strip() and self.current_box is not None:
            await self.current_box.update("*(empty reply)*")
        self.history.append({"role": "assistant", "content": text})
        self.last_stats = format_stats(end)
        self.reply_meta[len(self.history) - 1] = {**self.current_meta, "stats": self.last_stats}
        self._clear_current()
        self._set_status(f"{self.ready_line} │ {self.last_stats}")

    async def _finish_failed(self, error: str) -> None:
        """The request in flight failed: say so in its bubble and forget the question."""
        if self.current_stream is not None:
            await self.current_stream.stop()
        if self.current_box is not None:
            self.current_box.add_class("-error")
            await self.current_box.append(f"\n\n**error:** {error}")
        if self.history and self.history[-1]["role"] == "user":
            self.history.pop()
        self._clear_current()

    def _clear_current(self) -> None:
        self.current_id = None
        self.current_box = None
        self.current_stream = None
        self.current_text = []
        self.refresh_bindings()

    async def _on_error(self, reply: ErrorReply) -> None:
        message = reply.message
        if reply.fatal:
            first, _, rest = message.partition("\n")
            if self.current_id is not None:  # its bubble says what happened; the log tail goes below
                await self._finish_failed(first)
                if rest.strip():
                    await self._note(rest, error=True)
            else:
                await self._note(message, error=True)
            self._failed(message)
            return
        if reply.id is not None and reply.id == self.current_id:
            await self._finish_failed(message)
            self._set_status(f"error: {message.splitlines()[0]}", "error")
        elif reply.op == "load":  # the old model is still served: show it as selected again
            if self.client is not None:
                self.client_target = next(
                    (t for t in self.targets if t.model == self.client.model and t.adapter == self.client.adapter), None
                )
                if self.client_target is not None:
                    self.query_one("#chat-target", Select).value = self.targets.index(self.client_target)
            self.state = "ready"
            self._set_status(f"error: {message.splitlines()[0]}", "error")
            await self._note(message, error=True)
        else:
            self._set_status(f"error: {message.splitlines()[0]}", "error")

    def _failed(self, message: str) -> None:
        self.state = "failed"
        self._drop_client()
        self.add_class("-failed")
        self._set_status(f"✗ {message.splitlines()[0]}", "error")

    async def on_chat_start_failed(self, message: ChatStartFailed) -> None:
        if message.client is not self.client:
            return
        if self.current_id is not None:
            await self._finish_failed(message.error)
        self._failed(message.error)

    # ----------------------------------------------------------------------------------------- actions
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":  # Esc means "stop" only while a reply streams; otherwise it passes on
            return self.current_id is not None
        return True

    def action_stop(self) -> None:
        if self.current_id is None or self.client is None:
            return
        self.client.stop(self.current_id)
        self._set_status("stopping …", "busy")

    @on(Button.Pressed, "#chat-retry")
    async def retry_pressed(self) -> None:
        await self.action_restart()

    async def _config_path_changed(self, path: str) -> None:
        self.config_path = path
        await self.action_restart()

    async def action_restart(self) -> None:
        """Reload the config's targets and (re)start the worker with the selected one."""
        old = self._selected_target()
        self._read_config()
        for hint in self.query("#chat-hint").results(Static):
            hint.update(self._hint())
        if self.config_error:  # keep what runs (if anything): only the config is broken
            self.add_class("-failed")
            self._set_status(f"config error: {self.config_error}", "error")
            return
        select = self.query_one("#chat-target", Select)
        select.set_options(self._target_options())
        select.value = self.targets.index(old) if old in self.targets else 0
        if self.current_id is not None:  # its reply will never come from the new worker
            await self._finish_failed("restarted")
        self._drop_client()
        target = self._selected_target()
        if target is not None:
            self._start_client(target)
            self._set_status(f"loading {target.label} ({_short(target.model)}) …", "busy")

    async def action_new_chat(self) -> None:
        if self.current_id is not None and self.client is not None:
            self.client.stop(self.current_id)
            await self._finish_failed("stopped: new chat")
        self.history.clear()
        self.reply_meta.clear()
        self.chat_started = None
        self.last_saved = None
        log = self.query_one("#chat-log", VerticalScroll)
        await log.remove_children()
        await log.mount(Static("New conversation.", id="chat-hint"))
        self.query_one("#chat-input", MessageInput).focus()

    def action_save(self) -> None:
        """Write the conversation as Markdown + JSON (engine.chat.transcript): `<run>/chat/` when the offered
        models are a run's, else `.chats/`; one pair of files per conversation, replaced on each save."""
        from engine.chat.transcript import make_record, new_name

        messages = [dict(m, **self.reply_meta.get(i, {})) for i, m in enumerate(self.history)]
        if self.current_id is not None and self.current_text:  # a reply still streaming: what came so far
            messages.append(
                {"role": "assistant", "content": "".join(self.current_text), "partial": True, **self.current_meta}
            )
        if not messages:
            self.notify("Nothing to save yet: the conversation is empty.", severity="warning")
            return
        system = self.query_one("#chat-system", Input).value.strip() or None
        target = self.client_target or self._selected_target()
        last = next((m for m in reversed(messages) if m["role"] == "assistant" and "params" in m), {})
        try:
            params = last.get("params") or self._params().given()
        except ProtocolError:
            params = {}
        record = make_record(
            ([{"role": "system", "content": system}] if system else []) + messages,
            label=target.label if target else "model",
            model=target.model if target else "",
            adapter=target.adapter if target else None,
            params=params,
            run=self.run_id,
            device=self.ready_device,
        )
        self._save(record, self.config_path, self.run_id, new_name(self.chat_started))

    @work(thread=True, group="chat-save")
    def _save(self, record: dict[str, Any], config_path: str, run_id: str | None, name: str) -> None:
        """Off the event loop: finding the run store reads the config; each file is fsynced."""
        from engine.chat.transcript import chat_dir, save
        from engine.store.runs import runs_root

        try:
            run_path = runs_root(config_path) / run_id if run_id else None
            paths = save(record, chat_dir(run_path) / f"{name}.md")
        except OSError as exc:  # FileWriteError names the path and what to do
            self.app.call_from_thread(self.notify, f"Cannot save the conversation: {exc}", severity="error", timeout=10)
            return

        def done() -> None:
            self.last_saved = paths
            self.notify(f"Saved {paths[0]}\n(and {paths[1].name})", title="Conversation saved")

        self.app.call_from_thread(done)

    # ------------------------------------------------------------------------------------------ status
    def _set_status(self, text: str, tone: str = "") -> None:
        self.status = text
        status = self.query_one("#chat-status", Static)
        status.update(Text(text))
        status.set_class(tone == "error", "-error")
        status.set_class(tone == "busy", "-busy")


def _where(target: ChatTarget) -> str:
    return target.model + (f" + {target.adapter}" if target.adapter else "")


def _short(path: str, width: int = 34) -> str:
    """A model name or path cut to fit a narrow line, keeping its end (the part that differs)."""
    text = str(path)
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1) :]
