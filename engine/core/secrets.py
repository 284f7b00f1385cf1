"""Keep secrets out of everything a run writes or a command prints.

Light module. Replaced by `***`: the values of secret environment variables (the known ones, and any
whose name ends in KEY, TOKEN, SECRET or PASSWORD; also those loaded from `.env`), and anything shaped
like an OpenAI or Hugging Face key.

Redact *before* cutting a message short: a key cut in half no longer matches, and its first part would
survive. `clip(text, n)` does both in the right order.
"""

from __future__ import annotations

import io
import os
import re

SECRET_ENV_VARS = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "WANDB_API_KEY")
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)$", re.IGNORECASE)
_KEY_SHAPES = re.compile(r"\b(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,})\b")
_MIN_SECRET_LEN = 8  # shorter values would redact ordinary words


def secret_values() -> list[str]:
    names = set(SECRET_ENV_VARS) | {name for name in os.environ if _SECRET_NAME.search(name)}
    values = {os.environ.get(name, "") for name in names}
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LEN), key=len, reverse=True)


def redact(text: str) -> str:
    for value in secret_values():
        if value in text:
            text = text.replace(value, "***")
    return _KEY_SHAPES.sub("***", text)


def clip(text: str, limit: int) -> str:
    """Redact, then cut to `limit` characters (never the other way round)."""
    text = redact(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_dotenv_secrets(workdir: str | os.PathLike[str] = ".") -> None:
    """Read `.env` into the environment (without overriding it), so a key known only there is redacted too."""
    try:
        from dotenv import load_dotenv
    except ImportError:  # pragma: no cover - python-dotenv is a dependency
        return
    load_dotenv(os.path.join(workdir, ".env"), override=False)


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
