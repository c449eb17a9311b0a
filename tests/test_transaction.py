"""Transactions (issue 8 §4): one instant across devices, all or nothing, grouped completion.

* a three-device grouped transaction with one target that fills up mid-job leaves all
  three bitmaps exactly as they were (the bits at the instant plus the writes made
  during the jobs), and the same transaction re-run to a good target succeeds;
* individual mode lets the good jobs complete;
* an invalid action, or a worker that cannot start: nothing starts, nothing changes;
* bitmap actions at the instant, rolled back when the instant cannot be taken;
* cross-device consistency: a writer keeps gen(B) ∈ {gen(A), gen(A) - 1}; every backup
  set taken mid-run shows a state that existed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shmblock import layout as L
from shmblock.device_handle import DeviceHandle
from shmblock.engine import Engine
from shmblock.errors import BitmapBusy, CopyBeforeWriteError, JobError, UsageError
from shmblock.job import Outcome
from shmblock.transaction import (
    Backup,
    BitmapAdd,
    BitmapClear,
    BitmapDisable,
    BitmapEnable,
    BitmapMerge,
    BitmapRemove,
)
from tests.helpers import small_tmpfs
from tests.procs import MiB, wait_until

CLUSTER = 64 * 1024
SIZE = 2 * MiB
N = SIZE // CLUSTER
#: Written after the bitmap is added: the bits at the instant (> 512 KiB of them, so a
#: 512 KiB file system fills up before the job is done).
DIRTY = [0, 1, 2, 3, 5, 8, 11, 13, 17, 19, 21, 22, 23, 27, 29, 30, 31]
#: Written while the jobs run: they stay dirty whatever the outcome.
DURING = [4, 13, 26]
#: Ten clusters a second: slow enough to be cancelled mid-job.
SLOW = 10 * CLUSTER


def rand(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8)


def write_clusters(dev: DeviceHandle, clusters: list[int], seed: int) -> list[int]:
    """Guest writes of whole clusters; those that went through (a write whose save to a
    failed target is refused leaves the device unchanged)."""
    done = []
    for i, c in enumerate(clusters):
        try:
            dev.write(c * CLUSTER, rand(seed + i, CLUSTER))
        except CopyBeforeWriteError:
            continue
        done.append(c)
    return done


def mask(clusters: list[int]) -> np.ndarray:
    m = np.zeros(N, dtype=np.bool_)
    m[clusters] = True
    return m


def three_devices(engine: Engine) -> list[DeviceHandle]:
    devs = []
    for i in range(3):
        dev = engine.create_device(SIZE, CLUSTER, name=f"d{i}")
        dev.fill(0.5, seed=i)
        dev.add_bitmap("b0")
        write_clusters(dev, DIRTY, seed=100 + 10 * i)
        devs.append(dev)
    return devs


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: a target file system that fills up mid-job (root only)."""
    with small_tmpfs(tmp_path, "512k") as mount:
        yield mount


def incrementals(devs: list[DeviceHandle], targets: list[Path], speeds: list[int],
                 verify: bool = False) -> list[Backup]:
    return [Backup(dev, str(t), sync="incremental", bitmap="b0", speed=s, chunk=CLUSTER,
                   verify=verify)
            for dev, t, s in zip(devs, targets, speeds, strict=True)]


# -- grouped and individual completion ---------------------------------------------------


