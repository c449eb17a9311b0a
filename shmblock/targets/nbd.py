"""NBD client target: a backup written to an export of a Network Block Device server.

Theory of operation
===================

Section names below are those of doc/proto.md in the NBD project
(github.com/NetworkBlockDevice/nbd); URIs follow doc/uri.md (see
:mod:`shmblock.targets.nbd_uri`).

**Connect.** TCP (with ``TCP_NODELAY``: requests are small headers that should not wait
for Nagle) or a Unix socket. Every socket operation - connect, each send and receive -
runs under the target's ``timeout``; a server that stops answering fails the call in
``timeout`` seconds instead of hanging the backup worker.

**Handshake** ("Newstyle negotiation", "Fixed newstyle negotiation"). The server sends
``NBDMAGIC``, ``IHAVEOPT`` and its handshake flags; we answer with the client flags it
offered and we understand (``NBD_FLAG_C_FIXED_NEWSTYLE``, ``NBD_FLAG_C_NO_ZEROES``),
never more ("Client flags": a server drops clients that set flags it did not offer).
Oldstyle servers are refused. Then option haggling:

* fixed newstyle: ``NBD_OPT_GO`` with the export name and an ``NBD_INFO_BLOCK_SIZE``
  request ("Option types", ``NBD_OPT_INFO`` and ``NBD_OPT_GO``). ``NBD_REP_INFO``
  replies carry ``NBD_INFO_EXPORT`` (size and transmission flags) and
  ``NBD_INFO_BLOCK_SIZE``; ``NBD_REP_ACK`` enters transmission. ``NBD_REP_ERR_UNKNOWN``
  means no such export; ``NBD_REP_ERR_UNSUP`` means an old server, and we fall back to
  ``NBD_OPT_EXPORT_NAME`` on the same connection, as the spec asks;
* plain newstyle (no ``NBD_FLAG_FIXED_NEWSTYLE``): ``NBD_OPT_EXPORT_NAME`` is the only
  option there is. Its reply is size + flags (+ 124 zero bytes unless NO_ZEROES was
  agreed); a server that does not have the export just closes the connection.

A failed handshake ends with ``NBD_OPT_ABORT`` (a soft disconnect, "Termination of the
session during option haggling") and raises :class:`~shmblock.errors.TargetUnreachable`:
nothing was opened, whatever went wrong (refused, no socket file, unknown export, a silent
server, not an NBD server at all).

**Checks** before the first write: an export smaller than the device is
:class:`~shmblock.errors.TargetTooSmall`; ``NBD_FLAG_READ_ONLY`` is
:class:`~shmblock.errors.TargetReadOnly`. Size constraints ("Size constraints",
``NBD_INFO_BLOCK_SIZE``): because we asked for them in ``NBD_OPT_GO`` we MUST obey them.
Every request offset and length is a multiple of the minimum block size (we refuse at open
a cluster size that is not), and no data request exceeds the maximum payload: requests
are cut into chunks of at most :data:`DEFAULT_CHUNK` (4 MiB) or the server's maximum,
whichever is smaller, rounded down to the preferred block size. Without advertised
constraints the protocol default maximum payload is 32 MiB.

**Transmission** ("Transmission", "Request message", "Simple reply message"). We never
negotiate structured replies, so every reply is a 16-byte simple reply (magic, error,
cookie), followed by the data for a successful ``NBD_CMD_READ``. Requests are
*pipelined*: :meth:`NbdTarget.write` sends a request (header and payload with one
``sendmsg``, the payload a memoryview of the caller's buffer, never copied) and returns
without waiting for its reply; :meth:`NbdTarget.settle` waits for every reply (the backup
worker calls it before telling a writer that its cluster is saved). Replies may come in
any order ("Replies need not be sent in the same order as requests"); each is matched to
its request by cookie. At most :data:`MAX_INFLIGHT_REQUESTS` requests and
:data:`MAX_INFLIGHT_BYTES` of payload are in flight: when the window is full, the next
request first collects replies. Nothing else waits for round trips, so throughput is
bounded by bandwidth, not latency.

Reads are pipelined the same way, but only after every write has been answered (and reads
finish before the next write is sent), so the two streams never wait on each other.

``NBD_CMD_WRITE_ZEROES`` (no ``NBD_CMD_FLAG_NO_HOLE``: a hole reading as zeroes is what
a backup needs) is used when the server sets ``NBD_FLAG_SEND_WRITE_ZEROES``; otherwise
zeroes are written from one reusable zero buffer. :meth:`NbdTarget.commit` waits for
every reply, then sends ``NBD_CMD_FLUSH`` if ``NBD_FLAG_SEND_FLUSH`` is set ("Ordering of
messages and writes": a flush covers every write answered before it).

**How errors surface.** An error reply to any request fails the job: the error is kept
and raised as :class:`~shmblock.errors.TargetIOError` from the call that collects it
(the ``write`` whose window was full, or ``commit``), and again from every later call,
naming the command, the offset and the NBD error ("Error values"), e.g. ``NBD server
nbd+unix:///x?socket=s failed WRITE at offset 1048576 (65536 bytes): No space left on
device (ENOSPC)``. A timeout, a closed connection (EOF, ``ECONNRESET``, ``EPIPE``) or a
malformed reply likewise raises :class:`~shmblock.errors.TargetIOError`, and since the
byte stream may then be out of step, the connection is dropped without ``NBD_CMD_DISC``
(a hard disconnect, "Terminating the transmission phase").

**Ending.** :meth:`NbdTarget.close` sends ``NBD_CMD_DISC`` (no reply) and closes the
socket; :meth:`NbdTarget.abort` stops sending and does the same, best effort. Both are
idempotent. An NBD export has no temporary name and nothing to rename: committed or
aborted, what was written stays in the export, and only the job's outcome says whether it
is a finished backup.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import socket
import struct
from dataclasses import dataclass
from typing import Literal, NoReturn

from shmblock.errors import (
    TargetError,
    TargetIOError,
    TargetReadOnly,
    TargetTooSmall,
    TargetUnreachable,
)
from shmblock.targets.base import Buffer, Target
from shmblock.targets.nbd_uri import NbdAddress, parse_nbd_uri

# --- protocol constants (proto.md "Values") ---------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253  # oldstyle negotiation
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_WRITE_ZEROES = 1 << 6

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7

REP_ACK = 1
REP_INFO = 3
REP_ERROR_BIT = 1 << 31

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3


class OptionError(enum.IntEnum):
    """Option reply error types ("Option reply types"); bit 31 set."""

    NBD_REP_ERR_UNSUP = REP_ERROR_BIT + 1
    NBD_REP_ERR_POLICY = REP_ERROR_BIT + 2
    NBD_REP_ERR_INVALID = REP_ERROR_BIT + 3
    NBD_REP_ERR_PLATFORM = REP_ERROR_BIT + 4
    NBD_REP_ERR_TLS_REQD = REP_ERROR_BIT + 5
    NBD_REP_ERR_UNKNOWN = REP_ERROR_BIT + 6
    NBD_REP_ERR_SHUTDOWN = REP_ERROR_BIT + 7
    NBD_REP_ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT + 8
    NBD_REP_ERR_TOO_BIG = REP_ERROR_BIT + 9
    NBD_REP_ERR_EXT_HEADER_REQD = REP_ERROR_BIT + 10


class Command(enum.IntEnum):
    """Request types ("Request types"); the names appear in error messages."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    WRITE_ZEROES = 6


