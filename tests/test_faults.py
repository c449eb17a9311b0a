"""Faults in a live run: killed and stopped processes, garbage on every queue.

* No leaks (DESIGN.md invariant 5): a writer or the backup worker killed with SIGKILL,
  Ctrl-C to ``shmblock-run run``, SIGKILL of the ``shmblock-run`` supervisor itself
  (then ``shmblock-run cleanup``). The autouse fixture of conftest.py checks /dev/shm,
  the mqueue file system and the run registry after every test.
* A dead or stuck backup worker never hangs writers (invariant 6): SIGSTOP it and guest
  writes wait at most the copy-before-write timeout, then fail or break the snapshot,
  per policy; the stuck detection kills it and fails the job; the device stays intact.
* Bad input (invariant 7): malformed, truncated, oversized, unknown and unexpected
  messages sent with raw posix_ipc to every queue of a live run kill nobody, and the job
  still completes and verifies.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import msgpack
import numpy as np
import posix_ipc
import pytest

import protocol
from shmblock import freeze as freeze_module
from shmblock import layout as L
from shmblock import stats as S
from shmblock.engine import DeviceHandle, Engine
from shmblock.errors import CopyBeforeWriteError, PeerGone, UsageError
from shmblock.job import Outcome
from shmblock.names import list_records
from shmblock.options import BackupOptions
from shmblock.targets import TargetSpec
from shmblock.verify import SnapshotCapture
from tests.helpers import small_tmpfs
from tests.procs import (
    MiB,
    assert_same_image,
    children,
    cmdline,
    kill_tree,
    pid_gone,
    run_cli,
    start_cli,
    start_writer_stopping_in_write,
    stopped,
    unthrottle,
    wait_for_cbw,
    wait_until,
)

CLUSTER = 64 * 1024
U8 = np.uint8


def ops(dev: DeviceHandle, writers: int) -> np.ndarray:
    return dev.device.stats[:writers, S.W_OPS].copy()


def assert_writers_progress(dev: DeviceHandle, idents: list[int]) -> None:
    """Each writer in ``idents`` completes more writes from now on."""
    before = dev.device.stats[:, S.W_OPS].copy()
    wait_until(lambda: all(dev.device.stats[i, S.W_OPS] > before[i] for i in idents), 10.0,
               what=f"writers {idents} to keep writing")


def assert_job_released_device(dev: DeviceHandle) -> None:
    assert int(dev.device.ctl[L.CTL_JOB_ACTIVE]) == 0
    assert not dev.device.needs_copy.any(), "a concluded job left clusters marked"


def random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, n, dtype=U8)


def fill(dev: DeviceHandle, data: np.ndarray) -> None:
    for off in range(0, data.size, MiB):
        dev.write(off, data[off : off + MiB])


def no_partial(target: Path) -> None:
    assert not target.exists(), f"{target} exists after a failed job"
    assert not Path(str(target) + ".part").exists(), "the partial target was left behind"


# -- killed processes --------------------------------------------------------------------


@pytest.mark.parametrize("cbw_mode", ["stage", "request"])
def test_writer_sigkill_mid_job(tmp_path: Path, cbw_mode: str) -> None:
    """A writer killed mid-job: the job completes and verifies, the others write on."""
    target, reference = tmp_path / "b.raw", tmp_path / "ref.raw"
    with Engine() as engine:
        dev = engine.create_device(32 * MiB, max_writers=3)
        procs = engine.start_writers(dev, 3, workload="random", duration=60.0, seed=4)
        time.sleep(0.2)
        job = engine.backup(dev, str(target), speed=MiB // 4, cbw_mode=cbw_mode,
                            cbw_timeout=30.0, verify=True, reference_image=str(reference))
        wait_for_cbw(job, 4)
        procs[0].proc.kill()
        procs[0].proc.wait(10)
        assert job.state.value == "running"
        assert_writers_progress(dev, [1, 2])
        unthrottle(job)
        result = job.wait(60.0)
        assert procs[1].alive and procs[2].alive
        engine.stop_writers()
        codes = [w.proc.returncode for w in procs]
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    assert codes == [-signal.SIGKILL, 0, 0]
    assert_same_image(reference, target)


def test_backup_worker_sigkill_fails_job_and_frees_writers(tmp_path: Path) -> None:
    target = tmp_path / "b.raw"
    with Engine() as engine:
        dev = engine.create_device(32 * MiB, max_writers=2)
        procs = engine.start_writers(dev, 2, workload="random", duration=60.0, seed=2)
        time.sleep(0.2)
        job = engine.backup(dev, str(target), speed=MiB // 4, cbw_timeout=2.0, verify=True)
        wait_for_cbw(job, 4)
        worker = job.proc.pid
        os.kill(worker, signal.SIGKILL)
        result = job.wait(15.0)
        assert result.outcome is Outcome.FAILED
        assert "backup worker died" in result.error and "signal 9" in result.error, \
            result.error
        assert result.verified is None
        assert pid_gone(worker)
        no_partial(target)
        assert_job_released_device(dev)
        # The writers keep writing, and a guest write from here is fast and lands.
        assert_writers_progress(dev, [0, 1])
        data = np.full(8192, 0xA5, dtype=U8)
        t0 = time.monotonic()
        dev.write(CLUSTER - 4096, data)
        assert time.monotonic() - t0 < 0.5
        assert dev.read(CLUSTER - 4096, 8192) == data.tobytes()
        # The device can be backed up again (stale requests of the dead worker are
        # still in its queue), while the same writers run.
        second, reference = tmp_path / "again.raw", tmp_path / "ref.raw"
        job2 = engine.backup(dev, str(second), verify=True, reference_image=str(reference))
        result2 = job2.wait(60.0)
        assert all(w.alive for w in procs)
        engine.stop_writers()
        codes = [w.proc.returncode for w in procs]
        errors = [s.errors for s in engine.writer_stats(dev)]
    assert codes == [0, 0]
    assert errors == [0, 0], "guest writes failed although the map was released"
    assert result2.outcome is Outcome.COMPLETED, result2.error
    assert result2.verified is True, result2.verify_error
    assert_same_image(reference, second)


def test_device_intact_after_backup_worker_dies(tmp_path: Path) -> None:
    """Every guest write before, during and after the worker's death lands; none is lost."""
    size = 4 * MiB
    rng = np.random.default_rng(1)
    model = random_bytes(rng, size)
    target = tmp_path / "b.raw"
    with Engine() as engine:
        dev = engine.create_device(size)
        fill(dev, model)
        job = engine.backup(dev, str(target), speed=CLUSTER, cbw_mode="request",
                            cbw_timeout=1.0)

        def write(off: int, n: int) -> float:
            data = random_bytes(rng, n)
            t0 = time.monotonic()
            dev.write(off, data)
            model[off : off + n] = data
            return time.monotonic() - t0

        for c in (63, 62, 40):  # saved by the worker on request first
            write(c * CLUSTER + 100, 5000)
        os.kill(job.proc.pid, signal.SIGKILL)
        # Racing the supervisor's discovery of the death: waits, then goes through.
        assert write(30 * CLUSTER, 3 * CLUSTER) < 2.0
        result = job.wait(15.0)
        assert result.outcome is Outcome.FAILED
        assert_job_released_device(dev)
        for _ in range(200):
            off = int(rng.integers(0, size - 70000))
            assert write(off, int(rng.integers(1, 70000))) < 0.5
        assert np.array_equal(np.frombuffer(dev.read(0, size), dtype=U8), model)
        assert np.array_equal(dev.device.data, model)
    no_partial(target)


