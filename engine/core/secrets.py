"""Keep secrets out of everything a run writes or a command prints.

Light module. `redact(text)` replaces with `***`:
- known secret values, and every piece of 8 or more characters of one (a server that echoes a key's
  prefix and its suffix separately leaks neither). Known: the values of secret environment variables
  (the named ones, and any whose name ends in KEY, TOKEN, SECRET, PASSWORD, PASSWD, PASS, PASSPHRASE or
  CREDENTIALS), the passwords of URLs in
  the environment (`OPENAI_BASE_URL=http://user:password@host`), and the same from every `.env` read by
  `load_dotenv_secrets` (even where the environment overrides it). Each both as written and stripped:
  a key with a trailing newline is sent stripped, and the stripped form is what a server echoes;
- shapes, whatever their value: the password of a URL (`scheme://user:***@host`), `api_key=`/`token=`
  assignments and query values, `api_key: X` (YAML, HTTP headers, Python reprs), `--api-key X` /
  `--hf-token=X` flags, `Bearer X`, `Authorization: Basic X`, and anything shaped like an OpenAI or
  Hugging Face key.

`redact_data` does the same to plain data (a config as dicts and lists), where names say more: any value
under a key named like a secret, and the item after a secret flag in a list of arguments.

It runs on every event line, so the matcher is built once per set of secret values and cached.
Redact *before* cutting a message short: a key cut in half no longer matches, and its first part would
survive. `clip(text, n)` does both in the right order.
"""

from __future__ import annotations

import base64
import io
import os
import re
from functools import lru_cache
from typing import Any
from urllib.parse import quote

SECRET_ENV_VARS = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "WANDB_API_KEY")
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIALS?|(?:^|_)PASS)$", re.IGNORECASE)
_MIN_SECRET_LEN = 8  # shorter values (and pieces) would redact ordinary words
MASK = "***"

# a name that holds a secret in text: api_key, OPENAI_API_KEY, hf-token, client_secret, db_password, x_key
_NAME = r"(?:[A-Za-z0-9]+[_-])*(?:api[_-]?key|access[_-]?key|token|secret|password|passwd)|(?:[A-Za-z0-9]+[_-])+key"
_COLON_NAME = (
    r"(?:[A-Za-z0-9]+[_-])*(?:api[_-]?key|access[_-]?key|secret|password|passwd)|(?:[A-Za-z0-9]+[_-])+key"
    r"|(?:(?:hf|api|auth|access|refresh|bearer|id|github|openai|wandb)[_-]?)?token"
)
_SHAPES = (
    # scheme://user:password@host -> scheme://user:***@host
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^\s/@:?#]*:)[^\s/@?#]+(?=@)"), r"\1" + MASK),
    # ?key=X &token=X (query values) and api_key=X, api_key='X', OPENAI_API_KEY=X (assignments)
    (re.compile(r"(?i)([?&;](?:" + _NAME + r"|key)=)[^&\s#\"'<>]+"), r"\1" + MASK),
    (re.compile(r"(?i)((?<![\w-])(?:" + _NAME + r")\s*=\s*['\"]?)(?!\*\*\*)[^\s'\"&,;)}\]]+"), r"\1" + MASK),
    (re.compile(r"(?i)(\"(?:" + _NAME + r")\"\s*:\s*\")[^\"]+"), r"\1" + MASK),  # "api_key": "X" (JSON)
    # api_key: X (YAML), x-api-key: X (an HTTP header), {'api_key': 'X'} (a Python repr); `token` alone or
    # with a known prefix only: pad_token / eos_token are a tokenizer's ordinary settings
    (re.compile(r"(?i)((?<![\w-])(?:" + _COLON_NAME + r")['\"]?\s*:\s*['\"]?)(?!\*\*\*)[^\s'\",;)}\]]+"), r"\1" + MASK),
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?basic\s+)[A-Za-z0-9+/=]{8,}"), r"\1" + MASK),
    # --api-key X, --api-key=X, --hf-token X (a next word that is another flag is not a value)
    (re.compile(r"(?i)((?<![\w-])--?(?:" + _NAME + r")(?:=|\s+))(?!-)\S+"), r"\1" + MASK),
    (re.compile(r"(?i)(\bbearer\s+)[\w.~+/=-]{8,}"), r"\1" + MASK),
    (re.compile(r"\b(?:sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,})\b"), MASK),
)
_SHAPE_HINT = re.compile(r"(?i)key|token|secret|passw|bearer|basic|://|sk-|hf_")
_SECRET_FLAG = re.compile(r"(?i)^--?(?:" + _NAME + r"|key)$")  # an item of an argument list: hide the next one
_URL_PASSWORD = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s/@:?#]*:([^\s/@?#]+)@")