def test_grouped_transaction_with_a_failing_target_leaves_every_bitmap_as_it_was(
        tmp_path: Path, small_fs: Path) -> None:
    targets = [tmp_path / "d0.raw", small_fs / "d1.raw", tmp_path / "d2.raw"]
    with Engine() as engine:
        devs = three_devices(engine)
        before = [d.bitmap("b0") for d in devs]
        # d0 completes at once, d1 fills its file system after 0.8 s (8 clusters at
        # SLOW; until then every bitmap stays consumed), d2 is still copying then.
        txn = engine.transaction(incrementals(devs, targets, [0, SLOW, SLOW]),
                                 completion_mode="grouped")
        assert [j.device for j in txn.jobs] == devs
        assert all(d.bitmap("b0").sum() == 0 for d in devs), "one instant consumes all"
        during = [write_clusters(d, DURING, seed=200 + i) for i, d in enumerate(devs)]
        results = txn.wait(60.0)
        outcomes = [r.outcome for r in results]
        assert outcomes[1] is Outcome.FAILED, results[1].error
        assert "No space left on device" in results[1].error
        assert outcomes[2] is Outcome.CANCELLED, "the group cancels the others"
        assert txn.failed is not None and txn.failed[0] == txn.jobs[1].job
        assert not txn.succeeded
        for i, d in enumerate(devs):
            # Bit for bit: the bits at the instant put back, plus the writes made
            # during the jobs (which stay dirty whatever the outcome) -- even for d0,
            # whose own job completed.
            expected = before[i] | mask(during[i])
            after = d.bitmap("b0")
            assert np.array_equal(after, expected), (
                f"{d.name}: {np.flatnonzero(after).tolist()} != "
                f"{np.flatnonzero(expected).tolist()}")
            assert not d.busy_bitmaps
        assert not targets[1].exists() and not Path(f"{targets[2]}.part").exists()
        # The same transaction to a good target: everything succeeds and verifies.
        before = [d.bitmap("b0") for d in devs]
        targets[1] = tmp_path / "d1.raw"
        references = [d.device.data.copy() for d in devs]
        txn = engine.transaction(incrementals(devs, targets, [0, 0, 0], verify=True),
                                 completion_mode="grouped")
        results = txn.wait(60.0)
        assert [r.outcome for r in results] == [Outcome.COMPLETED] * 3, \
            [r.error for r in results]
        assert all(r.verified for r in results), [r.verify_error for r in results]
        assert txn.succeeded
        for d, t, ref, bits in zip(devs, targets, references, before, strict=True):
            assert d.bitmap("b0").sum() == 0, "synced: the bitmap starts over"
            image = np.frombuffer(t.read_bytes(), dtype=np.uint8).reshape(N, CLUSTER)
            assert np.array_equal(image[bits], ref.reshape(N, CLUSTER)[bits])
            assert not d.busy_bitmaps


def test_a_failed_group_settles_every_bitmap_by_its_mode_as_a_failure(
        tmp_path: Path, small_fs: Path) -> None:
    with Engine() as engine:
        devs = three_devices(engine)
        before = [d.bitmap("b0") for d in devs]
        txn = engine.transaction([
            # always: its work completes first, but the group fails, so its target is
            # discarded and nothing counts as copied: every bit comes back
            Backup(devs[0], str(tmp_path / "d0.raw"), sync="full", bitmap="b0",
                   bitmap_mode="always", chunk=CLUSTER),
            Backup(devs[1], str(small_fs / "d1.raw"), sync="bitmap", bitmap="b0",
                   bitmap_mode="on-success", speed=SLOW, chunk=CLUSTER),
            Backup(devs[2], str(tmp_path / "d2.raw"), sync="full", bitmap="b0",
                   bitmap_mode="never", speed=SLOW, chunk=CLUSTER)],
            completion_mode="grouped")
        results = txn.wait(60.0)
        # QEMU's grouped completion: a job whose work ended well waits for the group
        # (no target published); the failure aborts it, reported cancelled.
        assert [r.outcome for r in results] == \
            [Outcome.CANCELLED, Outcome.FAILED, Outcome.CANCELLED], [r.error for r in results]
        assert txn.failed is not None and txn.failed[0] == txn.jobs[1].job
        # always with sync=full: what the job covered (every cluster) and did not get
        # onto a kept target is dirty again: a superset of the bits before, never less.
        assert devs[0].bitmap("b0").all() and before[0].any()
        for d, bits in zip(devs[1:], before[1:], strict=True):
            assert np.array_equal(d.bitmap("b0"), bits), "on-success, never: as they were"
        assert not any(d.busy_bitmaps for d in devs)
        assert not (tmp_path / "d0.raw").exists(), "the group failed: nothing published"
        assert not list(tmp_path.glob("*.part"))