def test_late_wait_on_an_old_job_leaves_the_next_job_alone(tmp_path: Path) -> None:
    """Finalising job 1 after job 2 started touches neither job 2's map nor its file."""
    size = 4 * MiB
    rng = np.random.default_rng(3)
    snapshot = random_bytes(rng, size)
    with Engine() as engine:
        dev = engine.create_device(size)
        fill(dev, snapshot)
        first = engine.backup(dev, str(tmp_path / "first.raw"))
        assert first.tracker.wait(30.0)  # concluded, not yet waited for
        second = engine.backup(dev, str(tmp_path / "second.raw"), speed=CLUSTER, verify=True)
        assert first.wait(30.0).outcome is Outcome.COMPLETED
        assert dev.device.needs_copy[-1] == 1, "job 1's end cleared job 2's map"
        dev.write(size - CLUSTER, np.zeros(CLUSTER, dtype=U8))  # must save the old data
        unthrottle(second)
        result = second.wait(30.0)
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    expected = tmp_path / "snapshot.raw"
    snapshot.tofile(expected)
    assert_same_image(expected, tmp_path / "second.raw")


def test_retry_to_the_same_target_after_a_dead_worker(tmp_path: Path) -> None:
    """Job 1's worker dies; job 2 writes the same file; waiting on job 1 late is harmless."""
    size = 4 * MiB
    target = tmp_path / "b.raw"
    with Engine() as engine:
        dev = engine.create_device(size)
        fill(dev, random_bytes(np.random.default_rng(4), size))
        first = engine.backup(dev, str(target), speed=CLUSTER)
        os.kill(first.proc.pid, signal.SIGKILL)
        assert first.tracker.wait(15.0)
        second = engine.backup(dev, str(target), speed=CLUSTER, verify=True)
        wait_until(Path(str(target) + ".part").exists, 10.0, what="job 2's partial file")
        assert first.wait(15.0).outcome is Outcome.FAILED
        assert Path(str(target) + ".part").exists(), "job 1's end removed job 2's file"
        unthrottle(second)
        result = second.wait(30.0)
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a target file system that fills up (needs root to mount)."""
    with small_tmpfs(tmp_path, "2m") as mount:
        yield mount


@pytest.mark.parametrize("cbw_mode", ["stage", "request"])
def test_full_target_file_system(small_fs: Path, cbw_mode: str) -> None:
    """ENOSPC on the target fails the job with a clear reason; the device loses nothing."""
    size = 8 * MiB
    rng = np.random.default_rng(13)
    model = random_bytes(rng, size)
    target = small_fs / "b.raw"
    with Engine() as engine:
        dev = engine.create_device(size)
        fill(dev, model)
        job = engine.backup(dev, str(target), speed=2 * MiB, cbw_mode=cbw_mode,
                            cbw_timeout=5.0, verify=True)
        deadline = time.monotonic() + 60.0
        while not job.tracker.concluded:
            assert time.monotonic() < deadline, "the job did not fail on a full target"
            off = int(rng.integers(0, size - 4096))
            data = random_bytes(rng, 4096)
            try:
                dev.write(off, data)
            except CopyBeforeWriteError:
                pass  # break-guest-write: the device keeps the old data
            else:
                model[off : off + 4096] = data
        result = job.wait(30.0)
        assert result.outcome is Outcome.FAILED
        assert "No space left on device" in result.error, result.error
        assert_job_released_device(dev)
        dev.write(0, data)
        model[:4096] = data
        assert np.array_equal(dev.device.data, model), "the device lost or changed data"
    no_partial(target)
    assert os.listdir(small_fs) == []


# -- a stopped (stuck) backup worker ---------------------------------------------------------


@pytest.mark.parametrize("cbw_mode", ["stage", "request"])
def test_stopped_worker_break_guest_write(tmp_path: Path, cbw_mode: str) -> None:
    """Guest writes wait at most cbw_timeout, then fail and leave the device unchanged."""
    size, timeout = 8 * MiB, 0.5
    rng = np.random.default_rng(2)
    snapshot = random_bytes(rng, size)
    target = tmp_path / "b.raw"
    with Engine() as engine:
        dev = engine.create_device(size)
        fill(dev, snapshot)
        # A buffer of 16 clusters, so that it fills within the 40 writes.
        opts = BackupOptions(TargetSpec.parse(str(target)), speed=CLUSTER, cbw_mode=cbw_mode,
                             cbw_timeout=timeout, verify=True, cbw_buffer=16 * CLUSTER)
        job = engine.backup(dev, opts)
        succeeded: list[int] = []
        failed: list[tuple[int, float]] = []
        with stopped(job.proc.pid):
            for c in range(size // CLUSTER - 1, size // CLUSTER - 41, -1):
                t0 = time.monotonic()
                try:
                    dev.write(c * CLUSTER, np.full(4096, 0xEE, dtype=U8))
                except CopyBeforeWriteError:
                    failed.append((c, time.monotonic() - t0))
                    if len(failed) == 2:
                        break
                else:
                    succeeded.append(c)
            for c, elapsed in failed:
                assert timeout * 0.9 <= elapsed < timeout + 1.0, elapsed
                assert dev.read(c * CLUSTER, 4096) == snapshot[c * CLUSTER :][:4096].tobytes()
                assert dev.device.needs_copy[c] == 1
        if cbw_mode == "request":
            assert not succeeded, "no write can save a cluster through a stopped worker"
        else:
            # Writes save into the copy-before-write buffer; only when it is full does
            # a write need the worker.
            assert len(succeeded) == 16
        assert len(failed) == 2
        unthrottle(job)
        result = job.wait(60.0)
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    expected = tmp_path / "snapshot.raw"
    snapshot.tofile(expected)
    assert_same_image(expected, target)


def test_a_failed_guest_write_keeps_no_view_of_the_device(tmp_path: Path) -> None:
    """After CopyBeforeWriteError the device can still be closed: nothing pins its memory.

    A guest-writer process closes its device at exit and must not die on BufferError
    there (numpy views kept alive by a reference cycle through the exception). The
    garbage collector is off so that only plain reference counting frees things.
    """
    size = 4 * MiB
    gc.disable()
    try:
        with Engine() as engine:
            dev = engine.create_device(size)
            dev.write(0, np.ones(size, dtype=U8))
            maps = [dev.device._meta_map, dev.device._data_map]
            job = engine.backup(dev, str(tmp_path / "b.raw"), speed=CLUSTER,
                                cbw_mode="request", cbw_timeout=0.2)
            with stopped(job.proc.pid), pytest.raises(CopyBeforeWriteError):
                dev.write(size - 4096, np.zeros(4096, dtype=U8))
            unthrottle(job)
            assert job.wait(30.0).outcome is Outcome.COMPLETED
    finally:
        gc.enable()
    assert all(m is not None and m.closed for m in maps), "the device mapping stayed pinned"


def test_stopped_worker_break_snapshot(tmp_path: Path) -> None:
    """break-snapshot: the guest write goes through after the timeout, the job fails."""
    size, timeout = 4 * MiB, 0.5
    target = tmp_path / "b.raw"
    with Engine() as engine:
        dev = engine.create_device(size)
        fill(dev, np.full(size, 7, dtype=U8))
        job = engine.backup(dev, str(target), speed=CLUSTER, cbw_mode="request",
                            cbw_timeout=timeout, on_cbw_error="break-snapshot", verify=True)
        data = np.full(4096, 0x42, dtype=U8)
        with stopped(job.proc.pid):
            t0 = time.monotonic()
            dev.write(size - CLUSTER, data)
            elapsed = time.monotonic() - t0
        assert timeout * 0.9 <= elapsed < timeout + 1.0
        assert dev.read(size - CLUSTER, 4096) == data.tobytes()
        result = job.wait(30.0)
        assert result.outcome is Outcome.FAILED
        assert "snapshot is broken" in result.error, result.error
        assert_job_released_device(dev)
    no_partial(target)


def test_stuck_worker_is_killed_and_writers_run_on(tmp_path: Path) -> None:
    target, timeout = tmp_path / "b.raw", 0.5
    with Engine() as engine:
        engine.stuck_timeout = 1.0
        dev = engine.create_device(32 * MiB, max_writers=2)
        procs = engine.start_writers(dev, 2, workload="random", duration=60.0, seed=9)
        time.sleep(0.2)
        job = engine.backup(dev, str(target), speed=MiB // 4, cbw_mode="request",
                            cbw_timeout=timeout)
        wait_for_cbw(job, 2)
        worker = job.proc.pid
        t0 = time.monotonic()
        with stopped(worker):
            result = job.wait(20.0)
        assert time.monotonic() - t0 < 10.0
        assert result.outcome is Outcome.FAILED
        assert "stopped responding" in result.error, result.error
        assert pid_gone(worker)
        no_partial(target)
        assert_job_released_device(dev)
        assert_writers_progress(dev, [0, 1])
        engine.stop_writers()
        codes = [w.proc.returncode for w in procs]
        stats = engine.writer_stats(dev)
    assert codes == [0, 0]
    for s in stats:
        assert s.max_stall_s < timeout + 1.0, f"writer {s.writer} stalled {s.max_stall_s} s"


def test_worker_stuck_before_its_first_heartbeat_is_detected(tmp_path: Path) -> None:
    """A worker that stops before it ever beats is as stuck as one that stopped later."""
    with Engine() as engine:
        engine.stuck_timeout = 1.0
        dev = engine.create_device(4 * MiB)
        job = engine.create_backup(dev, str(tmp_path / "b.raw"), cbw_timeout=0.5)
        with stopped(job.proc.pid):
            job.start()
            result = job.wait(15.0)
        assert result.outcome is Outcome.FAILED
        assert "stopped responding" in result.error, result.error
        assert_job_released_device(dev)
        dev.write(0, np.ones(4096, dtype=U8))


def test_a_stopped_writer_fails_the_snapshot_in_bounded_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that never leaves its write: job start fails, nothing stays frozen."""
    monkeypatch.setattr(freeze_module, "FREEZE_TIMEOUT", 1.0)
    with Engine() as engine:
        dev = engine.create_device(16 * MiB, max_writers=2)
        procs = engine.start_writers(dev, 1, workload="random", duration=60.0, seed=12)
        procs.append(start_writer_stopping_in_write(engine, dev, 100, monkeypatch,
                                                    workload="random", duration=60.0,
                                                    seed=13))
        job = engine.create_backup(dev, str(tmp_path / "b.raw"))
        with stopped(procs[1].pid):  # stopped in a write already; continued at the end
            t0 = time.monotonic()
            with pytest.raises(PeerGone, match=r"writer 1 of dev0 .* stayed in a write"):
                job.start()
            assert time.monotonic() - t0 < 5.0
            assert_job_released_device(dev)
            assert_writers_progress(dev, [0])  # the other writer was thawed
        result = job.wait(30.0)
        assert result.outcome is Outcome.CANCELLED
        no_partial(tmp_path / "b.raw")
        assert_writers_progress(dev, [0, 1])  # and the stopped one resumes when continued
        # The device can still be backed up.
        again = engine.backup(dev, str(tmp_path / "again.raw"), verify=True)
        assert again.wait(60.0).verified is True
        engine.stop_writers()
        assert [w.proc.returncode for w in procs] == [0, 0]


