"""What the panel's views share: cell-width helpers (a run id in a narrow list, a cell cut to its column) and
the colours that tell compared runs apart (run list marks, curves, legends, tables)."""

from __future__ import annotations

from rich.cells import cell_len, set_cell_size

RUN_COLOURS = ("cyan", "magenta", "yellow", "green", "red", "blue")  # one a compared run, in marking order


def clip(text: str, width: int) -> str:
    """`text` in at most `width` cells, its end replaced by … when cut."""
    return text if cell_len(text) <= width else set_cell_size(text, max(width - 1, 0)) + "…"


def split_run_id(run_id: str) -> tuple[str, str]:
    """("2026-11-25", "080000-tiny") for "20261125-080000-tiny"; ("", run_id) for ids not made by the store."""
    date, sep, rest = run_id.partition("-")
    if sep and rest and len(date) == 8 and date.isdigit():
        return f"{date[:4]}-{date[4:6]}-{date[6:]}", rest
    return "", run_id