def test_individual_transaction_lets_the_good_jobs_complete(
        tmp_path: Path, small_fs: Path) -> None:
    targets = [tmp_path / "d0.raw", small_fs / "d1.raw", tmp_path / "d2.raw"]
    with Engine() as engine:
        devs = three_devices(engine)
        before = [d.bitmap("b0") for d in devs]
        txn = engine.transaction(incrementals(devs, targets, [0, 0, SLOW]))
        assert txn.completion_mode == "individual"
        results = txn.wait(60.0)
        assert [r.outcome for r in results] == \
            [Outcome.COMPLETED, Outcome.FAILED, Outcome.COMPLETED], [r.error for r in results]
        assert devs[0].bitmap("b0").sum() == 0 and devs[2].bitmap("b0").sum() == 0
        assert np.array_equal(devs[1].bitmap("b0"), before[1]), "on-success: bits back"
    assert targets[0].exists() and targets[2].exists() and not targets[1].exists()


def test_the_jobs_of_a_transaction_copy_in_parallel(tmp_path: Path) -> None:
    targets = [tmp_path / f"d{i}.raw" for i in range(3)]
    with Engine() as engine:
        devs = three_devices(engine)
        # 17 clusters at ten a second: 1.7 s each, 5.1 s one after the other.
        txn = engine.transaction(incrementals(devs, targets, [SLOW] * 3))
        results = txn.wait(60.0)
        assert all(r.outcome is Outcome.COMPLETED for r in results)
        starts = [j.tracker.running_since for j in txn.jobs]
        ends = [j.tracker.ended for j in txn.jobs]
        assert max(starts) < min(ends), "some job ended before another started"
        assert max(ends) - min(starts) < 0.8 * sum(r.duration_s for r in results)


def test_a_user_cancel_cancels_a_grouped_transaction(tmp_path: Path) -> None:
    targets = [tmp_path / f"d{i}.raw" for i in range(3)]
    with Engine() as engine:
        devs = three_devices(engine)
        before = [d.bitmap("b0") for d in devs]
        txn = engine.transaction(incrementals(devs, targets, [SLOW] * 3),
                                 completion_mode="grouped")
        txn.jobs[0].cancel()
        results = txn.wait(60.0)
        assert [r.outcome for r in results] == [Outcome.CANCELLED] * 3
        for d, bits in zip(devs, before, strict=True):
            assert np.array_equal(d.bitmap("b0"), bits)
    assert not any(t.exists() for t in targets)


# -- all or nothing ----------------------------------------------------------------------


def assert_nothing_started(engine: Engine, devs: list[DeviceHandle],
                           before: list[np.ndarray], tmp_path: Path) -> None:
    assert all(j.proc.poll() is not None for j in engine.jobs.values()), "a worker runs"
    assert all(j.tracker.concluded for j in engine.jobs.values())
    for d, bits in zip(devs, before, strict=True):
        assert d.bitmaps() == ["b0"] and np.array_equal(d.bitmap("b0"), bits)
        assert not d.busy_bitmaps and d.device.needs_copy.sum() == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == []


@pytest.mark.parametrize(("bad", "error", "message"), [
    (lambda devs, tmp: BitmapClear(devs[0], "nope"), UsageError,
     r"action 2 \(bitmap-clear on d0\): device d0 has no bitmap named 'nope'"),
    (lambda devs, tmp: Backup(devs[2], str(tmp / "x.raw"), sync="incremental",
                              bitmap="nope"), UsageError, "action 2 .*no such bitmap"),
    (lambda devs, tmp: Backup(devs[0], str(tmp / "x.raw")), UsageError,
     "device d0 already has a backup in this transaction"),
    (lambda devs, tmp: Backup(devs[2], str(tmp / "d0.raw")), UsageError, "d0.raw"),
    (lambda devs, tmp: Backup(devs[2], str(tmp / "x.raw"), sync="sideways"), UsageError,
     "action 2 .*sideways"),
    (lambda devs, tmp: BitmapAdd(devs[2], "b0"), UsageError, "already has a bitmap"),
    (lambda devs, tmp: BitmapMerge(devs[2], "b0", ()), UsageError, "at least one source"),
])
def test_an_invalid_action_starts_nothing(tmp_path: Path, bad: object, error: type,
                                          message: str) -> None:
    with Engine() as engine:
        devs = three_devices(engine)
        before = [d.bitmap("b0") for d in devs]
        actions = [Backup(devs[0], str(tmp_path / "d0.raw"), sync="incremental",
                          bitmap="b0"),
                   Backup(devs[1], str(tmp_path / "d1.raw")),
                   bad(devs, tmp_path)]  # type: ignore[operator]
        with pytest.raises(error, match=message):
            engine.transaction(actions)
        assert engine.jobs == {} and engine.record.children == [], "a worker was started"
        assert_nothing_started(engine, devs, before, tmp_path)


def test_a_busy_bitmap_or_a_grouped_bitmap_action_is_refused(tmp_path: Path) -> None:
    with Engine() as engine:
        devs = three_devices(engine)
        running = engine.backup(devs[2], str(tmp_path / "run.raw"), sync="incremental",
                                bitmap="b0", speed=SLOW)
        with pytest.raises(BitmapBusy, match=r"action 1 .*busy: job"):
            engine.transaction([Backup(devs[0], str(tmp_path / "a.raw")),
                                Backup(devs[2], str(tmp_path / "b.raw"), sync="incremental",
                                       bitmap="b0")])
        with pytest.raises(BitmapBusy, match=r"action 0 \(bitmap-remove on d2\)"):
            engine.transaction([BitmapRemove(devs[2], "b0")])
        with pytest.raises(UsageError, match="does not support completion-mode = grouped"):
            engine.transaction([Backup(devs[0], str(tmp_path / "a.raw")),
                                BitmapAdd(devs[1], "b1")], completion_mode="grouped")
        with pytest.raises(UsageError, match=r"action 1 .*action 0 of this transaction "
                                             r"changes it"):
            engine.transaction([BitmapClear(devs[0], "b0"),
                                Backup(devs[0], str(tmp_path / "a.raw"),
                                       sync="incremental", bitmap="b0")])
        with pytest.raises(UsageError, match="unknown completion mode 'some'"):
            engine.transaction([BitmapAdd(devs[0], "b1")], completion_mode="some")
        with pytest.raises(UsageError, match="at least one action"):
            engine.transaction([])
        with pytest.raises(UsageError, match="action 0 is a str, not a transaction action"):
            engine.transaction(["backup"])  # type: ignore[list-item]
        with pytest.raises(UsageError, match=r"action 0 \(bitmap-add\): its device is not"):
            engine.transaction([BitmapAdd("d0", "b1")])  # type: ignore[arg-type]
        with Engine() as other:
            stranger = other.create_device(SIZE, CLUSTER, name="d0")
            with pytest.raises(UsageError, match="its device is not one of this engine's"):
                engine.transaction([Backup(stranger, str(tmp_path / "s.raw"))])
        assert [j.job for j in engine.jobs.values()] == [running.job]
        running.cancel()
        running.wait(30.0)
        assert devs[0].bitmaps() == ["b0"] and devs[1].bitmaps() == ["b0"]


