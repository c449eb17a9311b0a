"""The NBD client target: conformance against real servers, pipelining, faults, URIs.

Servers (nbdkit, qemu-nbd, and small fakes from :mod:`tests.nbd_servers`) listen only on
Unix sockets under ``tmp_path`` or on 127.0.0.1, and are torn down by fixtures. Read-back
goes around our client: qemu-nbd is stopped and its image file read (``qemu-img convert``
for qcow2); ``nbdkit memory`` is read over a second NBD connection by ``qemu-img``.
"""

from __future__ import annotations

import abc
import gc
import mmap
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shmblock.errors import (
    TargetError,
    TargetIOError,
    TargetReadOnly,
    TargetTooSmall,
    TargetUnreachable,
    UsageError,
)
from shmblock.targets.base import Target
from shmblock.targets.nbd import NbdTarget, describe_nbd_error
from shmblock.targets.nbd_uri import NbdAddress, NbdUriError, parse_nbd_uri
from tests.nbd_servers import (
    GarbageServer,
    OldNbdServer,
    ServerGroup,
    ServerProcess,
    SilentServer,
    qemu_img_create,
    qemu_img_read,
    server_group,
)
from tests.target_conformance import CLUSTER, SIZE, TargetTests, pattern

#: Small, so that a broken fault path fails the test quickly instead of hanging it.
TIMEOUT = 5.0


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerGroup]:
    with server_group(tmp_path) as group:
        yield group


# --- conformance -------------------------------------------------------------------------


class NbdConformance(TargetTests, abc.ABC):
    """The shared suite against one kind of NBD server; subclasses start the server."""

    servers: ServerGroup
    server: ServerProcess
    targets: list[Target]

    @pytest.fixture(autouse=True)
    def _server_group(self, tmp_path: Path) -> Iterator[None]:
        self.targets = []
        with server_group(tmp_path) as group:
            self.servers = group
            try:
                yield
            finally:
                for target in self.targets:  # a failed test may leave one open
                    target.close()

    @abc.abstractmethod
    def start_server(self, tmp_path: Path, size: int) -> ServerProcess: ...

    def make_target(self, tmp_path: Path, size: int, cluster_size: int) -> Target:
        self.server = self.start_server(tmp_path, size)
        target = NbdTarget(self.server.uri, size, cluster_size, timeout=TIMEOUT)
        self.targets.append(target)
        return target

    def published(self, target: Target, tmp_path: Path) -> bool:
        # An NBD export has no temporary name and nothing is renamed on commit: whatever
        # was written is in the export, finished or not. Only the job outcome tells.
        return True

    def test_abort_leaves_no_finished_backup(self, tmp_path: Path) -> None:
        # Overrides the file-target version, which asserts that published() is False:
        # NBD cannot hide a partial backup (see published). What abort does promise:
        # it stops at once, lets go of the export, and the target refuses more writes.
        target = self.make_target(tmp_path, SIZE, CLUSTER)
        target.write(0, pattern(0))
        target.abort()
        with pytest.raises(TargetIOError, match="closed"):
            target.write(CLUSTER, pattern(1))
        target.close()
        again = NbdTarget(self.server.uri, SIZE, CLUSTER, timeout=TIMEOUT)
        again.close()

    def test_capabilities(self, tmp_path: Path) -> None:
        target = self.make_target(tmp_path, SIZE, CLUSTER)
        assert target.kind == "nbd"
        assert target.starts_zeroed is False
        assert isinstance(target, NbdTarget)
        assert target.punches_zeroes == target.export.can_write_zeroes
        assert target.describe() == self.server.uri
        target.close()


@pytest.mark.external
class TestNbdTargetNbdkitUnix(NbdConformance):
    def start_server(self, tmp_path: Path, size: int) -> ServerProcess:
        return self.servers.nbdkit("memory", f"size={size}")

    def read_back(self, target: Target, tmp_path: Path) -> bytes:
        return qemu_img_read(self.server.uri, tmp_path)


@pytest.mark.external
class TestNbdTargetNbdkitTcp(NbdConformance):
    def start_server(self, tmp_path: Path, size: int) -> ServerProcess:
        return self.servers.nbdkit("memory", f"size={size}", host="127.0.0.1")

    def read_back(self, target: Target, tmp_path: Path) -> bytes:
        return qemu_img_read(self.server.uri, tmp_path)


