"""Sync modes with a dirty bitmap: incremental and bitmap, and full/top that reset one.

Every sync mode × bitmap mode × outcome (completed, cancelled, target error mid-job):
the target holds the snapshot for what the mode covers, and the bitmap afterwards holds
exactly what QEMU's rules say (``shmblock/snapshot.py``): the writes made during the job,
plus the frozen bits (on-success after a failure; never), or every covered cluster
(always after a failure: the target is discarded, so nothing counts as copied). Then a
qcow2 incremental chain checked with qemu-img, and the errors refused before anything
starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shmblock.device_handle import DeviceHandle
from shmblock.engine import Engine
from shmblock.errors import BitmapBusy, CopyBeforeWriteError, UsageError
from shmblock.job import Outcome
from tests.helpers import small_tmpfs
from tests.procs import MiB, wait_until

CLUSTER = 64 * 1024
SIZE = 4 * MiB
N = SIZE // CLUSTER
#: Written after the bitmap is added, before the snapshot: the frozen bits.
DIRTY = [0, 2, 3, 5, 8, 13, 21, 22, 23, 34, 40, 41, 50, 55, 60, 61, 62, 63]
#: Written while the job runs: they stay dirty whatever the outcome.
DURING = [1, 21, 47]
#: Slow enough to cancel or fail mid-job: ten clusters a second.
SLOW = 10 * CLUSTER

JOBS = [("full", m) for m in ("on-success", "always", "never")] + \
    [("top", m) for m in ("on-success", "always", "never")] + \
    [("bitmap", m) for m in ("on-success", "always", "never")] + [("incremental", None)]
OUTCOMES = ["completed", "cancelled", "target-error"]


def rand(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8)


def write_clusters(dev: DeviceHandle, clusters: list[int], seed: int) -> list[int]:
    """Guest writes of whole clusters; returns those that went through."""
    done = []
    for i, c in enumerate(clusters):
        try:
            dev.write(c * CLUSTER, rand(seed + i, CLUSTER))
        except CopyBeforeWriteError:
            continue  # a failed target: the write was refused, the device unchanged
        done.append(c)
    return done


def prepare(engine: Engine) -> DeviceHandle:
    dev = engine.create_device(SIZE, CLUSTER)
    dev.fill(0.75, seed=1)  # some clusters never written: top covers less than full
    dev.add_bitmap("b0")
    write_clusters(dev, DIRTY, seed=100)
    return dev


def mask(clusters: list[int]) -> np.ndarray:
    m = np.zeros(N, dtype=np.bool_)
    m[clusters] = True
    return m


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: a target file system that fills up mid-job (root only)."""
    with small_tmpfs(tmp_path, "512k") as mount:
        yield mount


@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize(("sync", "mode"), JOBS)
def test_sync_mode_bitmap_mode_outcome(tmp_path: Path, sync: str, mode: str | None,
                                       outcome: str, request: pytest.FixtureRequest) -> None:
    directory = request.getfixturevalue("small_fs") if outcome == "target-error" \
        else tmp_path
    target = directory / "b.raw"
    with Engine() as engine:
        dev = prepare(engine)
        frozen = dev.bitmap("b0")
        assert np.array_equal(frozen, mask(DIRTY))
        allocated = dev.device.allocated != 0
        reference = dev.device.data.copy()
        covered = {"full": np.ones(N, dtype=np.bool_), "top": allocated}.get(sync, frozen)
        job = engine.backup(dev, str(target), sync=sync, bitmap="b0", bitmap_mode=mode,
                            chunk=CLUSTER, speed=0 if outcome == "completed" else SLOW)
        assert dev.bitmap("b0").sum() == 0, "the snapshot consumes the bitmap"
        during = write_clusters(dev, DURING, seed=200)
        if outcome == "cancelled":
            wait_until(lambda: int(np.count_nonzero(dev.device.saved)) >= 3, 20.0,
                       what="a few clusters copied")
            job.cancel()
        result = job.wait(60.0)
        expected_outcome = {"completed": Outcome.COMPLETED, "cancelled": Outcome.CANCELLED,
                            "target-error": Outcome.FAILED}[outcome]
        assert result.outcome is expected_outcome, result.error
        saved = dev.device.saved != 0
        after = dev.bitmap("b0")
        assert not dev.busy_bitmaps, "the bitmap stays busy after its job"
        # The bitmap afterwards (QEMU's backup_cleanup_sync_bitmap).
        mode_ = mode or "on-success"
        expected = mask(during)
        if mode_ == "never" or (mode_ == "on-success" and outcome != "completed"):
            expected |= frozen
        elif mode_ == "always" and outcome != "completed":
            # The .part is discarded: what reached it is not backed up (invariant 8).
            expected |= covered
        assert np.array_equal(after, expected), (
            f"bitmap has {np.flatnonzero(after).tolist()}, expected "
            f"{np.flatnonzero(expected).tolist()}")
        if outcome != "completed":
            assert 0 < saved.sum() < covered.sum(), "the job was to end mid-way"
            assert not target.exists() and not Path(f"{target}.part").exists()
            if outcome == "target-error":
                assert "No space left on device" in result.error, result.error
            return
        assert np.array_equal(saved, covered)
        assert result.bytes_total == int(covered.sum()) * CLUSTER
    image = np.frombuffer(target.read_bytes(), dtype=np.uint8).reshape(N, CLUSTER)
    ref = reference.reshape(N, CLUSTER)
    assert np.array_equal(image[covered], ref[covered]), "the snapshot's clusters differ"
    assert not image[~covered].any(), "a cluster the mode does not cover was written"


