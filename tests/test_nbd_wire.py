"""The NBD server's wire layer, sans I/O: handshake, options, requests, and a fuzz.

Bytes in, events out: no socket, no device. The fuzz drives random, truncated,
oversized and out-of-order input and checks the parser never raises, never buffers more
than its bounds, and either answers or hangs up.
"""

from __future__ import annotations

import random
import struct

import pytest

from shmblock.nbd import wire
from shmblock.nbd.wire import (
    Catalog,
    Closed,
    Disconnect,
    ExportView,
    Negotiated,
    Phase,
    Request,
    ServerConnection,
)

EXPORTS = {
    "live": ExportView("live", 1 << 20, True, 65536,
                       ("base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"),
                       "the device"),
    "ro": ExportView("ro", 1 << 20, False, 65536, ("base:allocation",)),
}


def catalog(exports: dict[str, ExportView] | None = None) -> Catalog:
    table = EXPORTS if exports is None else exports
    return Catalog(table.get, lambda: list(table.values()))


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", wire.IHAVEOPT, opt, len(data)) + data


def name_field(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw


def go(name: str, infos: tuple[int, ...] = (), opt: int = wire.OPT_GO) -> bytes:
    return option(opt, name_field(name) + struct.pack(">H", len(infos))
                  + b"".join(struct.pack(">H", i) for i in infos))


def meta(opt: int, export: str, queries: list[str]) -> bytes:
    return option(opt, name_field(export) + struct.pack(">I", len(queries))
                  + b"".join(name_field(q) for q in queries))


def request(command: int, offset: int = 0, length: int = 0, flags: int = 0,
            cookie: int = 7, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", wire.REQUEST_MAGIC, flags, command, cookie, offset,
                       length) + data


def option_replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) of every option reply in ``out``."""
    replies = []
    at = 0
    while at < len(out):
        magic, opt, rep, length = struct.unpack_from(">QIII", out, at)
        assert magic == wire.OPTION_REPLY_MAGIC
        replies.append((opt, rep, out[at + 20 : at + 20 + length]))
        at += 20 + length
    return replies


def simple_errors(out: bytes) -> list[tuple[int, int]]:
    """(error, cookie) of a run of simple replies."""
    found = []
    for at in range(0, len(out), 16):
        magic, err, cookie = struct.unpack_from(">IIQ", out, at)
        assert magic == wire.SIMPLE_REPLY_MAGIC
        found.append((err, cookie))
    return found


def connected(flags: int = wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES,
              exports: dict[str, ExportView] | None = None) -> ServerConnection:
    conn = ServerConnection(catalog(exports))
    greeting = conn.data_to_send()
    assert greeting == struct.pack(">QQH", wire.NBDMAGIC, wire.IHAVEOPT,
                                   wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES)
    assert conn.receive_data(struct.pack(">I", flags)) == []
    return conn


def transmitting(export: str = "live", structured: bool = True,
                 contexts: list[str] | None = None) -> ServerConnection:
    conn = connected()
    data = b""
    if structured:
        data += option(wire.OPT_STRUCTURED_REPLY)
    if contexts:
        data += meta(wire.OPT_SET_META_CONTEXT, export, contexts)
    events = conn.receive_data(data + go(export))
    assert isinstance(events[-1], Negotiated)
    conn.data_to_send()
    return conn


# -- handshake -------------------------------------------------------------------------


def test_go_reports_the_export_and_enters_transmission() -> None:
    conn = connected()
    events = conn.receive_data(go("live", (wire.INFO_NAME, wire.INFO_DESCRIPTION,
                                           wire.INFO_BLOCK_SIZE)))
    assert events == [Negotiated("live", False, ())]
    assert conn.phase is Phase.TRANSMISSION
    replies = option_replies(conn.data_to_send())
    assert replies[-1] == (wire.OPT_GO, wire.REP_ACK, b"")
    infos = {struct.unpack_from(">H", p)[0]: p[2:] for _, rep, p in replies[:-1]
             if rep == wire.REP_INFO}
    size, flags = struct.unpack(">QH", infos[wire.INFO_EXPORT])
    assert size == 1 << 20
    assert flags & wire.TF_HAS_FLAGS and not flags & wire.TF_READ_ONLY
    assert flags & wire.TF_SEND_WRITE_ZEROES and flags & wire.TF_SEND_FUA
    assert struct.unpack(">III", infos[wire.INFO_BLOCK_SIZE]) == (1, 65536, wire.MAX_REQUEST)
    assert infos[wire.INFO_NAME] == b"live"
    assert infos[wire.INFO_DESCRIPTION] == b"the device"


def test_info_does_not_enter_transmission_and_ro_is_flagged() -> None:
    conn = connected()
    assert conn.receive_data(go("ro", opt=wire.OPT_INFO)) == []
    replies = option_replies(conn.data_to_send())
    exp = next(p for _, rep, p in replies if rep == wire.REP_INFO
           and struct.unpack_from(">H", p)[0] == wire.INFO_EXPORT)
    assert struct.unpack(">QH", exp[2:])[1] & wire.TF_READ_ONLY
    assert conn.phase is Phase.OPTIONS


def test_unknown_options_are_refused_without_dropping() -> None:
    conn = connected()
    data = option(99, b"xyz") + option(wire.OPT_STARTTLS) + option(4) + go("nope")
    assert conn.receive_data(data) == []
    reps = [(o, r) for o, r, _ in option_replies(conn.data_to_send())]
    assert reps == [(99, wire.REP_ERR_UNSUP), (wire.OPT_STARTTLS, wire.REP_ERR_UNSUP),
                    (4, wire.REP_ERR_UNSUP), (wire.OPT_GO, wire.REP_ERR_UNKNOWN)]
    assert isinstance(conn.receive_data(go("live"))[0], Negotiated)


def test_list_names_every_export() -> None:
    conn = connected()
    conn.receive_data(option(wire.OPT_LIST))
    replies = option_replies(conn.data_to_send())
    names = [p[4 : 4 + struct.unpack_from(">I", p)[0]] for _, rep, p in replies
             if rep == wire.REP_SERVER]
    assert names == [b"live", b"ro"]
    assert replies[-1][1] == wire.REP_ACK
    conn.receive_data(option(wire.OPT_LIST, b"junk"))
    assert option_replies(conn.data_to_send())[0][1] == wire.REP_ERR_INVALID


def test_default_export_is_the_only_one() -> None:
    one = {"ro": EXPORTS["ro"]}
    assert isinstance(connected(exports=one).receive_data(go(""))[0], Negotiated)
    conn = connected()
    assert conn.receive_data(go("")) == []  # two exports: no default
    assert option_replies(conn.data_to_send())[0][1] == wire.REP_ERR_UNKNOWN


def test_export_name_option_old_style() -> None:
    conn = connected(flags=wire.FLAG_FIXED_NEWSTYLE)  # zeroes wanted
    events = conn.receive_data(option(wire.OPT_EXPORT_NAME, b"ro"))
    assert events == [Negotiated("ro", False, ())]
    out = conn.data_to_send()
    assert len(out) == 8 + 2 + 124
    size, flags = struct.unpack_from(">QH", out)
    assert size == 1 << 20 and flags & wire.TF_READ_ONLY
    bad = connected()
    assert isinstance(bad.receive_data(option(wire.OPT_EXPORT_NAME, b"nope"))[0], Closed)


def test_abort_acks_and_disconnects() -> None:
    conn = connected()
    assert conn.receive_data(option(wire.OPT_ABORT)) == [Disconnect()]
    assert option_replies(conn.data_to_send()) == [(wire.OPT_ABORT, wire.REP_ACK, b"")]
    assert conn.receive_data(go("live")) == []  # after the end, nothing


def test_unknown_client_flags_and_bad_magic_hang_up() -> None:
    conn = ServerConnection(catalog())
    assert isinstance(conn.receive_data(struct.pack(">I", 1 << 7))[0], Closed)
    conn = connected()
    assert isinstance(conn.receive_data(b"X" * 16)[0], Closed)


def test_non_fixed_client_unknown_option_hangs_up() -> None:
    conn = connected(flags=0)
    assert isinstance(conn.receive_data(option(99))[0], Closed)


def test_oversized_option_is_skipped_as_it_arrives() -> None:
    conn = connected()
    big = wire.MAX_OPTION_DATA + 1000
    header = struct.pack(">QII", wire.IHAVEOPT, wire.OPT_GO, big)
    assert conn.receive_data(header) == []
    for _ in range(big // 4096):
        assert conn.receive_data(b"\xff" * 4096) == []
        assert len(conn._buf) == 0  # never buffered
    assert conn.receive_data(b"\xff" * (big % 4096)) == []
    assert option_replies(conn.data_to_send())[0][1] == wire.REP_ERR_TOO_BIG
    assert isinstance(conn.receive_data(go("live"))[0], Negotiated)


def test_too_many_options_hang_up() -> None:
    conn = connected()
    events = conn.receive_data(option(wire.OPT_LIST) * (wire.MAX_OPTIONS + 1))
    assert isinstance(events[-1], Closed)


def test_meta_contexts_list_and_set() -> None:
    conn = connected()
    # SET before structured replies: refused, the option goes on.
    conn.receive_data(meta(wire.OPT_SET_META_CONTEXT, "live", ["base:allocation"]))
    assert option_replies(conn.data_to_send())[0][1] == wire.REP_ERR_INVALID
    conn.receive_data(meta(wire.OPT_LIST_META_CONTEXT, "live", []))
    listed = [p[4:] for _, rep, p in option_replies(conn.data_to_send())
              if rep == wire.REP_META_CONTEXT]
    assert listed == [b"base:allocation", b"qemu:dirty-bitmap:b0", b"qemu:dirty-bitmap:b1"]
    conn.receive_data(meta(wire.OPT_LIST_META_CONTEXT, "live", ["qemu:dirty-bitmap:"]))
    listed = [p[4:] for _, rep, p in option_replies(conn.data_to_send())
              if rep == wire.REP_META_CONTEXT]
    assert listed == [b"qemu:dirty-bitmap:b0", b"qemu:dirty-bitmap:b1"]
    conn.receive_data(option(wire.OPT_STRUCTURED_REPLY)
                      + meta(wire.OPT_SET_META_CONTEXT, "live",
                             ["qemu:dirty-bitmap:b1", "nope:x", "base:allocation"]))
    replies = option_replies(conn.data_to_send())
    chosen = [(struct.unpack_from(">I", p)[0], p[4:]) for _, rep, p in replies
              if rep == wire.REP_META_CONTEXT]
    assert chosen == [(3, b"qemu:dirty-bitmap:b1"), (1, b"base:allocation")]
    events = conn.receive_data(go("live"))
    assert events == [Negotiated("live", True, ((3, "qemu:dirty-bitmap:b1"),
                                                (1, "base:allocation")))]


def test_contexts_set_for_another_export_do_not_carry_over() -> None:
    conn = connected()
    conn.receive_data(option(wire.OPT_STRUCTURED_REPLY)
                      + meta(wire.OPT_SET_META_CONTEXT, "live", ["base:allocation"]))
    assert conn.receive_data(go("ro")) == [Negotiated("ro", True, ())]


@pytest.mark.parametrize("payload", [
    b"", b"\x00\x00", name_field("live")[:3], name_field("live") + b"\x00\x00\x00\x05",
    struct.pack(">I", 5000) + b"x" * 5000 + b"\x00" * 4,
    name_field("live") + struct.pack(">I", 1) + struct.pack(">I", 100) + b"short",
    name_field("live") + struct.pack(">I", 0) + b"trailing",
])
def test_malformed_meta_context_options_are_invalid(payload: bytes) -> None:
    conn = connected()
    assert conn.receive_data(option(wire.OPT_LIST_META_CONTEXT, payload)) == []
    assert option_replies(conn.data_to_send())[0][1] in (wire.REP_ERR_INVALID,
                                                         wire.REP_ERR_TOO_BIG)
    assert conn.phase is Phase.OPTIONS


# -- transmission ------------------------------------------------------------------------


def test_valid_requests_come_out_whole() -> None:
    conn = transmitting(contexts=["base:allocation"])
    data = bytes(range(256)) * 16
    events = conn.receive_data(
        request(wire.CMD_WRITE, 4096, len(data), wire.CMD_FLAG_FUA, 1, data)
        + request(wire.CMD_READ, 0, 512, wire.CMD_FLAG_DF, 2)
        + request(wire.CMD_FLUSH, cookie=3)
        + request(wire.CMD_BLOCK_STATUS, 0, 1 << 20, wire.CMD_FLAG_REQ_ONE, 4)
        + request(wire.CMD_WRITE_ZEROES, 0, 65536, wire.CMD_FLAG_NO_HOLE, 5)
        + request(wire.CMD_DISC, cookie=6))
    assert events == [
        Request(1, wire.CMD_WRITE, wire.CMD_FLAG_FUA, 4096, len(data), data),
        Request(2, wire.CMD_READ, wire.CMD_FLAG_DF, 0, 512),
        Request(3, wire.CMD_FLUSH, 0, 0, 0),
        Request(4, wire.CMD_BLOCK_STATUS, wire.CMD_FLAG_REQ_ONE, 0, 1 << 20),
        Request(5, wire.CMD_WRITE_ZEROES, wire.CMD_FLAG_NO_HOLE, 0, 65536),
        Disconnect(),
    ]
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(("export", "req", "error"), [
    ("live", request(wire.CMD_READ, (1 << 20) - 10, 11), wire.EINVAL),
    ("live", request(wire.CMD_READ, 0, 0), wire.EINVAL),
    ("live", request(wire.CMD_READ, 0, wire.MAX_REQUEST + 1), wire.EINVAL),
    ("live", request(wire.CMD_WRITE, 1 << 20, 1, data=b"x"), wire.ENOSPC),
    ("live", request(wire.CMD_TRIM, 2**64 - 1, 2), wire.EINVAL),
    ("live", request(wire.CMD_WRITE_ZEROES, 1 << 20, 512), wire.ENOSPC),
    ("live", request(wire.CMD_BLOCK_STATUS, 0, 512, flags=wire.CMD_FLAG_FUA), wire.EINVAL),
    ("live", request(wire.CMD_READ, 0, 1, flags=wire.CMD_FLAG_FUA), wire.EINVAL),
    ("live", request(wire.CMD_FLUSH, 1, 0), wire.EINVAL),
    ("live", request(wire.CMD_CACHE, 0, 512), wire.EINVAL),
    ("live", request(77, 0, 512), wire.EINVAL),
    ("live", request(wire.CMD_BLOCK_STATUS, 0, 512), wire.EINVAL),  # no context set
    ("ro", request(wire.CMD_WRITE, 0, 1, data=b"x"), wire.EPERM),
    ("ro", request(wire.CMD_WRITE_ZEROES, 0, 512), wire.EPERM),
    ("ro", request(wire.CMD_TRIM, 0, 512), wire.EPERM),
])
def test_bad_requests_are_answered_here(export: str, req: bytes, error: int) -> None:
    conn = transmitting(export, structured=False)
    assert conn.receive_data(req) == []
    assert simple_errors(conn.data_to_send()) == [(error, 7)]
    # The stream stays in step: the next request parses.
    assert conn.receive_data(request(wire.CMD_READ, 0, 512, cookie=8)) == [
        Request(8, wire.CMD_READ, 0, 0, 512)]


def test_structured_errors_for_read() -> None:
    conn = transmitting()
    conn.receive_data(request(wire.CMD_READ, 1 << 20, 512, cookie=9))
    out = conn.data_to_send()
    magic, flags, kind, cookie, _length = struct.unpack_from(">IHHQI", out)
    assert (magic, flags, kind, cookie) == (wire.STRUCTURED_REPLY_MAGIC, wire.REPLY_FLAG_DONE,
                                            wire.REPLY_TYPE_ERROR, 9)
    assert struct.unpack_from(">I", out, 20)[0] == wire.EINVAL
    assert b"past the export's end" in out


def test_oversized_write_is_skipped_and_refused() -> None:
    conn = transmitting(structured=False)
    big = wire.MAX_REQUEST + 4096
    assert conn.receive_data(request(wire.CMD_WRITE, 0, big, cookie=11)) == []
    for _ in range(big // (1 << 20)):
        conn.receive_data(bytes(1 << 20))
        assert len(conn._buf) == 0
    assert conn.receive_data(bytes(big % (1 << 20))) == []
    assert simple_errors(conn.data_to_send()) == [(wire.EINVAL, 11)]
    assert conn.receive_data(request(wire.CMD_FLUSH, cookie=12)) == [
        Request(12, wire.CMD_FLUSH, 0, 0, 0)]


def test_bad_request_magic_hangs_up() -> None:
    conn = transmitting()
    events = conn.receive_data(b"\x00" * 28)
    assert isinstance(events[0], Closed) and conn.closed


def test_replies_encode() -> None:
    conn = transmitting()
    head, data = conn.reply_read(5, 4096, b"abc")
    assert struct.unpack(">IHHQIQ", head) == (wire.STRUCTURED_REPLY_MAGIC,
                                               wire.REPLY_FLAG_DONE,
                                               wire.REPLY_TYPE_OFFSET_DATA, 5, 11, 4096)
    assert data == b"abc"
    out = conn.reply_block_status(6, [(1, [(512, 3)]), (2, [(100, 0), (412, 1)])])
    first = struct.unpack_from(">IHHQIIII", out)
    assert first == (wire.STRUCTURED_REPLY_MAGIC, 0, wire.REPLY_TYPE_BLOCK_STATUS, 6, 12,
                     1, 512, 3)
    second = struct.unpack_from(">IHHQIIIIII", out, 32)
    assert second[1] == wire.REPLY_FLAG_DONE and second[5:] == (2, 100, 0, 412, 1)


def test_clip_extents() -> None:
    assert wire.clip_extents([(100, 1), (100, 1), (100, 0)], 250, False) == [(200, 1), (50, 0)]
    assert wire.clip_extents([(100, 1), (100, 0)], 250, True) == [(100, 1)]
    assert wire.clip_extents([(0, 1), (10, 2)], 5, False) == [(5, 2)]
    many = [(1, i % 2) for i in range(5000)]
    assert len(wire.clip_extents(many, 5000, False)) == wire.MAX_EXTENTS


# -- fuzz ------------------------------------------------------------------------------------


def _valid_transcript(rng: random.Random) -> bytes:
    """A plausible client byte stream: flags, some options, requests."""
    parts = [struct.pack(">I", wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES)]
    for _ in range(rng.randrange(4)):
        parts.append(rng.choice([
            option(wire.OPT_LIST), option(wire.OPT_STRUCTURED_REPLY),
            meta(wire.OPT_LIST_META_CONTEXT, "live", []),
            meta(wire.OPT_SET_META_CONTEXT, "live", ["base:allocation"]),
            go("live", opt=wire.OPT_INFO), option(rng.randrange(64), b"q" * 5)]))
    parts.append(go(rng.choice(["live", "ro", "", "x"])))
    for i in range(rng.randrange(8)):
        cmd = rng.randrange(9)
        length = rng.choice([0, 1, 512, 4096, 1 << 20, wire.MAX_REQUEST + 1, 2**32 - 1])
        data = bytes(min(length, 8192)) if cmd == wire.CMD_WRITE else b""
        parts.append(request(cmd, rng.choice([0, 512, (1 << 20) - 1, 2**63]), length,
                             rng.randrange(64), i, data))
    return b"".join(parts)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        what = rng.randrange(4)
        if what == 0 and b:  # flip bytes
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif what == 1:  # truncate
            del b[rng.randrange(len(b) + 1):]
        elif what == 2:  # insert junk
            at = rng.randrange(len(b) + 1)
            b[at:at] = rng.randbytes(rng.randrange(40))
        else:  # swap two slices (out of order)
            i, j = sorted(rng.randrange(len(b) + 1) for _ in range(2))
            b = b[j:] + b[i:j] + b[:i]
    return bytes(b)


def _drive(conn: ServerConnection, data: bytes, rng: random.Random) -> None:
    at = 0
    closed = False
    while at < len(data):
        n = rng.choice([1, 3, 16, 28, 100, 4096])
        events = conn.receive_data(data[at : at + n])
        at += n
        out = conn.data_to_send()
        assert len(out) < 1 << 20
        # Input is only buffered up to one bounded unit plus the chunk just fed.
        assert len(conn._buf) <= wire.MAX_REQUEST + 28 + n
        for ev in events:
            assert not closed, "events after the connection ended"
            if isinstance(ev, Closed | Disconnect):
                closed = True
            if isinstance(ev, Request):
                view = conn.export
                assert view is not None
                assert ev.offset + ev.length <= view.size
                assert ev.command != wire.CMD_WRITE or view.writable
                assert ev.command == wire.CMD_FLUSH or ev.length > 0


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_parsers_never_crash(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        conn = ServerConnection(catalog())
        conn.data_to_send()
        kind = rng.randrange(3)
        if kind == 0:
            data = rng.randbytes(rng.randrange(200))
        elif kind == 1:
            data = _mutate(rng, _valid_transcript(rng))
        else:
            data = _valid_transcript(rng)
        _drive(conn, data, rng)