@pytest.mark.external
class TestNbdTargetQemuNbdRaw(NbdConformance):
    def start_server(self, tmp_path: Path, size: int) -> ServerProcess:
        self.image = qemu_img_create(tmp_path / "export.raw", size)
        return self.servers.qemu_nbd(self.image, "raw")

    def read_back(self, target: Target, tmp_path: Path) -> bytes:
        self.server.stop()
        return self.image.read_bytes()


@pytest.mark.external
class TestNbdTargetQemuNbdQcow2(NbdConformance):
    def start_server(self, tmp_path: Path, size: int) -> ServerProcess:
        self.image = qemu_img_create(tmp_path / "export.qcow2", size, "qcow2")
        return self.servers.qemu_nbd(self.image, "qcow2", export="backup")

    def read_back(self, target: Target, tmp_path: Path) -> bytes:
        self.server.stop()  # releases the image lock and closes the qcow2 cleanly
        return qemu_img_read(str(self.image), tmp_path, "qcow2")


# --- pipelining ----------------------------------------------------------------------------


@pytest.mark.external
def test_writes_are_pipelined(servers: ServerGroup, tmp_path: Path) -> None:
    size = 64 * CLUSTER
    server = servers.nbdkit("memory", f"size={size}")
    target = NbdTarget(server.uri, size, CLUSTER, timeout=TIMEOUT)
    expected = b"".join(pattern(c) for c in range(64))
    for c in range(64):
        target.write(c * CLUSTER, pattern(c))
    target.commit()
    assert target.peak_inflight > 1
    assert target.read(0, size) == expected
    target.close()
    assert qemu_img_read(server.uri, tmp_path) == expected


@pytest.mark.external
def test_pipelining_hides_server_latency(servers: ServerGroup) -> None:
    # Every write takes the server 100 ms. One at a time, 32 writes need 3.2 s; with 16
    # in flight (nbdkit runs them on parallel threads) they need about 0.2 s.
    size = 32 * CLUSTER
    server = servers.nbdkit("memory", f"size={size}", "delay-write=100ms", filters=["delay"])
    target = NbdTarget(server.uri, size, CLUSTER, timeout=TIMEOUT)
    started = time.monotonic()
    for c in range(32):
        target.write(c * CLUSTER, pattern(c))
    target.commit()
    elapsed = time.monotonic() - started
    target.close()
    assert target.peak_inflight == 16
    assert elapsed < 1.6, f"32 writes of 100 ms each took {elapsed:.2f} s: not pipelined"


@pytest.mark.external
def test_requests_honour_maximum_payload(servers: ServerGroup, tmp_path: Path) -> None:
    # blocksize-error-policy=error makes nbdkit fail any request over 128 KiB with
    # EINVAL, so 1 MiB writes succeed only if they are split.
    size = 64 * CLUSTER
    server = servers.nbdkit(
        "memory",
        f"size={size}",
        "blocksize-maximum=128K",
        "blocksize-error-policy=error",
        filters=["blocksize-policy"],
    )
    target = NbdTarget(server.uri, size, CLUSTER, timeout=TIMEOUT)
    assert target.export.maximum_payload == 128 * 1024
    run = b"".join(pattern(c) for c in range(16))
    target.write(0, run)
    target.write_zeroes(16 * CLUSTER, 48 * CLUSTER)
    target.commit()
    assert target.read(0, 16 * CLUSTER) == run
    target.close()
    assert qemu_img_read(server.uri, tmp_path) == run + bytes(48 * CLUSTER)


@pytest.mark.external
def test_minimum_block_larger_than_cluster_is_refused(servers: ServerGroup) -> None:
    server = servers.nbdkit(
        "memory",
        "size=1M",
        "blocksize-minimum=8K",
        "blocksize-preferred=8K",
        filters=["blocksize-policy"],
    )
    with pytest.raises(TargetError, match="minimum block size of 8192"):
        NbdTarget(server.uri, 1 << 20, 4096, timeout=TIMEOUT)