# -- errors before anything starts ---------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sync": "bitmap", "bitmap": "nope", "bitmap_mode": "always"}, "no bitmap named 'nope'"),
    ({"sync": "bitmap", "bitmap": "b0"}, "needs a bitmap mode"),
    ({"sync": "full", "bitmap": "b0"}, "needs a bitmap mode"),
    ({"sync": "full", "bitmap_mode": "always"}, "without a bitmap"),
    ({"sync": "incremental"}, "needs a bitmap"),
    ({"sync": "bitmap", "bitmap_mode": "never"}, "needs a bitmap"),
    ({"sync": "incremental", "bitmap": "b0", "bitmap_mode": "always"}, "use sync=bitmap"),
    ({"sync": "none", "bitmap": "b0", "bitmap_mode": "never"}, "sync=none cannot use"),
    ({"sync": "bitmap", "bitmap": "b0", "bitmap_mode": "sometimes"}, "unknown bitmap mode"),
])
def test_bad_bitmap_options_are_refused_before_anything_starts(
        tmp_path: Path, kwargs: dict[str, str], message: str) -> None:
    with Engine() as engine:
        dev = prepare(engine)
        with pytest.raises(UsageError, match=message):
            engine.create_backup(dev, str(tmp_path / "b.raw"), **kwargs)  # type: ignore[arg-type]
        assert engine.jobs == {} and engine.record.children == []
        assert np.array_equal(dev.bitmap("b0"), mask(DIRTY))
    assert not (tmp_path / "b.raw").exists() and not (tmp_path / "b.raw.part").exists()


def test_a_bitmap_in_use_is_busy(tmp_path: Path) -> None:
    with Engine() as engine:
        dev = prepare(engine)
        job = engine.backup(dev, str(tmp_path / "a.raw"), sync="incremental", bitmap="b0",
                            speed=CLUSTER)
        with pytest.raises(BitmapBusy, match=f"bitmap 'b0' of device dev0 is busy: job "
                                             f"{job.job}"):
            engine.create_backup(dev, str(tmp_path / "b.raw"), sync="incremental",
                                 bitmap="b0")
        with pytest.raises(BitmapBusy):
            dev.remove_bitmap("b0")
        job.cancel()
        assert job.wait(30.0).outcome is Outcome.CANCELLED
        # Free again, and the cancelled job left every bit (on-success).
        assert np.array_equal(dev.bitmap("b0"), mask(DIRTY))
        dev.remove_bitmap("b0")
    assert not (tmp_path / "b.raw").exists()


