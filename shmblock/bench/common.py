"""Small helpers every bench section uses (one copy, not one per section)."""

from __future__ import annotations

import contextlib
import os
import statistics


def median(values: list[float]) -> float:
    """The median of ``values``; 0.0 for none (a section that measured nothing)."""
    return float(statistics.median(values)) if values else 0.0


def remove_file(path: str) -> None:
    """Remove a bench output if it is there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
