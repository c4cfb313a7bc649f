"""Results as text: targets (PASS / FAIL), number formatting and Markdown tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda v, t: v <= t,
    "<": lambda v, t: v < t,
    ">=": lambda v, t: v >= t,
    ">": lambda v, t: v > t,
}


def check(value: float | None, op: str, threshold: float) -> str:
    """``"PASS"`` / ``"FAIL"`` for ``value op threshold``; ``"n/a"`` without a value."""
    if value is None:
        return "n/a"
    return "PASS" if _OPS[op](value, threshold) else "FAIL"


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (``-`` for None)."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown pipe table with padded columns (readable as plain text too). Numbers are
    right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        all(_looks_numeric(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))
    ]

    def line(row):
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    sep = (
        "|"
        + "|".join(
            "-" * (w + 1) + ":" if num else ":" + "-" * (w + 1)
            for w, num in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _looks_numeric(text: str) -> bool:
    text = text.rstrip("%x").replace(",", "")
    if text in ("-", ""):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True
