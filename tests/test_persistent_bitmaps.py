"""Dirty bitmaps through :class:`DeviceHandle`: every operation and every refusal, on a
device in shared memory and on a file-backed device (whose bitmaps are persistent), and
the persistent ones across a normal restart, a restart after the supervisor was
killed mid-backup, a modelled power loss, and a store that cannot be trusted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shmblock import device as device_module
from shmblock.bitmaps import PersistentBitmapFile, VolatileDisk, store_dir
from shmblock.device_handle import DeviceHandle
from shmblock.engine import Engine
from shmblock.errors import (
    BitmapBusy,
    BitmapError,
    BitmapInconsistent,
    DeviceError,
    UsageError,
)
from shmblock.job import Outcome
from tests import test_sync_bitmap as tsb
from tests.procs import MiB, children, needs_qemu_img, run_cli
from tests.test_sync_bitmap import small_fs  # noqa: F401  (a fixture the matrix uses)

CLUSTER = 64 * 1024
SIZE = 4 * MiB
N = SIZE // CLUSTER


def write(dev: DeviceHandle, clusters: list[int], seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for c in clusters:
        dev.write(c * CLUSTER, rng.integers(1, 256, CLUSTER, dtype=np.uint8))


def mask(clusters: list[int]) -> np.ndarray:
    m = np.zeros(N, dtype=np.bool_)
    m[clusters] = True
    return m


@pytest.fixture(params=["shm", "file"])
def backing(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """None for a device in shared memory, else the path of a device file."""
    return None if request.param == "shm" else str(tmp_path / "disk.raw")


@pytest.fixture
def engine() -> Iterator[Engine]:
    with Engine() as e:
        yield e


# -- the API, on both kinds of device ---------------------------------------------------------


def test_every_bitmap_operation(engine: Engine, backing: str | None) -> None:
    dev = engine.create_device(SIZE, CLUSTER, backing_file=backing)
    dev.add_bitmap("a")
    dev.add_bitmap("coarse", granularity=4 * CLUSTER)
    write(dev, [0, 5, 9])
    assert np.array_equal(dev.bitmap("a"), mask([0, 5, 9]))
    # A write marks its whole granule: clusters 4-7 and 8-11.
    assert np.array_equal(dev.bitmap("coarse"), mask([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]))
    info = {i.name: i for i in dev.bitmap_info()}
    assert info["a"].count == 3 * CLUSTER and info["a"].granularity == CLUSTER
    assert info["coarse"].count == 12 * CLUSTER and info["coarse"].granularity == 4 * CLUSTER
    assert info["a"].enabled and info["a"].consistency == "consistent"
    assert info["a"].busy is None
    assert info["a"].persistent is (backing is not None)

    dev.disable_bitmap("a")
    write(dev, [20])
    assert not dev.bitmap("a")[20] and dev.bitmap("coarse")[20]
    assert not {i.name: i for i in dev.bitmap_info()}["a"].enabled
    dev.enable_bitmap("a")
    write(dev, [21])
    assert dev.bitmap("a")[21]

    dev.add_bitmap("sum")
    dev.merge_bitmaps("sum", ["a", "coarse"])
    assert np.array_equal(dev.bitmap("sum"), dev.bitmap("a") | dev.bitmap("coarse"))

    dev.clear_bitmap("a")
    assert not dev.bitmap("a").any()
    assert {i.name: i for i in dev.bitmap_info()}["a"].count == 0
    dev.remove_bitmap("a")
    assert dev.bitmaps() == ["coarse", "sum"]
    write(dev, [30])  # no row records into a removed bitmap's place
    assert dev.bitmap("sum")[30]


def test_every_refusal(engine: Engine, backing: str | None, tmp_path: Path) -> None:
    dev = engine.create_device(SIZE, CLUSTER, backing_file=backing)
    dev.add_bitmap("a")
    with pytest.raises(UsageError, match="already has a bitmap named 'a'"):
        dev.add_bitmap("a")
    with pytest.raises(UsageError, match="must be 1-32 of"):
        dev.add_bitmap("no/slash")
    for g in (CLUSTER // 2, 3 * CLUSTER, 0):
        with pytest.raises(UsageError, match=r"granularity .* must be a power of two"):
            dev.add_bitmap("b", granularity=g)
    for op in (dev.remove_bitmap, dev.clear_bitmap, dev.enable_bitmap, dev.disable_bitmap,
               dev.bitmap):
        with pytest.raises(UsageError, match="no bitmap named 'zz'"):
            op("zz")
    with pytest.raises(UsageError, match="no bitmap named 'zz'"):
        dev.merge_bitmaps("a", ["zz"])
    with pytest.raises(UsageError, match="no bitmap named 'zz'"):
        dev.merge_bitmaps("zz", ["a"])
    with pytest.raises(UsageError, match="at least one source"):
        dev.merge_bitmaps("a", [])
    for i in range(7):
        dev.add_bitmap(f"x{i}")
    with pytest.raises((UsageError, BitmapError), match="already has 8 bitmaps"):
        dev.add_bitmap("ninth")
    for i in range(7):
        dev.remove_bitmap(f"x{i}")
    # Busy: a job consumes it.
    write(dev, [1, 2])
    job = engine.backup(dev, str(tmp_path / "i.raw"), sync="incremental", bitmap="a",
                        speed=CLUSTER)
    with pytest.raises(BitmapBusy, match=f"busy: job {job.job}"):
        dev.clear_bitmap("a")
    with pytest.raises(BitmapBusy, match=f"busy: job {job.job}"):
        dev.remove_bitmap("a")
    dev.add_bitmap("t")
    with pytest.raises(BitmapBusy, match=f"busy: job {job.job}"):
        dev.merge_bitmaps("a", ["t"])
    assert {i.name: i for i in dev.bitmap_info()}["a"].busy == job.job
    job.cancel()
    assert job.wait(30.0).outcome is Outcome.CANCELLED
    assert np.array_equal(dev.bitmap("a"), mask([1, 2]))  # on-success: all put back
    dev.clear_bitmap("a")


def test_a_persistent_bitmap_needs_a_free_row_for_its_backup(engine: Engine,
                                                            tmp_path: Path) -> None:
    dev = engine.create_device(SIZE, CLUSTER, backing_file=str(tmp_path / "d.raw"))
    for i in range(8):
        dev.add_bitmap(f"x{i}")
    with pytest.raises(BitmapError, match="needs a free one"):
        engine.create_backup(dev, str(tmp_path / "i.raw"), sync="incremental", bitmap="x0")
    assert engine.jobs == {}


# -- persistence ------------------------------------------------------------------------------


def test_persistent_bitmaps_survive_a_normal_restart(tmp_path: Path) -> None:
    disk = str(tmp_path / "disk.raw")
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER, backing_file=disk)
        dev.add_bitmap("keep", granularity=2 * CLUSTER)
        dev.add_bitmap("off")
        dev.add_bitmap("gone", persistent=False)
        write(dev, [3, 10])
        dev.disable_bitmap("off")
    assert (store_dir(disk) / "maps").is_file()
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER, backing_file=disk)
        assert dev.bitmaps() == ["keep", "off"]  # the non-persistent one went
        info = {i.name: i for i in dev.bitmap_info()}
        assert info["keep"].granularity == 2 * CLUSTER and info["keep"].enabled
        assert info["keep"].count == 4 * CLUSTER and info["keep"].persistent
        assert not info["off"].enabled and info["off"].count == 2 * CLUSTER
        assert np.array_equal(dev.bitmap("keep"), mask([2, 3, 10, 11]))
        write(dev, [40])  # still recording, into the same rows
        assert dev.bitmap("keep")[40] and not dev.bitmap("off")[40]


def test_a_device_file_open_in_a_live_run_is_refused(tmp_path: Path) -> None:
    disk = str(tmp_path / "disk.raw")
    with Engine() as first, Engine() as second:
        first.create_device(SIZE, CLUSTER, backing_file=disk)
        with pytest.raises(DeviceError, match=r"disk\.raw"):
            second.create_device(SIZE, CLUSTER, backing_file=disk)


def test_a_geometry_change_makes_bitmaps_inconsistent_and_refuses_incrementals(
        tmp_path: Path) -> None:
    disk = str(tmp_path / "disk.raw")
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER, backing_file=disk)
        dev.add_bitmap("b0")
        write(dev, [1])
    with Engine() as engine:
        # Same file, other cluster size: the rows no longer mean what they meant.
        dev = engine.create_device(SIZE, CLUSTER // 2, backing_file=disk)
        (info,) = dev.bitmap_info()
        assert info.consistency == "inconsistent" and "geometry mismatch" in info.reason
        assert not info.enabled
        with pytest.raises(BitmapInconsistent, match="geometry mismatch"):
            engine.create_backup(dev, str(tmp_path / "i.raw"), sync="incremental",
                                 bitmap="b0")
        assert engine.jobs == {} and not (tmp_path / "i.raw.part").exists()
        with pytest.raises(BitmapInconsistent):
            dev.clear_bitmap("b0")
        dev.remove_bitmap("b0")  # the one thing an inconsistent bitmap allows
        dev.add_bitmap("b0")
        assert dev.bitmap_info()[0].consistency == "consistent"


SUPERVISOR = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from shmblock.engine import Engine
    disk, target, ready = sys.argv[1:4]
    engine = Engine()
    dev = engine.create_device({size}, {cluster}, backing_file=disk)
    dev.add_bitmap("b0")
    rng = np.random.default_rng(5)
    for c in (1, 4, 9, 30):
        dev.write(c * {cluster}, rng.integers(1, 256, {cluster}, dtype=np.uint8))
    job = engine.backup(dev, target, sync="incremental", bitmap="b0", speed={cluster})
    for c in (2, 9):
        dev.write(c * {cluster}, rng.integers(1, 256, {cluster}, dtype=np.uint8))
    open(ready, "w").close()
    time.sleep(60)
""")


