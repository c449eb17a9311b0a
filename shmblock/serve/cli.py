"""``shmblock-run serve``: the QMP (and NBD) server until SIGTERM, Ctrl-C or ``quit``."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from shmblock.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qmp", metavar="PATH", required=True,
                   help="the QMP control socket to create (Unix socket, mode 0600)")
    p.add_argument("--qmp-tcp", metavar="HOST:PORT",
                   help="also listen for QMP on TCP (loopback only; port 0: any)")
    p.add_argument("--nbd", metavar="PATH|HOST:PORT",
                   help="start the NBD server at once (as nbd-server-start would)")
    p.add_argument("--max-clients", type=int, default=16, metavar="N",
                   help="QMP connections served at once (default 16)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line with the addresses once listening")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM, SIGINT or ``quit``; everything made is removed on the way out."""
    from shmblock.serve import Server, ready_line

    tcp = None
    if args.qmp_tcp:
        host, _, port = args.qmp_tcp.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--qmp-tcp {args.qmp_tcp!r}: expected HOST:PORT")
        tcp = (host.strip("[]"), int(port))
    server = Server(qmp_path=args.qmp, qmp_tcp=tcp, nbd=args.nbd,
                    max_clients=args.max_clients)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # A server's normal end: stop serving, clean up, exit 0 (not the CLI's
    # Interrupted, which would unwind from wherever the main thread is).
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    try:
        if args.json:
            print(ready_line(server), flush=True)
        while not stop.is_set() and not server.wait(0.2):
            pass
    finally:
        server.stop()
    return 0
