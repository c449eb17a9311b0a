"""Sizes as qemu-img and fio write them, and the human forms of sizes and rates."""

from __future__ import annotations

import pytest

from shmblock.errors import UsageError
from shmblock.units import format_rate, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512", 512),
        ("0", 0),
        ("4096", 4096),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("256M", 256 << 20),
        ("1G", 1 << 30),
        ("2T", 2 << 40),
        ("1P", 1 << 50),
        ("1.5M", 3 << 19),
        ("0.5K", 512),
        ("64KiB", 64 << 10),
        ("64KB", 64 << 10),
        ("64kib", 64 << 10),
        ("1GiB", 1 << 30),
        ("100B", 100),
        (" 64K ", 64 << 10),
        ("64 K", 64 << 10),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_plain_numbers_are_exact() -> None:
    """Plain byte counts go through no floating point: every digit counts."""
    assert parse_size(str(2**53 + 1)) == 2**53 + 1
    assert parse_size("9007199254740993K") == 9007199254740993 * 1024
    assert parse_size("1.5P") == 3 << 49


def test_parse_size_accepts_ints() -> None:
    assert parse_size(4096) == 4096
    assert parse_size(0) == 0
    with pytest.raises(UsageError, match="must not be negative"):
        parse_size(-1)


@pytest.mark.parametrize(
    "text",
    ["", " ", "abc", "-1", "-64K", "64X", "K", "1.2.3", "1e3", "64KK", "0x10", "1,5M",
     "64 K B", "1.5", "0.1K", "1.1G", "nan", "inf"],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_size(text, what="--size")
    message = str(info.value)
    assert repr(text) in message, message
    assert "--size" in message, message


def test_parse_size_error_is_a_value_error() -> None:
    # Callers that only know the standard library can still catch it.
    with pytest.raises(ValueError, match="cluster size"):
        parse_size("big", what="cluster size")


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (64 << 10, "64.0 KiB"),
        (256 << 20, "256.0 MiB"),
        (3 << 29, "1.5 GiB"),
        (5 << 40, "5.0 TiB"),
        (1 << 50, "1024.0 TiB"),  # the largest unit keeps growing
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        (0, "0 B/s"),
        (999, "999 B/s"),
        (1000, "1.00 kB/s"),
        (1500, "1.50 kB/s"),
        (1e6, "1.00 MB/s"),
        (12.345e6, "12.35 MB/s"),
        (5.62e9, "5.62 GB/s"),
        (2e12, "2000.00 GB/s"),
    ],
)
def test_format_rate(rate: float, expected: str) -> None:
    assert format_rate(rate) == expected


@pytest.mark.parametrize("n", [0, 1, 512, 4096, 64 << 10, 1 << 20, 3 << 30, 7 << 40])
def test_format_then_parse_round_trip(n: int) -> None:
    """What format_size prints for a whole unit parses back (qemu-img style)."""
    number, unit = format_size(n).split()
    assert parse_size(number + unit[0] if unit != "B" else number) == n
