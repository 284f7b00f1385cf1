"""What every `tas` command shares: the consoles and the one way to report a user error."""

from __future__ import annotations

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> int:
    """Print `error: message` (the user's input is wrong: no traceback) and return the exit code."""
    errors.print(f"[bold red]error:[/] {message}", markup=True)
    return code
