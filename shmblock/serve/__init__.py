"""``shmblock-run serve`` as a library: a QMP control socket (and NBD) on one engine.

::

    with Server(qmp_path="/run/shmblock.qmp") as server:   # listening when start() returns
        server.wait()                                      # until quit, or stop()

Theory of operation. The :class:`Server` owns (or borrows) an :class:`~shmblock.engine.
Engine` and one :class:`~shmblock.qmp.commands.Monitor` on it. Threads:

* one *acceptor* per listening socket (Unix; TCP on loopback optional), which starts
* one *client* thread per connection: it sends the greeting, feeds what it reads to a
  sans-IO :class:`~shmblock.qmp.wire.QmpConnection` and hands each request to the main
  thread, waiting for its reply. A client that
  disconnects mid-command loses nothing: the command runs to its end, only its reply
  has nobody to go to. A client that keeps sending garbage
  (:data:`~shmblock.qmp.wire.MAX_ERRORS` errors in a row) is disconnected;
* one *main* thread that runs every command, one at a time (QEMU's main loop; see
  :meth:`Server.call` for why it must be one long-lived thread);
* one *event* thread: events are put on a queue by whoever emits them (the engine's
  pump holds a job's lock then, so nothing may block there) and sent from here to every
  client that has finished capability negotiation.

Bounds: at most ``max_clients`` connections (more are greeted with an error and
closed), a message of at most :data:`~shmblock.qmp.wire.MAX_MESSAGE` bytes; a client
that does not read its replies or events for :data:`SEND_TIMEOUT` seconds is dropped.

:meth:`Server.stop` (also on ``quit``) closes the listeners and removes their socket
files, disconnects the clients, stops the NBD server, and closes the engine if the
server made it (jobs cancelled, devices and queues unlinked). The control socket is
created with owner-only permissions (0600): whoever can connect can back up, read or
overwrite every device.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import select
import socket
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from shmblock.engine import Engine
from shmblock.errors import UsageError
from shmblock.qmp import wire
from shmblock.qmp.commands import PACKAGE, QEMU_VERSION, Monitor

log = logging.getLogger(__name__)

#: Seconds a client may take to accept one message before it is dropped.
SEND_TIMEOUT = 10.0
#: Connections served at once.
MAX_CLIENTS = 16
_POLL = 0.2  # how often blocked threads look at the stop flag
_READ = 65536


def _readable(sock: socket.socket, timeout: float = _POLL) -> bool:
    """Whether ``sock`` has input (or EOF, or an error) within ``timeout``: poll, not
    select, which fails for descriptors past 1024."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


class _Client:
    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.conn = wire.QmpConnection()
        self.send_lock = threading.Lock()
        self.alive = True
        self.thread = threading.Thread(target=self.run, name="qmp-client", daemon=True)

    def send(self, data: bytes) -> None:
        if not self.alive:
            return
        with self.send_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                self.alive = False  # gone, or not reading: the reader thread ends it

    def run(self) -> None:
        try:
            self.send(wire.greeting(QEMU_VERSION, PACKAGE))
            # Not ended by ``stopping``: stop() flushes the events (SHUTDOWN...) first
            # and then shuts this socket down, which ends the loop; a client thread
            # that closed its socket as soon as the stop began lost them.
            while self.alive and not self.server.stopped.is_set():
                if not _readable(self.sock):
                    continue
                try:
                    data = self.sock.recv(_READ)
                except OSError:
                    break
                if not data:
                    break
                for item in self.conn.receive_data(data):
                    self.handle(item)
                if self.conn.too_many_errors:
                    break
        except Exception:  # never let one client take the server down
            log.exception("QMP client thread failed")
        finally:
            self.alive = False
            with contextlib.suppress(OSError):
                self.sock.close()
            self.server.forget(self)

    def handle(self, item: wire.Incoming) -> None:
        if isinstance(item, wire.BadInput):
            self.send(wire.error_reply(item, item.error))
            return
        try:
            result = self.server.dispatch(self.conn, item)
        except wire.QmpError as exc:
            self.send(wire.error_reply(item, exc))
            return
        except Exception as exc:  # a bug: answer it, keep serving
            log.exception("QMP command %s failed", item.command)
            self.send(wire.error_reply(item, wire.QmpError(f"internal error: {exc}")))
            return
        self.send(wire.reply(item, result))
        if item.command == "quit" and self.server.quitting:
            threading.Thread(target=self.server.stop, name="qmp-quit", daemon=True).start()


