"""on-cbw-error with a real backup worker whose target fails (issue 7, item 3).

Under ``break-guest-write`` a guest write whose cluster could not be saved must fail
and leave the device unchanged -- even though the failing job clears ``needs_copy`` on
its way out -- and be counted as refused because of the target. With an NBD target the
worker must not answer a copy request before the server has acknowledged the write
(the client pipelines writes). Every test runs the real backup worker process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shmblock import stats as S
from shmblock.engine import DeviceHandle, Engine
from shmblock.errors import CopyBeforeWriteError
from shmblock.job import Outcome
from tests.nbd_servers import NBD_CMD_FLUSH, OldNbdServer, server_group
from tests.procs import stopped

MiB = 1 << 20
CLUSTER = 64 * 1024
SIZE = 8 * MiB


def guest_stats(dev: DeviceHandle) -> S.WriterStats:
    """The counters of the engine's own guest writer of ``dev`` (flushed now)."""
    io = dev._guest()
    io.flush_stats()
    return S.WriterStats.from_row(io.writer, dev.device.stats[io.writer])


def fill(dev: DeviceHandle, rng: np.random.Generator) -> np.ndarray:
    model = rng.integers(1, 256, SIZE, dtype=np.uint8)
    for off in range(0, SIZE, MiB):
        dev.write(off, model[off : off + MiB])
    return model


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tiny tmpfs (needs root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "shmblock-test",
                           str(where)], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True, timeout=30, check=False)


def write_until_refused(dev: DeviceHandle, model: np.ndarray, clusters: range,
                        value: int) -> list[int]:
    """One guest write per cluster, each needing copy-before-write, until the first is
    refused; returns the clusters whose writes went through. A write may only go through
    if its cluster was saved (request mode: the worker set ``saved``)."""
    through = []
    for c in clusters:
        assert dev.device.needs_copy[c] == 1
        data = np.full(4096, value, dtype=np.uint8)
        try:
            dev.write(c * CLUSTER, data)
        except CopyBeforeWriteError as exc:
            assert "could not save" in str(exc) or "did not save" in str(exc), exc
            break
        assert dev.device.saved[c] == 1, f"cluster {c} was written but never saved"
        model[c * CLUSTER : c * CLUSTER + 4096] = data
        through.append(c)
    else:
        raise AssertionError("no write was refused: the target never failed")
    assert np.array_equal(dev.device.data, model), "a refused write changed the device"
    return through


def test_nbd_write_error_fails_the_guest_write(tmp_path: Path) -> None:
    """The NBD server fails every write with EIO. The worker sends the copy-before-write
    save and must wait for the server's reply before answering: the guest write fails,
    the device is unchanged, the refusal is counted as a target error, the job fails.
    (Before: the write was answered as soon as it was sent, and went through.)"""
    rng = np.random.default_rng(1)
    with server_group(tmp_path) as servers, Engine() as engine:
        server = servers.nbdkit("memory", str(SIZE), "error=EIO", "error-pwrite-rate=100%",
                                filters=["error"])
        dev = engine.create_device(SIZE)
        model = fill(dev, rng)
        job = engine.backup(dev, server.uri, sync="none", cbw_mode="request",
                            cbw_timeout=10.0)
        through = write_until_refused(dev, model, range(3, 10), 0xAB)
        assert through == []
        result = job.wait(30.0)
        assert result.outcome is Outcome.FAILED
        assert "Input/output error" in result.error, result.error
        stats = guest_stats(dev)
        assert stats.errors == 1 and stats.target_errors == 1
        # The job is over: writes run free, nothing was lost.
        dev.write(3 * CLUSTER, np.zeros(4096, dtype=np.uint8))
        model[3 * CLUSTER : 3 * CLUSTER + 4096] = 0
        assert np.array_equal(dev.device.data, model)