def test_a_supervisor_killed_mid_backup_leaves_every_bit(tmp_path: Path) -> None:
    """The job's frozen copy is on disk: the next open ORs it back (QEMU would lose the
    bitmap, or mark it inconsistent)."""
    disk, ready = tmp_path / "disk.raw", tmp_path / "ready"
    script = SUPERVISOR.format(size=SIZE, cluster=CLUSTER)
    proc = subprocess.Popen([sys.executable, "-c", script, str(disk),
                             str(tmp_path / "i.raw"), str(ready)],
                            start_new_session=True, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
        cleaned = run_cli("cleanup")  # whatever happened: the dead run's segments go
    assert cleaned.returncode == 0, cleaned.stderr
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER, backing_file=str(disk))
        assert dev.bitmap_store is not None
        recovery = dev.bitmap_store.recovery
        assert recovery.stop == "process-crash", recovery
        assert "b0" in recovery.restored
        # The job's frozen bits came back, with the writes made during the job.
        assert np.array_equal(dev.bitmap("b0"), mask([1, 2, 4, 9, 30]))
        assert dev.bitmap_info()[0].consistency == "consistent"


class ModelledStore(PersistentBitmapFile):
    """The maps file's disk is modelled as its bytes at the last sync."""

    durable: bytes = b""

    def _sync_maps(self) -> None:
        assert self._map is not None
        type(self).durable = bytes(self._map)  # a real fdatasync would only cost time