class Server:
    """A QMP server (and optionally NBD) on an engine; see the module docstring.

    ``engine`` None: the server makes one and closes it on :meth:`stop`. ``qmp_path``: the
    Unix socket to listen on; ``qmp_tcp`` ``(host, port)`` on loopback (port 0: any;
    :attr:`qmp_port` says which). ``nbd``: start the NBD server at once on a Unix socket
    path or ``HOST:PORT`` (as ``nbd-server-start`` would).
    """

    def __init__(self, engine: Engine | None = None, qmp_path: str | None = None, *,
                 qmp_tcp: tuple[str, int] | None = None, nbd: str | None = None,
                 max_clients: int = MAX_CLIENTS) -> None:
        if qmp_path is None and qmp_tcp is None:
            raise UsageError("the server needs a QMP socket path (or a TCP address)")
        if qmp_tcp is not None and qmp_tcp[0] not in ("127.0.0.1", "localhost", "::1"):
            raise UsageError(f"QMP over TCP listens on loopback only, not {qmp_tcp[0]!r}")
        if max_clients < 1:
            raise UsageError("max_clients must be at least 1")
        self._own_engine = engine is None
        self.engine = engine
        self.qmp_path = qmp_path
        self.qmp_tcp = qmp_tcp
        self.qmp_port: int | None = None
        self.nbd_address = nbd
        self.max_clients = max_clients
        self.monitor: Monitor | None = None
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self._listeners: list[socket.socket] = []
        self._bound_path: str | None = None
        self._clients: set[_Client] = set()
        self._clients_lock = threading.Lock()
        self._events: queue.Queue[bytes | threading.Event | None] = queue.Queue()
        self.quitting = False
        self._threads: list[threading.Thread] = []
        self._stop_lock = threading.Lock()
        self._started = False
        self._calls: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = \
            queue.Queue()
        self._main = threading.Thread(target=self._main_loop, name="qmp-main", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Listen; returns once clients can connect. Undoes everything on failure."""
        if self._started:
            raise UsageError("the server is started already")
        self._started = True
        try:
            # The sockets first: a bad path is a usage error, before anything is created.
            if self.qmp_path is not None:
                self._listeners.append(self._bind_unix(self.qmp_path))
                self._bound_path = self.qmp_path
            if self.qmp_tcp is not None:
                try:
                    tcp = socket.create_server(self.qmp_tcp, reuse_port=False)
                except OSError as exc:
                    raise UsageError(f"cannot listen for QMP on {self.qmp_tcp}: "
                                     f"{exc.strerror}") from exc
                self.qmp_port = tcp.getsockname()[1]
                self._listeners.append(tcp)
            if self.engine is None:
                # One backup worker per device, started with it: a job's snapshot follows
                # blockdev-backup within milliseconds (shmblock.backup_workers).
                self.engine = Engine(prestart_backup_worker=True)
            self.monitor = Monitor(self.engine, self._emit, _nbd_factory(),
                                   on_quit=self._quit)
            self._main.start()
            if self.nbd_address is not None:
                self.monitor.execute("nbd-server-start", {"addr": nbd_addr(self.nbd_address)})
            for lsock in self._listeners:
                self._spawn(self._accept, lsock, name="qmp-accept")
            self._spawn(self._send_events, name="qmp-events")
        except BaseException:
            self.stop()
            raise

    def _spawn(self, fn: Callable[..., None], *args: Any, name: str) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    @staticmethod
    def _bind_unix(path: str) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise UsageError(f"QMP socket path {path!r} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a socket nobody listens on: a crashed server's
            else:
                raise UsageError(f"QMP socket {path!r} is in use by a running server")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Owner-only from the start: chmod after bind would leave a window. umask is
        # process-wide; nothing else of ours creates files at this moment.
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on QMP socket {path!r}: {exc.strerror}") from exc
        finally:
            os.umask(old)
        sock.listen(16)
        return sock

    def stop(self) -> None:
        """Stop serving and clean up (see the module docstring). Idempotent."""
        with self._stop_lock:
            if self.stopped.is_set():
                return
            self.stopping.set()
            for lsock in self._listeners:
                with contextlib.suppress(OSError):
                    lsock.close()
            if self._bound_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._bound_path)
            me = threading.current_thread()
            self._flush_events()  # SHUTDOWN, BLOCK_EXPORT_DELETED... before hanging up
            with self._clients_lock:
                clients = list(self._clients)
            for c in clients:
                with contextlib.suppress(OSError):
                    c.sock.shutdown(socket.SHUT_RDWR)
            try:
                if self.monitor is not None:
                    self.monitor.close()
                if self._own_engine and self.engine is not None:
                    self.engine.close()
            finally:
                self._events.put(None)
                self._calls.put(None)
                if self._main.is_alive() and self._main is not me:
                    self._main.join(30.0)
                for t in self._threads:
                    if t is not me:
                        t.join(5.0)
                for c in clients:
                    if c.thread is not me:
                        c.thread.join(5.0)
                self.stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (``quit``, :meth:`stop`); False on timeout."""
        return self.stopped.wait(timeout)

    def _quit(self) -> None:
        # QEMU answers quit, then shuts down: the client's thread starts the stop once
        # the reply is sent (_Client.handle).
        self.quitting = True
        self._emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})

    def _flush_events(self, timeout: float = SEND_TIMEOUT) -> None:
        """Wait (bounded) until the events queued so far have been sent."""
        if not any(t.name == "qmp-events" and t.is_alive() for t in self._threads):
            return
        sent = threading.Event()
        self._events.put(sent)
        sent.wait(timeout)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connections ----------------------------------------------------------------------------

    def _accept(self, lsock: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                if not _readable(lsock):
                    continue
                sock, _ = lsock.accept()
            except (OSError, ValueError):  # closed by stop()
                return
            sock.settimeout(SEND_TIMEOUT)
            client = _Client(self, sock)
            with self._clients_lock:
                full = len(self._clients) >= self.max_clients
                if not full:
                    self._clients.add(client)
            if full:
                with contextlib.suppress(OSError):
                    sock.sendall(wire.error_reply(None, wire.QmpError(
                        f"too many QMP connections (at most {self.max_clients})")))
                sock.close()
                continue
            client.thread.start()

    def forget(self, client: _Client) -> None:
        with self._clients_lock:
            self._clients.discard(client)

    @property
    def clients(self) -> int:
        with self._clients_lock:
            return len(self._clients)

    def dispatch(self, conn: wire.QmpConnection, req: wire.Request) -> Any:
        """Capability negotiation here, everything else in the monitor."""
        if req.command == "qmp_capabilities":
            if conn.negotiated:
                raise wire.QmpError("Capabilities negotiation is already complete, command "
                                    "ignored", wire.COMMAND_NOT_FOUND)
            from shmblock.qmp import schema
            from shmblock.qmp.schemas import SCHEMAS

            schema.check(SCHEMAS["qmp_capabilities"], req.arguments)
            if req.arguments.get("enable"):
                raise wire.QmpError("Capability 'oob' not available")
            conn.negotiated = True
            return {}
        if not conn.negotiated:
            raise wire.QmpError("Expecting capabilities negotiation with "
                                "'qmp_capabilities'", wire.COMMAND_NOT_FOUND)
        monitor = self.monitor
        assert monitor is not None
        return self.call(lambda: monitor.execute(req.command, req.arguments))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's main thread and return (or raise) what it does.

        Every command runs there, one at a time, as in QEMU's main loop, and not on the
        client's thread: worker processes are started with PR_SET_PDEATHSIG, which Linux
        ties to the *thread* that forked them, so a backup started from a client's
        thread would be killed when that client disconnects.
        """
        if threading.current_thread() is self._main:
            return fn()
        future: Future[Any] = Future()
        self._calls.put((fn, future))
        return future.result()

    def _main_loop(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                break
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the client's thread
                future.set_exception(exc)
        while True:  # after stop: nothing more runs
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1].set_exception(wire.QmpError("the server is shutting down"))

    # -- events -------------------------------------------------------------------------------

    def _emit(self, name: str, data: dict[str, Any], when: float | None = None) -> None:
        self._events.put(wire.event(name, data, when))

    def _send_events(self) -> None:
        while True:
            msg = self._events.get()
            if msg is None:
                return
            if isinstance(msg, threading.Event):
                msg.set()
                continue
            with self._clients_lock:
                clients = [c for c in self._clients if c.conn.negotiated]
            for c in clients:
                c.send(msg)


def nbd_addr(spec: str) -> dict[str, Any]:
    """``--nbd PATH`` or ``HOST:PORT`` as nbd-server-start's ``addr``."""
    if "/" in spec or ":" not in spec:
        return {"type": "unix", "data": {"path": spec}}
    host, _, port = spec.rpartition(":")
    if not port.isdigit() or not host:
        raise UsageError(f"--nbd {spec!r}: expected a socket path or HOST:PORT")
    return {"type": "inet", "data": {"host": host.strip("[]"), "port": port}}


def _nbd_factory() -> Callable[..., Any]:
    """The NBD server class (contract C3)."""
    from shmblock.nbd import NbdServer

    factory: Callable[..., Any] = NbdServer
    return factory


def ready_line(server: Server) -> str:
    """What ``serve --json`` prints once it listens."""
    nbd = server.monitor.nbd if server.monitor is not None else None
    return json.dumps({"qmp": server.qmp_path, "qmp_port": server.qmp_port,
                       "nbd": server.nbd_address if nbd is not None else None,
                       "pid": os.getpid()})


__all__ = ["MAX_CLIENTS", "SEND_TIMEOUT", "Server", "nbd_addr", "ready_line"]
