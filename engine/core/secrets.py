"""Keep secrets out of everything a run writes.

Light module. Values of the secret environment variables (also those loaded from `.env`) and anything
shaped like an OpenAI or Hugging Face key are replaced by `***` in events and in messages we print.
"""

from __future__ import annotations

import os
import re

SECRET_ENV_VARS = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "WANDB_API_KEY")
_KEY_SHAPES = re.compile(r"\b(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,})\b")
_MIN_SECRET_LEN = 8  # shorter values would redact ordinary words


def secret_values() -> list[str]:
    values = {os.environ.get(name, "") for name in SECRET_ENV_VARS}
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LEN), key=len, reverse=True)


def redact(text: str) -> str:
    for value in secret_values():
        if value in text:
            text = text.replace(value, "***")
    return _KEY_SHAPES.sub("***", text)