# -- an incremental chain read back with qemu-img -----------------------------------------


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_an_incremental_qcow2_chain_reads_back_as_each_snapshot(tmp_path: Path) -> None:
    full, inc = tmp_path / "full.qcow2", tmp_path / "inc.qcow2"
    ref_full, ref_inc = tmp_path / "full.ref.raw", tmp_path / "inc.ref.raw"
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER)
        dev.fill(0.5, seed=7)
        dev.add_bitmap("b0")
        write_clusters(dev, DIRTY[:5], seed=300)
        # A full backup that resets the bitmap (QEMU allows a bitmap with sync=full).
        first = engine.backup(dev, str(full), sync="full", bitmap="b0",
                              bitmap_mode="on-success", reference_image=str(ref_full),
                              verify=True)
        write_clusters(dev, DURING, seed=400)  # during the full backup: stay dirty
        r1 = first.wait(60.0)
        assert r1.outcome is Outcome.COMPLETED and r1.verified, r1.error
        assert np.array_equal(dev.bitmap("b0"), mask(DURING))
        write_clusters(dev, [9, 10, 44], seed=500)
        dev.write(20 * CLUSTER, np.zeros(CLUSTER, dtype=np.uint8))  # zeros over data
        dirty = dev.bitmap("b0")
        second = engine.backup(dev, str(inc), sync="incremental", bitmap="b0",
                               backing_file="full.qcow2", backing_format="qcow2",
                               reference_image=str(ref_inc), verify=True)
        r2 = second.wait(60.0)
        assert r2.outcome is Outcome.COMPLETED and r2.verified, r2.error
        assert r2.bytes_total == int(dirty.sum()) * CLUSTER  # only the dirty clusters
        assert not dev.bitmap("b0").any()
    for image, ref in ((full, ref_full), (inc, ref_inc)):
        check = qemu_img("check", str(image))
        assert check.returncode == 0, check.stdout + check.stderr
        same = qemu_img("compare", str(ref), str(image))
        assert same.returncode == 0, f"{image.name}: {same.stdout}{same.stderr}"
    # The incremental alone holds only the dirty clusters: without its backing file it
    # is not the snapshot.
    rebased = qemu_img("rebase", "-u", "-b", "", str(inc))
    assert rebased.returncode == 0, rebased.stderr
    assert qemu_img("compare", str(ref_inc), str(inc)).returncode == 1


# -- what counts as copied ------------------------------------------------------------------


def test_a_cancelled_always_job_to_nbd_counts_nothing_as_copied(tmp_path: Path) -> None:
    """NBD writes are pipelined: before the final settle a cluster marked saved may still
    be refused, so a job that did not complete clears no bit (over-approximation)."""
    from tests.nbd_servers import server_group

    with server_group(tmp_path) as servers, Engine() as engine:
        server = servers.nbdkit("memory", str(SIZE))
        dev = prepare(engine)
        job = engine.backup(dev, server.uri, sync="bitmap", bitmap="b0",
                            bitmap_mode="always", chunk=CLUSTER, speed=SLOW)
        wait_until(lambda: int(np.count_nonzero(dev.device.saved)) >= 3, 20.0,
                   what="a few clusters copied")
        job.cancel()
        assert job.wait(30.0).outcome is Outcome.CANCELLED
        assert 0 < int(np.count_nonzero(dev.device.saved)) < len(DIRTY)
        assert np.array_equal(dev.bitmap("b0"), mask(DIRTY))


def test_a_killed_worker_leaves_every_bit(tmp_path: Path) -> None:
    """SIGKILL of the backup worker: the supervisor ends the job and the bitmap keeps
    its frozen bits and the writes made meanwhile (on-success, a failed job)."""
    import signal

    with Engine() as engine:
        dev = prepare(engine)
        job = engine.backup(dev, str(tmp_path / "b.raw"), sync="incremental", bitmap="b0",
                            chunk=CLUSTER, speed=SLOW)
        during = write_clusters(dev, DURING, seed=200)
        os.kill(job.proc.pid, signal.SIGKILL)
        result = job.wait(30.0)
        assert result.outcome is Outcome.FAILED and "killed by signal 9" in result.error
        assert np.array_equal(dev.bitmap("b0"), mask(DIRTY) | mask(during))
        assert not dev.busy_bitmaps
        # The next incremental copies all of it.
        again = engine.backup(dev, str(tmp_path / "c.raw"), sync="incremental", bitmap="b0")
        assert again.wait(30.0).bytes_total == len(set(DIRTY) | set(during)) * CLUSTER
