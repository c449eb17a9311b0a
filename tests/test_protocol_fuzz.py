"""Fuzzing decode: whatever the bytes, it returns a valid message or raises
RemoteProtocolError, and nothing else."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import MAX_MESSAGE_SIZE, Message, Ready, RemoteProtocolError, decode, encode
from protocol.codec import describe
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


# -- nesting ------------------------------------------------------------------------------
# A message is a flat array; a peer that nests containers a thousand deep (a 1 KiB message)
# used to make decode raise RecursionError while it built its error text (repr of the
# nested value), which killed whichever loop received it.


def _nested(depth: int, container: bytes = b"\x91") -> bytes:
    """``depth`` one-element containers around a 0: ``[[[...[0]...]]]`` without recursion."""
    return container * depth + b"\x00"


# Where a nested value can sit: the whole message, the version, the code, a field; with
# and without trailing bytes (ExtraData's repr would include the parsed value).
NESTING_SPOTS = [
    pytest.param(b"", b"", id="whole"),
    pytest.param(b"\x92", b"\x07", id="version"),  # [nested, 7]
    pytest.param(b"\x92\x01", b"", id="code"),  # [1, nested]
    pytest.param(b"\x95\x01\x07", b"\x01\x01", id="field"),  # Ready(role=nested, ...)
    pytest.param(b"\x95\x01\x07\xa6writer", b"\x01", id="field2"),  # Ready(ident=nested)
    pytest.param(b"\x95\x01\x07", b"\x01\x01\x00", id="trailing"),
]


@pytest.mark.parametrize("depth", [2, 100, 999, 1000, 1023, 1024, 1025, 5000, 8000])
@pytest.mark.parametrize(("head", "tail"), NESTING_SPOTS)
@pytest.mark.parametrize("container", [b"\x91", b"\x81\x00"], ids=["array", "map"])
def test_deep_nesting_is_a_remote_error(depth: int, head: bytes, tail: bytes,
                                        container: bytes) -> None:
    data = head + _nested(depth, container) + tail
    if len(data) > MAX_MESSAGE_SIZE:
        data = data[:MAX_MESSAGE_SIZE]
    with pytest.raises(RemoteProtocolError) as info:
        decode(data)
    assert len(str(info.value)) < 500  # the nested value is described, never spelled out


def test_the_error_for_a_nested_field_names_the_element() -> None:
    with pytest.raises(RemoteProtocolError, match="element 2 of the message is a tuple"):
        decode(b"\x95\x01\x07" + _nested(1000) + b"\x01\x01")


def test_deep_nesting_with_the_pure_python_unpacker(monkeypatch: pytest.MonkeyPatch) -> None:
    """msgpack's fallback unpacker recurses in Python: still a clean RemoteProtocolError."""
    from msgpack import fallback

    monkeypatch.setattr(msgpack, "unpackb", fallback.unpackb)  # codec calls msgpack.unpackb
    for depth in (100, 1000, 5000):
        with pytest.raises(RemoteProtocolError):
            decode(b"\x95\x01\x07" + _nested(depth) + b"\x01\x01")
    assert decode(encode(Ready(role="writer", ident=1, pid=1))) == Ready("writer", 1, 1)


containers = st.recursive(
    st.integers(0, 3),
    lambda inner: st.lists(inner, min_size=1, max_size=2).map(tuple),
    max_leaves=4,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 6), st.integers(1, 3000), st.data())
def test_nested_values_anywhere(position: int, depth: int, data: st.DataObject) -> None:
    """Any element of a plausible message replaced by a deep or wide nest is refused."""
    valid = [1, 7, "writer", 1, 1]
    head = b"".join(_packed_scalar(v) for v in valid[:position])
    tail = b"".join(_packed_scalar(v) for v in valid[position + 1 :])
    nest = _nested(depth, data.draw(st.sampled_from([b"\x91", b"\x81\x00", b"\xdc\x00\x01"])))
    body = head + nest + tail
    count = len(valid) if position < len(valid) else len(valid) + 1
    decodes_or_refuses((bytes([0x90 + count]) + body)[:MAX_MESSAGE_SIZE])
    decodes_or_refuses(_packed([*valid[:2], data.draw(containers, label="wide")]))


def _packed_scalar(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def test_describe_is_bounded() -> None:
    assert describe("x" * 10_000).endswith("(10000 long)")
    assert len(describe("x" * 10_000)) < 100
    assert describe(2**4000) == "an int of 4001 bits"
    assert describe((1, 2)) == "a tuple of 2 items"
    assert describe(7) == "7"
    assert describe(object()) == "a object"
