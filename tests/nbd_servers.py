"""NBD servers for the NBD target tests: real ones (nbdkit, qemu-nbd) and tiny fakes.

Every server listens on a Unix socket inside the test's ``tmp_path`` or on 127.0.0.1,
never anywhere else. Real servers run in their own process group and are stopped by
:class:`ServerGroup` (SIGTERM, then SIGKILL to the whole group); fake servers are
threads that :class:`ServerGroup` closes and joins. Use a group as a context manager or
from a fixture, so that nothing is left behind when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def require_binary(name: str) -> str:
    """The path of an external tool, or skip the test saying which one is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (needed for this NBD test)")
    return path


def free_tcp_port(host: str = LOOPBACK) -> int:
    """A loopback port nothing listens on right now (the server may race us for it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def tcp_authority(host: str, port: int | None) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class ServerProcess:
    """A real NBD server started by a test; ``uri`` is what a client connects to."""

    name: str
    argv: list[str]
    uri: str
    log: Path
    proc: subprocess.Popen[bytes]
    socket_path: Path | None = None
    port: int | None = None
    host: str = LOOPBACK

    def connect_probe(self) -> bool:
        try:
            if self.socket_path is not None:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(1.0)
                    s.connect(str(self.socket_path))
            else:
                assert self.port is not None
                with socket.create_connection((self.host, self.port), timeout=1.0):
                    pass
        except OSError:
            return False
        return True

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before serving: "
                    f"{self.log.read_text(errors='replace').strip()}"
                )
            if self.connect_probe():
                return
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not start listening within {timeout} s")

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers; wait for the process."""
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)
        # Children that outlived the leader (none expected) go too.
        self._signal_group(signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the process group at once: the server dies mid-conversation."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


class ServerGroup:
    """Owns the servers a test starts; :meth:`close` tears all of them down."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.processes: list[ServerProcess] = []
        self.fakes: list[FakeServerBase] = []
        self._count = 0

    def __enter__(self) -> ServerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fake in self.fakes:
            fake.close()
        for server in self.processes:
            if server.proc.poll() is None:
                server.stop()
        self.fakes.clear()
        self.processes.clear()

    def _endpoint(self, host: str | None) -> tuple[Path | None, int | None]:
        self._count += 1
        if host is not None:
            assert host in (LOOPBACK, "::1"), "test servers listen on loopback only"
            return None, free_tcp_port(host)
        path = self.tmp_path / f"nbd{self._count}.sock"
        # sun_path holds 108 bytes; pytest's tmp_path stays well below that.
        assert len(str(path)) < 100, f"socket path too long for AF_UNIX: {path}"
        return path, None

    def _start(
        self,
        name: str,
        argv: list[str],
        uri: str,
        *,
        sock: Path | None,
        port: int | None,
        host: str | None,
    ) -> ServerProcess:
        log = self.tmp_path / f"{name}{self._count}.log"
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as a whole
            )
        server = ServerProcess(name, argv, uri, log, proc, sock, port, host or LOOPBACK)
        self.processes.append(server)
        server.wait_ready()
        return server

    def nbdkit(
        self,
        plugin: str,
        *plugin_args: str,
        filters: Sequence[str] = (),
        readonly: bool = False,
        host: str | None = None,
        export: str = "",
        options: Sequence[str] = (),
    ) -> ServerProcess:
        """``nbdkit -f [--filter=F...] PLUGIN ARGS`` on a fresh Unix socket, or on a free
        port of ``host`` (127.0.0.1 or ::1) when given."""
        binary = require_binary("nbdkit")
        sock, port = self._endpoint(host)
        argv = [binary, "-f", "--exit-with-parent", *options]
        argv += [f"--filter={f}" for f in filters]
        if readonly:
            argv.append("--readonly")
        if host is not None:
            argv += ["-i", host, "-p", str(port)]
            uri = f"nbd://{tcp_authority(host, port)}/{export}"
        else:
            argv += ["-U", str(sock)]
            uri = f"nbd+unix:///{export}?socket={sock}"
        argv += [plugin, *plugin_args]
        return self._start("nbdkit", argv, uri, sock=sock, port=port, host=host)

    def qemu_nbd(
        self,
        image: Path,
        fmt: str = "raw",
        export: str | None = None,
        readonly: bool = False,
        host: str | None = None,
    ) -> ServerProcess:
        """``qemu-nbd`` serving ``image`` until stopped (``--persistent``)."""
        binary = require_binary("qemu-nbd")
        sock, port = self._endpoint(host)
        argv = [binary, "--persistent", "--shared=4", "-f", fmt, "--cache=writeback"]
        if export is not None:
            argv += ["-x", export]
        if readonly:
            argv.append("--read-only")
        if host is not None:
            argv += ["-b", host, "-p", str(port)]
            uri = f"nbd://{tcp_authority(host, port)}/{export or ''}"
        else:
            argv += ["-k", str(sock)]
            uri = f"nbd+unix:///{export or ''}?socket={sock}"
        argv.append(str(image))
        return self._start("qemu-nbd", argv, uri, sock=sock, port=port, host=host)

    def add_fake(self, fake: FakeServerBase) -> FakeServerBase:
        self.fakes.append(fake)
        fake.start()
        return fake


def qemu_img_read(source: str, tmp_path: Path, fmt: str = "raw") -> bytes:
    """Read a whole image or NBD export with ``qemu-img convert`` (not our client)."""
    binary = require_binary("qemu-img")
    out = tmp_path / "read-back.raw"
    out.unlink(missing_ok=True)
    subprocess.run(
        [binary, "convert", "-f", fmt, "-O", "raw", source, str(out)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_img_create(path: Path, size: int, fmt: str = "raw") -> Path:
    binary = require_binary("qemu-img")
    subprocess.run(
        [binary, "create", "-q", "-f", fmt, str(path), str(size)],
        check=True,
        timeout=30,
        capture_output=True,
    )
    return path


# --- fake servers (threads on a Unix socket) ---------------------------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
REP_ERR_UNSUP = (1 << 31) + 1
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC, NBD_CMD_FLUSH = 0, 1, 2, 3
NBD_EINVAL = 22


class FakeServerBase:
    """A one-thread server on a Unix socket; each connection is handled by ``serve``,
    then closed (unless ``keeps_connections``: a hung server holds them until close())."""

    keeps_connections = False

    def __init__(self, socket_path: Path, timeout: float = 10.0) -> None:
        assert len(str(socket_path)) < 100
        self.socket_path = socket_path
        self.timeout = timeout
        self.uri = f"nbd+unix:///?socket={socket_path}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(socket_path))
        self._listener.listen(4)
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self.errors: list[BaseException] = []
        #: set each time a connection has been served to its end
        self.served = threading.Event()

    def uri_for(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.socket_path}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(STOP_TIMEOUT)
        for conn in self._connections:
            conn.close()
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(self.timeout)
            try:
                self.serve(conn)
            except (OSError, EOFError):
                pass  # the client went away; that is its business
            except BaseException as exc:  # pragma: no cover - surfaced by tests
                self.errors.append(exc)
            if self.keeps_connections:
                self._connections.append(conn)
            else:
                conn.close()
            self.served.set()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def recv_exact(self, conn: socket.socket, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            if self._stop.is_set():
                raise EOFError
            try:
                chunk = conn.recv(n - len(data))
            except TimeoutError:
                continue
            if not chunk:
                raise EOFError
            data += chunk
        return bytes(data)


class SilentServer(FakeServerBase):
    """Accepts connections and never says a word (a hung server)."""

    keeps_connections = True

    def serve(self, conn: socket.socket) -> None:
        # Keep the connection open (it is closed by close()) and accept further ones.
        return


class GarbageServer(FakeServerBase):
    """Answers like a web server: not NBD at all."""

    def serve(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")


@dataclass
class OldServerLog:
    options: list[int] = field(default_factory=list)
    export_names: list[str] = field(default_factory=list)
    commands: list[tuple[int, int, int]] = field(default_factory=list)


class OldNbdServer(FakeServerBase):
    """A server from before NBD_OPT_GO: fixed newstyle (or plain newstyle when
    ``fixed=False``) that answers NBD_REP_ERR_UNSUP to every option but
    NBD_OPT_EXPORT_NAME, then serves simple READ/WRITE/FLUSH/DISC on a bytearray.

    ``go_error`` replaces NBD_REP_ERR_UNSUP by another option error (TLS_REQD, POLICY…).
    """

    def __init__(
        self,
        socket_path: Path,
        size: int,
        *,
        fixed: bool = True,
        go_error: int = REP_ERR_UNSUP,
        export: str = "",
    ) -> None:
        super().__init__(socket_path)
        self.data = bytearray(size)
        self.fixed = fixed
        self.go_error = go_error
        self.export = export
        self.log = OldServerLog()

    def serve(self, conn: socket.socket) -> None:
        handshake_flags = 0b11 if self.fixed else 0  # FIXED_NEWSTYLE | NO_ZEROES
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, handshake_flags))
        (client_flags,) = struct.unpack(">I", self.recv_exact(conn, 4))
        if client_flags & ~handshake_flags:
            return  # "the server MUST drop the TCP connection" on flags it did not offer
        while True:
            magic, option, length = struct.unpack(">QII", self.recv_exact(conn, 16))
            if magic != IHAVEOPT:
                return
            payload = self.recv_exact(conn, length)
            self.log.options.append(option)
            if option == OPT_EXPORT_NAME:
                name = payload.decode()
                self.log.export_names.append(name)
                if name != self.export:
                    return  # unknown export: all EXPORT_NAME can do is hang up
                reply = struct.pack(">QH", len(self.data), 1 | 1 << 2)  # HAS_FLAGS|FLUSH
                if not client_flags & 0b10:
                    reply += bytes(124)
                conn.sendall(reply)
                break
            if option == OPT_ABORT or not self.fixed:
                return
            conn.sendall(struct.pack(">QIII", OPTION_REPLY_MAGIC, option, self.go_error, 0))
        self._transmission(conn)

    def _transmission(self, conn: socket.socket) -> None:
        while True:
            header = self.recv_exact(conn, 28)
            magic, _flags, command, cookie, offset, length = struct.unpack(">IHHQQI", header)
            if magic != REQUEST_MAGIC:
                return
            self.log.commands.append((command, offset, length))
            if command == NBD_CMD_DISC:
                return
            error = 0
            if offset + length > len(self.data):
                error = NBD_EINVAL
            if command == NBD_CMD_WRITE:
                payload = self.recv_exact(conn, length)
                if not error:
                    self.data[offset : offset + length] = payload
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie))
            elif command == NBD_CMD_READ and not error:
                reply = struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie)
                conn.sendall(reply + bytes(self.data[offset : offset + length]))
            elif command == NBD_CMD_FLUSH:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie))
            else:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, NBD_EINVAL, cookie))


@contextlib.contextmanager
def server_group(tmp_path: Path) -> Iterator[ServerGroup]:
    group = ServerGroup(tmp_path)
    try:
        yield group
    finally:
        group.close()