REGION = 4 * CLUSTER  # 16 regions on the 4 MiB device: recovery is region-precise
BOOT_A, BOOT_B = b"A" * 16, b"B" * 16


def test_a_power_loss_loses_no_write_of_the_guest_write_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Power loss at engine level: the region map is a disk that keeps only what was
    synced (:class:`VolatileDisk`), the maps file keeps only its last sync, the image
    every write (the worst case: the page cache wrote all data back, none of the bits).
    Recovery must mark every cluster written since the last backup's instant dirty, so
    an incremental from the recovered bitmap, over the full backup, is the device."""
    disk = str(tmp_path / "disk.raw")
    intent = VolatileDisk()

    def modelled(image: str, cluster_size: int, run_id: str) -> PersistentBitmapFile:
        store = ModelledStore.open(image, cluster_size=cluster_size, run_id=run_id,
                                   region_size=REGION, intent=intent, boot_id=BOOT_A)
        # The backup worker attaches too (and opens the real file, which it never uses).
        (store_dir(image) / "intent").touch()
        return store

    monkeypatch.setattr(device_module, "open_bitmap_store", modelled)
    full = tmp_path / "full.raw"
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER, backing_file=disk)
        dev.add_bitmap("b0")
        write(dev, [0, 1, 17, 40], seed=1)
        job = engine.backup(dev, str(full), sync="full", bitmap="b0",
                            bitmap_mode="on-success")
        assert job.wait(30.0).outcome is Outcome.COMPLETED
        # After the job's checkpoint: these bits never reach the maps file's disk,
        # only the region map's first-touch syncs protect them.
        after = [2, 9, 33, 34, 63]
        write(dev, after, seed=2)
        rows_on_disk = ModelledStore.durable
        intent_on_disk = intent.power_loss()
    monkeypatch.undo()
    # The power went: the disk holds the image as written, the maps file as last
    # synced, the region map as last synced.
    maps = store_dir(disk) / "maps"
    maps.write_bytes(rows_on_disk)
    (store_dir(disk) / "intent").write_bytes(intent_on_disk)
    monkeypatch.setattr(device_module, "open_bitmap_store",
                        lambda image, cs, run_id: PersistentBitmapFile.open(
                            image, cluster_size=cs, run_id=run_id, boot_id=BOOT_B))
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER, backing_file=disk)
        assert dev.bitmap_store is not None
        assert dev.bitmap_store.recovery.stop == "machine-crash"
        recovered = dev.bitmap("b0")
        missed = [c for c in after if not recovered[c]]
        assert not missed, f"writes lost by the power loss: clusters {missed}"
        # An over-approximation by whole regions, not the whole device.
        assert recovered.sum() < N // 2
        inc = tmp_path / "inc.raw"
        job = engine.backup(dev, str(inc), sync="incremental", bitmap="b0")
        assert job.wait(30.0).outcome is Outcome.COMPLETED
        current = dev.device.data.copy().reshape(N, CLUSTER)
    chain = np.frombuffer(full.read_bytes(), dtype=np.uint8).reshape(N, CLUSTER).copy()
    incremental = np.frombuffer(inc.read_bytes(), dtype=np.uint8).reshape(N, CLUSTER)
    chain[recovered] = incremental[recovered]
    assert np.array_equal(chain, current), "full + incremental is not the device"


def test_a_power_loss_without_the_region_map_marks_bitmaps_inconsistent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another boot, and the region map never reached the disk: the recording bitmap
    cannot be trusted, and an incremental from it is refused before it starts."""
    disk = str(tmp_path / "disk.raw")
    monkeypatch.setattr(device_module, "open_bitmap_store",
                        lambda image, cs, run_id: ModelledStore.open(
                            image, cluster_size=cs, run_id=run_id, intent=VolatileDisk(),
                            boot_id=BOOT_A))
    # (No backup runs here, so no process opens the region-map file, which is missing.)
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER, backing_file=disk)
        dev.add_bitmap("b0")
        write(dev, [1])
        rows_on_disk = ModelledStore.durable
    (store_dir(disk) / "maps").write_bytes(rows_on_disk)
    monkeypatch.setattr(device_module, "open_bitmap_store",
                        lambda image, cs, run_id: PersistentBitmapFile.open(
                            image, cluster_size=cs, run_id=run_id, boot_id=BOOT_B))
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER, backing_file=disk)
        (info,) = dev.bitmap_info()
        assert info.consistency == "inconsistent" and "region map" in info.reason, info
        with pytest.raises(BitmapInconsistent, match="inconsistent"):
            engine.create_backup(dev, str(tmp_path / "i.raw"), sync="incremental",
                                 bitmap="b0")
        assert engine.jobs == {}
        with pytest.raises(BitmapInconsistent):
            dev.bitmap("b0")


