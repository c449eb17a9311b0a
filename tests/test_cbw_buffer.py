"""The copy-before-write buffer: producers, the drain, back-pressure, dead writers, options.

The protocol is in :mod:`shmblock.cbw_buffer`; these tests drive it with real writer
processes where the point is what another process (or the kernel, for a killed one)
does, and in-process where the point is one party's arithmetic.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shmblock import cbw_buffer
from shmblock import layout as L
from shmblock.claims import Claims
from shmblock.copier import Copier
from shmblock.device import Device, Geometry
from shmblock.engine import Engine
from shmblock.errors import UsageError
from shmblock.guest import GuestIO
from shmblock.job import Outcome
from shmblock.options import BackupOptions
from shmblock.targets import TargetSpec
from shmblock.targets.base import Buffer
from shmblock.targets.raw import RawTarget
from tests.helpers import CS, begin_job, new_device, pattern
from tests.procs import ROOT, pid_gone, run_cli, wait_until

N = 64
ENGINE_CLUSTER = 64 << 10  # the engine's default cluster size


class CountingTarget(RawTarget):
    """A raw target that records every write (offset, length)."""

    def __init__(self, path: str, size: int, cluster_size: int) -> None:
        super().__init__(path, size, cluster_size)
        self.writes: list[tuple[int, int]] = []

    def write(self, offset: int, data: Buffer) -> None:
        self.writes.append((offset, memoryview(data).nbytes))
        super().write(offset, data)


def fill(device: Device, seed: int = 7) -> bytes:
    content = pattern(device.size, seed)
    device.data[:] = np.frombuffer(content, np.uint8)
    device.allocated[:] = 1
    return content


@pytest.fixture
def device() -> Iterator[Device]:
    with new_device(Geometry(N * CS, cluster_size=CS, max_writers=4, buffer_slots=16)) as dev:
        yield dev


@pytest.fixture
def claims(device: Device) -> Iterator[Claims]:
    with Claims(device.meta_name) as c:
        yield c


# -- sizes and options ---------------------------------------------------------------------------


def test_limit_slots_rounds_up_and_refuses_more_than_the_device_has(device: Device) -> None:
    assert cbw_buffer.limit_slots(device, None) == 16
    assert cbw_buffer.limit_slots(device, 0) == 0
    assert cbw_buffer.limit_slots(device, 1) == 1  # a part of a cluster is a cluster
    assert cbw_buffer.limit_slots(device, 16 * CS) == 16
    with pytest.raises(UsageError, match=r"cbw-buffer .* is more than .*16 clusters"):
        cbw_buffer.limit_slots(device, 16 * CS + 1)


@pytest.mark.parametrize("bad", [-1, True, 1.5, "64K"])
def test_backup_options_refuse_a_bad_buffer_size(bad: object) -> None:
    with pytest.raises(UsageError, match="cbw-buffer"):
        BackupOptions(TargetSpec.parse("/tmp/x.raw"), cbw_buffer=bad)  # type: ignore[arg-type]


def test_configure_sets_the_limit_and_resets_the_statistics(device: Device) -> None:
    ctl = device.ctl
    for word in (L.CTL_BUF_PEAK, L.CTL_BUF_FALLBACKS, L.CTL_BUF_SAVES, L.CTL_BUF_FULL_NS):
        ctl[word] = 5
    cbw_buffer.configure(device, 4 * CS)
    stats = cbw_buffer.stats(device)
    assert stats == cbw_buffer.BufferStats(capacity_bytes=4 * CS, peak_bytes=0,
                                           full_seconds=0.0, saves=0, fallbacks=0)
    cbw_buffer.configure(device, None, "request")  # the request path uses no buffer
    assert int(ctl[L.CTL_BUF_LIMIT]) == 0
    with pytest.raises(UsageError, match="more than"):
        cbw_buffer.configure(device, 1 << 30)


def test_engine_refuses_a_buffer_larger_than_the_device_has(tmp_path: Path) -> None:
    with Engine() as engine:
        dev = engine.create_device(4 << 20)  # 64 clusters: the whole device
        opts = BackupOptions(TargetSpec.parse(str(tmp_path / "b.raw")), cbw_buffer=8 << 20)
        with pytest.raises(UsageError, match=r"cbw-buffer 8\.0 MiB is more than"):
            engine.create_backup(dev, opts)
        assert not engine.jobs, "the job was refused before its worker started"


def test_cli_refuses_a_bad_buffer_size(tmp_path: Path) -> None:
    proc = run_cli("run", "--size", "16M", "--writers", "1", "--duration", "0.2",
                   "--backup-at", "0.1", "--target", "t.raw", "--cbw-buffer", "12Q",
                   cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "cbw buffer" in proc.stderr and "12Q" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- back-pressure ---------------------------------------------------------------------------------


def test_backpressure_is_graded() -> None:
    """Nothing up to half full, then a delay growing with occupancy, no cliff."""
    f = cbw_buffer.backpressure_delay
    assert f(0.0) == f(0.25) == f(0.5) == 0.0
    levels = [0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]
    delays = [f(u) for u in levels]
    assert all(a < b for a, b in itertools.pairwise(delays))
    assert delays[-1] == cbw_buffer.BP_MAX_DELAY
    # graded: no step bigger than a third of the maximum between these levels
    assert max(b - a for a, b in itertools.pairwise(delays)) \
        < cbw_buffer.BP_MAX_DELAY / 3


def test_a_writers_cost_grows_with_occupancy(device: Device, claims: Claims) -> None:
    """Each save owes the delay of the occupancy its reservation found; the writer pays
    it in sleeps (after the claim is released), and the total grows with occupancy."""
    fill(device)
    owed: list[float] = []
    for held in (0, 8, 10, 12, 14):
        begin_job(device, "full")
        device.slot_state[:held] = L.SLOT_FULL  # other writers' saves, not drained yet
        slept: list[float] = []
        producer = cbw_buffer.Producer(device, 0, claims, sleep=slept.append)
        try:
            assert producer.save(20, time.monotonic() + 5)  # batch of one (16 slots)
            producer.pace()
            owed.append(producer.debt + sum(slept))
            assert producer.occupancy == (held + 1) / 16
        finally:
            producer.close()
    assert owed[0] == 0.0 and owed[1] > 0.0  # 9/16 is past half full
    assert all(a < b for a, b in itertools.pairwise(owed[1:])), owed


def test_debt_is_paid_in_real_sleeps_and_oversleep_is_credit(device: Device,
                                                            claims: Claims) -> None:
    fill(device)
    begin_job(device, "full")
    device.slot_state[:15] = L.SLOT_FULL
    producer = cbw_buffer.Producer(device, 0, claims)
    try:
        assert producer.save(20, time.monotonic() + 5)
        assert producer.debt == cbw_buffer.backpressure_delay(1.0)
        producer.pace()
        assert producer.slept >= cbw_buffer.BP_MAX_DELAY
        assert producer.debt <= 0.0  # slept at least what was owed
    finally:
        producer.close()


# -- the drain -------------------------------------------------------------------------------------


def test_drain_is_in_offset_order_with_one_write_per_run(device: Device, claims: Claims,
                                                         tmp_path: Path) -> None:
    before = fill(device)
    begin_job(device, "full")
    target = CountingTarget(str(tmp_path / "t.raw"), device.size, CS)
    copier = Copier(device, target, claims)
    try:
        copier.begin()
        # clusters in the order writers happened to save them, in scattered slots
        staged = {9: 7, 2: 3, 14: 4, 5: 5, 11: 12, 0: 13, 7: 6}
        for slot, c in staged.items():
            device.staging[slot] = device.data[c * CS : (c + 1) * CS]
            device.slot_cluster[slot] = c
            device.slot_state[slot] = L.SLOT_FULL
        # A live writer's reservation is not touched (a dead one's would be freed).
        alive = Claims(device.meta_name)
        assert alive.try_claim(cbw_buffer.ALIVE_BASE + 2)
        device.slot_state[1] = L.SLOT_HELD + 2
        assert copier.drain_staging() == 7
        alive.close()
        assert target.writes == [(3 * CS, 5 * CS), (12 * CS, 2 * CS)]
        state = device.slot_state.copy()
        assert state[1] == L.SLOT_HELD + 2
        state[1] = L.SLOT_FREE
        assert not state.any()
        assert device.ctl[L.CTL_BUF_SAVES] == 7 and copier.cbw_clusters == 7
        data = target.read(0, device.size)
        for c in range(3, 8):
            assert data[c * CS : (c + 1) * CS] == before[c * CS : (c + 1) * CS], c
        saved = device.saved.copy()
        assert saved[3:8].all() and saved[12:14].all() and saved.sum() == 7
    finally:
        copier.close()
        target.abort()


def test_drain_writes_a_cluster_saved_twice_once(device: Device, claims: Claims,
                                                 tmp_path: Path) -> None:
    """A writer killed between FULL and clearing the map leaves the cluster marked; a
    second save of it holds the same bytes. The drain writes it once, frees both."""
    before = fill(device)
    begin_job(device, "full")
    target = CountingTarget(str(tmp_path / "t.raw"), device.size, CS)
    copier = Copier(device, target, claims)
    try:
        copier.begin()
        for slot in (4, 9):
            device.staging[slot] = device.data[6 * CS : 7 * CS]
            device.slot_cluster[slot] = 6
            device.slot_state[slot] = L.SLOT_FULL
        assert copier.drain_staging() == 2
        assert target.writes == [(6 * CS, CS)]
        assert not device.slot_state.any()
        assert target.read(6 * CS, CS) == before[6 * CS : 7 * CS]
    finally:
        copier.close()
        target.abort()


def test_long_runs_are_split_at_the_gather_size(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shmblock.copier.DRAIN_RUN_BYTES", 3 * CS)
    with new_device(Geometry(N * CS, cluster_size=CS, max_writers=2, buffer_slots=16)) as dev, \
            Claims(dev.meta_name) as claims:
        before = fill(dev)
        begin_job(dev, "full")
        target = CountingTarget(str(tmp_path / "t.raw"), dev.size, CS)
        copier = Copier(dev, target, claims)
        try:
            copier.begin()
            for slot in range(8):
                c = 20 + 7 - slot  # reversed: the drain sorts them
                dev.staging[slot] = dev.data[c * CS : (c + 1) * CS]
                dev.slot_cluster[slot] = c
                dev.slot_state[slot] = L.SLOT_FULL
            assert copier.drain_staging() == 8
            assert target.writes == [(20 * CS, 3 * CS), (23 * CS, 3 * CS), (26 * CS, 2 * CS)]
            assert target.read(20 * CS, 8 * CS) == before[20 * CS : 28 * CS]
        finally:
            copier.close()
            target.abort()


def test_a_long_drain_lets_the_job_loop_serve_requests(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers that found the buffer full wait for copy requests: a drain of a full
    buffer stops every DRAIN_SERVICE_BYTES for the loop to serve them (not after its
    last run, and not in the final drain of finish())."""
    monkeypatch.setattr("shmblock.copier.DRAIN_SERVICE_BYTES", 3 * CS)
    with new_device(Geometry(N * CS, cluster_size=CS, max_writers=2, buffer_slots=16)) as dev, \
            Claims(dev.meta_name) as claims:
        fill(dev)
        begin_job(dev, "none")
        target = CountingTarget(str(tmp_path / "t.raw"), dev.size, CS)
        copier = Copier(dev, target, claims)
        calls: list[int] = []
        copier.between_runs = lambda: calls.append(len(target.writes))

        def stage(clusters: list[int]) -> None:
            for slot, c in enumerate(clusters):
                dev.staging[slot] = dev.data[c * CS : (c + 1) * CS]
                dev.slot_cluster[slot] = c
                dev.slot_state[slot] = L.SLOT_FULL

        try:
            copier.begin()
            stage([1, 3, 5, 7, 9, 11, 13])  # seven runs of one cluster
            assert copier.drain_staging() == 7
            assert calls == [3, 6]  # after 3 and 6 clusters; none after the last
            calls.clear()
            stage([20, 22, 24, 26])
            copier.finish("none")
            assert calls == [] and not dev.slot_state.any()
        finally:
            copier.close()
            target.abort()


