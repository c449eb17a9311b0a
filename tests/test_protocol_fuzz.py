"""Fuzzing decode: whatever the bytes, it returns a valid message or raises
RemoteProtocolError, and nothing else."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import MAX_MESSAGE_SIZE, Message, RemoteProtocolError, decode, encode
from tests.test_protocol import MAXIMAL, messages


def decodes_or_refuses(data: bytes) -> None:
    """The property: a valid message, or RemoteProtocolError. Anything else propagates."""
    try:
        msg = decode(data)
    except RemoteProtocolError:
        return
    # What decode accepted passed the constructor's checks: it re-encodes and round-trips.
    assert decode(encode(msg)) == msg


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=MAX_MESSAGE_SIZE + 16))
def test_random_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"\x93\x01", b"\x94\x01", b"\x95\x01", b"\x96\x01", b"\x97\x01"]),
       st.binary(max_size=64))  # fmt: skip
def test_random_bytes_after_a_plausible_header(head: bytes, tail: bytes) -> None:
    decodes_or_refuses(head + tail)


def _every_prefix(msg: Message) -> None:
    data = encode(msg)
    for end in range(len(data)):
        try:
            decode(data[:end])
        except RemoteProtocolError:
            continue
        raise AssertionError(f"decoded a {end}-byte prefix of {len(data)}-byte {msg!r:.60}")


@settings(max_examples=100, deadline=None)
@given(messages)
def test_every_truncation_is_refused(msg: Message) -> None:
    # msgpack arrays declare their length, so no proper prefix is a whole message.
    _every_prefix(msg)


def test_every_truncation_of_the_largest_messages_is_refused() -> None:
    for msg in MAXIMAL:
        _every_prefix(msg)


@settings(max_examples=500, deadline=None)
@given(messages, st.data())
def test_byte_flips(msg: Message, data: st.DataObject) -> None:
    buf = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        index = data.draw(st.integers(0, len(buf) - 1), label="index")
        buf[index] = data.draw(st.integers(0, 255), label="byte")
    decodes_or_refuses(bytes(buf))


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_insertions_and_deletions(msg: Message, data: st.DataObject) -> None:
    buf = bytearray(encode(msg))
    index = data.draw(st.integers(0, len(buf)), label="index")
    if data.draw(st.booleans(), label="insert"):
        buf[index:index] = data.draw(st.binary(min_size=1, max_size=8), label="inserted")
    else:
        del buf[index : index + data.draw(st.integers(1, 8), label="deleted")]
    decodes_or_refuses(bytes(buf))


# Well-formed msgpack with the right header but arbitrary fields: reaches the field checks,
# which random bytes mostly do not.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=70),
    st.binary(max_size=8),
    st.sampled_from(["writer", "backup", "full", "top", "none", "incremental", "", "job-1"]),
    st.sampled_from([0, 1, 4095, 4096, 2**31 - 1, 2**31, 2**31 + 1, 2**63 - 1, 2**63]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.integers(0, 3), inner, max_size=2)
    ),
    max_leaves=6,
)


def _packed(items: list[Any]) -> bytes:
    return msgpack.packb(items, use_bin_type=True)


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(st.just(1), values),
    st.one_of(st.integers(0, 21), values),
    st.lists(values, max_size=7),
)
def test_structured_garbage(version: Any, code: Any, fields: list[Any]) -> None:
    decodes_or_refuses(_packed([version, code, *fields]))