def test_the_guest_write_path_arms_regions(engine: Engine, tmp_path: Path) -> None:
    """The first write to a region in an epoch makes its intent durable; later ones
    only look at one byte; a backup's instant starts a new epoch."""
    dev = engine.create_device(SIZE, CLUSTER, backing_file=str(tmp_path / "d.raw"))
    store = dev.bitmap_store
    assert isinstance(store, PersistentBitmapFile)
    dev.add_bitmap("b0")
    assert not store.armed.any()
    write(dev, [3])
    assert store.armed.all()  # one 64 MiB region covers this small device
    job = engine.backup(dev, str(tmp_path / "i.raw"), sync="incremental", bitmap="b0")
    assert not store.armed.any()  # begin_epoch at the instant
    assert job.wait(30.0).outcome is Outcome.COMPLETED
    write(dev, [4])
    assert store.armed.all()


# -- SIGKILL of every process ------------------------------------------------------------------

EVERYTHING = textwrap.dedent("""
    import sys, time
    from shmblock.engine import Engine
    disk, full, inflight = sys.argv[1:4]
    engine = Engine()
    dev = engine.create_device({size}, {cluster}, backing_file=disk)
    dev.add_bitmap("b0")
    dev.fill(0.5, seed=3)
    job = engine.backup(dev, full, sync="full", bitmap="b0", bitmap_mode="on-success")
    assert job.wait(60).ok, job.wait(60).error
    engine.start_writers(dev, 2, workload="random", block_size=4096, rate=30, seed=9)
    time.sleep(0.5)
    # A slow incremental in flight when everything dies: its frozen copy is on disk.
    engine.backup(dev, inflight, sync="incremental", bitmap="b0", speed={cluster})
    time.sleep(0.3)
    print("ready", flush=True)
    time.sleep(120)
""")


