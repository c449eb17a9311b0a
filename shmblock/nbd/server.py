"""The NBD server's I/O: listening sockets, one thread per connection, a bounded pool.

The protocol is :mod:`shmblock.nbd.wire` (sans I/O); this module moves its bytes and
runs its requests against the exports (:mod:`shmblock.nbd.exports`).

Threads. One acceptor thread per listening socket; per connection a reader (reads and
parses, and blocks when the connection has too much in flight, which is our
back-pressure) and a sender (the only thread that may block writing its socket: a
reply is written by the thread that made it, without blocking, when nobody else is
writing, and only what the socket did not take is handed over); one pool of
:data:`WORKERS` threads shared by every connection that runs requests. The device's
write path blocks (copy-before-write may wait for the backup worker), so requests run in
threads, not in an event loop; replies go out in whatever order requests finish (NBD
matches them by cookie). A request counts as in flight until its reply is sent, so a
client that does not read its replies only stalls itself.

Bounds (the server faces untrusted peers):

* a request carries at most :data:`~shmblock.nbd.wire.MAX_REQUEST` (32 MiB) of data;
* a connection has at most :data:`MAX_IN_FLIGHT` requests and
  :data:`MAX_IN_FLIGHT_BYTES` of read or write data in flight;
* at most ``max_connections`` connections (default 16); one more is accepted and closed;
* the handshake must end within :data:`HANDSHAKE_TIMEOUT`, and a reply must be taken
  by the client within :data:`SEND_TIMEOUT`, else the connection is dropped;
* refusals made by the wire layer (bad requests) wait to be sent up to
  :data:`MAX_UNSENT` bytes; beyond that the connection is not read until they are.

So the server holds at most ``max_connections × (MAX_IN_FLIGHT_BYTES + MAX_REQUEST)``
bytes of request data. Ownership: an export's source belongs to the server once added;
:meth:`NbdServer.remove_export` and :meth:`NbdServer.stop` close it.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import os
import select
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from shmblock.errors import CopyBeforeWriteError, ShmblockError, UsageError
from shmblock.nbd import wire
from shmblock.nbd.exports import ExportGone, ExportSource, LiveExport
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

log = logging.getLogger("shmblock.nbd")

WORKERS = 8
MAX_IN_FLIGHT = 16
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
HANDSHAKE_TIMEOUT = 30.0
SEND_TIMEOUT = 60.0
RECV_CHUNK = 256 * 1024
#: a reply's header and data up to this size go out in one send
COALESCE = 256 * 1024
#: reads of a live export up to this size run in the connection's own thread: a memcpy
#: costs less than the hand-over to the pool
INLINE_READ = 1024 * 1024
#: refusals the protocol layer may queue for a client that does not read them
MAX_UNSENT = 1024 * 1024
POLL = 0.25


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """One export as :meth:`NbdServer.exports` lists it."""

    name: str
    size: int
    writable: bool
    connections: int
    description: str = ""


@dataclass
class _Export:
    name: str
    source: ExportSource
    description: str

    def view(self) -> ExportView:
        s = self.source
        return ExportView(self.name, s.size, s.writable, s.block_size, tuple(s.contexts),
                          self.description)


class _Connection:
    """One client: its socket, its protocol state, what it has in flight.

    Three kinds of thread touch it: its reader (parses, submits, blocks on the bounds),
    pool threads (run requests, reply) and its sender (the only one that may block on
    the socket). A request counts as in flight until its reply is *sent*, so a
    client that does not read its replies stalls only itself: its sender blocks, its
    budget fills, its reader stops reading -- no pool thread ever waits on its socket.
    """

    def __init__(self, server: NbdServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.proto = ServerConnection(Catalog(server._find_view, server._list_views))
        self.export: _Export | None = None
        self.contexts: tuple[tuple[int, str], ...] = ()
        self.cond = threading.Condition()
        self.in_flight = 0
        self.bytes_in_flight = 0
        #: replies waiting for the sender: (parts, the request budget they release, their
        #: size if the protocol layer made them)
        self.outbox: collections.deque[tuple[tuple[bytes | memoryview, ...], int, int]] = \
            collections.deque()
        #: a thread is writing the socket (the sender, or a thread sending directly)
        self.sending = False
        #: bytes the protocol layer itself queued (handshake, refusals) not yet sent
        self.protocol_bytes = 0
        self.closing = False  # the reader is done: the sender ends once the outbox is empty
        self.broken = False
        self.thread = threading.Thread(target=self._run, name=f"nbd-conn-{peer}",
                                       daemon=True)
        self.sender = threading.Thread(target=self._send_loop, name=f"nbd-send-{peer}",
                                       daemon=True)

    # -- sending ----------------------------------------------------------------------

    def send(self, *parts: bytes | memoryview, cost: int = -1) -> None:
        """Send or queue a reply; ``cost`` is the budget of the request it answers (-1:
        none, the protocol layer made it).

        If nobody is writing the socket, the calling thread writes what the socket takes
        without blocking (most replies: no hand-over to the sender); whatever is left
        goes to the front of the outbox for the sender, which may block on it.
        """
        if len(parts) > 1 and sum(len(p) for p in parts) <= COALESCE:
            parts = (b"".join(parts),)  # one segment for a small reply (TCP_NODELAY)
        size = sum(len(p) for p in parts) if cost < 0 else 0
        with self.cond:
            if self.broken:
                if cost >= 0:
                    self._release(cost)
                return
            self.protocol_bytes += size
            if self.outbox or self.sending:
                self.outbox.append((parts, cost, size))
                self.cond.notify_all()
                return
            self.sending = True  # the write side is ours until we give it back
        rest: list[memoryview] = []
        try:
            rest = self._write_now(parts)
        except OSError as exc:
            log.info("nbd: %s: cannot send a reply (%s); dropping it", self.peer, exc)
            self.drop()
        with self.cond:
            self.sending = False
            if rest and not self.broken:
                self.outbox.appendleft((tuple(rest), cost, size))
            else:
                self._sent(cost, size)
            self.cond.notify_all()

    def _write_now(self, parts: tuple[bytes | memoryview, ...]) -> list[memoryview]:
        """Write ``parts`` as far as the socket takes them now; returns what is left.

        The socket has a timeout, so its descriptor is non-blocking: ``writev`` returns
        what fitted (or raises BlockingIOError when nothing did).
        """
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        fd = self.sock.fileno()
        while views:
            try:
                n = os.writev(fd, views)
            except BlockingIOError:
                break
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
        return views

    def _sent(self, cost: int, size: int) -> None:
        """A queued reply is gone (sent or dropped), with self.cond held."""
        if cost >= 0:
            self._release(cost)
        else:
            self.protocol_bytes = max(self.protocol_bytes - size, 0)  # a drop reset it

    def _release(self, cost: int) -> None:
        """A request is over (with self.cond held)."""
        self.in_flight -= 1
        self.bytes_in_flight -= cost
        self.cond.notify_all()

    def _send_loop(self) -> None:
        while True:
            with self.cond:
                while not self.broken:
                    if self.outbox and not self.sending:
                        break
                    if self.closing and not self.outbox and not self.sending:
                        return
                    self.cond.wait(POLL)
                if self.broken:
                    return
                parts, cost, size = self.outbox.popleft()
                self.sending = True
            try:
                for part in parts:
                    if len(part):
                        self.sock.sendall(part)
            except OSError as exc:
                # The client went away or stopped reading: nothing more to tell it.
                log.info("nbd: %s: cannot send a reply (%s); dropping it", self.peer, exc)
                self.drop()
            with self.cond:
                self.sending = False
                self._sent(cost, size)
                self.cond.notify_all()

    def drop(self) -> None:
        """Break the connection: the reader sees EOF, queued replies are discarded."""
        with self.cond:
            self.broken = True
            for _, cost, _size in self.outbox:
                if cost >= 0:
                    self._release(cost)
            self.outbox.clear()
            self.protocol_bytes = 0
            self.cond.notify_all()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # -- the reading thread -------------------------------------------------------------

    def start(self) -> None:
        self.sender.start()
        self.thread.start()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.thread.join(timeout)
        self.sender.join(max(deadline - time.monotonic(), 0.1))

    def _run(self) -> None:
        try:
            self._converse()
        except Exception:  # never let one client's surprise kill the server
            log.exception("nbd: %s: connection failed", self.peer)
        finally:
            self._drain()
            with self.cond:
                self.closing = True
                self.cond.notify_all()
            self.sender.join(SEND_TIMEOUT)
            if self.sender.is_alive():
                self.drop()
                self.sender.join(SEND_TIMEOUT)
            with contextlib.suppress(OSError):
                self.sock.close()
            self.server._forget(self)

    def _converse(self) -> None:
        sock = self.sock
        sock.settimeout(SEND_TIMEOUT)
        self.send(self.proto.data_to_send())
        handshake_end = time.monotonic() + HANDSHAKE_TIMEOUT
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while not self.broken and not self.server._stopping.is_set():
            if (self.proto.phase in (Phase.OPTIONS, Phase.CLIENT_FLAGS)
                    and time.monotonic() > handshake_end):
                log.info("nbd: %s: handshake took over %s s", self.peer, HANDSHAKE_TIMEOUT)
                return
            with self.cond:
                # A client that sends and never reads gets no more of our attention
                # than its unsent refusals are worth.
                if self.protocol_bytes > MAX_UNSENT:
                    self.cond.wait(POLL)
                    continue
            # poll, not select: select fails for descriptors past FD_SETSIZE (1024),
            # which a busy server process reaches
            if not poller.poll(POLL * 1000):
                continue
            try:
                data = sock.recv(RECV_CHUNK)
            except OSError:
                return
            if not data:
                return  # the client went away (mid-request too: its write is dropped)
            events = self.proto.receive_data(data)
            out = self.proto.data_to_send()
            if out:
                self.send(out)
            for event in events:
                if isinstance(event, Negotiated):
                    if not self._bind(event):
                        return
                elif isinstance(event, Request):
                    if not self._submit(event):
                        return
                elif isinstance(event, Closed):
                    self.server.protocol_errors += 1
                    log.info("nbd: %s: %s; hanging up", self.peer, event.reason)
                    return
                elif isinstance(event, Disconnect):
                    return

    def _bind(self, event: Negotiated) -> bool:
        export = self.server._bind(self, event.export)
        if export is None:
            return False  # removed between the option and now
        self.export = export
        self.contexts = event.contexts
        return True

    def _submit(self, req: Request) -> bool:
        cost = len(req.data) if req.command == wire.CMD_WRITE else \
            req.length if req.command == wire.CMD_READ else 0
        with self.cond:
            while (self.in_flight >= MAX_IN_FLIGHT
                   or self.bytes_in_flight + cost > MAX_IN_FLIGHT_BYTES):
                if self.broken or self.server._stopping.is_set():
                    return False
                self.cond.wait(POLL)
            self.in_flight += 1
            self.bytes_in_flight += cost
        export = self.export
        if (req.command == wire.CMD_READ and req.length <= INLINE_READ
                and export is not None and isinstance(export.source, LiveExport)):
            self._serve(req, cost)
            return True
        try:
            self.server._pool.submit(self._serve, req, cost)
        except RuntimeError:  # the pool shut down: the server is stopping
            with self.cond:
                self._release(cost)
            return False
        return True

    def _drain(self) -> None:
        """Let requests in flight finish and their replies go out (a write that started
        lands whole)."""
        deadline = time.monotonic() + SEND_TIMEOUT
        with self.cond:
            while self.in_flight and time.monotonic() < deadline:
                self.cond.wait(POLL)

    # -- running one request (in the pool) ---------------------------------------------

    def _serve(self, req: Request, cost: int) -> None:
        try:
            reply = self._execute(req)
        except Exception as exc:  # a bug must cost one reply, not the server
            log.exception("nbd: %s: %s failed", self.peer, req.name)
            reply = (self.proto.reply_error(req.cookie, req.command, wire.EIO,
                                            f"internal error: {exc}"),)
        self.send(*reply, cost=cost)

    def _execute(self, req: Request) -> tuple[bytes | memoryview, ...]:
        """Run ``req``; returns its reply."""
        export = self.export
        assert export is not None
        source = export.source
        proto = self.proto
        try:
            if req.command == wire.CMD_READ:
                data = source.read(req.offset, req.length)
                return tuple(proto.reply_read(req.cookie, req.offset, data))
            if req.command == wire.CMD_WRITE:
                source.write(req.offset, memoryview(req.data), bool(req.flags & wire.CMD_FLAG_FUA))
            elif req.command == wire.CMD_FLUSH:
                source.flush()
            elif req.command == wire.CMD_TRIM:
                source.trim(req.offset, req.length)
                if req.flags & wire.CMD_FLAG_FUA:
                    source.flush()
            elif req.command == wire.CMD_WRITE_ZEROES:
                # proto.md: with FAST_ZERO, fail fast unless zeroing is faster than
                # writing. Ours writes zeroes through copy-before-write like data,
                # except where the device was never written (nothing to do: fast).
                if req.flags & wire.CMD_FLAG_FAST_ZERO and not (
                        isinstance(source, LiveExport)
                        and source.already_zero(req.offset, req.length)):
                    return (proto.reply_error(req.cookie, req.command, wire.ENOTSUP,
                                              "zeroing written data is not faster "
                                              "than writing"),)
                source.write_zeroes(req.offset, req.length,
                                    bool(req.flags & wire.CMD_FLAG_FUA))
            elif req.command == wire.CMD_BLOCK_STATUS:
                chunks = []
                one = bool(req.flags & wire.CMD_FLAG_REQ_ONE)
                for ident, name in self.contexts:
                    extents = wire.clip_extents(
                        source.block_status(name, req.offset, req.length), req.length, one)
                    if not extents:
                        raise ExportGone(f"no extents for context {name}")
                    chunks.append((ident, extents))
                return (proto.reply_block_status(req.cookie, chunks),)
            return (proto.reply_ok(req.cookie),)
        except CopyBeforeWriteError as exc:
            # The snapshot's old contents could not be saved: the write did not happen.
            return (proto.reply_error(req.cookie, req.command, wire.EIO, str(exc)),)
        except UsageError as exc:
            return (proto.reply_error(req.cookie, req.command, wire.EINVAL, str(exc)),)
        except (ShmblockError, OSError) as exc:
            return (proto.reply_error(req.cookie, req.command, wire.EIO, str(exc)),)


class NbdServer:
    """An NBD server for shmblock exports, on Unix sockets and loopback TCP (C3)."""

    def __init__(self, *, max_connections: int = 16) -> None:
        if not 1 <= max_connections <= 1024:
            raise UsageError(f"max_connections {max_connections} must be from 1 to 1024")
        self.max_connections = max_connections
        self.protocol_errors = 0
        self._lock = threading.Lock()
        self._exports: dict[str, _Export] = {}
        self._bound: dict[str, set[_Connection]] = {}
        self._connections: set[_Connection] = set()
        self._listeners: list[tuple[socket.socket, threading.Thread, str | None,
                                    tuple[int, int] | None]] = []
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="nbd-req")
        self._stopped = False

    # -- listening ----------------------------------------------------------------------

    def start_unix(self, path: str) -> None:
        """Listen on a Unix socket at ``path``, created owner-only (0600). UsageError if
        ``path`` exists or its directory does not."""
        self._require_running()
        path = os.path.abspath(path)
        directory = os.path.dirname(path)
        if os.path.lexists(path):
            raise UsageError(f"cannot listen on {path!r}: it exists")
        if not os.path.isdir(directory):
            raise UsageError(f"cannot listen on {path!r}: no directory {directory!r}")
        # Bind inside a private (0700) directory, make it 0600, then rename it into
        # place: the socket is never reachable with looser permissions, and no
        # process-wide umask is changed under other threads.
        private = tempfile.mkdtemp(prefix=".nbd-", dir=directory)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            tmp = os.path.join(private, "sock")
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            sock.listen(64)
            try:
                os.link(tmp, path)  # fails if someone created ``path`` meanwhile
            except FileExistsError:
                raise UsageError(f"cannot listen on {path!r}: it exists") from None
            os.unlink(tmp)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {path!r}: {exc.strerror}") from exc
        except BaseException:
            sock.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(private, "sock"))
            with contextlib.suppress(OSError):
                os.rmdir(private)
        st = os.stat(path)
        self._listen(sock, path, (st.st_dev, st.st_ino))

    def start_tcp(self, host: str, port: int) -> int:
        """Listen on loopback ``host`` (127.0.0.1, ::1, localhost) at ``port`` (0: any
        free one); returns the port. UsageError for a non-loopback address."""
        self._require_running()
        name = "127.0.0.1" if host == "localhost" else host
        try:
            addr = ipaddress.ip_address(name)
        except ValueError:
            raise UsageError(f"NBD listens on loopback only; {host!r} is not a loopback "
                             "address") from None
        if not addr.is_loopback:
            raise UsageError(f"NBD listens on loopback only; {host!r} is not loopback")
        if not 0 <= port <= 65535:
            raise UsageError(f"port {port} out of range")
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((name, port))
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        bound: int = sock.getsockname()[1]
        self._listen(sock, None, None)
        return bound

    def _listen(self, sock: socket.socket, path: str | None,
                identity: tuple[int, int] | None) -> None:
        sock.settimeout(POLL)
        thread = threading.Thread(target=self._accept_loop, args=(sock,),
                                  name="nbd-accept", daemon=True)
        with self._lock:
            self._listeners.append((sock, thread, path, identity))
        thread.start()

    def _accept_loop(self, sock: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                client, addr = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(POLL)  # EMFILE and friends: do not spin
                continue
            client.settimeout(None)
            if client.family != socket.AF_UNIX:
                # Replies are whole messages: do not hold them back for Nagle.
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = addr[0] + ":" + str(addr[1]) if isinstance(addr, tuple) else "unix"
            with self._lock:
                full = len(self._connections) >= self.max_connections
                conn = None if full or self._stopping.is_set() else \
                    _Connection(self, client, peer)
                if conn is not None:
                    self._connections.add(conn)
            if conn is None:
                log.info("nbd: refusing %s: %d connections already", peer,
                         self.max_connections)
                client.close()
                continue
            conn.start()

    # -- exports --------------------------------------------------------------------------

    def add_export(self, name: str, source: ExportSource, *, description: str = "") -> None:
        """Serve ``source`` as ``name`` (UsageError for a bad or duplicate name)."""
        self._require_running()
        if not isinstance(name, str) or len(name.encode()) > wire.MAX_NAME or "\0" in name:
            raise UsageError(f"bad NBD export name {name!r}: at most {wire.MAX_NAME} "
                             "bytes of UTF-8 without NUL")
        if len(description.encode()) > wire.MAX_NAME:
            raise UsageError(f"the description of export {name!r} is over "
                             f"{wire.MAX_NAME} bytes")
        with self._lock:
            if name in self._exports:
                raise UsageError(f"an NBD export named {name!r} exists already")
            self._exports[name] = _Export(name, source, description)
            self._bound[name] = set()

    def remove_export(self, name: str, *, hard: bool = False) -> None:
        """Stop serving ``name`` and close its source. Refused (UsageError) while clients
        use it, unless ``hard``: then they are disconnected (requests in flight finish)."""
        with self._lock:
            export = self._exports.get(name)
            if export is None:
                raise UsageError(f"no NBD export named {name!r}")
            users = list(self._bound[name])
            if users and not hard:
                raise UsageError(f"NBD export {name!r} has {len(users)} client(s) "
                                 "connected (remove it hard to disconnect them)")
            del self._exports[name]
            del self._bound[name]
        for conn in users:
            conn.drop()
        for conn in users:
            conn.join(SEND_TIMEOUT)
        export.source.close()

    def exports(self) -> list[ExportInfo]:
        with self._lock:
            return [ExportInfo(e.name, e.source.size, e.source.writable,
                               len(self._bound[e.name]), e.description)
                    for e in self._exports.values()]

    def _find_view(self, name: str) -> ExportView | None:
        with self._lock:
            export = self._exports.get(name)
        return None if export is None else export.view()

    def _list_views(self) -> list[ExportView]:
        with self._lock:
            exports = list(self._exports.values())
        return [e.view() for e in exports]

    def _bind(self, conn: _Connection, name: str) -> _Export | None:
        with self._lock:
            export = self._exports.get(name)
            if export is not None:
                self._bound[name].add(conn)
            return export

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
            if conn.export is not None:
                self._bound.get(conn.export.name, set()).discard(conn)

    # -- lifecycle --------------------------------------------------------------------------

    def _require_running(self) -> None:
        if self._stopped:
            raise UsageError("the NBD server is stopped")

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, disconnect every client (requests in flight finish, up to
        ``timeout``), close every export's source and unlink the Unix sockets. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        deadline = time.monotonic() + timeout
        with self._lock:
            listeners = list(self._listeners)
            self._listeners.clear()
        for sock, thread, path, identity in listeners:
            thread.join(max(deadline - time.monotonic(), 0.1))
            sock.close()
            if path is not None:
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    if (st.st_dev, st.st_ino) == identity:  # ours, not a newcomer's
                        os.unlink(path)
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            conn.drop()
        for conn in conns:
            conn.join(max(deadline - time.monotonic(), 0.1))
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            exports = list(self._exports.values())
            self._exports.clear()
            self._bound.clear()
        for export in exports:
            with contextlib.suppress(Exception):
                export.source.close()

    def __enter__(self) -> NbdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
