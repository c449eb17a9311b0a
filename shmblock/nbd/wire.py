"""The server side of the NBD protocol, sans I/O: bytes in, events out; replies in, bytes out.

The contract is the NBD protocol document (``doc/proto.md`` of the NetworkBlockDevice
project); section names below refer to it. Nothing here touches a socket, a thread or a
device, so a fuzzer drives :class:`ServerConnection` directly.

Theory of operation
===================

A connection goes through three phases, each a state of :class:`Phase`:

``CLIENT_FLAGS``
    We sent the greeting (fixed newstyle, ``NBD_FLAG_FIXED_NEWSTYLE | NO_ZEROES``);
    the client answers with 4 bytes of flags. Unknown flags end the connection, as
    the spec asks.
``OPTIONS``
    Option haggling. Every option is 16 bytes of header and at most
    :data:`MAX_OPTION_DATA` bytes of data; a longer option is answered with
    ``NBD_REP_ERR_TOO_BIG`` and its data skipped as it arrives (never buffered). An
    option we do not implement gets ``NBD_REP_ERR_UNSUP`` and the haggling goes on.
    At most :data:`MAX_OPTIONS` options per connection, then we hang up (a peer
    cycling through options forever holds a connection slot for nothing).
    ``NBD_OPT_GO`` or ``NBD_OPT_EXPORT_NAME`` on a known export moves on.
``TRANSMISSION``
    Requests (28-byte header, then the payload of a write). Each is validated
    completely here -- magic, command, flags, range, size, read-only, what was
    negotiated -- before the server sees it: a bad one is answered here with the
    error the spec names, and only a :class:`Request` that may touch data leaves.
    A write payload above :data:`MAX_REQUEST` is skipped as it arrives and
    answered ``EINVAL``. A bad magic means we lost the framing: we hang up.

Lengths are checked against fixed bounds before anything is buffered; the input buffer
never holds more than one bounded request or option plus what one ``receive_data``
brought.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shmblock.errors import ShmblockError

# -- constants (doc/proto.md) --------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_FAST_ZERO = 1 << 11

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disconnect",
                 CMD_FLUSH: "flush", CMD_TRIM: "trim", CMD_CACHE: "cache",
                 CMD_WRITE_ZEROES: "write-zeroes", CMD_BLOCK_STATUS: "block-status"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

#: the command flags each command accepts (proto.md "Request types")
ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

# -- bounds ----------------------------------------------------------------------------------

#: largest read or write payload (and advertised maximum block size)
MAX_REQUEST = 32 * 1024 * 1024
#: largest option payload we buffer (an export name is at most 4096 bytes, and a
#: meta-context option a few names)
MAX_OPTION_DATA = 64 * 1024
#: longest export name or metadata-context query (proto.md: names up to 4096 bytes)
MAX_NAME = 4096
#: options one connection may send before we hang up
MAX_OPTIONS = 256
#: metadata-context queries in one option
MAX_QUERIES = 128
#: extents in one block-status reply chunk
MAX_EXTENTS = 1024

_OPTION_HEADER = struct.Struct(">QII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_STRUCTURED = struct.Struct(">IHHQI")


class NbdError(ShmblockError):
    """Something about the NBD server (its setup, an export) went wrong."""


class RemoteProtocolError(NbdError):
    """The client broke the protocol badly enough that we hang up."""


class Phase(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ExportView:
    """What the handshake needs to know about one export."""

    name: str
    size: int
    writable: bool
    block_size: int  # preferred (the cluster size)
    contexts: tuple[str, ...] = ()
    description: str = ""
    min_block: int = 1


class Catalog:
    """The exports a connection may choose from (the server's table, looked up live)."""

    def __init__(self, find: Callable[[str], ExportView | None],
                 listing: Callable[[], Sequence[ExportView]]) -> None:
        self.find = find
        self.listing = listing


# -- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The handshake chose an export; transmission starts."""

    export: str
    structured: bool
    contexts: tuple[tuple[int, str], ...]  # (id, name) selected with SET_META_CONTEXT


@dataclass(frozen=True, slots=True)
class Request:
    """A valid transmission request that touches the export."""

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    data: bytes = b""

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.command, str(self.command))


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client asked to end (NBD_CMD_DISC, NBD_OPT_ABORT): finish in-flight work,
    then close."""


@dataclass(frozen=True, slots=True)
class Closed:
    """We hang up: the peer broke the protocol (``reason`` says how)."""

    reason: str


Event = Negotiated | Request | Disconnect | Closed


def _u32(data: bytes | bytearray, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


@dataclass
class _Skip:
    """Bytes of an oversized payload still to discard, and what to answer afterwards."""

    remaining: int
    then: Callable[[], None]


@dataclass
class ServerConnection:
    """One NBD connection, server side, without I/O (see the module docstring).

    Feed bytes with :meth:`receive_data` (it returns the events they complete) and send
    :meth:`data_to_send` to the peer after every call. Answer each :class:`Request`
    with one of the ``reply_*`` methods, which return the bytes to send.
    """

    catalog: Catalog
    phase: Phase = Phase.CLIENT_FLAGS
    export: ExportView | None = None
    structured: bool = False
    no_zeroes: bool = False
    fixed: bool = False
    options_seen: int = 0
    _buf: bytearray = field(default_factory=bytearray)
    _out: bytearray = field(default_factory=bytearray)
    _skip: _Skip | None = None
    #: contexts selected by SET_META_CONTEXT, and the export they were selected for
    _meta_export: str | None = None
    _meta: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        self._out += struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    # -- input --------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes the protocol itself wants sent (handshake replies, rejected requests)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> list[Event]:
        """Take bytes from the peer; returns the events they complete (maybe none).

        Once a :class:`Closed` or :class:`Disconnect` came out, further bytes are
        ignored.
        """
        if self.phase is Phase.CLOSED:
            return []
        self._buf += data
        events: list[Event] = []
        while not self.closed:
            if self._skip is not None:
                take = min(self._skip.remaining, len(self._buf))
                del self._buf[:take]
                self._skip.remaining -= take
                if self._skip.remaining:
                    break
                then, self._skip = self._skip.then, None
                then()
                continue
            before = len(events)
            progressed = self._step(events)
            if not progressed and len(events) == before:
                break
        return events

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def _close(self, events: list[Event], reason: str) -> None:
        self.phase = Phase.CLOSED
        self._buf.clear()
        events.append(Closed(reason))

    def _step(self, events: list[Event]) -> bool:
        """Consume one unit (client flags, an option, a request); False if incomplete."""
        buf = self._buf
        if self.phase is Phase.CLIENT_FLAGS:
            if len(buf) < 4:
                return False
            flags = _u32(buf, 0)
            del buf[:4]
            if flags & ~CLIENT_FLAGS_KNOWN:
                self._close(events, f"unknown client flags {flags:#x}")
                return True
            self.fixed = bool(flags & FLAG_FIXED_NEWSTYLE)
            self.no_zeroes = bool(flags & FLAG_NO_ZEROES)
            self.phase = Phase.OPTIONS
            return True
        if self.phase is Phase.OPTIONS:
            return self._option(events)
        return self._request(events)

    # -- options (proto.md "Option haggling") ---------------------------------------------

    def _option(self, events: list[Event]) -> bool:
        buf = self._buf
        if len(buf) < _OPTION_HEADER.size:
            return False
        magic, option, length = _OPTION_HEADER.unpack_from(buf)
        if magic != IHAVEOPT:
            self._close(events, f"bad option magic {magic:#x}")
            return True
        self.options_seen += 1
        if self.options_seen > MAX_OPTIONS:
            self._close(events, f"more than {MAX_OPTIONS} options")
            return True
        if length > MAX_OPTION_DATA:
            del buf[: _OPTION_HEADER.size]
            if option == OPT_EXPORT_NAME:  # no way to answer it: the spec says hang up
                self._close(events, f"export name of {length} bytes")
                return True
            self._skip = _Skip(length, lambda: self._error(
                option, REP_ERR_TOO_BIG, f"option data of {length} bytes is too long"))
            return True
        if len(buf) < _OPTION_HEADER.size + length:
            return False
        data = bytes(buf[_OPTION_HEADER.size : _OPTION_HEADER.size + length])
        del buf[: _OPTION_HEADER.size + length]
        handler = _OPTION_HANDLERS.get(option)
        if handler is None:
            if not self.fixed:  # plain newstyle has no way to refuse an option
                self._close(events, f"unsupported option {option} from a non-fixed client")
                return True
            self._error(option, REP_ERR_UNSUP, f"option {option} is not supported")
            return True
        handler(self, option, data, events)
        return True

    def _reply(self, option: int, rep: int, payload: bytes = b"") -> None:
        self._out += struct.pack(">QIII", OPTION_REPLY_MAGIC, option, rep, len(payload))
        self._out += payload

    def _error(self, option: int, rep: int, message: str) -> None:
        self._reply(option, rep, message.encode()[:MAX_NAME])

    def _opt_abort(self, option: int, data: bytes, events: list[Event]) -> None:
        # proto.md: the server SHOULD ack, then close.
        self._reply(option, REP_ACK)
        self.phase = Phase.CLOSED
        self._buf.clear()
        events.append(Disconnect())

    def _opt_list(self, option: int, data: bytes, events: list[Event]) -> None:
        if data:
            self._error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        for view in self.catalog.listing():
            name = view.name.encode()
            self._reply(option, REP_SERVER, struct.pack(">I", len(name)) + name
                        + view.description.encode()[:MAX_NAME])
        self._reply(option, REP_ACK)

    def _opt_structured(self, option: int, data: bytes, events: list[Event]) -> None:
        if data:
            self._error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            return
        self.structured = True
        self._reply(option, REP_ACK)

    def _parse_name(self, data: bytes, at: int) -> tuple[str, int] | None:
        """A length-prefixed UTF-8 name at ``at``: (name, next offset), None if malformed."""
        if len(data) < at + 4:
            return None
        n = _u32(data, at)
        if n > MAX_NAME or len(data) < at + 4 + n:
            return None
        try:
            return data[at + 4 : at + 4 + n].decode(), at + 4 + n
        except UnicodeDecodeError:
            return None

    def _find(self, name: str) -> ExportView | None:
        view = self.catalog.find(name)
        if view is None and name == "":
            # The default export (what a client asks for when given no name): ours if
            # exactly one export exists, as qemu-nbd serves its only one.
            listing = list(self.catalog.listing())
            if len(listing) == 1:
                view = listing[0]
        return view

    def _opt_export_name(self, option: int, data: bytes, events: list[Event]) -> None:
        try:
            name = data.decode()
        except UnicodeDecodeError:
            name = None
        view = None if name is None else self._find(name)
        if view is None:
            # proto.md: NBD_OPT_EXPORT_NAME has no error reply; the server closes.
            self._close(events, "NBD_OPT_EXPORT_NAME of an unknown export")
            return
        self._out += struct.pack(">QH", view.size, self._transmission_flags(view))
        if not self.no_zeroes:
            self._out += bytes(124)
        self._enter_transmission(view, events)

    def _opt_info_go(self, option: int, data: bytes, events: list[Event]) -> None:
        parsed = self._parse_name(data, 0)
        if parsed is None:
            self._error(option, REP_ERR_INVALID, "malformed export name")
            return
        name, at = parsed
        if len(data) < at + 2:
            self._error(option, REP_ERR_INVALID, "missing information request count")
            return
        count = int.from_bytes(data[at : at + 2], "big")
        if len(data) != at + 2 + 2 * count:
            self._error(option, REP_ERR_INVALID, "information request count does not "
                        "match the option's length")
            return
        wanted = {int.from_bytes(data[i : i + 2], "big") for i in range(at + 2, len(data), 2)}
        view = self._find(name)
        if view is None:
            self._error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if INFO_NAME in wanted:
            self._reply(option, REP_INFO, struct.pack(">H", INFO_NAME) + view.name.encode())
        if INFO_DESCRIPTION in wanted and view.description:
            self._reply(option, REP_INFO, struct.pack(">H", INFO_DESCRIPTION)
                        + view.description.encode()[:MAX_NAME])
        # Always sent (a client that did not ask may still honour it; qemu-nbd does so).
        self._reply(option, REP_INFO, struct.pack(
            ">HIII", INFO_BLOCK_SIZE, view.min_block, view.block_size, MAX_REQUEST))
        self._reply(option, REP_INFO, struct.pack(
            ">HQH", INFO_EXPORT, view.size, self._transmission_flags(view)))
        self._reply(option, REP_ACK)
        if option == OPT_GO:
            self._enter_transmission(view, events)

    def _enter_transmission(self, view: ExportView, events: list[Event]) -> None:
        self.export = view
        self.phase = Phase.TRANSMISSION
        # Contexts chosen for another export do not carry over (proto.md
        # "NBD_OPT_SET_META_CONTEXT": the name must match the one of NBD_OPT_GO).
        if self._meta_export != view.name:
            self._meta = ()
        events.append(Negotiated(view.name, self.structured, self._meta))

    def _opt_meta(self, option: int, data: bytes, events: list[Event]) -> None:
        if option == OPT_SET_META_CONTEXT and not self.structured:
            self._error(option, REP_ERR_INVALID,
                        "NBD_OPT_SET_META_CONTEXT needs structured replies first")
            return
        parsed = self._parse_name(data, 0)
        if parsed is None or len(data) < parsed[1] + 4:
            self._error(option, REP_ERR_INVALID, "malformed meta-context option")
            return
        name, at = parsed
        count = _u32(data, at)
        at += 4
        if count > MAX_QUERIES:
            self._error(option, REP_ERR_TOO_BIG, f"more than {MAX_QUERIES} queries")
            return
        queries = []
        for _ in range(count):
            query = self._parse_name(data, at)
            if query is None:
                self._error(option, REP_ERR_INVALID, "malformed meta-context query")
                return
            queries.append(query[0])
            at = query[1]
        if at != len(data):
            self._error(option, REP_ERR_INVALID, "trailing bytes after the queries")
            return
        view = self._find(name)
        if view is None:
            self._error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        offered = view.contexts
        if option == OPT_LIST_META_CONTEXT and not queries:
            chosen = list(offered)
        else:
            chosen = []
            for q in queries:
                for ctx in offered:
                    # "base:" lists every context of namespace base; "qemu:dirty-bitmap:"
                    # every bitmap. SET only takes exact names (proto.md).
                    exact = ctx == q
                    prefix = (option == OPT_LIST_META_CONTEXT and q.endswith(":")
                              and ctx.startswith(q))
                    if (exact or prefix) and ctx not in chosen:
                        chosen.append(ctx)
        # A context id is its index among the export's contexts, plus one.
        ids = [(offered.index(ctx) + 1, ctx) for ctx in chosen]
        for ident, ctx in ids:
            self._reply(option, REP_META_CONTEXT, struct.pack(">I", ident) + ctx.encode())
        if option == OPT_SET_META_CONTEXT:
            self._meta_export = view.name
            self._meta = tuple(ids)
        self._reply(option, REP_ACK)

    def _transmission_flags(self, view: ExportView) -> int:
        flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_DF
        if view.writable:
            flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO
            # Several connections see each other's writes at once (one device in
            # memory), so a flush on one covers all: NBD_FLAG_CAN_MULTI_CONN.
        flags |= TF_CAN_MULTI_CONN
        if not view.writable:
            flags |= TF_READ_ONLY
        return flags

    # -- transmission (proto.md "Transmission phase") ----------------------------------------

    def _request(self, events: list[Event]) -> bool:
        buf = self._buf
        if len(buf) < _REQUEST.size:
            return False
        magic, flags, command, cookie, offset, length = _REQUEST.unpack_from(buf)
        if magic != REQUEST_MAGIC:
            self._close(events, f"bad request magic {magic:#x}")
            return True
        has_payload = command == CMD_WRITE
        if has_payload and length > MAX_REQUEST:
            del buf[: _REQUEST.size]

            def refuse() -> None:
                self._out.extend(self.reply_error(
                    cookie, command, EINVAL,
                    f"write of {length} bytes is over the {MAX_REQUEST}-byte limit"))

            self._skip = _Skip(length, refuse)
            return True
        need = _REQUEST.size + (length if has_payload else 0)
        if len(buf) < need:
            return False
        data = bytes(buf[_REQUEST.size : need]) if has_payload else b""
        del buf[:need]
        if command == CMD_DISC:
            self.phase = Phase.CLOSED
            self._buf.clear()
            events.append(Disconnect())
            return True
        problem = self._validate(command, flags, offset, length)
        if problem is not None:
            err, message = problem
            self._out += self.reply_error(cookie, command, err, message)
            return True
        events.append(Request(cookie, command, flags, offset, length, data))
        return True

    def _validate(self, command: int, flags: int, offset: int,
                  length: int) -> tuple[int, str] | None:
        """The error for a request that must not reach the export (None: it may)."""
        view = self.export
        assert view is not None
        name = COMMAND_NAMES.get(command)
        if name is None or command == CMD_CACHE:
            return EINVAL, f"unknown or unsupported command {command}"
        if flags & ~ALLOWED_FLAGS[command]:
            return EINVAL, f"flags {flags:#x} are not valid for {name}"
        if flags & CMD_FLAG_DF and not self.structured:
            return EINVAL, "NBD_CMD_FLAG_DF needs structured replies"
        if command == CMD_FLUSH:
            if offset or length:
                return EINVAL, "flush takes offset 0 and length 0"
            return None
        if command == CMD_BLOCK_STATUS and (not self.structured or not self._meta):
            return EINVAL, "block status needs structured replies and a metadata context"
        writes = command in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)
        if writes and not view.writable:
            return EPERM, f"{name} on the read-only export {view.name!r}"
        if length == 0:
            return EINVAL, f"{name} of 0 bytes"
        if offset + length > view.size:
            # proto.md "Error values": writes past the end SHOULD fail with ENOSPC,
            # reads and trims with EINVAL
            err = ENOSPC if command in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
            return err, f"{name} of {length} bytes at {offset} is past the export's end " \
                        f"({view.size} bytes)"
        if command == CMD_READ and length > MAX_REQUEST:
            return (EOVERFLOW if flags & CMD_FLAG_DF else EINVAL), \
                f"read of {length} bytes is over the {MAX_REQUEST}-byte limit"
        return None

    # -- replies ------------------------------------------------------------------------------

    def reply_ok(self, cookie: int) -> bytes:
        """Success of a command without data (a simple reply: allowed for every command
        but read and block status even after structured replies were negotiated)."""
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def reply_error(self, cookie: int, command: int, error: int, message: str) -> bytes:
        """An error reply; a structured one (with ``message``) where the spec wants it."""
        if self.structured and command in (CMD_READ, CMD_BLOCK_STATUS):
            text = message.encode()[:MAX_NAME]
            payload = struct.pack(">IH", error, len(text)) + text
            return _STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                    REPLY_TYPE_ERROR, cookie, len(payload)) + payload
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)

    def reply_read(self, cookie: int, offset: int,
                   data: bytes | memoryview) -> list[bytes | memoryview]:
        """A successful read: header(s) and the data (a list, so the data is not copied)."""
        if self.structured:
            return [_STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                     REPLY_TYPE_OFFSET_DATA, cookie, 8 + len(data))
                    + struct.pack(">Q", offset), data]
        return [_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data]

    def reply_block_status(self, cookie: int,
                           chunks: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> bytes:
        """Block status: one chunk per context id with its extents (length, flags)."""
        out = bytearray()
        for i, (ident, extents) in enumerate(chunks):
            body = struct.pack(">I", ident) + b"".join(
                struct.pack(">II", length, flags) for length, flags in extents)
            done = REPLY_FLAG_DONE if i == len(chunks) - 1 else 0
            out += _STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, done, REPLY_TYPE_BLOCK_STATUS,
                                    cookie, len(body)) + body
        return bytes(out)


_OPTION_HANDLERS: dict[int, Callable[[ServerConnection, int, bytes, list[Event]], None]] = {
    OPT_EXPORT_NAME: ServerConnection._opt_export_name,
    OPT_ABORT: ServerConnection._opt_abort,
    OPT_LIST: ServerConnection._opt_list,
    OPT_INFO: ServerConnection._opt_info_go,
    OPT_GO: ServerConnection._opt_info_go,
    OPT_STRUCTURED_REPLY: ServerConnection._opt_structured,
    OPT_LIST_META_CONTEXT: ServerConnection._opt_meta,
    OPT_SET_META_CONTEXT: ServerConnection._opt_meta,
}


def clip_extents(extents: Sequence[tuple[int, int]], length: int,
                 one: bool) -> list[tuple[int, int]]:
    """Extents cut to the request's ``length`` (at least one, none empty), at most
    :data:`MAX_EXTENTS`, only the first with ``one`` (NBD_CMD_FLAG_REQ_ONE)."""
    out: list[tuple[int, int]] = []
    left = length
    for ext_len, flags in extents:
        if left <= 0 or len(out) >= (1 if one else MAX_EXTENTS):
            break
        n = min(ext_len, left, 0xFFFFFFFF)
        if n <= 0:
            continue
        if out and out[-1][1] == flags and out[-1][0] + n <= 0xFFFFFFFF:
            out[-1] = (out[-1][0] + n, flags)
        else:
            out.append((n, flags))
        left -= n
    return out