@pytest.mark.external
def test_zeroes_are_written_when_server_lacks_write_zeroes(
    servers: ServerGroup, tmp_path: Path
) -> None:
    size = 8 * CLUSTER
    server = servers.nbdkit("memory", f"size={size}", "zeromode=none", filters=["nozero"])
    target = NbdTarget(server.uri, size, CLUSTER, timeout=TIMEOUT)
    assert not target.punches_zeroes
    target.write(0, b"".join(pattern(c) for c in range(8)))
    target.write_zeroes(2 * CLUSTER, 4 * CLUSTER)  # must overwrite, not skip
    target.commit()
    target.close()
    data = qemu_img_read(server.uri, tmp_path)
    assert data[2 * CLUSTER : 6 * CLUSTER] == bytes(4 * CLUSTER)
    assert data[6 * CLUSTER :] == pattern(6) + pattern(7)


@pytest.mark.external
def test_ipv6_loopback(servers: ServerGroup, tmp_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    server = servers.nbdkit("memory", f"size={SIZE}", host="::1")
    assert server.uri.startswith("nbd://[::1]:")
    target = NbdTarget(server.uri, SIZE, CLUSTER, timeout=TIMEOUT)
    target.write(0, pattern(0))
    target.commit()
    assert target.read(0, CLUSTER) == pattern(0)
    target.close()


# --- handshake variants ------------------------------------------------------------------


def test_fallback_to_export_name_when_go_is_unsupported(
    servers: ServerGroup, tmp_path: Path
) -> None:
    fake = OldNbdServer(tmp_path / "old.sock", SIZE, export="disk")
    servers.add_fake(fake)
    target = NbdTarget(fake.uri_for("disk"), SIZE, CLUSTER, timeout=TIMEOUT)
    assert target.export.negotiated_with == "EXPORT_NAME"
    assert fake.log.options == [7, 1]  # NBD_OPT_GO refused, then NBD_OPT_EXPORT_NAME
    for c in (3, 1, 2):
        target.write(c * CLUSTER, pattern(c))
    target.write_zeroes(0, CLUSTER)  # no WRITE_ZEROES flag: sent as zero data
    target.commit()
    assert target.read(CLUSTER, 3 * CLUSTER) == pattern(1) + pattern(2) + pattern(3)
    target.close()
    assert fake.served.wait(TIMEOUT)  # the server saw the connection end
    assert bytes(fake.data[CLUSTER : 4 * CLUSTER]) == pattern(1) + pattern(2) + pattern(3)
    assert fake.log.commands[-1][0] == 2  # NBD_CMD_DISC
    assert not fake.errors


def test_plain_newstyle_server_gets_export_name_only(servers: ServerGroup, tmp_path: Path) -> None:
    fake = OldNbdServer(tmp_path / "plain.sock", SIZE, fixed=False)
    servers.add_fake(fake)
    target = NbdTarget(fake.uri, SIZE, CLUSTER, timeout=TIMEOUT)
    target.write(0, pattern(0))
    target.commit()
    target.close()
    assert fake.served.wait(TIMEOUT)
    assert fake.log.options == [1]
    assert bytes(fake.data[:CLUSTER]) == pattern(0)


def test_unknown_export_on_old_server(servers: ServerGroup, tmp_path: Path) -> None:
    fake = OldNbdServer(tmp_path / "old.sock", SIZE, export="disk")
    servers.add_fake(fake)
    started = time.monotonic()
    with pytest.raises(TargetUnreachable, match=r"closed the connection.*'other' does not exist"):
        NbdTarget(fake.uri_for("other"), SIZE, CLUSTER, timeout=TIMEOUT)
    assert time.monotonic() - started < 1.0  # the close is seen at once, no timeout


@pytest.mark.parametrize(
    ("go_error", "message"),
    [
        ((1 << 31) + 5, "requires TLS for export ''.*NBD_REP_ERR_TLS_REQD"),
        ((1 << 31) + 2, "refuses export '' by policy"),
        ((1 << 31) + 7, "is shutting down"),
        ((1 << 31) + 3, "refused export '' \\(NBD_REP_ERR_INVALID\\)"),
    ],
)
def test_go_errors_are_named(
    servers: ServerGroup, tmp_path: Path, go_error: int, message: str
) -> None:
    fake = OldNbdServer(tmp_path / "err.sock", SIZE, go_error=go_error)
    servers.add_fake(fake)
    with pytest.raises(TargetUnreachable, match=message):
        NbdTarget(fake.uri, SIZE, CLUSTER, timeout=TIMEOUT)
    # A refused handshake ends with a soft disconnect (NBD_OPT_ABORT).
    assert fake.served.wait(TIMEOUT)
    assert fake.log.options == [7, 2]


@pytest.mark.external
def test_nbdkit_without_fixed_newstyle(servers: ServerGroup, tmp_path: Path) -> None:
    server = servers.nbdkit("memory", f"size={SIZE}", options=["--mask-handshake=0"])
    target = NbdTarget(server.uri, SIZE, CLUSTER, timeout=TIMEOUT)
    assert target.export.negotiated_with == "EXPORT_NAME"
    target.write(CLUSTER, pattern(1))
    target.commit()
    target.close()
    assert qemu_img_read(server.uri, tmp_path)[CLUSTER : 2 * CLUSTER] == pattern(1)


@pytest.mark.external
def test_oldstyle_server_is_refused(servers: ServerGroup) -> None:
    server = servers.nbdkit("memory", f"size={SIZE}", options=["--oldstyle"])
    with pytest.raises(TargetUnreachable, match="oldstyle"):
        NbdTarget(server.uri, SIZE, CLUSTER, timeout=TIMEOUT)


# --- faults ----------------------------------------------------------------------------


def test_connection_refused() -> None:
    # A bound socket that does not listen: nothing can take the port, connects are refused.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(TargetUnreachable, match=f"connection refused at 127.0.0.1:{port}"):
            NbdTarget(f"nbd://127.0.0.1:{port}/x", SIZE, CLUSTER, timeout=TIMEOUT)
        assert time.monotonic() - started < TIMEOUT


def test_missing_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "absent.sock"
    with pytest.raises(TargetUnreachable, match=f"socket '{path}' does not exist"):
        NbdTarget(f"nbd+unix:///x?socket={path}", SIZE, CLUSTER, timeout=TIMEOUT)


def test_stale_unix_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # the file exists, nobody listens
        with pytest.raises(TargetUnreachable, match="connection refused"):
            NbdTarget(f"nbd+unix:///?socket={path}", SIZE, CLUSTER, timeout=TIMEOUT)


@pytest.mark.external
def test_unknown_export_name(servers: ServerGroup, tmp_path: Path) -> None:
    image = qemu_img_create(tmp_path / "named.raw", SIZE)
    server = servers.qemu_nbd(image, export="backup")
    uri = server.uri.replace("/backup?", "/other?")
    with pytest.raises(TargetUnreachable, match="export 'other' not found on NBD server"):
        NbdTarget(uri, SIZE, CLUSTER, timeout=TIMEOUT)
    # The soft disconnect left the server usable for the right name.
    NbdTarget(server.uri, SIZE, CLUSTER, timeout=TIMEOUT).close()


@pytest.mark.external
def test_export_smaller_than_device(servers: ServerGroup) -> None:
    server = servers.nbdkit("memory", "size=1M")
    with pytest.raises(TargetTooSmall, match=r"holds 1048576 bytes.*device \(2097152 bytes\)"):
        NbdTarget(server.uri, 2 << 20, CLUSTER, timeout=TIMEOUT)


@pytest.mark.external
@pytest.mark.parametrize("server_kind", ["qemu-nbd", "nbdkit"])
def test_read_only_export(servers: ServerGroup, tmp_path: Path, server_kind: str) -> None:
    if server_kind == "qemu-nbd":
        server = servers.qemu_nbd(qemu_img_create(tmp_path / "ro.raw", SIZE), readonly=True)
    else:
        server = servers.nbdkit("memory", f"size={SIZE}", readonly=True)
    with pytest.raises(TargetReadOnly, match="is read-only"):
        NbdTarget(server.uri, SIZE, CLUSTER, timeout=TIMEOUT)


@pytest.mark.external
def test_eio_on_every_request(servers: ServerGroup) -> None:
    server = servers.nbdkit(
        "memory", f"size={SIZE}", "error=EIO", "error-rate=1", filters=["error"]
    )
    target = NbdTarget(server.uri, SIZE, CLUSTER, timeout=TIMEOUT)
    target.write(CLUSTER, pattern(1))
    with pytest.raises(
        TargetIOError, match=r"failed WRITE at offset 65536 .*Input/output error \(EIO\)"
    ):
        target.commit()
    target.abort()
    target.close()


@pytest.mark.external
def test_enospc_fails_the_job_and_stays_failed(servers: ServerGroup) -> None:
    size = 64 * CLUSTER
    server = servers.nbdkit(
        "memory",
        f"size={size}",
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=1",
        filters=["error"],
    )
    target = NbdTarget(server.uri, size, CLUSTER, timeout=TIMEOUT)
    expected = (
        f"NBD server {re.escape(server.uri)} failed WRITE at offset \\d+ "
        r"\(65536 bytes\): No space left on device \(ENOSPC\)"
    )
    # The error surfaces from a later write (when the window fills) or from commit.
    with pytest.raises(TargetIOError, match=expected):
        for c in range(64):
            target.write(c * CLUSTER, pattern(c))
        target.commit()
    # Sticky: every later call reports the same failure; zeroes too.
    with pytest.raises(TargetIOError, match="ENOSPC"):
        target.write_zeroes(0, CLUSTER)
    with pytest.raises(TargetIOError, match="ENOSPC"):
        target.commit()
    target.abort()
    target.close()


@pytest.mark.external
@pytest.mark.parametrize("failure", ["error-reply", "server-killed"])
def test_failure_keeps_no_view_of_written_buffers(servers: ServerGroup, failure: str) -> None:
    # The backup worker writes straight from the device mapping, and closes the mapping
    # after the target: a failure must not keep those buffers exported, or closing the
    # device fails with BufferError. An exception object kept past its handler (as the
    # remembered failure, or through a reference cycle with a frame of its own traceback)
    # holds that traceback's frames, and so their memoryviews. The cyclic garbage
    # collector is off here, as it may well be at that moment in the worker.
    plugin_args = ["error=EIO", "error-pwrite-rate=1"] if failure == "error-reply" else []
    filters = ["error"] if failure == "error-reply" else []
    server = servers.nbdkit("memory", f"size={SIZE}", *plugin_args, filters=filters)
    target = NbdTarget(server.uri, SIZE, CLUSTER, timeout=TIMEOUT)
    region = mmap.mmap(-1, SIZE)
    view = memoryview(region)
    if failure == "server-killed":
        target.write(0, view[:CLUSTER])
        server.kill()
    failures = 0
    gc.disable()
    try:
        for c in range(1, SIZE // CLUSTER + 1):
            try:
                if c < SIZE // CLUSTER:
                    target.write(c * CLUSTER, view[c * CLUSTER : (c + 1) * CLUSTER])
                else:
                    target.commit()
            except TargetIOError:
                failures += 1
        assert failures >= 1
        target.abort()
        target.close()
        view.release()
        region.close()  # BufferError if anything still holds a view of the region
    finally:
        gc.enable()


@pytest.mark.external
def test_write_zeroes_error_is_named(servers: ServerGroup) -> None:
    server = servers.nbdkit(
        "memory", f"size={SIZE}", "error-zero=EPERM", "error-zero-rate=1", filters=["error"]
    )
    target = NbdTarget(server.uri, SIZE, CLUSTER, timeout=TIMEOUT)
    assert target.punches_zeroes
    target.write(0, pattern(0))
    target.write_zeroes(4 * CLUSTER, 2 * CLUSTER)
    with pytest.raises(
        TargetIOError,
        match=r"failed WRITE_ZEROES at offset 262144 \(131072 bytes\): "
        r"Operation not permitted \(EPERM\)",
    ):
        target.commit()
    target.close()


@pytest.mark.external
@pytest.mark.parametrize("server_kind", ["nbdkit", "qemu-nbd"])
def test_server_killed_mid_backup(servers: ServerGroup, tmp_path: Path, server_kind: str) -> None:
    size = 64 * CLUSTER
    if server_kind == "nbdkit":
        server = servers.nbdkit("memory", f"size={size}")
    else:
        server = servers.qemu_nbd(qemu_img_create(tmp_path / "k.raw", size))
    target = NbdTarget(server.uri, size, CLUSTER, timeout=TIMEOUT)
    for c in range(8):
        target.write(c * CLUSTER, pattern(c))
    target.commit()
    server.kill()
    started = time.monotonic()
    # A write may still land in the socket buffer; by commit at the latest it must fail.
    with pytest.raises(TargetIOError, match="closed the connection"):
        for c in range(8, 64):
            target.write(c * CLUSTER, pattern(c))
        target.commit()
    assert time.monotonic() - started < TIMEOUT
    with pytest.raises(TargetIOError, match="closed the connection"):
        target.commit()
    target.abort()
    target.close()


def test_silent_server_times_out(servers: ServerGroup, tmp_path: Path) -> None:
    fake = SilentServer(tmp_path / "silent.sock")
    servers.add_fake(fake)
    started = time.monotonic()
    with pytest.raises(TargetUnreachable, match=r"did not answer within 1 s"):
        NbdTarget(fake.uri, SIZE, CLUSTER, timeout=1.0)
    assert time.monotonic() - started < 3.0


@pytest.mark.external
def test_server_that_stops_answering_writes(servers: ServerGroup) -> None:
    server = servers.nbdkit("memory", f"size={SIZE}", "delay-write=30", filters=["delay"])
    target = NbdTarget(server.uri, SIZE, CLUSTER, timeout=1.0)
    target.write(0, pattern(0))
    started = time.monotonic()
    with pytest.raises(TargetIOError, match=r"did not answer within 1 s.*1 request unanswered"):
        target.commit()
    assert time.monotonic() - started < 3.0
    target.abort()
    target.close()
    server.kill()  # do not wait for the 30 s write to finish


def test_not_an_nbd_server(servers: ServerGroup, tmp_path: Path) -> None:
    fake = GarbageServer(tmp_path / "http.sock")
    servers.add_fake(fake)
    with pytest.raises(TargetUnreachable, match="is not an NBD server"):
        NbdTarget(fake.uri, SIZE, CLUSTER, timeout=TIMEOUT)


@pytest.mark.external
def test_closed_target_refuses_calls(servers: ServerGroup) -> None:
    server = servers.nbdkit("memory", f"size={SIZE}")
    target = NbdTarget(server.uri, SIZE, CLUSTER, timeout=TIMEOUT)
    target.close()
    for call in (
        lambda: target.write(0, pattern(0)),
        lambda: target.write_zeroes(0, CLUSTER),
        target.commit,
        lambda: target.read(0, CLUSTER),
    ):
        with pytest.raises(TargetIOError, match="is closed"):
            call()
    target.abort()
    target.close()


def test_bad_timeout_is_rejected() -> None:
    with pytest.raises(TargetError, match="timeout must be positive"):
        NbdTarget("nbd://127.0.0.1/x", SIZE, CLUSTER, timeout=0)


def test_nbd_error_descriptions() -> None:
    assert describe_nbd_error(28) == "No space left on device (ENOSPC)"
    assert describe_nbd_error(108) == "Server is in the process of being shut down (ESHUTDOWN)"
    assert "treated as EINVAL" in describe_nbd_error(2)


# --- URIs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("nbd://example.com/disk", NbdAddress("tcp", "example.com", 10809, None, "disk")),
        ("nbd://example.com", NbdAddress("tcp", "example.com", 10809, None, "")),
        ("nbd://example.com/", NbdAddress("tcp", "example.com", 10809, None, "")),
        ("nbd://example.com//disk", NbdAddress("tcp", "example.com", 10809, None, "/disk")),
        ("nbd://h/hello%20world", NbdAddress("tcp", "h", 10809, None, "hello world")),
        ("nbd://h/a+b", NbdAddress("tcp", "h", 10809, None, "a+b")),
        ("nbd://h/%C3%A9t%C3%A9", NbdAddress("tcp", "h", 10809, None, "été")),
        ("nbd://127.0.0.1:10810/x", NbdAddress("tcp", "127.0.0.1", 10810, None, "x")),
        ("nbd://127.0.0.1:/x", NbdAddress("tcp", "127.0.0.1", 10809, None, "x")),
        ("nbd://[::1]:1234/x", NbdAddress("tcp", "::1", 1234, None, "x")),
        ("nbd://[::1]", NbdAddress("tcp", "::1", 10809, None, "")),
        ("NBD://h/x", NbdAddress("tcp", "h", 10809, None, "x")),
        ("nbd://h/x?x-experiment=1", NbdAddress("tcp", "h", 10809, None, "x")),
        ("nbd+unix:///disk?socket=/tmp/s", NbdAddress("unix", None, None, "/tmp/s", "disk")),
        ("nbd+unix:///?socket=/tmp/s", NbdAddress("unix", None, None, "/tmp/s", "")),
        ("nbd+unix://?socket=s.sock", NbdAddress("unix", None, None, "s.sock", "")),
        (
            "nbd+unix:///a%2Fb?socket=/tmp/with%20space+plus",
            NbdAddress("unix", None, None, "/tmp/with space+plus", "a/b"),
        ),
        (
            "nbd+unix:///?socket=%00/abstract",
            NbdAddress("unix", None, None, "\0/abstract", ""),
        ),
    ],
)
def test_parse_valid_uris(uri: str, expected: NbdAddress) -> None:
    assert parse_nbd_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("nbds://h/x", "TLS is not supported"),
        ("nbds+unix:///x?socket=/s", "TLS is not supported"),
        ("nbd://h/x?tls-type=x509", "TLS is not supported"),
        ("http://h/x", "unknown URI scheme 'http'"),
        ("/tmp/disk.raw", "is not an NBD URI"),
        ("", "is not an NBD URI"),
        ("nbd:h/x", "expected nbd://"),
        ("nbd+unix:/x?socket=/s", "expected nbd\\+unix://"),
        ("nbd:///x", "needs a host"),
        ("nbd://h:0/x", "port '0' is not a number"),
        ("nbd://h:65536/x", "port '65536'"),
        ("nbd://h:ab/x", "port 'ab'"),
        ("nbd://::1/x", "malformed host"),
        ("nbd://[::1/x", "unterminated IPv6"),
        ("nbd://[nothost]/x", "not an IPv6 address"),
        ("nbd://[::1]x/y", "after the IPv6 address"),
        ("nbd://user@h/x", "user info"),
        ("nbd://h/x#frag", "fragments"),
        ("nbd://h/x?socket=/s", "only valid with nbd\\+unix"),
        ("nbd://h/x?color=blue", "unknown query parameter 'color'"),
        ("nbd://h/bad%zzescape", "malformed percent escape"),
        ("nbd://h/%ff", "not valid UTF-8"),
        ("nbd://h/a%00b", "NUL"),
        ("nbd://h/" + "x" * 4097, "longer than 4096 bytes"),
        ("nbd://h/a b", "spaces"),
        ("nbd+unix:///x", "needs a socket=PATH"),
        ("nbd+unix:///x?socket=", "is empty"),
        ("nbd+unix://host/x?socket=/s", "takes no host"),
        ("nbd+unix:///x?socket=/a&socket=/b", "given twice"),
        ("nbd+unix:///x?socket", "has no value"),
    ],
)
def test_parse_invalid_uris(uri: str, message: str) -> None:
    with pytest.raises(NbdUriError, match=message):
        parse_nbd_uri(uri)


def test_uri_errors_are_usage_and_target_errors() -> None:
    with pytest.raises(UsageError):
        parse_nbd_uri("nbds://h/x")
    with pytest.raises(TargetError):
        NbdTarget("nbds://h/x", SIZE, CLUSTER)


def test_address_endpoint_and_validation() -> None:
    assert parse_nbd_uri("nbd://[::1]:5/x").endpoint() == "[::1]:5"
    assert parse_nbd_uri("nbd://h/x").endpoint() == "h:10809"
    assert parse_nbd_uri("nbd+unix:///?socket=/s").endpoint() == "unix socket '/s'"
    with pytest.raises(ValueError, match="needs host and port"):
        NbdAddress("tcp", None, None, "/s", "")
    with pytest.raises(ValueError, match="needs socket_path"):
        NbdAddress("unix", "h", 1, None, "")
