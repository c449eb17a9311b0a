"""Real processes, real shared memory, real queues: the engine end to end.

* Point in time (DESIGN.md invariant 1): guest-writer processes hammer the device while
  a backup is taken; the finished target equals the reference image the engine wrote at
  the snapshot instant, byte for byte, checked around our code (numpy on the raw file;
  ``qemu-img check`` and ``qemu-img convert`` for qcow2). The matrix is pairwise over
  workload × writer count × copy-before-write mode × target format × sync mode: every
  pair of values meets in some case, and every combination of the three two-valued
  factors occurs.
* The same through the Python API's own guest writes (``DeviceHandle.write``).
* Freeze (invariant 3): while the supervisor holds a freeze, nothing writes the device.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import posix_ipc
import pytest

import protocol
from protocol.messages import MAX_TEXT_CHARS
from shmblock import stats as S
from shmblock.engine import DeviceHandle, Engine
from shmblock.job import Outcome
from shmblock.names import RunNames
from shmblock.transport import (
    WRITER_CONTROL_RECEIVES,
    WRITER_QUEUE_BYTES,
    WRITER_QUEUE_MESSAGES,
    WRITER_REPLY_RECEIVES,
    Queue,
)
from shmblock.verify import SnapshotCapture
from tests.procs import (
    MiB,
    assert_same_image,
    needs_qemu_img,
    qcow2_as_raw,
    start_writer_stopping_in_write,
    stopped,
    unthrottle,
    wait_for_cbw,
    wait_until,
)

CLUSTER = 64 * 1024
# RLIMIT_MSGQUEUE of an unprivileged user by default (mq_overview(7)), and what the
# kernel charges per message slot on top of its size: a struct msg_msg and a
# posix_msg_tree_node, 48 bytes each on x86-64 (ipc/mqueue.c, mqueue_get_inode).
DEFAULT_RLIMIT_MSGQUEUE = 819200
MQ_SLOT_OVERHEAD = 96

# (workload, writers, cbw mode, target format, sync mode): a pairwise covering array.
POINT_IN_TIME_CASES = [
    ("random", 1, "stage", "raw", "top"),
    ("random", 2, "request", "raw", "full"),
    ("random", 4, "request", "qcow2", "full"),
    ("random", 8, "stage", "qcow2", "top"),
    ("sequential", 1, "request", "raw", "full"),
    ("sequential", 2, "stage", "qcow2", "full"),
    ("sequential", 4, "stage", "raw", "full"),
    ("sequential", 8, "request", "raw", "top"),
    ("zipf", 1, "request", "qcow2", "top"),
    ("zipf", 2, "request", "qcow2", "full"),
    ("zipf", 4, "request", "raw", "full"),
    ("zipf", 8, "stage", "qcow2", "full"),
    ("mixed", 1, "request", "qcow2", "top"),
    ("mixed", 2, "request", "qcow2", "top"),
    ("mixed", 4, "request", "raw", "top"),
    ("mixed", 8, "stage", "qcow2", "full"),
    ("first-touch", 1, "request", "raw", "full"),
    ("first-touch", 2, "request", "qcow2", "full"),
    ("first-touch", 4, "stage", "qcow2", "top"),
    ("first-touch", 8, "stage", "qcow2", "full"),
]


def target_as_raw(target: Path, fmt: str, tmp_path: Path) -> Path:
    """The finished backup as a raw file, read around our own code."""
    assert target.exists(), f"{target} was not committed"
    assert not Path(str(target) + ".part").exists()
    if fmt == "raw":
        return target
    return qcow2_as_raw(target, tmp_path / "converted.raw")


@needs_qemu_img
@pytest.mark.parametrize(("workload", "writers", "cbw_mode", "fmt", "sync"),
                         POINT_IN_TIME_CASES,
                         ids=["-".join(map(str, c)) for c in POINT_IN_TIME_CASES])
def test_point_in_time_with_writer_processes(tmp_path: Path, workload: str, writers: int,
                                             cbw_mode: str, fmt: str, sync: str) -> None:
    seed = POINT_IN_TIME_CASES.index((workload, writers, cbw_mode, fmt, sync)) + 1
    size = 32 * MiB
    # sync=top copies what was allocated at the snapshot: rate-limit the writers so that
    # usually only part of the device is allocated by then.
    rate = 1200.0 / writers if sync == "top" else 0.0
    target = tmp_path / f"backup.{fmt}"
    reference = tmp_path / "reference.raw"
    with Engine() as engine:
        dev = engine.create_device(size, max_writers=writers)
        procs = engine.start_writers(dev, writers, workload=workload, duration=60.0,
                                     rate=rate, seed=seed)
        time.sleep(0.25)
        # A slow background copy, so that writers meet clusters it has not reached yet;
        # once copy-before-write has saved some, let it run at full speed.
        job = engine.create_backup(dev, str(target), format=fmt, sync=sync,
                                   cbw_mode=cbw_mode, speed=2 * MiB, cbw_timeout=30.0,
                                   verify=True, reference_image=str(reference))
        job.start()
        wait_for_cbw(job, 4, timeout=30.0)
        time.sleep(0.1)
        unthrottle(job)
        assert job.tracker.wait(60.0), "the job did not conclude"
        alive_at_end = [w.alive for w in procs]
        result = job.wait(60.0)
        engine.stop_writers()
        stats = engine.writer_stats(dev)
        codes = [w.proc.returncode for w in procs]
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    assert all(alive_at_end), "the writers must still be writing when the job ends"
    assert codes == [0] * writers
    assert result.cbw_clusters > 0
    assert sum(s.cbw_saves + s.cbw_requests for s in stats) > 0
    if cbw_mode == "request":
        assert sum(s.cbw_saves for s in stats) == 0, "request mode never stages"
    assert all(s.ops > 0 and s.errors == 0 for s in stats)
    if sync == "top":
        # How much was allocated at the snapshot depends on timing; what sync=top leaves
        # out is proved by test_sync_top_covers_only_allocated_clusters.
        assert 0 < result.bytes_total <= size
    else:
        assert result.bytes_total == size
    assert_same_image(reference, target_as_raw(target, fmt, tmp_path))


def test_sync_top_covers_only_allocated_clusters(tmp_path: Path) -> None:
    """sync=top: clusters never written before the snapshot are neither copied nor saved."""
    size = 8 * MiB
    clusters = size // CLUSTER
    rng = np.random.default_rng(9)
    snapshot = np.zeros(size, dtype=np.uint8)
    target = tmp_path / "b.raw"
    with Engine() as engine:
        dev = engine.create_device(size)
        for c in range(0, clusters, 2):  # every even cluster allocated
            data = rng.integers(1, 256, CLUSTER, dtype=np.uint8)
            dev.write(c * CLUSTER, data)
            snapshot[c * CLUSTER : (c + 1) * CLUSTER] = data
        job = engine.backup(dev, str(target), sync="top", speed=CLUSTER, verify=True)
        for c in reversed(range(clusters)):  # all of them, after the snapshot
            dev.write(c * CLUSTER + 512, rng.integers(0, 256, 1024, dtype=np.uint8))
        unthrottle(job)
        result = job.wait(60.0)
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    assert result.bytes_total == size // 2
    assert result.clusters_copied == clusters // 2
    # The first background chunk (16 clusters, 8 marked) may go before the writes.
    assert clusters // 2 - 8 <= result.cbw_clusters <= clusters // 2
    expected = tmp_path / "snapshot.raw"
    snapshot.tofile(expected)
    assert_same_image(expected, target)


def test_point_in_time_sync_none(tmp_path: Path) -> None:
    """sync=none saves exactly the clusters overwritten during the job, as they were."""
    size = 32 * MiB
    target, reference = tmp_path / "b.raw", tmp_path / "ref.raw"
    with Engine() as engine:
        dev = engine.create_device(size, max_writers=2)
        fill(dev, np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8))
        procs = engine.start_writers(dev, 2, workload="random", duration=60.0, seed=21,
                                     rate=400.0)
        time.sleep(0.2)
        job = engine.backup(dev, str(target), sync="none", verify=True,
                            reference_image=str(reference))
        wait_for_cbw(job, 16)
        time.sleep(0.2)
        job.complete()
        result = job.wait(60.0)
        saved = dev.device.saved.astype(bool)
        assert all(w.alive for w in procs)
        engine.stop_writers()
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    clusters = size // CLUSTER
    assert 16 <= int(saved.sum()) < clusters, "only the overwritten clusters are saved"
    assert result.cbw_clusters == int(saved.sum())
    got = np.fromfile(target, dtype=np.uint8).reshape(clusters, CLUSTER)
    want = np.fromfile(reference, dtype=np.uint8).reshape(clusters, CLUSTER)
    assert np.array_equal(got[saved], want[saved])
    assert not got[~saved].any(), "clusters the job did not save must stay holes"


def fill(dev: DeviceHandle, data: np.ndarray) -> None:
    for off in range(0, data.size, MiB):
        dev.write(off, data[off : off + MiB])


@needs_qemu_img
@pytest.mark.parametrize(("cbw_mode", "fmt"), [("stage", "raw"), ("request", "qcow2")])
def test_point_in_time_with_api_guest_writes(tmp_path: Path, cbw_mode: str, fmt: str) -> None:
    """Writes through DeviceHandle.write after the snapshot never reach the backup."""
    size = 8 * MiB
    rng = np.random.default_rng(7)
    before = rng.integers(0, 256, size, dtype=np.uint8)
    before[3 * CLUSTER : 5 * CLUSTER] = 0  # some zero clusters in the snapshot, too
    expected_now = before.copy()
    target = tmp_path / f"backup.{fmt}"
    with Engine() as engine:
        dev = engine.create_device(size)
        fill(dev, before)
        # 64 KiB/s: the background copy saves about one cluster per second, so every
        # write below meets clusters it has not copied yet.
        job = engine.backup(dev, str(target), format=fmt, cbw_mode=cbw_mode,
                            speed=CLUSTER, verify=True)
        clusters = size // CLUSTER
        for i, c in enumerate(reversed(range(clusters))):
            # Alternate single-cluster writes and writes straddling two clusters.
            off = c * CLUSTER + (i % 16) * 4096 if i % 2 else max(c * CLUSTER - 2048, 0)
            data = rng.integers(0, 256, 4096, dtype=np.uint8)
            dev.write(off, data)
            expected_now[off : off + 4096] = data
        # The whole device again, in big writes that span many clusters.
        for off in range(0, size, 3 * CLUSTER + 4096):
            data = rng.integers(0, 256, min(3 * CLUSTER + 4096, size - off), dtype=np.uint8)
            dev.write(off, data)
            expected_now[off : off + data.size] = data
        assert job.state.value == "running", "the job must still run during the writes"
        unthrottle(job)
        result = job.wait(60.0)
        assert np.array_equal(np.frombuffer(dev.read(0, size), dtype=np.uint8), expected_now)
        assert not dev.device.needs_copy.any()
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    assert result.cbw_clusters >= clusters // 2
    snapshot = tmp_path / "snapshot.raw"
    before.tofile(snapshot)
    assert_same_image(snapshot, target_as_raw(target, fmt, tmp_path))


def test_freeze_quiesces_every_writer(tmp_path: Path) -> None:
    """Inside Engine.freeze neither writer processes nor API writers change the device."""
    with Engine() as engine:
        dev = engine.create_device(16 * MiB, max_writers=3)
        engine.start_writers(dev, 3, workload="random", duration=60.0, seed=3)
        stop = threading.Event()
        api_writes = [0]

        def api_writer() -> None:
            rng = np.random.default_rng(11)
            while not stop.is_set():
                dev.write(int(rng.integers(0, 4096)) * 4096,
                          rng.integers(0, 256, 4096, dtype=np.uint8))
                api_writes[0] += 1

        thread = threading.Thread(target=api_writer)
        thread.start()
        try:
            stats = dev.device.stats
            wait_until(lambda: bool((stats[:3, S.W_OPS] > 0).all()), 10.0,
                       what="every writer to write")
            def resumed(ops_before: np.ndarray, api_before: int) -> bool:
                return bool((stats[:3, S.W_OPS] > ops_before).all()) and \
                    api_writes[0] > api_before

            for _ in range(5):
                with engine.freeze([dev]):
                    first = dev.device.data.copy()
                    ops_first = stats[:3, S.W_OPS].copy()
                    api_first = api_writes[0]
                    time.sleep(0.1)
                    second = dev.device.data.copy()
                    assert np.array_equal(stats[:3, S.W_OPS], ops_first)
                    assert api_writes[0] == api_first
                assert np.array_equal(first, second), "the device changed during a freeze"
                # And after the thaw everyone writes again.
                wait_until(partial(resumed, ops_first, api_first), 10.0,
                           what="writers to resume")
            assert (stats[:3, S.W_FREEZES] == 5).all()
        finally:
            stop.set()
            thread.join(10.0)


def test_freeze_of_two_devices_waits_for_every_writer_of_both(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Writer 0 of one device out of its write does not count for writer 0 of another,
    which is stopped inside one."""
    with Engine() as engine:
        first = engine.create_device(8 * MiB, name="first", max_writers=1)
        second = engine.create_device(8 * MiB, name="second", max_writers=1)
        (w_first,) = engine.start_writers(first, 1, duration=60.0, seed=1)
        w_second = start_writer_stopping_in_write(engine, second, 200, monkeypatch,
                                                  duration=60.0, seed=2)
        with stopped(w_second.pid):  # stopped already; continued whatever happens
            resume = threading.Timer(0.3, os.kill, (w_second.pid, signal.SIGCONT))
            resume.start()
            t0 = time.monotonic()
            with engine.freeze([first, second]):
                waited = time.monotonic() - t0
                before = [first.device.data.copy(), second.device.data.copy()]
                time.sleep(0.1)
                after = [first.device.data.copy(), second.device.data.copy()]
            resume.join()
        assert waited >= 0.25, "the freeze did not wait for the second device's writer"
        assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
        assert w_first.alive and w_second.alive