_dotenv_secrets: set[str] = set()  # values read from .env files: known even where the environment wins


def secret_values() -> list[str]:
    """Every known secret value, in each form it can appear in (as written, stripped, URL-quoted)."""
    found = set(_dotenv_secrets)
    for name, value in os.environ.items():
        found.update(_secrets_of(name, value))
    return sorted(_forms(found), key=len, reverse=True)


def is_secret_name(name: str) -> bool:
    """An environment variable (or config key) whose value is a secret: HF_TOKEN, OPENAI_API_KEY, X_PASSWORD."""
    return name in SECRET_ENV_VARS or bool(_SECRET_NAME.search(name))


def _secrets_of(name: str, value: str) -> list[str]:
    secrets = [value] if is_secret_name(name) else []
    if "://" in value and "@" in value:
        secrets += _URL_PASSWORD.findall(value)
    return secrets


def _forms(values: set[str]) -> set[str]:
    forms = set()
    for value in values:
        for form in (value, value.strip(), quote(value.strip(), safe=""), *_base64_forms(value.strip())):
            if len(form) >= _MIN_SECRET_LEN:
                forms.add(form)
    return forms


def _base64_forms(value: str) -> list[str]:
    """The base64 text of `value` wherever it starts inside encoded data (`Basic b64(user:key)`): one
    form per alignment (0, 1 or 2 bytes before it), keeping only the characters that depend on the value
    alone (a partial group at either end also encodes its neighbours)."""
    raw = value.encode()
    forms = []
    for before in range(3):
        encoded = base64.b64encode(b"\0" * before + raw).decode()
        start = 4 if before else 0  # the first group mixes the filler with the value
        end = 4 * ((before + len(raw)) // 3)  # the last partial group would mix it with what follows
        forms.append(encoded[start:end])
    return forms


class _Known:
    """The known secrets of one environment, as the pieces of 8 characters they are made of.

    Every piece of 8 or more characters of a secret contains one of its 8-character pieces, so masking
    each run of text covered by such pieces hides every piece of a secret; a whole value is one run.
    One regular expression finds the first piece (fast: most lines hold none); runs are extended here.
    Path-like values (`/home/...`, with spaces) are matched whole only: their pieces are ordinary words.
    """

    def __init__(self, values: tuple[str, ...]):
        self.whole = tuple(v for v in values if _path_like(v))
        n = _MIN_SECRET_LEN
        self.pieces = frozenset(v[i : i + n] for v in values if not _path_like(v) for i in range(len(v) - n + 1))
        self.first = re.compile("|".join(map(re.escape, sorted(self.pieces)))) if self.pieces else None

    def redact(self, text: str) -> str:
        for value in self.whole:
            text = text.replace(value, MASK)
        if self.first is None:
            return text
        n, out, done = _MIN_SECRET_LEN, [], 0
        while match := self.first.search(text, done):
            start, end = match.start(), match.end()
            while end < len(text) and text[end - n + 1 : end + 1] in self.pieces:
                end += 1
            out += [text[done:start], MASK]
            done = end
        return "".join(out) + text[done:] if out else text


def _path_like(value: str) -> bool:
    return value.startswith(("/", "~", "./", "../")) or any(c.isspace() for c in value)


_cache: tuple[dict, frozenset[str], _Known] | None = None


def _known() -> _Known:
    """The matcher for the current environment and `.env` values, rebuilt only when either changes.

    Comparing the environment's own mapping (`os.environ._data`, bytes) costs a microsecond; decoding
    it on every line would cost more than the redaction itself."""
    global _cache
    environ = getattr(os.environ, "_data", None) or dict(os.environ)
    dotenv = frozenset(_dotenv_secrets)
    if _cache is None or _cache[0] != environ or _cache[1] != dotenv:
        _cache = (dict(environ), dotenv, _matcher(tuple(secret_values())))
    return _cache[2]


@lru_cache(maxsize=16)
def _matcher(values: tuple[str, ...]) -> _Known:
    return _Known(values)


def redact(text: str) -> str:
    text = _known().redact(text)
    if _SHAPE_HINT.search(text):  # every shape holds one of these words; most lines hold none
        for pattern, replacement in _SHAPES:
            text = pattern.sub(replacement, text)
    return text


def redact_data(value: Any, name: str = "") -> Any:
    """Plain data (dicts, lists, strings) with secrets replaced: by `redact`, plus the value of any key
    named like a secret (`HF_TOKEN` in an env mapping) and the item after a secret flag in a list."""
    if isinstance(value, dict):
        return {k: redact_data(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        out, hide_next = [], False
        for item in value:
            if hide_next and isinstance(item, str):
                out.append(MASK)
                hide_next = False
                continue
            hide_next = isinstance(item, str) and bool(_SECRET_FLAG.match(item))
            if isinstance(item, str) and "=" in item and _SECRET_FLAG.match(item.split("=", 1)[0]):
                item = item.split("=", 1)[0] + "=" + MASK
            out.append(redact_data(item))
        return out
    if isinstance(value, str):
        return MASK if value and is_secret_name(name) else redact(value)
    return value


def secret_keys(data: Any, prefix: str = "") -> list[str]:
    """The dotted keys of plain data (a config as a dict) whose value holds a secret: what `redact_data`
    would change. A secret typed into a config file instead of `.env` is copied into every run's frozen
    config, which the workers read: `tas run` and the panel name the key so that it can move."""
    found = []
    for key, value in data.items() if isinstance(data, dict) else ():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            found += secret_keys(value, dotted)
        elif _holds_secret(str(key), value):
            found.append(dotted)
    return found


def _holds_secret(name: str, value: Any) -> bool:
    """A config value that holds a secret: its text has one (a known value, a URL password, `--api-key X`),
    or it sits under an environment variable's name (`HF_TOKEN:` in an env mapping). Lower-case config
    names are schema fields (`key: instruction` names a dataset column, `pad_token` a token), not secrets."""
    if isinstance(value, str):
        return redact(value) != value or (name.isupper() and bool(value) and is_secret_name(name))
    if isinstance(value, list):  # flags and their values (`--api-key X`); records by their own keys
        texts = [item for item in value if not isinstance(item, dict)]
        return redact_data(texts) != texts or any(secret_keys(item) for item in value if isinstance(item, dict))
    return False


def clip(text: str, limit: int) -> str:
    """Redact, then cut to `limit` characters (never the other way round)."""
    text = redact(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_dotenv_secrets(workdir: str | os.PathLike[str] = ".") -> None:
    """Read `.env` into the environment (without overriding it), and remember its secrets for `redact`:
    a key known only there, or one the environment overrides, is redacted too."""
    try:
        from dotenv import dotenv_values, load_dotenv
    except ImportError:  # pragma: no cover - python-dotenv is a dependency
        return
    path = os.path.join(workdir, ".env")
    load_dotenv(path, override=False)
    for name, value in dotenv_values(path).items():
        _dotenv_secrets.update(_secrets_of(name, value or ""))


class RedactingStream(io.TextIOBase):
    """A text stream that redacts whole lines before passing them on (a worker's stdout / stderr).

    Libraries print errors that can hold a key (an HTTP body echoing it, asyncio's "Task exception was
    never retrieved"); everything a worker prints goes to worker.log, which `tas logs` shows.
    """

    def __init__(self, inner):
        self.inner = inner
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            complete, _, self._pending = self._pending.rpartition("\n")
            self.inner.write(redact(complete) + "\n")
            self.inner.flush()
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self.inner.write(redact(self._pending))
            self._pending = ""
        self.inner.flush()

    def fileno(self) -> int:
        return self.inner.fileno()

    def isatty(self) -> bool:
        return False
