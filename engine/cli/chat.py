"""`tas chat` (moving here from engine.chat.client)."""

from engine.chat.client import add_chat_command as add_parser  # noqa: F401
