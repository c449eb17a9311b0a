"""Helpers of the QMP tests: a server in the test process, qemu.qmp clients, events."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient

from shmblock.serve import Server

#: Generous: eight engineers share two cores.
EVENT_TIMEOUT = 120.0
MiB = 1 << 20


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a Unix socket path has at most 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="qmpt", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def running_server(**kwargs: Any) -> Iterator[tuple[Server, Path]]:
    with short_dir() as d:
        server = Server(qmp_path=str(d / "qmp.sock"), **kwargs)
        server.start()
        try:
            yield server, d
        finally:
            server.stop()


async def connect(path: Path | str) -> tuple[QMPClient, EventListener]:
    client = QMPClient("test")
    listener = EventListener()
    client.register_listener(listener)
    await client.connect(str(path))
    return client, listener


async def next_event(listener: EventListener, name: str, timeout: float = EVENT_TIMEOUT,
                     **data: Any) -> dict[str, Any]:
    """The next event called ``name`` whose data has ``data`` (others are skipped)."""
    async def find() -> dict[str, Any]:
        while True:
            ev: Any = await listener.get()
            if ev["event"] == name and all(ev.get("data", {}).get(k) == v
                                           for k, v in data.items()):
                return dict(ev)
    return await asyncio.wait_for(find(), timeout)


async def all_events(listener: EventListener, name: str, devices: set[str],
                     timeout: float = EVENT_TIMEOUT) -> dict[str, dict[str, Any]]:
    """One ``name`` event per job in ``devices``, in whatever order they come."""
    found: dict[str, dict[str, Any]] = {}

    async def collect() -> None:
        while set(found) != devices:
            ev: Any = await listener.get()
            if ev["event"] == name and ev["data"].get("device") in devices:
                found[ev["data"]["device"]] = dict(ev)
    await asyncio.wait_for(collect(), timeout)
    return found


async def statuses(listener: EventListener, job: str, until: str,
                   timeout: float = EVENT_TIMEOUT) -> list[str]:
    """JOB_STATUS_CHANGE statuses of ``job`` up to and including ``until``."""
    seen: list[str] = []

    async def collect() -> None:
        while True:
            ev: Any = await listener.get()
            if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["id"] == job:
                seen.append(ev["data"]["status"])
                if seen[-1] == until:
                    return
    await asyncio.wait_for(collect(), timeout)
    return seen


async def ex(client: QMPClient, cmd: str, args: dict[str, Any] | None = None) -> Any:
    """``client.execute``, typed for the tests (qemu.qmp returns ``object``)."""
    return await client.execute(cmd, args)


async def error_of(client: QMPClient, cmd: str, args: dict[str, Any] | None = None
                   ) -> tuple[str, str]:
    """(class, desc) of the error ``cmd`` must fail with."""
    try:
        await client.execute(cmd, args)
    except ExecuteError as exc:
        return exc.error.error.class_, exc.error.error.desc
    raise AssertionError(f"{cmd} {args} did not fail")


def raw_client(path: Path | str, timeout: float = 30.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    return buf