#: "Error values": the only errno values a server may send, with the spec's wording.
NBD_ERRORS: dict[int, tuple[str, str]] = {
    1: ("EPERM", "Operation not permitted"),
    5: ("EIO", "Input/output error"),
    12: ("ENOMEM", "Cannot allocate memory"),
    22: ("EINVAL", "Invalid argument"),
    28: ("ENOSPC", "No space left on device"),
    75: ("EOVERFLOW", "Value too large"),
    95: ("ENOTSUP", "Operation not supported"),
    108: ("ESHUTDOWN", "Server is in the process of being shut down"),
}

# --- transfer sizing -------------------------------------------------------------------

DEFAULT_MAX_PAYLOAD = 1 << 25  # "Size constraints": default maximum payload, 32 MiB
DEFAULT_CHUNK = 4 << 20  # our request size when the server allows more
MAX_INFLIGHT_REQUESTS = 16  # qemu-nbd serves 16 requests per client at a time
MAX_INFLIGHT_BYTES = 64 << 20
#: WRITE_ZEROES carries no payload; still stay well inside the 32-bit length field.
MAX_ZEROES_REQUEST = 1 << 30
#: option replies are short strings and info records; anything huge is not NBD.
MAX_OPTION_REPLY = 1 << 16

_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
_EXPORT_INFO = struct.Struct(">QH")  # size, transmission flags
_BLOCK_SIZE_INFO = struct.Struct(">III")  # minimum, preferred, maximum payload


