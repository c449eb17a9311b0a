"""Small helpers every bench section uses (one copy, not one per section)."""

from __future__ import annotations

import contextlib
import os
import statistics
from typing import Any

#: the copy-before-write buffer's statistics a job reports (contract C1)
BUFFER_FIELDS = ("capacity_bytes", "peak_bytes", "full_seconds", "saves", "fallbacks")


def median(values: list[float]) -> float:
    """The median of ``values``; 0.0 for none (a section that measured nothing)."""
    return float(statistics.median(values)) if values else 0.0


def remove_file(path: str) -> None:
    """Remove a bench output if it is there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def buffer_stats(result: Any) -> dict[str, Any] | None:
    """A job result's copy-before-write buffer occupancy (contract C1), or None.

    ``JobResult.cbw_buffer`` (a ``BufferStats`` or None) exists once the bounded buffer
    is in the engine; before it, and for jobs that used no buffer, this is None and the
    report prints "n/a". A dict (the CLI's ``--json`` summary) is read the same way.
    """
    stats = result.get("cbw_buffer") if isinstance(result, dict) else \
        getattr(result, "cbw_buffer", None)
    if stats is None:
        return None
    if isinstance(stats, dict):
        out = {k: stats.get(k) for k in BUFFER_FIELDS}
    else:
        out = {k: getattr(stats, k, None) for k in BUFFER_FIELDS}
    if out["capacity_bytes"]:
        out["peak_share"] = out["peak_bytes"] / out["capacity_bytes"]
    return out