def test_snapshot_capture_runs_with_writers_frozen(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup's snapshot is taken inside the freeze: two copies in it are identical."""
    original = SnapshotCapture.capture
    copies: list[np.ndarray] = []

    def capture_twice(self: SnapshotCapture) -> None:
        copies.append(self._device.data.copy())
        time.sleep(0.1)
        original(self)
        copies.append(self._device.data.copy())

    monkeypatch.setattr(SnapshotCapture, "capture", capture_twice)
    with Engine() as engine:
        dev = engine.create_device(16 * MiB, max_writers=2)
        engine.start_writers(dev, 2, workload="random", duration=60.0, seed=5)
        time.sleep(0.2)
        job = engine.backup(dev, str(tmp_path / "b.raw"), verify=True)
        result = job.wait(60.0)
        engine.stop_writers()
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    assert len(copies) == 2
    assert np.array_equal(copies[0], copies[1]), "writers wrote during the snapshot freeze"


def queue_charge(name: str) -> int:
    """Bytes of RLIMIT_MSGQUEUE that the queue ``name`` costs its user."""
    mq = posix_ipc.MessageQueue(name)
    try:
        return int(mq.max_messages) * (int(mq.max_message_size) + MQ_SLOT_OVERHEAD)
    finally:
        mq.close()


def test_a_sixteen_writer_run_fits_the_default_queue_memory(tmp_path: Path) -> None:
    """The queues of a run with 16 writers take a quarter of an unprivileged user's 800 KiB.

    DESIGN.md: design to the default queue limits, never require raising them. Queue
    memory is per user, so one run must leave room for others (tests run in parallel,
    a user runs a backup beside a benchmark).
    """
    target, reference = tmp_path / "b.raw", tmp_path / "ref.raw"
    with Engine() as engine:
        dev = engine.create_device(16 * MiB, max_writers=16)
        dev.write(0, np.ones(4096, dtype=np.uint8))  # the API's own guest I/O queue, too
        procs = engine.start_writers(dev, 16, workload="zipf", duration=60.0, seed=16)
        job = engine.backup(dev, str(target), cbw_mode="request", verify=True,
                            reference_image=str(reference))
        charged = sum(queue_charge(name) for name in engine.record.queues)
        result = job.wait(60.0)
        engine.stop_writers()
        codes = [w.proc.returncode for w in procs]
    assert len(engine.record.queues) == 2 + 2 * 16 + 1
    assert charged <= DEFAULT_RLIMIT_MSGQUEUE // 4, f"{charged} bytes of queues"
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    assert codes == [0] * 16
    assert_same_image(reference, target)


@pytest.mark.parametrize("kinds", [WRITER_REPLY_RECEIVES, WRITER_CONTROL_RECEIVES])
def test_long_text_is_cut_to_fit_a_writer_queue(kinds: tuple[type[protocol.Message], ...]
                                                ) -> None:
    """A writer's small queues still take any valid message; long free text is cut."""
    names = RunNames.new()
    name = names.writer_reply_queue("dev0", 0)
    text = "é" * MAX_TEXT_CHARS  # 2 bytes each in UTF-8: 2 KiB
    msg: protocol.Message = protocol.CopyDone(seq=1, cluster=2, count=1, ok=False, error=text) \
        if protocol.CopyDone in kinds else protocol.Shutdown(reason=text)
    with Queue.create(name, kinds, WRITER_QUEUE_MESSAGES, WRITER_QUEUE_BYTES) as owner, \
            Queue.attach(name) as sender:
        assert owner.max_message_size == WRITER_QUEUE_BYTES
        sender.send(msg, timeout=1.0)
        got = owner.receive(1.0)
    assert type(got) is type(msg)
    cut = got.error if isinstance(got, protocol.CopyDone) else \
        got.reason if isinstance(got, protocol.Shutdown) else ""
    assert cut.endswith("…") and text.startswith(cut[:-1])
    assert len(cut.encode()) > WRITER_QUEUE_BYTES - 64


def test_sync_none_verifies_what_it_saved_even_after_the_next_snapshot(
        tmp_path: Path) -> None:
    """What a sync=none job covers is read when it ends, not at wait(): the next job's
    snapshot clears the ``saved`` map, and verifying against that would check nothing
    (or call a good backup bad)."""
    size = 8 * MiB
    with Engine() as engine:
        dev = engine.create_device(size, max_writers=2)
        fill(dev, np.random.default_rng(6).integers(0, 256, size, dtype=np.uint8))
        job = engine.backup(dev, str(tmp_path / "none.raw"), sync="none", verify=True)
        for c in range(0, 24, 3):  # overwrite a few clusters: the job saves their old data
            dev.write(c * CLUSTER, b"\x5a" * CLUSTER)
        job.complete()
        assert job.tracker.wait(60.0), "the sync=none job did not end"
        saved = int(np.count_nonzero(dev.device.saved))
        assert saved == 8
        second = engine.backup(dev, str(tmp_path / "full.raw"), sync="full")
        second_result = second.wait(60.0)
        result = job.wait(60.0)
    assert second_result.outcome is Outcome.COMPLETED, second_result.error
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    assert job.covered is not None and int(job.covered.sum()) == saved


def test_threads_writing_first_at_once_share_one_guest_handle() -> None:
    """The engine's guest I/O is made on first use: threads whose first writes race
    must get the same one (two would both create the writer's reply queue)."""
    errors: list[BaseException] = []
    with Engine() as engine:
        for round_ in range(8):
            dev = engine.create_device(4 * MiB, max_writers=2, name=f"r{round_}")
            barrier = threading.Barrier(4)

            def first_write(i: int, dev: DeviceHandle = dev,
                            barrier: threading.Barrier = barrier) -> None:
                try:
                    barrier.wait(10.0)
                    dev.write(i * CLUSTER, bytes([i + 1]) * CLUSTER)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=first_write, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20.0)
            assert not errors, errors
            assert all(dev.read(i * CLUSTER, 1) == bytes([i + 1]) for i in range(4))