def describe_nbd_error(code: int) -> str:
    """``No space left on device (ENOSPC)`` for an NBD error value."""
    if code in NBD_ERRORS:
        name, text = NBD_ERRORS[code]
        return f"{text} ({name})"
    # "Error values": treat an unexpected value as EINVAL, but show what was sent.
    name = errno.errorcode.get(code, "unknown")
    return f"error {code} ({name}; not an NBD error value, treated as EINVAL)"


@dataclass(frozen=True, slots=True)
class NbdExport:
    """What the handshake learned about the export."""

    size: int
    flags: int
    minimum_block: int
    preferred_block: int
    maximum_payload: int
    #: "GO" or "EXPORT_NAME": which option entered transmission
    negotiated_with: Literal["GO", "EXPORT_NAME"]

    @property
    def read_only(self) -> bool:
        return bool(self.flags & FLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & FLAG_SEND_FLUSH)

    @property
    def can_write_zeroes(self) -> bool:
        return bool(self.flags & FLAG_SEND_WRITE_ZEROES)


@dataclass(slots=True)
class _Request:
    command: Command
    offset: int
    length: int
    payload: int  # bytes counted against the in-flight window
    dest: memoryview | None = None  # where READ data goes


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class NbdTarget(Target):
    """An export on an NBD server, written through one pipelined connection.

    ``peak_inflight`` records the most requests that were in flight at once.
    """

    kind = "nbd"
    # The export's previous contents are unknown: every zero cluster must be sent.
    starts_zeroed = False
    punches_zeroes = False  # set per connection from NBD_FLAG_SEND_WRITE_ZEROES

    def __init__(self, uri: str, size: int, cluster_size: int, timeout: float = 30.0) -> None:
        super().__init__(size, cluster_size)
        if not timeout > 0:
            raise TargetError(f"NBD timeout must be positive, not {timeout!r}")
        self.uri = uri
        self.address: NbdAddress = parse_nbd_uri(uri)
        self.timeout = timeout
        self.peak_inflight = 0
        self._inflight: dict[int, _Request] = {}
        self._inflight_bytes = 0
        self._next_cookie = 1
        # The first failure, kept as its message: an exception object kept past its
        # handler would hold its traceback's frames, and with them memoryviews of the
        # buffers being written (the device mapping, which could then not be closed).
        self._failure: str | None = None
        # False once the byte stream may be out of step (partial send, bad reply): then
        # we must not send anything more, not even NBD_CMD_DISC.
        self._in_sync = True
        self._opening = True
        self._reply_header = bytearray(_SIMPLE_REPLY.size)
        self._zero_buffer: memoryview | None = None
        self._sock: socket.socket | None = self._connect()
        try:
            self.export = self._handshake()
            self._opening = False
            self._check_export()
        except BaseException:
            if self._opening:
                self._send_quietly(_OPTION.pack(IHAVEOPT, OPT_ABORT, 0))
            else:
                self._send_quietly(self._disconnect_request())
            self._close_socket()
            raise
        self.punches_zeroes = self.export.can_write_zeroes
        self._chunk = self._chunk_size()

    # --- connection --------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        addr = self.address
        where = f"NBD server {self.uri}"
        try:
            if addr.transport == "unix":
                assert addr.socket_path is not None
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.timeout)
                    sock.connect(addr.socket_path)
                except BaseException:
                    sock.close()
                    raise
            else:
                assert addr.host is not None and addr.port is not None
                sock = socket.create_connection((addr.host, addr.port), timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except FileNotFoundError as exc:
            raise TargetUnreachable(
                f"cannot connect to {where}: socket {addr.socket_path!r} does not exist"
            ) from exc
        except ConnectionRefusedError as exc:
            raise TargetUnreachable(
                f"cannot connect to {where}: connection refused at {addr.endpoint()} "
                f"(is the server running?)"
            ) from exc
        except socket.gaierror as exc:
            raise TargetUnreachable(
                f"cannot connect to {where}: cannot resolve host {addr.host!r}: {exc.strerror}"
            ) from exc
        except TimeoutError as exc:
            raise TargetUnreachable(
                f"{where} did not answer within {self.timeout:g} s (connecting to "
                f"{addr.endpoint()})"
            ) from exc
        except OSError as exc:
            raise TargetUnreachable(
                f"cannot connect to {where} at {addr.endpoint()}: {exc.strerror or exc}"
            ) from exc
        return sock

    def _error(self, message: str) -> TargetError:
        # Until the handshake is done the target was never opened: unreachable.
        if self._opening:
            return TargetUnreachable(message)
        return TargetIOError(message)

    def _broken(self, message: str, exc: BaseException | None = None) -> NoReturn:
        """The connection can no longer be trusted: remember why and raise."""
        self._in_sync = False
        error = self._error(message)
        if isinstance(error, TargetIOError) and self._failure is None:
            self._failure = message
        try:
            if exc is not None:
                raise error from exc
            raise error
        finally:
            # This frame is part of the error's traceback: holding the error here too is
            # a reference cycle that keeps every frame of it (and the buffers they were
            # sending) alive until the cyclic collector happens to run.
            del error, exc

    def _transport_error(self, exc: OSError, doing: str) -> NoReturn:
        where = f"NBD server {self.uri}"
        unanswered = self._unanswered()
        if isinstance(exc, TimeoutError):
            self._broken(
                f"{where} did not answer within {self.timeout:g} s ({doing}{unanswered})", exc
            )
        if isinstance(exc, ConnectionResetError | BrokenPipeError):
            self._broken(f"{where} closed the connection ({doing}{unanswered})", exc)
        self._broken(f"{where}: {doing} failed: {exc.strerror or exc}{unanswered}", exc)

    def _unanswered(self) -> str:
        pending = len(self._inflight)
        if not pending or self._opening:
            return ""
        return f", {pending} request{'s' if pending > 1 else ''} unanswered"

    def _require_socket(self) -> socket.socket:
        if self._sock is None:
            raise TargetIOError(f"NBD target {self.uri} is closed")
        return self._sock

    def _send(self, parts: list[Buffer], doing: str) -> None:
        """Send every byte of ``parts`` (scatter-gather, no joining copies)."""
        sock = self._require_socket()
        views = [memoryview(p).cast("B") for p in parts]
        views = [v for v in views if len(v)]
        try:
            while views:
                sent = sock.sendmsg(views)
                # sendmsg on a socket with a timeout may send part: drop what went out.
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if sent:
                    views[0] = views[0][sent:]
        except OSError as exc:
            self._transport_error(exc, doing)

    def _recv_into(self, view: memoryview, doing: str) -> None:
        sock = self._require_socket()
        try:
            while view:
                received = sock.recv_into(view)
                if received == 0:
                    self._broken(
                        f"NBD server {self.uri} closed the connection ({doing}{self._unanswered()})"
                    )
                view = view[received:]
        except OSError as exc:
            self._transport_error(exc, doing)

    def _recv(self, length: int, doing: str) -> bytes:
        buffer = bytearray(length)
        self._recv_into(memoryview(buffer), doing)
        return bytes(buffer)

    def _send_quietly(self, data: bytes) -> None:
        """Best effort (soft disconnects): a short wait, any error ignored."""
        if self._sock is None or not self._in_sync:
            return
        with contextlib.suppress(OSError):
            self._sock.settimeout(min(self.timeout, 1.0))
            self._sock.sendall(data)

    def _close_socket(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    # --- handshake ---------------------------------------------------------------------

    def _handshake(self) -> NbdExport:
        where = f"NBD server {self.uri}"
        greeting = self._recv(16, "waiting for the handshake greeting")
        magic, second = struct.unpack(">QQ", greeting)
        if magic != NBDMAGIC:
            self._broken(f"{where} is not an NBD server (greeting {greeting[:8]!r})")
        if second == CLISERV_MAGIC:
            self._broken(
                f"{where} uses the oldstyle handshake, which has no export names and is not "
                f"supported; run the server in newstyle mode"
            )
        if second != IHAVEOPT:
            self._broken(f"{where} sent an unknown handshake magic 0x{second:x}")
        (server_flags,) = struct.unpack(">H", self._recv(2, "reading the handshake flags"))
        # "Client flags": set only flags the server offered.
        fixed = bool(server_flags & FLAG_FIXED_NEWSTYLE)
        no_zeroes = bool(server_flags & FLAG_NO_ZEROES)
        client_flags = (FLAG_C_FIXED_NEWSTYLE if fixed else 0) | (
            FLAG_C_NO_ZEROES if no_zeroes else 0
        )
        self._send([struct.pack(">I", client_flags)], "sending the client flags")
        if fixed:
            export = self._option_go()
            if export is not None:
                return export
        return self._option_export_name(no_zeroes)

    def _send_option(self, option: int, data: bytes) -> None:
        self._send([_OPTION.pack(IHAVEOPT, option, len(data)), data], "sending an option")

    def _option_go(self) -> NbdExport | None:
        """NBD_OPT_GO; None when the server does not know it (NBD_REP_ERR_UNSUP)."""
        where = f"NBD server {self.uri}"
        name = self.address.export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
        self._send_option(OPT_GO, data)
        size_flags: tuple[int, int] | None = None
        block_sizes = (1, 4096, DEFAULT_MAX_PAYLOAD)
        while True:
            header = self._recv(_OPTION_REPLY.size, "waiting for the reply to NBD_OPT_GO")
            magic, option, reply, length = _OPTION_REPLY.unpack(header)
            if magic != OPTION_REPLY_MAGIC or option != OPT_GO:
                self._broken(f"{where} sent a malformed option reply (magic 0x{magic:x})")
            if length > MAX_OPTION_REPLY:
                self._broken(f"{where} sent an option reply of {length} bytes")
            payload = self._recv(length, "reading the reply to NBD_OPT_GO")
            if reply == REP_ACK:
                break
            if reply == REP_INFO:
                if len(payload) < 2:
                    self._broken(f"{where} sent a truncated NBD_REP_INFO")
                (info,) = struct.unpack_from(">H", payload)
                if info == INFO_EXPORT and len(payload) == 2 + _EXPORT_INFO.size:
                    size_flags = _EXPORT_INFO.unpack_from(payload, 2)
                elif info == INFO_BLOCK_SIZE and len(payload) == 2 + _BLOCK_SIZE_INFO.size:
                    block_sizes = _BLOCK_SIZE_INFO.unpack_from(payload, 2)
                # "MUST ignore information types that it does not recognize"
                continue
            if reply & REP_ERROR_BIT:
                if reply == OptionError.NBD_REP_ERR_UNSUP:
                    return None  # an old server: fall back to NBD_OPT_EXPORT_NAME
                self._option_refused(reply, payload)
            self._broken(f"{where} sent unknown option reply type {reply} to NBD_OPT_GO")
        if size_flags is None:
            self._broken(f"{where} accepted NBD_OPT_GO without sending NBD_INFO_EXPORT")
        minimum, preferred, maximum = block_sizes
        return NbdExport(size_flags[0], size_flags[1], minimum, preferred, maximum, "GO")

    def _option_refused(self, reply: int, payload: bytes) -> NoReturn:
        where = f"NBD server {self.uri}"
        export = self.address.export
        message = payload.decode("utf-8", "replace").strip()
        detail = f": {message}" if message else ""
        try:
            name = OptionError(reply).name
        except ValueError:
            name = f"error 0x{reply:x}"
        if reply == OptionError.NBD_REP_ERR_UNKNOWN:
            raise TargetUnreachable(f"export {export!r} not found on {where}{detail}")
        if reply == OptionError.NBD_REP_ERR_TLS_REQD:
            raise TargetUnreachable(
                f"{where} requires TLS for export {export!r} ({name}), which shmblock does "
                f"not support{detail}"
            )
        if reply == OptionError.NBD_REP_ERR_POLICY:
            raise TargetUnreachable(f"{where} refuses export {export!r} by policy ({name}){detail}")
        if reply == OptionError.NBD_REP_ERR_SHUTDOWN:
            raise TargetUnreachable(f"{where} is shutting down ({name}){detail}")
        raise TargetUnreachable(f"{where} refused export {export!r} ({name}){detail}")

    def _option_export_name(self, no_zeroes: bool) -> NbdExport:
        export = self.address.export
        self._send_option(OPT_EXPORT_NAME, export.encode())
        # "If the server is unwilling to allow the export, it MUST terminate the session":
        # a close here almost always means the export does not exist.
        doing = (
            f"after NBD_OPT_EXPORT_NAME; the server closes the connection when export "
            f"{export!r} does not exist"
        )
        size, flags = _EXPORT_INFO.unpack(self._recv(_EXPORT_INFO.size, doing))
        if not no_zeroes:
            self._recv(124, "reading the export information")
        return NbdExport(size, flags, 1, 4096, DEFAULT_MAX_PAYLOAD, "EXPORT_NAME")

    def _check_export(self) -> None:
        export, where = self.export, f"NBD server {self.uri}"
        if export.size < self.size:
            raise TargetTooSmall(
                f"export {self.address.export!r} on {where} holds {export.size} bytes, "
                f"smaller than the device ({self.size} bytes)"
            )
        if export.read_only:
            raise TargetReadOnly(f"export {self.address.export!r} on {where} is read-only")
        minimum = export.minimum_block
        if not _is_power_of_two(minimum) or self.cluster_size % minimum:
            raise TargetError(
                f"{where} requires a minimum block size of {minimum} bytes, which the "
                f"cluster size {self.cluster_size} is not a multiple of"
            )
        if export.maximum_payload < minimum:
            raise TargetError(
                f"{where} advertises a maximum payload ({export.maximum_payload}) smaller "
                f"than its minimum block size ({minimum})"
            )

    def _chunk_size(self) -> int:
        """Largest request payload: <= 4 MiB and the server's maximum, well aligned."""
        export = self.export
        limit = min(DEFAULT_CHUNK, export.maximum_payload)
        preferred = export.preferred_block
        align = preferred if _is_power_of_two(preferred) and preferred <= limit else 1
        align = max(align, export.minimum_block)
        return limit - limit % align

    # --- transmission ------------------------------------------------------------------

    def _request_header(self, command: Command, offset: int, length: int) -> tuple[int, bytes]:
        """A request header with a fresh cookie (cookies are never reused here)."""
        cookie = self._next_cookie
        self._next_cookie += 1
        return cookie, _REQUEST.pack(REQUEST_MAGIC, 0, command, cookie, offset, length)

    def _disconnect_request(self) -> bytes:
        return self._request_header(Command.DISC, 0, 0)[1]

    def _check_usable(self) -> None:
        self._require_socket()
        if self._failure is not None:
            raise TargetIOError(self._failure)

    def _submit(
        self,
        command: Command,
        offset: int,
        length: int,
        data: memoryview | None = None,
        dest: memoryview | None = None,
    ) -> None:
        """Send one request without waiting for its reply (window permitting)."""
        payload = len(data) if data is not None else (len(dest) if dest is not None else 0)
        self._make_room(payload)
        cookie, header = self._request_header(command, offset, length)
        self._inflight[cookie] = _Request(command, offset, length, payload, dest)
        self._inflight_bytes += payload
        self.peak_inflight = max(self.peak_inflight, len(self._inflight))
        self._send(
            [header] if data is None else [header, data],
            f"sending {command.name} at offset {offset}",
        )

    def _make_room(self, payload: int) -> None:
        while self._inflight and (
            len(self._inflight) >= MAX_INFLIGHT_REQUESTS
            or self._inflight_bytes + payload > MAX_INFLIGHT_BYTES
        ):
            self._receive_reply()

    def _drain(self) -> None:
        while self._inflight:
            self._receive_reply()

    def _receive_reply(self) -> None:
        """Collect one simple reply; raise the first error reply as TargetIOError."""
        where = f"NBD server {self.uri}"
        header = memoryview(self._reply_header)
        self._recv_into(header, "waiting for replies")
        magic, error, cookie = _SIMPLE_REPLY.unpack(header)
        if magic != SIMPLE_REPLY_MAGIC:
            kind = "a structured reply" if magic == STRUCTURED_REPLY_MAGIC else "a bad reply"
            self._broken(f"{where} sent {kind} (magic 0x{magic:08x}), not a simple reply")
        request = self._inflight.pop(cookie, None)
        if request is None:
            self._broken(f"{where} replied to unknown request cookie {cookie}")
        self._inflight_bytes -= request.payload
        if error:
            # "If an error occurs ... it MUST NOT send any payload for this request."
            if self._failure is None:
                self._failure = (
                    f"{where} failed {request.command.name} at offset {request.offset} "
                    f"({request.length} bytes): {describe_nbd_error(error)}"
                )
            raise TargetIOError(self._failure)
        if request.dest is not None:
            self._recv_into(request.dest, f"reading READ data at offset {request.offset}")

    def write(self, offset: int, data: Buffer) -> None:
        self._check_usable()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        self._check_aligned(offset, len(view))
        chunk = self._chunk
        for start in range(0, len(view), chunk):
            piece = view[start : start + chunk]
            self._submit(Command.WRITE, offset + start, len(piece), data=piece)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_usable()
        self._check_range(offset, length)
        self._check_aligned(offset, length)
        if self.export.can_write_zeroes:
            # Without a payload the request may exceed the maximum payload ("Size
            # constraints"), but servers with a scratch buffer may say EOVERFLOW for
            # huge ones: stay within the advertised maximum when there is one.
            step = min(MAX_ZEROES_REQUEST, max(self.export.maximum_payload, self._chunk))
            step -= step % self.export.minimum_block
            for start in range(0, length, step):
                n = min(step, length - start)
                self._submit(Command.WRITE_ZEROES, offset + start, n)
            return
        if self._zero_buffer is None:
            self._zero_buffer = memoryview(bytes(self._chunk))
        for start in range(0, length, self._chunk):
            n = min(self._chunk, length - start)
            self._submit(Command.WRITE, offset + start, n, data=self._zero_buffer[:n])

    def _check_aligned(self, offset: int, length: int) -> None:
        minimum = self.export.minimum_block
        if offset % minimum or length % minimum:
            raise TargetError(
                f"request at offset {offset} of {length} bytes is not aligned to the "
                f"minimum block size {minimum} of NBD server {self.uri}"
            )

    def settle(self) -> None:
        # The writes are pipelined: wait for their replies, so an error reply fails the
        # caller (a copy request's answer) instead of a later call.
        self._check_usable()
        self._drain()

    def commit(self) -> None:
        self._check_usable()
        self._drain()
        if self.export.can_flush:
            self._submit(Command.FLUSH, 0, 0)
            self._drain()

    def read(self, offset: int, length: int) -> bytes:
        self._check_usable()
        self._check_range(offset, length)
        self._check_aligned(offset, length)
        # Let every write be answered first, so READ data never competes with WRITE
        # payloads on the socket (neither side would read while the other is sending).
        self._drain()
        buffer = bytearray(length)
        view = memoryview(buffer)
        for start in range(0, length, self._chunk):
            n = min(self._chunk, length - start)
            self._submit(Command.READ, offset + start, n, dest=view[start : start + n])
        self._drain()
        del view
        return bytes(buffer)

    def abort(self) -> None:
        # Stop sending; NBD_CMD_DISC lets the server finish what it has and close.
        if self._sock is not None:
            self._send_quietly(self._disconnect_request())
            self._close_socket()

    def close(self) -> None:
        if self._sock is not None:
            # "There is no reply to an NBD_CMD_DISC" - nothing to wait for.
            self._send_quietly(self._disconnect_request())
            self._close_socket()

    def describe(self) -> str:
        return self.uri


__all__ = ["NbdAddress", "NbdExport", "NbdTarget", "describe_nbd_error", "parse_nbd_uri"]
