"""The Config tab: browse and edit a config file as a tree of sections, or as raw YAML.

The text of the file is the single source of truth: a form edit replaces one scalar in the text (so
comments and layout survive), the raw view edits the text directly, and after every change the text is
validated against the schema, with each error's key path and line listed below. Typing in the raw view
is validated once the keys rest for VALIDATE_AFTER_S; each validation parses the text once, and that
parse feeds the tree, the state line and the errors. Saving shows the diff against the file first and goes
through `save_config_text`, which refuses invalid text and writes atomically with a `.bak`: an invalid edit
can never be saved over a valid file.

The file edited is the app's `config_path`: choosing another file here sets it (new runs, the chat
targets and the header follow), and setting it elsewhere opens that file here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.timer import Timer
from textual.widgets import ContentSwitcher, Input, Label, Select, Static, TextArea, Tree

from engine.config.edit import field_help, save_config_text, set_yaml_value
from engine.config.errors import ConfigError
from engine.config.load import MAX_CONFIG_BYTES, parse_config, validate_tree
from tui.screens.diff import DiffScreen

SECTION_ORDER = ("teacher", "assistant", "student", "train", "datasets")
VALIDATE_AFTER_S = 0.3  # raw-view typing is validated once the keys rest this long
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when built in: ~20x faster than pure Python


@dataclass
class Checked:
    """One validation of the editor's text."""

    data: dict | None  # the YAML as data, for the tree (None when it is not a mapping: keep the last tree)
    issues: list[str]  # each with its key path and line; [] when valid


def check_config_text(text: str, source: str) -> Checked:
    """Validate `text` like `parse_config`, parsing it once: the same parse gives the tree its data.

    A text the single parse cannot judge alone (a YAML syntax error, an empty file, a top level that is
    not a mapping, an oversized text) is handed to `parse_config` for its exact message.
    """
    node = data = None
    try:
        loader = _Loader(text.removeprefix("\ufeff"))
        try:
            node = loader.get_single_node()
            if node is not None:
                data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError:
        pass
    if not isinstance(data, dict) or len(text.encode("utf-8", "replace")) > MAX_CONFIG_BYTES:
        try:
            parse_config(text, source=source)
            issues = []
        except ConfigError as exc:
            issues = [str(issue) for issue in exc.issues]
        return Checked(data if isinstance(data, dict) else None, issues)
    try:
        validate_tree(data, node, source)  # duplicate keys, ${} references, then the schema
        issues = []
    except ConfigError as exc:
        issues = [str(issue) for issue in exc.issues]
    return Checked(data, issues)


def config_files(current: str) -> list[str]:
    """config.yaml, configs/*.yaml and the current file, without repeats."""
    found = [current]
    for candidate in [Path("config.yaml"), *sorted(Path("configs").glob("*.yaml"))]:
        if candidate.exists() and str(candidate) not in found:
            found.append(str(candidate))
    return found