# -- producers and the consumer, in real processes -------------------------------------

WRITER = """
import sys, time
from shmblock.device import Device
from shmblock.errors import CopyBeforeWriteError
from shmblock.guest import GuestIO
meta, writer, writers, clusters, cs = sys.argv[1], *map(int, sys.argv[2:6])
dev = Device.attach(meta)
io = GuestIO(dev, writer, "/nobody-listens")
retries = 0
for c in range(writer, clusters, writers):
    while True:
        try:
            io.write(c * cs + 100, bytes([0xA0 + writer]) * 200)
            break
        except CopyBeforeWriteError:  # the buffer is full and nobody serves requests
            retries += 1
            time.sleep(0.0005)
io.close()
dev.close()
print(retries)
"""


def spawn(code: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def reap(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


def test_writers_in_processes_and_the_worker_share_a_small_buffer(tmp_path: Path) -> None:
    """Three writer processes save every cluster of the device through an 8-slot buffer
    (falling back and retrying when it is full) while this process drains it: every old
    cluster reaches the target exactly once, with its snapshot contents."""
    geo = Geometry(N * CS, cluster_size=CS, max_writers=4, buffer_slots=8)
    with new_device(geo) as dev, Claims(dev.meta_name) as claims:
        before = fill(dev)
        begin_job(dev, "none")  # copy-before-write only: every save goes the buffer
        target = CountingTarget(str(tmp_path / "t.raw"), dev.size, CS)
        copier = Copier(dev, target, claims)
        procs = [spawn(WRITER, dev.meta_name, w, 3, N, CS) for w in range(3)]
        try:
            copier.begin()
            deadline = time.monotonic() + 120
            while any(p.poll() is None for p in procs):
                copier.drain_staging()
                assert time.monotonic() < deadline, "writers did not finish"
            outs = [p.communicate(timeout=30) for p in procs]
            assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
            copier.finish("none")
            assert not (dev.slot_state == L.SLOT_FULL).any()
            offsets = sorted(off for off, _ in target.writes)
            clusters = [o // CS for o, n in target.writes for o in range(o, o + n, CS)]
            assert sorted(clusters) == list(range(N)), "a cluster saved twice or never"
            assert offsets == sorted(set(offsets))
            assert target.read(0, dev.size) == before
            assert dev.ctl[L.CTL_BUF_SAVES] == N
            stats = cbw_buffer.stats(dev)
            assert stats.saves == N and stats.peak_bytes <= 8 * CS
            # Each writer also gave its unused reservations back when it closed.
            assert not dev.slot_state.any()
        finally:
            reap(procs)
            copier.close()
            target.abort()


HOLDER = """
import sys, time
from shmblock.device import Device
from shmblock.guest import GuestIO
meta, writer, cs, marked = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dev = Device.attach(meta)
io = GuestIO(dev, writer, "/nobody-listens")
io.write(2 * cs, b"\\x11" * 16)  # saved and published (FULL), then written
io.write(3 * cs, b"\\x11" * 16)
# A save cut short: the claim taken, needs_copy read as 1, a slot reserved and filled,
# never published -- the process dies here.
io._claims.claim(marked, 1, time.monotonic() + 5)
assert dev.needs_copy[marked] == 1
slot = io._buffer.reserve(time.monotonic() + 5)
dev.staging[slot] = 0xEE
print(slot, flush=True)
time.sleep(120)
"""


def test_a_writer_killed_while_holding_buffer_space(tmp_path: Path) -> None:
    """SIGKILL a writer holding published slots, a reserved one and a cluster claim: the
    published ones are drained, the reserved one is reclaimed (a live writer takes it
    when the buffer has no other room), the half-saved cluster is still marked and
    saved from the device: the backup is the snapshot, nothing leaks."""
    geo = Geometry(N * CS, cluster_size=CS, max_writers=4, buffer_slots=4)
    with new_device(geo) as dev, Claims(dev.meta_name) as claims:
        before = fill(dev)
        begin_job(dev, "full")
        child = spawn(HOLDER, dev.meta_name, 1, CS, 5)
        guest = GuestIO(dev, 0, "/nobody-listens")  # no reply queue: no request path
        target = CountingTarget(str(tmp_path / "t.raw"), dev.size, CS)
        copier = Copier(dev, target, claims)
        try:
            assert child.stdout is not None
            held = int(child.stdout.readline())
            assert dev.slot_state[held] == L.SLOT_HELD + 1
            assert int((dev.slot_state == L.SLOT_FULL).sum()) == 2
            assert not claims.try_claim(5)  # the child holds cluster 5
            child.send_signal(signal.SIGKILL)
            child.communicate(timeout=30)
            wait_until(lambda: pid_gone(child.pid), 10, what="the writer to die")
            assert claims.try_claim(5)  # the kernel dropped the claim...
            claims.release(5)
            assert dev.needs_copy[5] == 1  # ...and the cluster is still covered
            # A live writer: one free slot, then only the dead writer's reservation.
            guest.write(8 * CS, b"\x22")
            guest.write(9 * CS, b"\x22")  # fails without reclaiming (no request path)
            assert int((dev.slot_state == L.SLOT_FULL).sum()) == 4
            assert cbw_buffer.stats(dev).fallbacks == 0
            copier.begin()
            assert copier.drain_staging() == 4
            while not copier.background_done:
                copier.copy_next_chunk()
            copier.finish("full")
            assert not dev.slot_state.any(), "buffer space leaked"
            assert target.read(0, dev.size) == before
        finally:
            reap([child])
            guest.close()
            copier.close()
            target.abort()


def test_the_worker_frees_a_dead_writers_reservations(tmp_path: Path) -> None:
    geo = Geometry(N * CS, cluster_size=CS, max_writers=4, buffer_slots=4)
    with new_device(geo) as dev, Claims(dev.meta_name) as claims:
        fill(dev)
        begin_job(dev, "full")
        child = spawn(HOLDER, dev.meta_name, 2, CS, 5)
        target = RawTarget(str(tmp_path / "t.raw"), dev.size, CS)
        copier = Copier(dev, target, claims)
        try:
            assert child.stdout is not None
            held = int(child.stdout.readline())
            copier.begin()
            copier.drain_staging()  # the two published slots; the child is alive
            assert dev.slot_state[held] == L.SLOT_HELD + 2
            child.send_signal(signal.SIGKILL)
            child.communicate(timeout=30)
            copier._next_upkeep = 0.0  # the next look is due
            copier.drain_staging()
            assert not dev.slot_state.any()
        finally:
            reap([child])
            copier.close()
            target.abort()


# -- a whole job --------------------------------------------------------------------------


def test_a_full_buffer_falls_back_to_the_worker_and_the_backup_is_exact(tmp_path: Path) -> None:
    """Four first-touch writers and a one-cluster buffer: most saves find it full and go
    the request path; none fails, and the backup is the snapshot. The job reports it."""
    target = tmp_path / "b.raw"
    with Engine() as engine:
        dev = engine.create_device(16 << 20)
        procs = engine.start_writers(dev, 4, workload="first-touch", duration=60.0, seed=3)
        time.sleep(0.2)
        opts = BackupOptions(TargetSpec.parse(str(target)), speed=1 << 20, verify=True,
                             cbw_buffer=ENGINE_CLUSTER, cbw_timeout=30.0)
        job = engine.backup(dev, opts)
        wait_until(lambda: job.progress[0] >= 2 << 20, 60, what="some progress")
        job.set_speed(0)
        result = job.wait(120.0)
        assert all(w.alive for w in procs)
        engine.stop_writers()
        errors = [s.errors for s in engine.writer_stats(dev)]
    assert errors == [0] * 4
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    stats = result.cbw_buffer
    assert stats is not None
    assert stats.capacity_bytes == ENGINE_CLUSTER and 0 < stats.peak_bytes <= ENGINE_CLUSTER
    assert stats.saves > 0 and stats.fallbacks > 0
    assert stats.full_seconds > 0
    assert result.cbw_clusters >= stats.saves


def test_run_summary_reports_the_buffer(tmp_path: Path) -> None:
    proc = run_cli("run", "--size", "16M", "--writers", "2", "--duration", "1.0",
                   "--backup-at", "0.3", "--speed", "4M", "--target", "b.raw",
                   "--format", "raw", "--cbw-buffer", "256K", "--json", "s.json",
                   cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cbw buffer 256.0 KiB: peak" in proc.stdout
    summary = json.loads((tmp_path / "s.json").read_text())
    for found in (summary["cbw_buffer"], summary["backup"]["cbw_buffer"]):
        assert set(found) == {"capacity_bytes", "peak_bytes", "full_seconds", "saves",
                              "fallbacks"}
        assert found["capacity_bytes"] == 256 << 10
    assert os.path.exists(tmp_path / "b.raw")


class _PublishesWhileRead(np.ndarray[Any, Any]):
    """A slot-state array in which writer 3 publishes slot 0 (HELD+3 -> FULL) right
    after the first boolean-mask read: the interleaving a concurrent writer produces
    between two loads of the shared states."""

    published = False
    shared: np.ndarray[Any, Any] | None = None  # the "shared memory"

    def __getitem__(self, key: Any) -> Any:
        # After the mask was computed (from whichever copy), before the values are read.
        if isinstance(key, np.ndarray) and key.dtype == np.bool_ \
                and not _PublishesWhileRead.published:
            _PublishesWhileRead.published = True
            assert _PublishesWhileRead.shared is not None
            _PublishesWhileRead.shared[0] = L.SLOT_FULL
        return np.ndarray.__getitem__(self, key)


def test_reclaim_never_frees_a_slot_published_while_it_looks(device: Device,
                                                            claims: Claims) -> None:
    """Regression: reading the states twice turned a slot published in between into
    the mark FULL, whose writer (-1) has no alive lock, and every FULL slot of the
    buffer was freed undrained (found as 128 clusters missing from a verified backup)."""
    alive = Claims(device.meta_name)
    try:
        assert alive.try_claim(cbw_buffer.ALIVE_BASE + 3)  # writer 3 is alive
        states = np.array([L.SLOT_HELD + 3, L.SLOT_FULL, L.SLOT_FULL],
                          dtype=np.uint16).view(_PublishesWhileRead)
        _PublishesWhileRead.published = False
        _PublishesWhileRead.shared = states.view(np.ndarray)
        fake: Any = type("FakeDevice", (), {"slot_state": states})()
        # Called by writer 0, which found the buffer full.
        freed = cbw_buffer._reclaim_dead(fake, claims, own=0)
        assert freed == 0
        assert np.asarray(states).tolist() == [L.SLOT_FULL] * 3
    finally:
        alive.close()