@needs_qemu_img
def test_sigkill_of_every_process_loses_no_bit(tmp_path: Path) -> None:
    """Writers, backup worker and supervisor all killed with SIGKILL mid-run, mid-backup:
    the device file, re-opened by a new engine, gives an incremental that, over the full
    backup, reads back as the device file (the state after the last write: writes went
    to its MAP_SHARED mapping). QEMU would have lost the bitmap or marked it
    inconsistent and forced a full backup."""
    disk, full, inc = tmp_path / "disk.raw", tmp_path / "full.qcow2", tmp_path / "inc.qcow2"
    size = 16 * MiB
    script = EVERYTHING.format(size=size, cluster=CLUSTER)
    proc = subprocess.Popen([sys.executable, "-c", script, str(disk), str(full),
                             str(tmp_path / "inflight.raw")], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the child prints "ready" or dies
        assert line.strip() == "ready", proc.communicate(timeout=30)[1]
        assert len(children(proc.pid)) >= 3, "writers and the backup worker run"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our child leads its own group
        proc.communicate(timeout=30)
        cleaned = run_cli("cleanup")  # whatever happened: the dead run's segments go
    assert proc.returncode == -signal.SIGKILL
    assert cleaned.returncode == 0, cleaned.stderr
    assert not (tmp_path / "inflight.raw.part").exists()
    with Engine() as engine:
        dev = engine.create_device(size, CLUSTER, backing_file=str(disk))
        assert dev.bitmap_store is not None
        recovery = dev.bitmap_store.recovery
        assert recovery.stop == "process-crash" and "b0" in recovery.restored, recovery
        (info,) = dev.bitmap_info()
        assert info.consistency == "consistent" and 0 < info.count < size, info
        job = engine.backup(dev, str(inc), sync="incremental", bitmap="b0",
                            backing_file=str(full), backing_format="qcow2", verify=True)
        result = job.wait(60.0)
        assert result.outcome is Outcome.COMPLETED and result.verified, result.error
        assert result.bytes_total == info.count  # only what the bitmap held
    for image in (full, inc):
        check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True,
                               text=True, timeout=60, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
    same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(disk),
                           str(inc)], capture_output=True, text=True, timeout=60, check=False)
    assert same.returncode == 0, same.stdout + same.stderr


# -- every sync mode × bitmap mode × outcome, with a persistent bitmap --------------------------