def test_a_worker_that_cannot_start_stops_the_others(tmp_path: Path) -> None:
    with Engine() as engine:
        devs = three_devices(engine)
        before = [d.bitmap("b0") for d in devs]
        socket = tmp_path / "nobody.sock"
        actions = [Backup(devs[0], str(tmp_path / "d0.raw"), sync="incremental",
                          bitmap="b0"),
                   Backup(devs[1], str(tmp_path / "d1.qcow2"), sync="incremental",
                          bitmap="b0"),
                   Backup(devs[2], f"nbd+unix:///x?socket={socket}", target_timeout=2.0)]
        with pytest.raises(JobError, match="could not start"):
            engine.transaction(actions)
        assert len(engine.jobs) == 3
        assert_nothing_started(engine, devs, before, tmp_path)
        for job in engine.jobs.values():
            assert job.seq == 0, "no snapshot was taken"


# -- bitmap actions at the instant ---------------------------------------------------------


def test_bitmap_actions_apply_at_the_instant_of_the_backups(tmp_path: Path) -> None:
    with Engine() as engine:
        a = engine.create_device(SIZE, CLUSTER, name="a")
        b = engine.create_device(SIZE, CLUSTER, name="b")
        for dev in (a, b):
            dev.add_bitmap("old")
            dev.add_bitmap("other")
        write_clusters(a, [1, 2], seed=1)
        write_clusters(b, [3], seed=2)
        b.device.dirty[b.device.bitmap_names()["other"]][7] = 1
        # The regime's start: a full backup of both and a fresh bitmap at its instant.
        txn = engine.transaction([
            Backup(a, str(tmp_path / "a.raw")), BitmapAdd(a, "inc"),
            Backup(b, str(tmp_path / "b.raw")), BitmapAdd(b, "inc"),
            BitmapClear(a, "old"), BitmapMerge(b, "old", ("other",)),
            BitmapRemove(b, "other")])
        assert a.bitmap("inc").sum() == 0 and b.bitmap("inc").sum() == 0
        assert a.bitmap("old").sum() == 0
        assert np.array_equal(b.bitmap("old"), mask([3, 7]))
        assert b.bitmaps() == ["inc", "old"]
        write_clusters(a, [9], seed=3)
        assert [r.outcome for r in txn.wait(30.0)] == [Outcome.COMPLETED] * 2
        assert np.array_equal(a.bitmap("inc"), mask([9]))
        assert np.array_equal(a.bitmap("old"), mask([9]))


def recording(dev: DeviceHandle, name: str) -> bool:
    index = dev.device.bitmap_names()[name]
    return bool(int(dev.device.ctl[L.CTL_BITMAP_MASK]) >> index & 1)


def test_bitmaps_disabled_and_enabled_at_the_instant(tmp_path: Path) -> None:
    with Engine() as engine:
        a = engine.create_device(SIZE, CLUSTER, name="a")
        a.add_bitmap("x")
        a.add_bitmap("y")
        write_clusters(a, [1], seed=1)
        txn = engine.transaction([BitmapDisable(a, "x"), Backup(a, str(tmp_path / "a.raw"))])
        assert not recording(a, "x") and recording(a, "y")
        write_clusters(a, [2], seed=2)
        assert np.array_equal(a.bitmap("x"), mask([1])), "a disabled bitmap keeps its bits"
        assert np.array_equal(a.bitmap("y"), mask([1, 2]))
        txn.wait(30.0)
        engine.transaction([BitmapEnable(a, "x")])
        write_clusters(a, [3], seed=3)
        assert np.array_equal(a.bitmap("x"), mask([1, 3]))
        with pytest.raises(UsageError, match=r"action 0 \(bitmap-enable on a\): .*'z'"):
            engine.transaction([BitmapEnable(a, "z")])