class ConfigTab(Vertical):
    DEFAULT_CSS = """
    ConfigTab { height: 1fr; }
    ConfigTab #bar { height: 3; }
    ConfigTab #file { width: 36; }
    ConfigTab #state { width: 1fr; padding: 1 1 0 1; }
    ConfigTab #form { height: 1fr; }
    ConfigTab #tree { width: 1fr; min-width: 30; }
    ConfigTab #editor { width: 38; padding: 0 1; border-left: solid $primary 40%; }
    ConfigTab #help { height: auto; color: $text-muted; }
    ConfigTab #raw { height: 1fr; }
    ConfigTab #errors { height: auto; max-height: 6; color: $error; padding: 0 1; }
    """

    BINDINGS = [
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+r", "toggle_raw", "Form/YAML"),
        Binding("ctrl+z", "revert", "Revert", show=False),
    ]

    def __init__(self, config_path: str):
        super().__init__()
        self.path = config_path
        self.saved_text = ""
        self.text = ""
        self.issues: list[str] = []
        self.data: dict | None = None  # the text's data as last parsed (the tree shows it)
        self.validations = 0
        self._pending: Timer | None = None  # a validation waiting for the keys to rest
        self.selected: tuple[str | int, ...] | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="bar"):
            files = config_files(self.path)
            yield Select([(f, f) for f in files], value=self.path, allow_blank=False, id="file")
            yield Static(id="state")
        with ContentSwitcher(initial="form", id="views"):
            with Horizontal(id="form"):
                yield Tree("config", id="tree")
                with Vertical(id="editor"):
                    yield Label("select a key", id="key")
                    yield Static(id="help")
                    yield Input(placeholder="value (YAML)", id="value")
            yield TextArea(id="raw", language="yaml", show_line_numbers=True)
        yield Static(id="errors")

    def on_mount(self) -> None:
        self.load(self.path)
        self.watch(self.app, "config_path", self._config_path_changed, init=False)

    # ----------------------------------------------------------------------------------- loading

    def load(self, path: str) -> None:
        self.path = path
        try:
            self.saved_text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.saved_text = ""
            self.notify(f"{path}: cannot read ({exc})", severity="error")
        self.data = None  # a new file: a new tree (its root is the path)
        self.set_text(self.saved_text, from_raw=False)

    def set_text(self, text: str, from_raw: bool) -> None:
        """New buffer text: validate it now, refresh the tree, and (unless it came from there) the raw view."""
        self.text = text
        if not from_raw:
            raw = self.query_one("#raw", TextArea)
            with raw.prevent(TextArea.Changed):
                raw.load_text(text)
        self.validate()

    def validate(self) -> None:
        """Check the text (one parse) and show the result: the tree, the state line, the errors."""
        if self._pending is not None:
            self._pending.stop()
            self._pending = None
        checked = check_config_text(self.text, self.path)
        self.validations += 1
        self.issues = checked.issues
        if checked.data is not None and checked.data != self.data:  # else keep the tree (mid-edit, or a comment)
            self.data = checked.data
            self.rebuild_tree()
        self.show_state()

    @property
    def checking(self) -> bool:
        """A validation is waiting for the keys to rest."""
        return self._pending is not None

    def show_state(self) -> None:
        modified = self.text != self.saved_text
        state = Text()
        if self._pending is not None:
            state.append("… checking", style="dim")
        elif self.issues:
            state.append(f"✗ {len(self.issues)} error{'s' * (len(self.issues) > 1)}", style="bold red")
        else:
            state.append("✓ valid", style="green")
        if modified:
            state.append("  ● modified (ctrl+s: diff + save)", style="yellow")
        if self._trust_remote_code():
            state.append("  ⚠ trust_remote_code is on", style="bold yellow")
        self.query_one("#state", Static).update(state)
        self.query_one("#errors", Static).update(Text("\n".join(self.issues[:6])))

    def _trust_remote_code(self) -> bool:
        try:
            return bool(self.data["teacher"]["open"]["model"].get("trust_remote_code"))
        except Exception:
            return False

    def rebuild_tree(self) -> None:
        tree = self.query_one("#tree", Tree)
        data = self.data
        if data is None:
            return
        expanded = {node.data for node in _walk(tree.root) if node.is_expanded and node.data is not None}
        tree.clear()
        tree.root.label = self.path
        ordered = sorted(data.items(), key=lambda kv: SECTION_ORDER.index(kv[0]) if kv[0] in SECTION_ORDER else 99)
        for key, value in ordered:
            _add_node(tree.root, (key,), key, value, expanded)
        tree.root.expand()

    # ----------------------------------------------------------------------------------- editing

    @on(Tree.NodeHighlighted, "#tree")
    def select_key(self, event: Tree.NodeHighlighted) -> None:
        path = event.node.data
        if path is None:
            return
        self.selected = path
        help_ = field_help(path)
        self.query_one("#key", Label).update(Text(help_.path if help_ else ".".join(map(str, path)), style="bold"))
        lines = []
        if help_:
            lines.append(help_.description)
            lines.append(f"type: {help_.type}" + (f"   default: {help_.default}" if help_.default else ""))
        value_input = self.query_one("#value", Input)
        value = _get(self.data, path)
        editable = not isinstance(value, dict) and not (
            isinstance(value, list) and value and isinstance(value[0], dict)
        )
        value_input.disabled = not editable
        value_input.value = _render(value) if editable else ""
        if not editable:
            lines.append("a section: pick one of its keys")
        self.query_one("#help", Static).update("\n".join(lines))

    @on(Input.Submitted, "#value")
    def apply_value(self, event: Input.Submitted) -> None:
        if self.selected is None:
            return
        try:
            value = yaml.safe_load(event.value) if event.value.strip() else None
        except yaml.YAMLError:
            value = event.value  # not YAML: take it as a plain string
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 1e-4 as a string; a number is meant
            except ValueError:
                pass
        try:
            text = set_yaml_value(self.text, self.selected, value)
        except KeyError as exc:
            self.notify(f"{exc.args[0]}; add it in the YAML view (ctrl+r)", severity="warning")
            return
        self.set_text(text, from_raw=False)
        problems = [i for i in self.issues if ".".join(map(str, self.selected)) in i.replace("[", ".").replace("]", "")]
        if problems:
            self.notify(problems[0], title="invalid value", severity="error")

    @on(TextArea.Changed, "#raw")
    def raw_changed(self, event: TextArea.Changed) -> None:
        """A keystroke in the raw view: validated once the keys rest (each one restarts the wait)."""
        self.text = event.text_area.text
        if self._pending is not None:
            self._pending.stop()
        self._pending = self.set_timer(VALIDATE_AFTER_S, self._keys_rested, name="config-validate")
        self.show_state()

    def _keys_rested(self) -> None:
        self._pending = None  # (this timer is the one firing: nothing to stop)
        self.validate()

    @on(Select.Changed, "#file")
    def switch_file(self, event: Select.Changed) -> None:
        path = str(event.value)
        if path == self.path:
            return
        self._open(path)
        self.app.config_path = path  # every tab follows

    def _config_path_changed(self, path: str) -> None:
        """The app's config file changed elsewhere: edit that one."""
        if path == self.path:
            return
        self._open(path)
        select = self.query_one("#file", Select)
        with select.prevent(Select.Changed):
            select.set_options([(f, f) for f in config_files(path)])
            select.value = path

    def _open(self, path: str) -> None:
        if self.text != self.saved_text:
            self.notify(f"unsaved changes to {self.path} were discarded", severity="warning")
        self.load(path)

    def action_toggle_raw(self) -> None:
        switcher = self.query_one("#views", ContentSwitcher)
        switcher.current = "raw" if switcher.current == "form" else "form"
        self.query_one("#raw" if switcher.current == "raw" else "#tree").focus()

    def action_revert(self) -> None:
        self.set_text(self.saved_text, from_raw=False)
        self.notify("reverted to the file on disk")

    def action_save(self) -> None:
        if self._pending is not None:
            self.validate()  # the keys have not rested yet: check what is being saved
        if self.issues:
            self.notify(f"not saved: {self.issues[0]}", title=f"{len(self.issues)} errors", severity="error", timeout=8)
            return
        if self.text == self.saved_text:
            self.notify("no changes to save")
            return
        diff = "".join(
            difflib.unified_diff(
                self.saved_text.splitlines(keepends=True),
                self.text.splitlines(keepends=True),
                fromfile=f"{self.path} (on disk)",
                tofile=f"{self.path} (edited)",
            )
        )
        self.app.push_screen(DiffScreen(self.path, diff), self._save_confirmed)

    def _save_confirmed(self, confirmed: bool | None) -> None:
        if not confirmed:
            return
        try:
            save_config_text(self.path, self.text)
        except ConfigError as exc:
            self.notify(str(exc), title="not saved", severity="error", timeout=8)
            return
        except OSError as exc:
            self.notify(
                f"{self.path}: {exc.strerror}; the file on disk is unchanged",
                title="not saved",
                severity="error",
                timeout=8,
            )
            return
        self.saved_text = self.text
        self.show_state()
        self.notify(f"saved {self.path} (previous version in {Path(self.path).name}.bak)")


def _walk(node):
    yield node
    for child in node.children:
        yield from _walk(child)


def _add_node(parent, path: tuple[Any, ...], key: Any, value: Any, expanded: set) -> None:
    label = f"[{key}]" if isinstance(key, int) else str(key)
    if isinstance(value, dict):
        node = parent.add(Text(label, style="bold"), data=path, expand=path in expanded)
        for child_key, child_value in value.items():
            _add_node(node, path + (child_key,), child_key, child_value, expanded)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        node = parent.add(Text(label, style="bold"), data=path, expand=path in expanded)
        for index, item in enumerate(value):
            _add_node(node, path + (index,), index, item, expanded)
    else:
        parent.add_leaf(Text.assemble((label, ""), (": ", "dim"), (_render(value), "cyan")), data=path)


def _render(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return str(value)


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data