# -- bad input on every queue -----------------------------------------------------------------


def bad_messages(max_size: int) -> list[tuple[str, bytes]]:
    """Bytes no receiver may accept, the largest as large as the queue allows."""
    valid = protocol.encode(protocol.JobProgress(job="job1", done=1, total=2))
    return [
        ("garbage", b"\xc1\xff\x00garbage"),
        ("empty", b""),
        ("truncated", valid[:-3]),
        ("trailing", valid + b"\x00"),
        ("oversized", b"\xdb" + b"\xff" * (max_size - 1)),
        ("oversized-string", msgpack.packb([1, 7, "x" * (max_size - 20), 1, 1])),
        ("unknown-type", msgpack.packb([protocol.PROTOCOL_VERSION, 99, 1, 2])),
        ("wrong-version", msgpack.packb([99, 1, 5])),
        ("bad-field", msgpack.packb([protocol.PROTOCOL_VERSION, 4, -1, 1, 1, 1])),
        ("not-an-array", msgpack.packb({"type": 1})),
        # 1000 arrays deep (1 KiB; as deep as a writer's small queue allows): decode
        # used to raise RecursionError building its error text, which killed whichever
        # loop received it. Whole, as the version, as a field.
        ("deeply-nested", b"\x91" * min(1000, max_size - 1) + b"\x00"),
        ("deeply-nested-version", b"\x92" + b"\x91" * min(1000, max_size - 3) + b"\x00\x07"),
        ("deeply-nested-field", b"\x95\x01\x07" + b"\x91" * min(1000, max_size - 8)
         + b"\x00\x01\x01"),
    ]


