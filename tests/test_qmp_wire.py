"""The QMP wire layer and argument schema without sockets (shmblock.qmp.wire, .schema),
and a fuzz test of the parser: random, truncated, oversized, out-of-order input ends in
clean errors, never an exception, and the stream stays in step."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmblock.qmp import schema, wire
from shmblock.qmp.schemas import SCHEMAS
from shmblock.qmp.wire import MAX_DEPTH, MAX_MESSAGE, BadInput, QmpConnection, QmpError, Request


def feed(data: bytes, step: int | None = None) -> list[wire.Incoming]:
    conn = QmpConnection()
    if step is None:
        return conn.receive_data(data)
    out: list[wire.Incoming] = []
    for i in range(0, len(data), step):
        out += conn.receive_data(data[i:i + step])
    return out


def descs(items: list[wire.Incoming]) -> list[str]:
    return [i.error.desc if isinstance(i, BadInput) else f"ok:{i.command}" for i in items]


def test_greeting_and_messages_are_one_crlf_line() -> None:
    g = wire.greeting((10, 0, 0), "shmblock")
    assert g.endswith(b"\r\n") and g.count(b"\n") == 1
    assert json.loads(g) == {"QMP": {"version": {"qemu": {"major": 10, "minor": 0,
                                                          "micro": 0}, "package": "shmblock"},
                                     "capabilities": []}}
    req = Request("x", {}, {"n": [1]}, True)
    assert json.loads(wire.reply(req, {"a": 1})) == {"return": {"a": 1}, "id": {"n": [1]}}
    assert json.loads(wire.error_reply(Request("x", {}), QmpError("boom"))) == {
        "error": {"class": "GenericError", "desc": "boom"}}
    ev = json.loads(wire.event("JOB_STATUS_CHANGE", {"id": "j"}, 12.5))
    assert ev == {"event": "JOB_STATUS_CHANGE", "data": {"id": "j"},
                  "timestamp": {"seconds": 12, "microseconds": 500000}}


def test_objects_are_split_without_newlines_in_any_pieces() -> None:
    data = (b'{"execute":"a","id":1}{"execute":"b","arguments":{"s":"}{\\"\\\\"}}'
            b'\n  {"execute" : "c", "id": "x}"}')
    for step in (None, 1, 2, 3, 7):
        items = feed(data, step)
        assert [i.command for i in items if isinstance(i, Request)] == ["a", "b", "c"]
        assert isinstance(items[1], Request) and items[1].arguments == {"s": '}{"\\'}
        assert isinstance(items[2], Request) and items[2].id == "x}"


@pytest.mark.parametrize(("data", "desc"), [
    (b'[1, 2]', "QMP input must be a JSON object"),
    (b'42 ', "QMP input must be a JSON object"),
    (b'"s"', "QMP input must be a JSON object"),
    (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
    (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
    (b'{"execute": "x", "arguments": []}', "QMP input member 'arguments' must be an object"),
    (b'{"execute": "x", "foo": 1}', "QMP input member 'foo' is unexpected"),
    (b'{"execute": "x",}', "JSON parse error"),
    (b'{"execute": x}', "JSON parse error"),
    (b'}', "JSON parse error, stray '}'"),
    (b'{"execute": "\xff"}', "JSON parse error"),
])
def test_bad_input_gets_qemus_generic_error(data: bytes, desc: str) -> None:
    items = feed(data)
    assert len(items) == 1 and isinstance(items[0], BadInput)
    assert items[0].error.error_class == "GenericError"
    assert items[0].error.desc.startswith(desc)


def test_id_is_echoed_even_for_a_bad_request() -> None:
    [item] = feed(b'{"execute": "x", "id": 7, "bogus": true}')
    assert isinstance(item, BadInput) and item.has_id and item.id == 7
    assert json.loads(wire.error_reply(item, item.error))["id"] == 7


def test_oversized_value_is_refused_once_and_the_stream_stays_in_step() -> None:
    conn = QmpConnection()
    big = b'{"execute": "x", "arguments": {"s": "' + b"a" * (MAX_MESSAGE + 10) + b'"}}'
    out: list[wire.Incoming] = []
    for i in range(0, len(big), 65536):
        out += conn.receive_data(big[i:i + 65536])
    out += conn.receive_data(b'{"execute": "after"}')
    assert descs(out) == [f"JSON value too long (more than {MAX_MESSAGE} bytes)", "ok:after"]


def test_deep_nesting_is_refused_and_skipped() -> None:
    deep = b'{"execute": "x", "arguments": {"a": ' + b"[" * (MAX_DEPTH + 5) + \
        b"]" * (MAX_DEPTH + 5) + b'}}{"execute": "next"}'
    assert descs(feed(deep)) == [f"JSON nesting too deep (at most {MAX_DEPTH} levels)",
                                 "ok:next"]


def test_unterminated_garbage_is_bounded() -> None:
    conn = QmpConnection()
    for _ in range(20):
        conn.receive_data(b"[" * 100_000)
    assert len(conn._cur) <= MAX_MESSAGE  # nothing kept beyond the bound


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"{", b"}", b"[", b"]", b'"', b"\\", b'{"execute": "q"}',
                     b'{"execute": "q", "id": [1, {"a": "}"}]}', b"\r\n", b"nul", b"1e999"])),
    max_size=30), st.integers(min_value=1, max_value=50))
def test_fuzz_parser_never_raises(pieces: list[bytes], step: int) -> None:
    data = b"".join(pieces)
    conn = QmpConnection()
    for i in range(0, len(data), step):
        for item in conn.receive_data(data[i:i + step]):
            assert isinstance(item, (Request, BadInput))
            line = wire.error_reply(item, item.error) if isinstance(item, BadInput) \
                else wire.reply(item, {})
            assert line.endswith(b"\r\n") and json.loads(line)
    assert len(conn._cur) <= MAX_MESSAGE
    # Whatever came before: once every string and bracket is closed, the next object is
    # read as a request (the stream is back in step).
    conn.receive_data(b"x" * conn._escape + b'"' * conn._in_string + b"]" * (conn._depth + 1))
    conn.receive_data(b" ")  # ends a pending top-level scalar
    conn._depth = 0  # (the closing above may have been ']' for a '{': a parse error)
    tail = conn.receive_data(b'{"execute": "last"}')
    assert [i.command for i in tail if isinstance(i, Request)] == ["last"]


def test_fuzz_valid_requests_survive_any_split() -> None:
    msgs = [{"execute": f"c{i}", "arguments": {"k": "v" * i, "n": [i, {"x": "}"}]},
             "id": i} for i in range(20)]
    data = b"".join(json.dumps(m).encode() for m in msgs)
    for step in (1, 5, 13, 64):
        items = feed(data, step)
        assert [(i.command, i.id) for i in items if isinstance(i, Request)] == \
            [(m["execute"], m["id"]) for m in msgs]


# -- the schema ----------------------------------------------------------------------------


def check(command: str, args: dict[str, Any]) -> str:
    try:
        schema.check(SCHEMAS[command], args)
    except QmpError as exc:
        return exc.desc
    return "ok"


def test_schema_errors_are_qemus() -> None:
    ok = {"job-id": "j", "device": "d", "target": "t", "sync": "full"}
    assert check("blockdev-backup", ok) == "ok"
    assert check("blockdev-backup", {**ok, "x": 1}) == "Parameter 'x' is unexpected"
    assert check("blockdev-backup", {"device": "d", "target": "t"}) == \
        "Parameter 'sync' is missing"
    assert check("blockdev-backup", {**ok, "speed": "fast"}) == \
        "Invalid parameter type for 'speed', expected: integer"
    assert check("blockdev-backup", {**ok, "speed": True}) == \
        "Invalid parameter type for 'speed', expected: integer"
    assert check("blockdev-backup", {**ok, "sync": "some"}) == \
        "Parameter 'sync' does not accept value 'some'"
    assert check("blockdev-add", {"driver": "nope", "node-name": "n"}) == \
        "Parameter 'driver' does not accept value 'nope'"
    assert check("blockdev-add", {"driver": "nbd", "node-name": "n",
                                  "server": {"type": "unix"}}) == \
        "Parameter 'server.path' is missing"
    assert check("nbd-server-start", {"addr": {"type": "unix", "data": {"path": 1}}}) == \
        "Invalid parameter type for 'addr.data.path', expected: string"
    assert check("transaction", {"actions": [{"type": "blockdev-backup", "data": {
        **ok, "sync": "x"}}]}) == "Parameter 'actions[0].data.sync' does not accept value 'x'"
    assert check("block-dirty-bitmap-merge", {"node": "n", "target": "t",
                                              "bitmaps": ["a", {"node": "n", "name": "b"}]}) \
        == "ok"
    assert check("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": [3]}) \
        .startswith("Invalid parameter type for 'bitmaps[0]'")
