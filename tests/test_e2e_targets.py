"""End to end: backups through the whole engine, judged by QEMU's and nbdkit's own tools.

Every test here runs the real engine — guest-writer and backup-worker processes, the
copy-before-write path, ``reference_image=`` written from the copy taken while the writers
were frozen — and then lets tools that share no code with shmblock decide whether the
backup is right:

* qcow2: ``qemu-img check`` (a valid image, no leaks, no corruption), ``qemu-img compare``
  against the reference image (identical contents, read through the backing chain when
  there is one), ``qemu-img map`` (holes stay unallocated, zero clusters are zero clusters,
  explicit clusters sit in the top layer) and ``qemu-img info --backing-chain``;
* NBD: ``qemu-nbd`` exporting a raw file and a qcow2 image, ``nbdkit memory``, over TCP on
  127.0.0.1 and over Unix sockets; what the export holds afterwards is read around our
  client (the file once qemu-nbd is stopped, ``qemu-img convert`` of the qcow2, a second
  NBD connection by ``qemu-img`` for nbdkit) and must equal the reference image. Exports
  start out full of garbage, so zero clusters must really be written;
* faults: nbdkit's ``error`` filter (EIO, ENOSPC) switched on mid-backup, a server killed
  mid-job, connection refused, an unknown export, an export smaller than the device, a
  read-only export, a full file system, a backup worker killed with SIGKILL. Each ends in
  a failed job whose message names the cause, with the device intact (a guest thread in
  this process writes known data through the copy-before-write path during the job and
  after it; the device must hold exactly that) and no shared memory left behind.

Devices are small (16-32 MiB) and writers short, so the whole module runs in about a
minute on two cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from shmblock.engine import BackupJob, DeviceHandle, Engine
from shmblock.errors import CopyBeforeWriteError, JobError, PeerGone, StateError
from shmblock.job import JobResult, Outcome
from shmblock.targets.qcow2 import Qcow2Target
from tests.conftest import leftovers
from tests.nbd_servers import LOOPBACK, ServerGroup, ServerProcess, free_tcp_port, server_group

MiB = 1 << 20
CLUSTER = 64 * 1024
SIZE = 32 * MiB
NBD_SIZE = 16 * MiB

BoolArray = npt.NDArray[np.bool_]


# --- tools ---------------------------------------------------------------------------------


def need(*tools: str) -> None:
    """Skip the test, naming the package, when an external tool is missing."""
    packages = {"qemu-img": "qemu-utils", "qemu-nbd": "qemu-utils", "nbdkit": "nbdkit"}
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt install {packages.get(tool, tool)})")


def tool(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return tool("qemu-img", *args)


def qemu_img_ok(*args: str) -> subprocess.CompletedProcess[str]:
    proc = qemu_img(*args)
    assert proc.returncode == 0, f"qemu-img {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc


def assert_check_ok(image: Path) -> None:
    """``qemu-img check`` exits 0 and finds nothing wrong (no leaks, no corruptions)."""
    out = qemu_img_ok("check", str(image)).stdout
    assert "No errors were found on the image." in out, out


def assert_identical(reference: Path, image: Path | str, image_format: str) -> None:
    """``qemu-img compare`` finds ``image`` identical to the raw ``reference``."""
    proc = qemu_img("compare", "-f", "raw", "-F", image_format, str(reference), str(image))
    assert proc.returncode == 0, f"qemu-img compare: {proc.stdout}{proc.stderr}"
    assert "Images are identical." in proc.stdout


@dataclass(frozen=True)
class ClusterMap:
    """``qemu-img map --output=json`` expanded to one entry per cluster."""

    present: BoolArray  # allocated in some layer of the chain
    zero: BoolArray  # reads as zeros
    data: BoolArray  # backed by data in a file
    depth: npt.NDArray[np.int64]  # 0 = the image itself, 1 = its backing file, ...


def cluster_map(image: Path, size: int) -> ClusterMap:
    entries = json.loads(qemu_img_ok("map", "--output=json", str(image)).stdout)
    n = size // CLUSTER
    present, zero, data = (np.zeros(n, dtype=np.bool_) for _ in range(3))
    depth = np.full(n, -1, dtype=np.int64)
    for e in entries:
        start, length = int(e["start"]), int(e["length"])
        assert start % CLUSTER == 0 and length % CLUSTER == 0, e
        span = slice(start // CLUSTER, (start + length) // CLUSTER)
        present[span], zero[span], data[span] = e["present"], e["zero"], e["data"]
        depth[span] = e["depth"]
    assert (depth >= 0).all(), "qemu-img map did not cover the whole image"
    return ClusterMap(present, zero, data, depth)


def nonzero_clusters(image: Path) -> BoolArray:
    """Which clusters of a raw image hold any non-zero byte."""
    data = np.fromfile(image, dtype=np.uint8)
    return np.asarray(data.reshape(-1, CLUSTER).any(axis=1), dtype=np.bool_)


def shmblock_run(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """The installed ``shmblock-run`` (the environment carries the test's name prefix)."""
    script = Path(sys.executable).with_name("shmblock-run")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "shmblock.cli"]
    proc = tool(*argv, *args, timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


# --- driving the engine --------------------------------------------------------------------


def backup_under_load(engine: Engine, dev: DeviceHandle, target: Path | str, reference: Path,
                      *, workload: str = "random", writers: int = 2, backup_at: float = 0.4,
                      rate: float = 0.0, seed: int = 1, **options: Any) -> JobResult:
    """Writers run ``workload``; ``backup_at`` s in, a verified backup is taken mid-run.

    The writers run until the job has concluded (however slow the machine is that day),
    then are stopped; every one of them must end cleanly.
    """
    started = time.monotonic()
    procs = engine.start_writers(dev, writers, workload=workload, rate=rate, seed=seed)
    job = engine.create_backup(dev, str(target), verify=True, reference_image=str(reference),
                               **options)
    time.sleep(max(started + backup_at - time.monotonic(), 0.0))
    job.start()
    result = job.wait(60)
    engine.stop_writers()
    assert [w.proc.returncode for w in procs] == [0] * writers
    assert all(w.ok for w in procs), [w.error for w in procs]
    return result


def assert_verified(result: JobResult) -> None:
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error


def wait_for_progress(job: BackupJob, at_least: int, timeout: float = 20.0) -> None:
    """Wait until the job has saved ``at_least`` bytes (it must still be running)."""
    deadline = time.monotonic() + timeout
    while job.progress[0] < at_least:
        assert not job.tracker.concluded, f"the job ended early: {job.tracker.error}"
        assert time.monotonic() < deadline, f"no progress in {timeout} s: {job.progress}"
        time.sleep(0.005)


def unthrottle(job: BackupJob) -> None:
    """Let a speed-limited job run to its end at full speed (if it is still running)."""
    with contextlib.suppress(StateError, PeerGone):
        job.set_speed(0)


class ModelGuest:
    """A guest writer in this process: known data through the API, and a model of the device.

    Writes go through :meth:`DeviceHandle.write`, the same copy-before-write path as the
    writer processes. A write refused with CopyBeforeWriteError must leave the device
    unchanged (on-cbw-error=break-guest-write), so the model skips it. At the end the whole
    device must equal the model: nothing the job did (or failed to do) changed guest data.
    """

    def __init__(self, dev: DeviceHandle, seed: int = 7) -> None:
        self.dev = dev
        self.rng = np.random.default_rng(seed)
        self.model = np.frombuffer(bytearray(dev.read(0, dev.size)), dtype=np.uint8)
        self.writes = 0
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-guest", daemon=True)
        self._errors: list[BaseException] = []

    def fill(self) -> None:
        """Random non-zero data over the whole device, cluster by cluster."""
        for c in range(self.dev.size // CLUSTER):
            self.write(c * CLUSTER, CLUSTER)

    def write(self, offset: int, length: int) -> None:
        data = self.rng.integers(1, 256, length, dtype=np.uint8)
        try:
            self.dev.write(offset, data.tobytes())
        except CopyBeforeWriteError:
            self.refused += 1
            return
        self.model[offset : offset + length] = data
        self.writes += 1

    def _run(self) -> None:
        blocks = self.dev.size // 4096
        try:
            while not self._stop.is_set():
                self.write(int(self.rng.integers(0, blocks)) * 4096, 4096)
                # A few hundred writes a second: enough to race the job, too few to
                # save every cluster by copy-before-write before a fault is injected.
                time.sleep(0.002)
        except BaseException as exc:  # surfaced by assert_intact()
            self._errors.append(exc)

    def __enter__(self) -> ModelGuest:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def assert_intact(self) -> None:
        """The device holds exactly what was written; guest writes still work."""
        assert not self._errors, self._errors
        assert self.writes > 0
        assert self.dev.read(0, self.dev.size) == self.model.tobytes()
        refused = self.refused
        for c in range(0, self.dev.size // CLUSTER, 7):
            self.write(c * CLUSTER + 4096, 8192)
        assert self.refused == refused, "a guest write was refused after the job ended"
        assert self.dev.read(0, self.dev.size) == self.model.tobytes()


def assert_failed(job: BackupJob, *causes: str) -> JobResult:
    result = job.wait(60)
    assert result.outcome is Outcome.FAILED, result
    for cause in causes:
        assert cause in result.error, f"{cause!r} not in {result.error!r}"
    return result


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerGroup]:
    with server_group(tmp_path) as group:
        yield group


@pytest.fixture(autouse=True)
def clean_exit(shm_prefix: str, mqueue_dir: Path | None,
               capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    """No shared memory or queue left once the test's engines are closed, and no worker
    died of a traceback (workers inherit our stderr; a crash there is a bug even when
    the job's result is right)."""
    yield
    assert not leftovers(shm_prefix, mqueue_dir)
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


# --- qcow2 under every workload ------------------------------------------------------------


@pytest.mark.external
@pytest.mark.parametrize(("workload", "via", "cbw_mode"), [
    ("random", "api", "stage"), ("sequential", "api", "request"), ("zipf", "cli", "stage"),
    ("mixed", "api", "request"), ("first-touch", "api", "stage"),
])
def test_qcow2_backup_under_load(tmp_path: Path, workload: str, via: str,
                                 cbw_mode: str) -> None:
    """Writers hammer the device; the qcow2 backup is valid and equals the reference.

    Both copy-before-write modes: writers staging old data themselves, and writers asking
    the backup worker to save it while they wait (``cbw_mode="request"``)."""
    need("qemu-img")
    image, reference = tmp_path / "b.qcow2", tmp_path / "r.raw"
    if via == "cli":
        summary = tmp_path / "s.json"
        proc = shmblock_run(
            "run", "--size", "32M", "--writers", "2", "--workload", workload,
            "--duration", "2.5", "--backup-at", "0.3", "--speed", "64M",
            "--cbw-mode", cbw_mode, "--format", "qcow2", "--target", str(image),
            "--reference-image", str(reference), "--json", str(summary), "--quiet")
        assert proc.returncode == 0, proc.stderr
        backup = json.loads(summary.read_text())["backup"]
        assert backup["outcome"] == "completed" and backup["verified"] is True, backup
        cbw = backup["cbw_clusters"]
    else:
        with Engine() as engine:
            dev = engine.create_device(SIZE)
            result = backup_under_load(engine, dev, image, reference, workload=workload,
                                       speed=64 * MiB, cbw_mode=cbw_mode)
        assert_verified(result)
        cbw = result.cbw_clusters
    assert cbw > 0, "no copy-before-write happened: the writers did not race the backup"
    assert_check_ok(image)
    assert_identical(reference, image, "qcow2")
    # Data clusters are data; clusters the snapshot holds as zeros are never stored as data.
    m = cluster_map(image, SIZE)
    has_data = nonzero_clusters(reference)
    assert (m.data == has_data).all()
    assert not (m.zero & has_data).any()


@pytest.mark.external
@pytest.mark.parametrize("workload", ["random", "first-touch"])
def test_qcow2_holes_and_zero_clusters(tmp_path: Path, workload: str) -> None:
    """Writers touch part of the device, some clusters hold zeros written through the API:
    never-written clusters stay unallocated, zero clusters are zero clusters, not data."""
    need("qemu-img")
    image, reference = tmp_path / "b.qcow2", tmp_path / "r.raw"
    clusters = SIZE // CLUSTER
    zeroed = np.arange(40, 72)  # written with zeros before the snapshot
    with Engine() as engine:
        dev = engine.create_device(SIZE)
        for c in range(8, 16):
            dev.write(c * CLUSTER, b"\xa5" * CLUSTER)
        for c in zeroed.tolist():
            dev.write(c * CLUSTER, bytes(CLUSTER))
        # Slow writers (about 300 writes in all over 512 clusters): many stay holes.
        result = backup_under_load(engine, dev, image, reference, workload=workload,
                                   rate=150, backup_at=0.3, speed=32 * MiB)
        ever_written = dev.device.allocated != 0
    assert_verified(result)
    assert_check_ok(image)
    assert_identical(reference, image, "qcow2")

    m = cluster_map(image, SIZE)
    has_data = nonzero_clusters(reference)
    never_written = ~ever_written
    assert never_written.sum() >= clusters // 8, "the writers left no holes to check"
    # Never written at all: unallocated (no data cluster, no zero cluster).
    assert not m.present[never_written].any()
    # Zeros written through the API (and not overwritten before the snapshot): zero
    # clusters, allocated as such, with no data behind them.
    still_zero = zeroed[~has_data[zeroed]]
    assert still_zero.size >= 8
    assert m.present[still_zero].all() and m.zero[still_zero].all()
    assert not m.data[still_zero].any()
    # Everything else the snapshot holds as zeros is not data either; data is data.
    assert (m.data == has_data).all()
    assert m.present[has_data].all()


# --- a backing chain through the engine ----------------------------------------------------


@pytest.mark.external
def test_qcow2_backing_chain(tmp_path: Path) -> None:
    """base.qcow2 (full), then thin.qcow2 over it with sync=full: every cluster explicit,
    zeros included, so nothing of the base shows through; the chain equals snapshot 2."""
    need("qemu-img")
    base, thin = tmp_path / "base.qcow2", tmp_path / "thin.qcow2"
    ref1, ref2 = tmp_path / "r1.raw", tmp_path / "r2.raw"
    probe = Qcow2Target(str(tmp_path / "probe.qcow2"), SIZE, CLUSTER)
    assert probe.starts_zeroed is True  # a fresh image reads as zeros: holes may stay
    probe.abort()
    with Engine() as engine:
        dev = engine.create_device(SIZE)
        first = backup_under_load(engine, dev, base, ref1, workload="random", seed=1,
                                  speed=64 * MiB)
        assert_verified(first)
        # A backing file means unknown contents below: the worker may skip nothing.
        probe = Qcow2Target(str(tmp_path / "probe.qcow2"), SIZE, CLUSTER,
                            backing_file="base.qcow2", backing_format="qcow2")
        assert probe.starts_zeroed is False
        probe.abort()
        # Clusters that hold data in the base are zeros in the second snapshot.
        for c in range(64, 192):
            dev.write(c * CLUSTER, bytes(CLUSTER))
        second = backup_under_load(engine, dev, thin, ref2, workload="random", seed=2,
                                   rate=300, backup_at=0.3, speed=32 * MiB,
                                   backing_file="base.qcow2", backing_format="qcow2")
    assert_verified(second)
    assert_check_ok(base)
    assert_identical(ref1, base, "qcow2")
    assert_check_ok(thin)
    assert_identical(ref2, thin, "qcow2")  # read through the chain

    chain = json.loads(qemu_img_ok("info", "--backing-chain", "--output=json",
                                   str(thin)).stdout)
    assert [Path(layer["filename"]).name for layer in chain] == ["thin.qcow2", "base.qcow2"]
    assert chain[0]["backing-filename"] == "base.qcow2"
    assert chain[0]["backing-filename-format"] == "qcow2"
    assert [layer["format"] for layer in chain] == ["qcow2", "qcow2"]

    # sync=full over a backing file: every cluster lives in thin itself (depth 0), and
    # the zero ones are explicit zero clusters, so the base's data cannot show through.
    m = cluster_map(thin, SIZE)
    assert (m.depth == 0).all() and m.present.all()
    zeros_now = ~nonzero_clusters(ref2)
    assert m.zero[zeros_now].all() and not m.data[zeros_now].any()
    hidden = zeros_now & nonzero_clusters(ref1)
    assert hidden.sum() >= 16, "too few base clusters were zeroed to prove anything"


# --- NBD: qemu-nbd (raw, qcow2) and nbdkit memory, over TCP and Unix sockets ----------------


@dataclass
class Export:
    server: ServerProcess
    kind: str
    image: Path | None

    def read_back(self, tmp_path: Path) -> bytes:
        """The export's contents, read around our NBD client."""
        out = tmp_path / "export-read.raw"
        if self.kind == "nbdkit-memory":
            # nbdkit memory vanishes with the server: read it over a second connection.
            qemu_img_ok("convert", "-f", "raw", "-O", "raw", self.server.uri, str(out))
            self.server.stop()
        else:
            self.server.stop()
            assert self.image is not None
            if self.kind == "qemu-nbd-qcow2":
                assert_check_ok(self.image)
                qemu_img_ok("convert", "-f", "qcow2", "-O", "raw", str(self.image), str(out))
            else:
                out = self.image
        return out.read_bytes()


def garbage(path: Path, size: int) -> Path:
    """A raw file of non-zero bytes: an export that does not start zeroed."""
    np.full(size, 0xA5, dtype=np.uint8).tofile(path)
    return path


def start_export(servers: ServerGroup, tmp_path: Path, kind: str, transport: str,
                 size: int = NBD_SIZE) -> Export:
    """An export of ``size`` bytes that starts out full of garbage."""
    host = LOOPBACK if transport == "tcp" else None
    junk = garbage(tmp_path / "junk.raw", size)
    if kind == "qemu-nbd-raw":
        image = junk.rename(tmp_path / "export.raw")
        return Export(servers.qemu_nbd(image, "raw", export="disk", host=host), kind, image)
    if kind == "qemu-nbd-qcow2":
        image = tmp_path / "export.qcow2"
        qemu_img_ok("convert", "-f", "raw", "-O", "qcow2", str(junk), str(image))
        return Export(servers.qemu_nbd(image, "qcow2", host=host), kind, image)
    server = servers.nbdkit("memory", str(size), host=host)
    qemu_img_ok("convert", "-n", "-f", "raw", "-O", "raw", str(junk), server.uri)
    return Export(server, kind, None)


@pytest.mark.external
@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("kind", ["qemu-nbd-raw", "qemu-nbd-qcow2", "nbdkit-memory"])
def test_nbd_backup(servers: ServerGroup, tmp_path: Path, kind: str, transport: str) -> None:
    """A backup under load to a real NBD server reads back identical to the reference."""
    need("qemu-img", "qemu-nbd", "nbdkit")
    export = start_export(servers, tmp_path, kind, transport)
    reference = tmp_path / "r.raw"
    with Engine() as engine:
        dev = engine.create_device(NBD_SIZE)
        # Slow writers keep many clusters zero: they must overwrite the export's garbage.
        # Over TCP the worker saves clusters on request, so NBD writes happen while a
        # guest write waits for them; over Unix sockets writers stage old data.
        result = backup_under_load(engine, dev, export.server.uri, reference, rate=300,
                                   backup_at=0.3, speed=16 * MiB,
                                   cbw_mode="request" if transport == "tcp" else "stage")
    assert_verified(result)
    assert result.cbw_clusters > 0
    assert (~nonzero_clusters(reference)).sum() >= 16, "no zero clusters to prove zeroing"
    assert export.read_back(tmp_path) == reference.read_bytes()


@pytest.mark.external
def test_nbd_backup_cli_to_qemu_nbd(servers: ServerGroup, tmp_path: Path) -> None:
    """``shmblock-run run --target nbd+unix:///...?socket=... --format nbd`` exits 0,
    verified; the file behind qemu-nbd is identical to the reference image."""
    need("qemu-img", "qemu-nbd")
    image = garbage(tmp_path / "export.raw", 32 * MiB)
    server = servers.qemu_nbd(image, "raw", export="backup")
    assert server.uri.startswith("nbd+unix:///backup?socket=")
    reference, summary = tmp_path / "r.raw", tmp_path / "s.json"
    proc = shmblock_run(
        "run", "--size", "32M", "--writers", "2", "--workload", "random", "--duration", "2.5",
        "--backup-at", "0.3", "--speed", "64M", "--target", server.uri, "--format", "nbd",
        "--reference-image", str(reference), "--json", str(summary))
    assert proc.returncode == 0, proc.stderr
    assert "verify   ok" in proc.stdout
    backup = json.loads(summary.read_text())["backup"]
    assert backup["outcome"] == "completed" and backup["verified"] is True, backup
    assert backup["format"] == "nbd"
    server.stop()
    assert_identical(reference, image, "raw")


# --- NBD faults mid-backup -----------------------------------------------------------------


@pytest.mark.external
@pytest.mark.parametrize(("errno_name", "words"), [
    ("EIO", "Input/output error (EIO)"), ("ENOSPC", "No space left on device (ENOSPC)"),
])
def test_nbd_server_errors_mid_backup(servers: ServerGroup, tmp_path: Path,
                                      errno_name: str, words: str) -> None:
    """nbdkit's error filter starts failing writes once the backup is under way."""
    need("nbdkit")
    trigger = tmp_path / "inject"
    args = [f"{op}{suffix}" for op in ("error-pwrite", "error-zero") for suffix in (
        f"={errno_name}", "-rate=100%", f"-file={trigger}")]
    server = servers.nbdkit("memory", str(NBD_SIZE), *args, filters=["error"])
    with Engine() as engine:
        dev = engine.create_device(NBD_SIZE)
        guest = ModelGuest(dev)
        guest.fill()
        with guest:
            job = engine.backup(dev, server.uri, speed=4 * MiB, cbw_timeout=2.0)
            wait_for_progress(job, 2 * MiB)  # the first writes went through
            trigger.touch()
            unthrottle(job)
            assert_failed(job, words, "WRITE")
        guest.assert_intact()
    assert "injecting" in server.log.read_text()


@pytest.mark.external
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_nbd_server_killed_mid_backup(servers: ServerGroup, tmp_path: Path,
                                      transport: str) -> None:
    need("qemu-nbd")
    image = garbage(tmp_path / "export.raw", NBD_SIZE)
    server = servers.qemu_nbd(image, "raw", host=LOOPBACK if transport == "tcp" else None)
    with Engine() as engine:
        dev = engine.create_device(NBD_SIZE)
        guest = ModelGuest(dev)
        guest.fill()
        with guest:
            job = engine.backup(dev, server.uri, speed=4 * MiB, cbw_timeout=2.0,
                                target_timeout=5.0)
            wait_for_progress(job, 2 * MiB)
            server.kill()
            unthrottle(job)
            assert_failed(job, "closed the connection")
        guest.assert_intact()


def failing_open_case(servers: ServerGroup, tmp_path: Path, case: str) -> tuple[str, str]:
    """(URI, words the error must contain) for a target that cannot be opened."""
    if case == "refused":
        port = free_tcp_port()
        return f"nbd://{LOOPBACK}:{port}/", "connection refused"
    if case == "unknown-export":
        image = garbage(tmp_path / "export.raw", NBD_SIZE)
        server = servers.qemu_nbd(image, "raw", export="disk", host=LOOPBACK)
        return server.uri.replace("/disk", "/nosuch"), "export 'nosuch' not found"
    if case == "too-small":
        server = servers.nbdkit("memory", str(NBD_SIZE // 2))
        return server.uri, f"holds {NBD_SIZE // 2} bytes, smaller than the device"
    image = garbage(tmp_path / "export.raw", NBD_SIZE)
    server = servers.qemu_nbd(image, "raw", readonly=True)
    return server.uri, "is read-only"


@pytest.mark.external
@pytest.mark.parametrize("case", ["refused", "unknown-export", "too-small", "read-only"])
def test_nbd_target_cannot_be_opened(servers: ServerGroup, tmp_path: Path,
                                     case: str) -> None:
    """The job fails before the snapshot, naming the cause; the device never notices."""
    need("qemu-nbd", "nbdkit")
    uri, words = failing_open_case(servers, tmp_path, case)
    with Engine() as engine:
        dev = engine.create_device(NBD_SIZE)
        guest = ModelGuest(dev)
        guest.fill()
        with guest:
            with pytest.raises(JobError, match="could not start") as raised:
                engine.create_backup(dev, uri, job_id="bad", target_timeout=5.0)
            assert words in str(raised.value)
            result = assert_failed(engine.jobs["bad"], words)
            assert result.bytes_written == 0
        guest.assert_intact()


@pytest.mark.external
@pytest.mark.parametrize("case", ["refused", "eio"])
def test_nbd_failures_through_the_cli(servers: ServerGroup, tmp_path: Path, case: str) -> None:
    """The CLI exits 1 with one line naming the cause, and leaves nothing behind."""
    need("nbdkit")
    if case == "refused":
        uri, words = f"nbd://{LOOPBACK}:{free_tcp_port()}/", "connection refused"
    else:
        server = servers.nbdkit("memory", "32M", "error=EIO", "error-pwrite-rate=100%",
                                filters=["error"])
        uri, words = server.uri, "Input/output error (EIO)"
    proc = shmblock_run("run", "--size", "32M", "--writers", "1", "--duration", "0.5",
                        "--backup-at", "0.2", "--target", uri, "--quiet")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    # One line from shmblock-run naming the cause (workers may log warnings before it).
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("shmblock-run: ") and words in last, proc.stderr


# --- file targets on a full file system ----------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "4m") -> Iterator[Path]:
    """A tiny tmpfs mounted at ``where`` (root only), unmounted afterwards."""
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = tool("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        if tool("umount", str(where)).returncode != 0:
            tool("umount", "-l", str(where))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_file_target_on_full_file_system(tmp_path: Path, fmt: str) -> None:
    """A 4 MiB file system, a 16 MiB device of data: ENOSPC fails the job, nothing left."""
    with small_tmpfs(tmp_path / "small") as small:
        target = small / f"b.{fmt}"
        with Engine() as engine:
            dev = engine.create_device(NBD_SIZE)
            guest = ModelGuest(dev)
            guest.fill()
            with guest:
                job = engine.backup(dev, str(target), format=fmt, cbw_timeout=2.0)
                assert_failed(job, "No space left on device", f"b.{fmt}.part")
            guest.assert_intact()
        assert not target.exists()
        assert list(small.iterdir()) == [], "a partial file was left behind"


# --- a killed backup never looks like a good one -------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_killed_backup_worker_leaves_no_good_looking_target(tmp_path: Path,
                                                            fmt: str) -> None:
    """SIGKILL the backup worker mid-job: no ``b.<fmt>``; the ``.part`` it would leave
    behind is refused by ``qemu-img``; the engine removes it; the job is failed."""
    if fmt == "qcow2":
        need("qemu-img")
    target = tmp_path / f"b.{fmt}"
    part = tmp_path / f"b.{fmt}.part"
    with Engine() as engine:
        dev = engine.create_device(SIZE)
        # Slow writers, slow job: copy-before-write alone cannot finish it before the kill.
        procs = engine.start_writers(dev, 2, workload="random", rate=100, seed=3)
        job = engine.backup(dev, str(target), format=fmt, speed=4 * MiB, cbw_timeout=1.0)
        wait_for_progress(job, 4 * MiB)
        pid = job.proc.pid
        # Stop it first, so the file can be copied exactly as a kill leaves it (SIGKILL
        # loses nothing already written: the page cache keeps it).
        os.kill(pid, signal.SIGSTOP)
        try:
            assert part.exists() and not target.exists()
            if fmt == "qcow2":
                left = tmp_path / "left.qcow2"
                shutil.copyfile(part, left)
                check = qemu_img("check", str(left))
                assert check.returncode != 0, check.stdout
                info = qemu_img("info", str(left))
                assert info.returncode != 0, info.stdout
        finally:
            os.kill(pid, signal.SIGKILL)
        assert_failed(job, "backup worker died", "killed by signal 9")
        assert not target.exists()
        assert not part.exists(), "the engine must remove the .part of a failed job"
        engine.stop_writers()
        assert [w.proc.returncode for w in procs] == [0, 0]
        # The writers were freed: guest writes go through, and land.
        data = bytes(range(256)) * (CLUSTER // 256)
        for c in range(0, SIZE // CLUSTER, 5):
            dev.write(c * CLUSTER, data)
        for c in range(0, SIZE // CLUSTER, 5):
            assert dev.read(c * CLUSTER, CLUSTER) == data


@pytest.mark.external
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_unfinished_backup_leaves_the_previous_one_alone(tmp_path: Path, fmt: str) -> None:
    """A backup to the name of an earlier one replaces it only by its final rename: killed
    mid-job, it leaves the earlier backup byte for byte as it was."""
    need("qemu-img")
    target, reference = tmp_path / f"b.{fmt}", tmp_path / "r.raw"
    with Engine() as engine:
        dev = engine.create_device(SIZE)
        guest = ModelGuest(dev)
        guest.fill()
        assert_verified(engine.backup(dev, str(target), format=fmt, verify=True,
                                      reference_image=str(reference)).wait(60))
        before = target.read_bytes()
        guest.fill()  # new contents, so a partial overwrite could not go unnoticed
        job = engine.backup(dev, str(target), format=fmt, speed=4 * MiB)
        wait_for_progress(job, 4 * MiB)
        os.kill(job.proc.pid, signal.SIGKILL)
        assert_failed(job, "killed by signal 9")
        guest.assert_intact()
    assert target.read_bytes() == before
    assert not (tmp_path / f"b.{fmt}.part").exists()
    if fmt == "qcow2":
        assert_check_ok(target)
    assert_identical(reference, target, fmt)