def test_an_instant_that_cannot_be_taken_rolls_every_action_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shmblock import snapshot
    with Engine() as engine:
        devs = three_devices(engine)
        before = [d.bitmap("b0") for d in devs]
        real_take = snapshot.take
        calls = []

        def take(*args: object, **kwargs: object) -> int:
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected: the second snapshot cannot be set")
            return real_take(*args, **kwargs)  # type: ignore[arg-type]

        with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="injected"):
            patch.setattr(snapshot, "take", take)
            engine.transaction([
                BitmapAdd(devs[0], "new"), BitmapClear(devs[1], "b0"),
                BitmapDisable(devs[1], "b0"),
                Backup(devs[0], str(tmp_path / "d0.raw"), sync="incremental", bitmap="b0"),
                BitmapMerge(devs[2], "b0", ("b0",)),
                Backup(devs[2], str(tmp_path / "d2.raw"))])
        assert len(calls) == 2
        assert all(recording(d, "b0") for d in devs), "the disable is rolled back"
        for job in engine.jobs.values():
            job.wait(30.0)
        assert_nothing_started(engine, devs, before, tmp_path)


# -- cross-device consistency --------------------------------------------------------------


def generation_writer(first: DeviceHandle, second: DeviceHandle, offset: int,
                      stop: threading.Event, counts: list[int]) -> None:
    """Write generation g to ``first``, then to ``second``, for g = 1, 2, ... : at every
    instant gen(second) ∈ {gen(first), gen(first) - 1}."""
    gen = 0
    while not stop.is_set():
        gen += 1
        block = np.full(4096, gen % 251 + 1, dtype=np.uint8)
        block[:8] = np.frombuffer(gen.to_bytes(8, "little"), dtype=np.uint8)
        first.write(offset, block)
        second.write(offset, block)
    counts.append(gen)


def generation(image: bytes, offset: int) -> int:
    block = np.frombuffer(image[offset : offset + 4096], dtype=np.uint8)
    gen = int.from_bytes(block[:8].tobytes(), "little")
    assert gen == 0 or (block[8:] == gen % 251 + 1).all(), "a torn block"
    return gen


def test_every_backup_set_of_a_transaction_shows_a_state_that_existed(tmp_path: Path) -> None:
    with Engine() as engine:
        a = engine.create_device(SIZE, CLUSTER, name="a")
        b = engine.create_device(SIZE, CLUSTER, name="b")
        c = engine.create_device(SIZE, CLUSTER, name="c")
        # Real writer processes too, on a third device of the same instant.
        engine.start_writers(c, 2, workload="random", duration=30.0)
        for dev in (a, b):  # the handle's guest I/O is made on first use: not in threads
            dev.read(0, 1)
        stop = threading.Event()
        counts: list[int] = []
        threads = [  # one invariant in each direction: A then B, and B then A
            threading.Thread(target=generation_writer, args=(a, b, 0, stop, counts)),
            threading.Thread(target=generation_writer, args=(b, a, CLUSTER, stop, counts))]
        for t in threads:
            t.start()
        try:
            sets = []
            for round_ in range(6):
                least = 50 * (round_ + 1)
                wait_until(lambda: generation(a.read(0, 4096), 0) > least,  # noqa: B023
                           20.0, what="the generation writers running")
                ta, tb, tc = (tmp_path / f"{n}{round_}.raw" for n in "abc")
                txn = engine.transaction([Backup(a, str(ta)), Backup(b, str(tb)),
                                          Backup(c, str(tc))], completion_mode="grouped")
                assert all(r.outcome is Outcome.COMPLETED for r in txn.wait(60.0))
                sets.append((ta.read_bytes(), tb.read_bytes()))
                for t_ in (ta, tb, tc):
                    t_.unlink()
        finally:
            stop.set()
            for t in threads:
                t.join(30.0)
        assert len(counts) == 2
        for image_a, image_b in sets:
            ga, gb = generation(image_a, 0), generation(image_b, 0)
            assert gb in (ga, ga - 1), f"A then B: gen(A) = {ga}, gen(B) = {gb}"
            ha, hb = generation(image_b, CLUSTER), generation(image_a, CLUSTER)
            assert hb in (ha, ha - 1), f"B then A: gen(B) = {ha}, gen(A) = {hb}"
            assert ga > 0 and ha > 0
