"""Sizes the way qemu-img and fio write them: ``64K``, ``256M``, ``1G``, ``512``.

Suffixes are binary (K = 1024), as in qemu-img; an optional trailing ``B``/``iB`` is
accepted (``64KiB``). Plain numbers are bytes.
"""

from __future__ import annotations

import re
from fractions import Fraction

from shmblock.errors import UsageError

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, what: str = "size") -> int:
    """Parse ``text`` into bytes; raises UsageError naming ``what`` when it does not parse."""
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"{what} must not be negative, got {text}")
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(f"invalid {what} {text!r}: expected a number with an optional "
                         "K, M, G or T suffix, like 64K or 1G")
    number, suffix = match.groups()
    # Exact arithmetic: a float would silently round byte counts above 2**53.
    value = Fraction(number) * _SUFFIX[suffix.upper()]
    if value.denominator != 1:
        raise UsageError(f"invalid {what} {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: float) -> str:
    """Human form with a binary suffix: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_s: float) -> str:
    """Throughput in decimal units, as storage benchmarks quote it: '5.62 GB/s'."""
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.2f} {unit}"
    return f"{bytes_per_s:.0f} B/s"