@pytest.mark.parametrize("attempt", range(3))
def test_enospc_in_request_mode_fails_the_guest_write(tmp_path: Path, attempt: int) -> None:
    """A raw target on a nearly full file system: the copy-before-write save that hits
    ENOSPC fails its guest write, though the worker then ends the job and clears
    needs_copy (before, the write went through in 4 of 6 tries)."""
    rng = np.random.default_rng(10 + attempt)
    with tmpfs(tmp_path / "small", "1m") as small:
        target = small / "b.raw"
        with Engine() as engine:
            dev = engine.create_device(SIZE)
            model = fill(dev, rng)
            job = engine.backup(dev, str(target), sync="none", cbw_mode="request",
                                cbw_timeout=10.0)
            through = write_until_refused(dev, model, range(dev.device.clusters), 0xCD)
            assert 4 <= len(through) <= 16, through  # about 1 MiB of 64 KiB saves
            result = job.wait(30.0)
            assert result.outcome is Outcome.FAILED
            assert "No space left on device" in result.error, result.error
            stats = guest_stats(dev)
            assert stats.errors == 1 and stats.target_errors == 1
            assert not dev.device.needs_copy.any()
        assert os.listdir(small) == []


def test_broken_snapshot_stops_copy_before_write_at_once(tmp_path: Path) -> None:
    """break-snapshot: after the first write breaks the snapshot (the worker is stopped,
    so the save times out), later writes go through without waiting the timeout."""
    rng = np.random.default_rng(3)
    timeout = 0.5
    with Engine() as engine:
        dev = engine.create_device(SIZE)
        fill(dev, rng)
        job = engine.backup(dev, str(tmp_path / "b.raw"), sync="none", cbw_mode="request",
                            cbw_timeout=timeout, on_cbw_error="break-snapshot")
        with stopped(job.proc.pid):  # the worker answers nothing
            t0 = time.monotonic()
            dev.write(0, b"\x01" * 10)  # waits the timeout, then breaks the snapshot
            first = time.monotonic() - t0
            t0 = time.monotonic()
            for c in range(1, 9):
                dev.write(c * CLUSTER, b"\x02" * 10)
            rest = time.monotonic() - t0
        assert first >= timeout * 0.9
        assert rest < timeout, f"8 writes after the break took {rest:.2f} s"
        result = job.wait(30.0)
        assert result.outcome is Outcome.FAILED
        assert "broken" in result.error


# -- a long final flush is not a stuck worker ----------------------------------------------------


class _SlowFlushes:
    """A connection whose answer to NBD_CMD_FLUSH comes ``delay`` seconds late."""

    def __init__(self, conn: socket.socket, server: OldNbdServer, delay: float) -> None:
        self._conn, self._server, self._delay = conn, server, delay

    def sendall(self, data: bytes) -> None:
        commands = self._server.log.commands
        if commands and commands[-1][0] == NBD_CMD_FLUSH:
            time.sleep(self._delay)
        self._conn.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class SlowFlushServer(OldNbdServer):
    def __init__(self, socket_path: Path, size: int, delay: float) -> None:
        super().__init__(socket_path, size)
        self.delay = delay

    def serve(self, conn: socket.socket) -> None:
        super().serve(_SlowFlushes(conn, self, self.delay))  # type: ignore[arg-type]


def test_a_final_flush_longer_than_the_stuck_timeout_completes(tmp_path: Path) -> None:
    """The worker commits (NBD FLUSH) for 2.5 s, longer than the supervisor's stuck
    timeout of 1 s: its heartbeat goes on, so the job completes instead of the worker
    being killed as stuck (issue 7, smaller defects)."""
    with server_group(tmp_path) as servers, Engine() as engine:
        fake = servers.add_fake(SlowFlushServer(tmp_path / "slow.sock", SIZE, delay=2.5))
        assert isinstance(fake, SlowFlushServer)
        engine.stuck_timeout = 1.0
        dev = engine.create_device(SIZE)
        model = fill(dev, np.random.default_rng(4))
        t0 = time.monotonic()
        result = engine.backup(dev, fake.uri).wait(30.0)
        assert result.outcome is Outcome.COMPLETED, result.error
        assert time.monotonic() - t0 >= 2.5
        assert bytes(fake.data) == model.tobytes()