@pytest.mark.parametrize("outcome", tsb.OUTCOMES)
@pytest.mark.parametrize(("sync", "mode"), tsb.JOBS)
def test_persistent_bitmap_after_every_sync_mode_bitmap_mode_and_outcome(
        tmp_path: Path, sync: str, mode: str | None, outcome: str,
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The matrix of tests/test_sync_bitmap.py on a file-backed device: the bitmap's
    fate goes through the store's frozen copy (begin_backup / end_backup) and must be
    the same as in shared memory; and it is what a restart finds."""
    disk = str(tmp_path / "dev.raw")

    def prepare(engine: Engine) -> DeviceHandle:
        dev = engine.create_device(tsb.SIZE, tsb.CLUSTER, backing_file=disk)
        dev.fill(0.75, seed=1)
        dev.add_bitmap("b0")
        tsb.write_clusters(dev, tsb.DIRTY, seed=100)
        return dev

    monkeypatch.setattr(tsb, "prepare", prepare)
    bits: list[np.ndarray] = []
    original = DeviceHandle.close

    def close_and_remember(self: DeviceHandle) -> None:
        if self.bitmap_store is not None and "b0" in self.bitmaps():
            bits.append(self.bitmap("b0"))
        original(self)

    monkeypatch.setattr(DeviceHandle, "close", close_and_remember)
    tsb.test_sync_mode_bitmap_mode_outcome(tmp_path, sync, mode, outcome, request)
    monkeypatch.setattr(DeviceHandle, "close", original)
    (at_close,) = bits
    with PersistentBitmapFile.open(disk) as store:
        assert store.recovery.stop == "clean" and not store.recovery.restored
        assert np.array_equal(store.load("b0") != 0, at_close)
        assert store.free_rows() == 7, "the job's frozen copy is gone"


# -- transactions -----------------------------------------------------------------------------


def test_a_transactions_bitmap_actions_on_a_persistent_device_are_all_or_nothing(
        engine: Engine, tmp_path: Path) -> None:
    from shmblock.transaction import (
        BitmapAdd,
        BitmapClear,
        BitmapDisable,
        BitmapMerge,
        BitmapRemove,
    )

    disk = str(tmp_path / "disk.raw")
    dev = engine.create_device(SIZE, CLUSTER, backing_file=disk)
    for i in range(7):
        dev.add_bitmap(f"x{i}")
    write(dev, [1, 2, 3])
    dev.clear_bitmap("x3")
    write(dev, [10])
    engine.transaction([BitmapClear(dev, "x1"), BitmapDisable(dev, "x4"),
                        BitmapRemove(dev, "x5"), BitmapAdd(dev, "new"),
                        BitmapMerge(dev, "new", ("x3",))])
    assert dev.bitmaps() == ["new", "x0", "x1", "x2", "x3", "x4", "x6"]
    info = {i.name: i for i in dev.bitmap_info()}
    assert info["x1"].count == 0 and not info["x4"].enabled and info["new"].persistent
    assert np.array_equal(dev.bitmap("new"), mask([10]))
    write(dev, [20])
    assert dev.bitmap("new")[20] and not dev.bitmap("x4")[20]

    # A running backup's frozen copy holds the eighth row: the second add fails inside
    # the freeze, and every earlier action of the transaction is undone.
    job = engine.backup(dev, str(tmp_path / "i.raw"), sync="incremental", bitmap="x0",
                        speed=CLUSTER)
    before = {name: dev.bitmap(name) for name in dev.bitmaps()}
    enabled = {i.name: i.enabled for i in dev.bitmap_info()}
    with pytest.raises(BitmapError, match="already has 8 bitmaps"):
        engine.transaction([BitmapClear(dev, "x2"), BitmapRemove(dev, "x6"),
                            BitmapAdd(dev, "z"), BitmapAdd(dev, "zz")])
    assert {name: dev.bitmap(name) for name in dev.bitmaps()}.keys() == before.keys()
    for name, bits in before.items():
        assert np.array_equal(dev.bitmap(name), bits), name
    assert {i.name: i.enabled for i in dev.bitmap_info()} == enabled
    job.cancel()
    job.wait(30.0)
    engine.close()
    with PersistentBitmapFile.open(disk) as store:  # and so it is on disk
        assert store.names() == sorted(before)
        for name, bits in before.items():
            if name != "x0":  # x0 got its frozen bits back plus the write to 20
                assert np.array_equal(store.load(name) != 0, bits), name
