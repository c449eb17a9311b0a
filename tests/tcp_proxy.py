"""A small TCP proxy for slow-response tests: delay, throttle or stall the replies.

It sits between a client and a server on loopback and forwards bytes both ways; the
server→client direction can be shaped while it runs:

* ``delay``  seconds to wait before forwarding each piece of a reply;
* ``rate``   bytes per second the replies trickle at (None: as fast as they come);
* ``stall``  forward nothing back at all (the connection stays open, as a hung server's
  does) — the client's read timeout is what ends it.

Requests (client→server) are never shaped, so the server sees them and the test is about
the client's patience, not the server's. Every thread polls a stop flag with short
socket timeouts, so :meth:`SlowProxy.stop` ends everything within a second or two.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from types import TracebackType

_POLL = 0.2
_PIECE = 16384


class SlowProxy:
    """Forward ``127.0.0.1:port`` to ``upstream``; shape the replies as told."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = 0.0
        self.rate: float | None = None
        self.stall = False
        self.connections = 0
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(_POLL)
        self.port = int(self._listener.getsockname()[1])
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._spawn(self._accept_loop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def normal(self) -> None:
        """Stop shaping: forward replies as they come."""
        self.delay, self.rate, self.stall = 0.0, None, False

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            sockets = [*self._sockets, self._listener]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in list(self._threads):
            thread.join(timeout=10)

    def __enter__(self) -> SlowProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True,  # type: ignore[arg-type]
                                  name="slow-proxy")
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()      # upstream down: the client sees a reset, as it would
                continue
            for sock in (client, server):
                sock.settimeout(30)     # bounds sendall to a client that stopped reading
            with self._lock:
                self._sockets += [client, server]
                self.connections += 1
            self._spawn(self._pump, client, server, False)
            self._spawn(self._pump, server, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket, shaped: bool) -> None:
        try:
            while not self._stop.is_set():
                if shaped and self.stall:
                    time.sleep(_POLL)
                    continue
                readable, _, _ = select.select([src], [], [], _POLL)
                if not readable:
                    continue
                data = src.recv(_PIECE if not (shaped and self.rate) else
                                max(1, min(_PIECE, int(self.rate or _PIECE))))
                if not data:
                    break
                if shaped:
                    if self.delay:
                        self._stop.wait(self.delay)
                    if self.rate:
                        self._stop.wait(len(data) / self.rate)
                    while self.stall and not self._stop.is_set():
                        time.sleep(_POLL)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # Closing both ends passes an EOF or reset on, as a broken connection would.
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            src.close()     # each pump closes the socket it reads; the other pump, dst