def unexpected_messages(queue: str) -> list[protocol.Message]:
    """Valid messages that have no business on ``queue`` (or name nothing that exists)."""
    if queue == "sup":
        # The job's outcome forged for the real job (job1), without its token or with a
        # wrong one: only the job's own worker may report it.
        return [protocol.Freeze(epoch=1), protocol.CopyRequest(writer=0, seq=1, cluster=0,
                                                               count=1),
                protocol.JobCompleted(job="nosuchjob", bytes_written=1, clusters_copied=1,
                                      cbw_clusters=1),
                protocol.JobCompleted(job="job1", bytes_written=1, clusters_copied=1,
                                      cbw_clusters=1),
                protocol.JobFailed(job="job1", error="forged", token="0" * 32),
                protocol.JobCancelled(job="job1", token="f" * 32),
                protocol.JobProgress(job="job1", done=2**62, total=2**62),
                protocol.WriterDone(writer=4000, ok=True, error="")]
    if queue == "bk":
        # Control of the real job without its token: only the supervisor may steer it.
        return [protocol.CopyDone(seq=1, cluster=0, count=1, ok=True, error=""),
                protocol.Cancel(job="nosuchjob"), protocol.Pause(job="nosuchjob"),
                protocol.Pause(job="job1"), protocol.Cancel(job="job1", token="0" * 32),
                protocol.Complete(job="job1"), protocol.Shutdown(reason="forged"),
                protocol.CopyRequest(writer=4000, seq=1, cluster=2**40, count=1)]
    if queue == "ctl":
        return [protocol.JobStart(job="job1", sync="full", speed=0),
                protocol.Thaw(epoch=10**9), protocol.CopyDone(seq=1, cluster=0, count=1,
                                                               ok=True, error="")]
    return [protocol.CopyDone(seq=2**62, cluster=0, count=1, ok=False, error="spoof"),
            protocol.Freeze(epoch=5), protocol.JobFailed(job="job1", error="spoof")]


def drained(mq: posix_ipc.MessageQueue) -> bool:
    return int(mq.current_messages) == 0


def test_bad_messages_on_every_queue(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    target, reference = tmp_path / "b.raw", tmp_path / "ref.raw"
    with Engine() as engine:
        # 4 KiB clusters and rate-limited writers in request mode: for seconds, every
        # writer keeps asking the worker for copies, so it keeps reading its reply queue.
        dev = engine.create_device(16 * MiB, cluster_size=4096, max_writers=2)
        procs = engine.start_writers(dev, 2, workload="random", duration=60.0, seed=6,
                                     rate=2000.0)
        time.sleep(0.2)
        job = engine.backup(dev, str(target), speed=CLUSTER, cbw_mode="request",
                            cbw_timeout=30.0, verify=True, reference_image=str(reference))
        wait_for_cbw(job, 1)
        names = engine.names
        queues = {"sup": names.supervisor_queue, "bk": names.backup_queue("dev0")}
        for w in range(2):
            queues[f"w{w}-ctl"] = names.writer_control_queue("dev0", w)
            queues[f"w{w}-rep"] = names.writer_reply_queue("dev0", w)
        sent_to_sup = 0
        for key, name in queues.items():
            mq = posix_ipc.MessageQueue(name)
            try:
                kinds = bad_messages(int(mq.max_message_size))
                unexpected = [protocol.encode(m) for m in unexpected_messages(key.split("-")[-1])]
                for data in [d for _, d in kinds] + unexpected:
                    # One at a time: a full reply queue would make the worker drop a
                    # real answer (a writer then waits out its timeout).
                    mq.send(data, timeout=5.0)
                    wait_until(partial(drained, mq), 10.0,
                               what=f"the reader of {name} to take the message")
                if key == "sup":
                    sent_to_sup = len(kinds) + len(unexpected)
            finally:
                mq.close()
        # Let every receiver read what it got: the writers read their reply queues when
        # they next ask for a copy, their control queues at the next freeze.
        wait_for_cbw(job, int(dev.device.ctl[L.CTL_CBW_CLUSTERS]) + 20)
        with engine.freeze([dev]):
            pass
        wait_until(lambda: engine.sup.rejected >= sent_to_sup, 10.0,
                   what="the supervisor to reject the bad messages")
        assert job.state.value == "running"
        assert all(w.alive for w in procs) and job.proc.poll() is None
        unthrottle(job)
        result = job.wait(60.0)
        assert all(w.alive for w in procs)
        engine.stop_writers()
        codes = [w.proc.returncode for w in procs] + [job.proc.returncode]
    assert engine.sup.rejected == sent_to_sup
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    assert codes == [0, 0, 0]
    assert_same_image(reference, target)
    logged = capfd.readouterr().err
    for key in ("bk", "w0-ctl", "w1-ctl", "w0-rep", "w1-rep"):
        assert f"{queues[key]}: rejected malformed message" in logged, key
    for kind in ("CopyDone", "Pause"):
        assert f"{kind}" in logged and "on the backup queue" in logged


def test_a_frozen_for_an_epoch_not_asked_for_does_not_cut_a_freeze_short(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Frozen sent ahead of a freeze must not let the supervisor skip that writer.

    The writer is stopped inside a write when the freeze begins: the freeze has to wait
    for it (until it is continued and leaves the write), or its write in flight lands
    in the snapshot.
    """
    with Engine() as engine:
        dev = engine.create_device(16 * MiB, max_writers=1)
        writer = start_writer_stopping_in_write(engine, dev, 200, monkeypatch,
                                                workload="random", duration=60.0, seed=8)
        sup = posix_ipc.MessageQueue(engine.names.supervisor_queue)
        try:
            with stopped(writer.pid):  # stopped already; continued whatever happens
                spoof = protocol.Frozen(epoch=1, writer=0)
                sup.send(protocol.encode(spoof), timeout=5.0)
                wait_until(lambda: engine.sup.rejected == 1, 10.0,
                           what="the supervisor to reject it")
                resume = threading.Timer(0.3, os.kill, (writer.pid, signal.SIGCONT))
                resume.start()
                t0 = time.monotonic()
                with engine.freeze([dev]):
                    waited = time.monotonic() - t0
                    first = dev.device.data.copy()
                    time.sleep(0.1)
                    second = dev.device.data.copy()
                resume.join()
        finally:
            sup.close()
        assert waited >= 0.25, "the freeze did not wait for the stopped writer"
        assert np.array_equal(first, second), "a write landed during the freeze"
        assert engine.sup.rejected == 1
        assert writer.alive


def test_an_interrupt_right_after_the_snapshot_starts_no_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (shmblock-run's handler raises wherever the main thread is) just after the
    freeze: the job must not run on without its digest thread, and closing the engine
    must raise nothing else."""

    def interrupted(self: SnapshotCapture) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(SnapshotCapture, "finish_async", interrupted)
    with pytest.raises(KeyboardInterrupt), Engine() as engine:
        dev = engine.create_device(4 * MiB)
        job = engine.create_backup(dev, str(tmp_path / "b.raw"), verify=True)
        try:
            job.start()
        finally:
            time.sleep(0.5)  # time enough for a started job to finish
    result = job.wait(30.0)
    assert result.outcome is Outcome.CANCELLED, result
    assert not (tmp_path / "b.raw").exists()


def test_a_snapshot_without_digests_fails_verification_cleanly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the digests of the snapshot were never computed, verification says so."""
    monkeypatch.setattr(SnapshotCapture, "finish_async", lambda self: None)
    with Engine() as engine:
        dev = engine.create_device(4 * MiB)
        result = engine.backup(dev, str(tmp_path / "b.raw"), verify=True).wait(30.0)
    assert result.outcome is Outcome.COMPLETED
    assert result.verified is False
    assert "digest" in result.verify_error, result.verify_error


# -- the shmblock-run supervisor interrupted or killed --------------------------------------


def worker_pids(cli_pid: int) -> dict[str, int]:
    """Live worker children of a shmblock-run process, by role as shown in ps."""
    found = {}
    for pid in children(cli_pid):
        title = cmdline(pid)
        if title.startswith("shmblock: "):
            found[title.split(" run=")[0].removeprefix("shmblock: ")] = pid
    return found


def start_run(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    """shmblock-run run whose backup lasts about 30 s: slow background copy, and writers
    too slow (rate-limited) to save every cluster by copy-before-write early on."""
    return start_cli("run", "--size", "32M", "--writers", "2", "--duration", "30",
                     "--rate", "500", "--backup-at", "0.3", "--speed", "1M",
                     "--target", "b.raw", "--reference-image", "ref.raw", *extra,
                     cwd=tmp_path)


@pytest.mark.parametrize(("phase", "signals"), [
    ("writers", [signal.SIGINT]),
    ("backup", [signal.SIGINT]),
    ("backup", [signal.SIGINT, signal.SIGINT, signal.SIGINT]),  # an impatient user
    ("backup", [signal.SIGTERM]),
], ids=["ctrl-c-while-writers-start", "ctrl-c-mid-backup", "ctrl-c-thrice", "sigterm"])
def test_interrupting_run_removes_everything(tmp_path: Path, phase: str,
                                             signals: list[signal.Signals]) -> None:
    proc = start_run(tmp_path)
    try:
        want = {"guest-writer 0"} if phase == "writers" else \
            {"guest-writer 0", "guest-writer 1", "backup-worker"}
        seen: dict[str, int] = {}

        def started() -> bool:
            seen.update(worker_pids(proc.pid))
            return want <= set(seen)

        wait_until(started, 30.0, interval=0.005, what=f"workers {want}")
        if phase == "backup":
            wait_until((tmp_path / "b.raw.part").exists, 10.0, what="the target")
            time.sleep(0.3)  # the snapshot is taken, the job is copying
        for signum in signals:
            proc.send_signal(signum)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=30)
    finally:
        kill_tree(proc)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    for pid in seen.values():
        assert pid_gone(pid), f"worker {pid} outlived the interrupted run"
    assert not (tmp_path / "b.raw").exists()
    assert not (tmp_path / "b.raw.part").exists()
    assert list_records() == []


def test_sigkill_of_supervisor_then_cleanup(tmp_path: Path, shm_prefix: str) -> None:
    proc = start_run(tmp_path)
    try:
        want = {"guest-writer 0", "guest-writer 1", "backup-worker"}
        wait_until(lambda: want <= set(worker_pids(proc.pid)), 30.0, what=f"workers {want}")
        wait_until((tmp_path / "b.raw.part").exists, 10.0, what="the target")
        time.sleep(0.3)
        pids = worker_pids(proc.pid)
        proc.kill()
        proc.communicate(timeout=10)
    finally:
        kill_tree(proc)
    # Orphaned workers notice (PR_SET_PDEATHSIG and the parent pid check) and exit.
    wait_until(lambda: all(pid_gone(p) for p in pids.values()), 10.0,
               what="orphaned workers to exit")
    records = list_records()
    assert len(records) == 1, "the killed supervisor's run record is the map for cleanup"
    left = [p for p in os.listdir("/dev/shm") if p.startswith(shm_prefix)]
    assert left, "a killed supervisor cannot have unlinked its segments"
    out = run_cli("cleanup", cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "removed" in out.stdout
    assert [p for p in os.listdir("/dev/shm") if p.startswith(shm_prefix)] == []
    assert list_records() == []
    assert not (tmp_path / "b.raw.part").exists()
    again = run_cli("cleanup", cwd=tmp_path, timeout=60)
    assert again.returncode == 0 and "nothing to clean up" in again.stdout


def test_backup_worker_killed_under_shmblock_run(tmp_path: Path) -> None:
    """The CLI reports the dead worker in one line, exits 1 and leaves nothing behind."""
    proc = start_run(tmp_path, "--duration", "3", "--json", "s.json")
    try:
        wait_until(lambda: "backup-worker" in worker_pids(proc.pid), 30.0,
                   what="the backup worker")
        wait_until((tmp_path / "b.raw.part").exists, 10.0, what="the target")
        time.sleep(0.3)
        os.kill(worker_pids(proc.pid)["backup-worker"], signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_tree(proc)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "backup worker died" in lines[0] and "signal 9" in lines[0], lines[0]
    assert "failed" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["ok"] is False and summary["backup"]["status"] == "failed"
    assert not (tmp_path / "b.raw").exists()
    assert not (tmp_path / "b.raw.part").exists()


@pytest.mark.parametrize("registry", ["same", "other"])
def test_cleanup_leaves_a_live_run_alone(tmp_path: Path, shm_prefix: str,
                                         registry: str) -> None:
    """``same``: cleanup finds the live run's record and sees it alive. ``other``: a
    cleanup with its own, empty registry (another user session, another
    SHMBLOCK_RUN_DIR) has no record of the run and must still leave it alone."""
    proc = start_run(tmp_path, "--duration", "2", "--speed", "16M")
    env = None
    if registry == "other":
        env = {**os.environ, "SHMBLOCK_RUN_DIR": str(tmp_path / "other-runs")}
    try:
        wait_until(lambda: "backup-worker" in worker_pids(proc.pid), 30.0,
                   what="the backup worker")
        mine = sorted(p for p in os.listdir("/dev/shm") if p.startswith(shm_prefix))
        out = run_cli("cleanup", cwd=tmp_path, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        assert "nothing to clean up" in out.stdout
        assert sorted(p for p in os.listdir("/dev/shm") if p.startswith(shm_prefix)) == mine
        _, err = proc.communicate(timeout=60)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, err


def test_a_reference_image_in_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    """Refused up front, like a target there: not found out after the whole backup."""
    with Engine() as engine:
        dev = engine.create_device(4 * MiB)
        with pytest.raises(UsageError, match="/nonexistent/dir"):
            engine.create_backup(dev, str(tmp_path / "b.raw"),
                                 reference_image="/nonexistent/dir/r.raw")
        assert engine.jobs == {}, "nothing may start for a bad argument"


def test_a_worker_whose_supervisor_died_during_its_start_exits(tmp_path: Path) -> None:
    """SIGKILL of shmblock-run while a writer process is still starting up (before it
    could ask for PR_SET_PDEATHSIG): the writer must notice and exit, not write for the
    whole --duration under init."""
    proc = start_run(tmp_path, "--duration", "60")
    victim = 0
    try:
        def starting() -> bool:
            nonlocal victim
            for pid in children(proc.pid):
                if "workers.guest" in cmdline(pid):  # forked, not yet named by itself
                    victim = pid
                    return True
            return False

        wait_until(starting, 30.0, interval=0.001, what="a writer process starting")
        proc.kill()
        proc.wait(10)  # not communicate(): a surviving orphan holds the output pipes
        wait_until(lambda: pid_gone(victim), 15.0, what="the orphaned writer to exit")
    finally:
        kill_tree(proc)
        run_cli("cleanup", cwd=tmp_path, timeout=60)  # what the killed run left
