"""Persistent dirty bitmaps (shmblock.bitmaps): every operation and every validation error.

The crash tests (SIGKILL of real processes, modelled power loss) are in
test_bitmap_crash.py.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from shmblock.bitmaps import FilePersistence, PersistentBitmapFile, VolatileDisk, store_dir
from shmblock.bitmaps import files as F
from shmblock.bitmaps import ondisk as D
from shmblock.bitmaps import store as S
from shmblock.errors import (
    BitmapBusy,
    BitmapError,
    BitmapInconsistent,
    ShmblockError,
    UsageError,
)

CS = 64 * 1024
REGION = 1 << 20  # 16 clusters per region
SIZE = 8 << 20  # 128 clusters, 8 regions
OTHER_BOOT = b"\xee" * 16


def make_image(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.raw")


def open_store(image: Path, **kw: object) -> PersistentBitmapFile:
    kw.setdefault("cluster_size", CS)
    kw.setdefault("region_size", REGION)
    return PersistentBitmapFile.open(image, **kw)  # type: ignore[arg-type]


@pytest.fixture
def store(image: Path) -> Iterator[PersistentBitmapFile]:
    s = open_store(image, run_id="run1")
    try:
        yield s
    finally:
        s.close()


def written(s: PersistentBitmapFile, c0: int, c1: int) -> None:
    """What a guest writer does: note the write, then store 1 in every recording row."""
    s.note_write(c0, c1)
    mask = s.enabled_mask()
    for i in range(D.MAX_BITMAPS):
        if mask >> i & 1:
            s.dirty[i, c0:c1] = 1


def row_of(s: PersistentBitmapFile, name: str) -> np.ndarray:
    return s.load(name)


def info(s: PersistentBitmapFile, name: str) -> S.BitmapInfo:
    return s.info(name)


# -- creating and opening -------------------------------------------------------------


def test_new_store_is_private_and_empty(image: Path, store: PersistentBitmapFile) -> None:
    d = store_dir(image)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for name in ("maps", "intent"):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600
    assert store.recovery.stop == "new"
    assert store.list() == []
    assert store.enabled_mask() == 0


def test_missing_or_odd_image_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BitmapError, match="No such file"):
        PersistentBitmapFile.open(tmp_path / "nope.raw")
    with pytest.raises(BitmapError, match="not a regular file"):
        PersistentBitmapFile.open(tmp_path)
    odd = make_image(tmp_path / "odd.raw", CS + 512)
    with pytest.raises(UsageError, match="multiple of the cluster size"):
        PersistentBitmapFile.open(odd, cluster_size=CS)
    with pytest.raises(UsageError, match="cluster size"):
        open_store(make_image(tmp_path / "a.raw"), cluster_size=3000)
    with pytest.raises(UsageError, match="region size"):
        open_store(make_image(tmp_path / "b.raw"), region_size=CS // 2)


def test_reopen_without_a_cluster_size_uses_the_stores_own(image: Path) -> None:
    with open_store(image, cluster_size=4096) as s:
        s.add("a")
        written(s, 2000, 2001)
    with PersistentBitmapFile.open(image) as s:  # no cluster size: not a geometry change
        assert s.shape.cluster_size == 4096
        assert info(s, "a").status == "consistent"
        assert info(s, "a").count == 4096


@pytest.mark.parametrize("run_id", ["x" * 17, "a b", "ü", "r/1"])
def test_bad_run_id_is_a_usage_error(image: Path, run_id: str) -> None:
    with pytest.raises(UsageError, match="run id"):
        open_store(image, run_id=run_id)


def test_a_second_owner_is_refused_while_the_first_is_open(
        image: Path, store: PersistentBitmapFile) -> None:
    with pytest.raises(BitmapBusy, match=r"open by run run1 \(pid \d+\)"):
        open_store(image)


def test_planted_symlink_or_shared_directory_is_refused(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.raw")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    store_dir(img).symlink_to(elsewhere)
    with pytest.raises(BitmapError, match="not a private directory"):
        open_store(img)
    store_dir(img).unlink()
    store_dir(img).mkdir()
    os.chmod(store_dir(img), 0o777)
    with pytest.raises(BitmapError, match="not a private directory"):
        open_store(img)
    os.chmod(store_dir(img), 0o700)
    (store_dir(img) / "maps").symlink_to(tmp_path / "target")
    with pytest.raises(BitmapError, match="symlink"):
        open_store(img)


# -- add, remove, names ------------------------------------------------------------------


def test_add_defaults_to_cluster_granularity_enabled(store: PersistentBitmapFile) -> None:
    store.add("daily")
    i = info(store, "daily")
    assert (i.granularity, i.enabled, i.status, i.in_use, i.count) == (
        CS, True, "consistent", True, 0)
    assert store.enabled_mask() == 1
    store.add("weekly", granularity=4 * CS, enabled=False)
    assert info(store, "weekly").enabled is False
    assert store.enabled_mask() == 1
    assert store.names() == ["daily", "weekly"]


@pytest.mark.parametrize("name", ["", "x" * 33, "a/b", "a b", "bäd", "a\0b", "-" * 40])
def test_add_rejects_bad_names(store: PersistentBitmapFile, name: str) -> None:
    with pytest.raises(UsageError, match="must be 1-32 of"):
        store.add(name)


def test_add_accepts_every_allowed_character(store: PersistentBitmapFile) -> None:
    store.add("Az09_.-" + "x" * 25)
    assert store.names() == ["Az09_.-" + "x" * 25]


@pytest.mark.parametrize("granularity", [CS // 2, 3 * CS, 0, -CS, 1 << 32, 65536.0])
def test_add_rejects_bad_granularity(store: PersistentBitmapFile, granularity: object) -> None:
    with pytest.raises(UsageError, match="granularity"):
        store.add("b", granularity=granularity)  # type: ignore[arg-type]


def test_add_refuses_duplicates_and_a_ninth(store: PersistentBitmapFile) -> None:
    for k in range(D.MAX_BITMAPS):
        store.add(f"b{k}")
    with pytest.raises(BitmapError, match="already exists"):
        store.add("b0")
    with pytest.raises(BitmapError, match="already has 8 bitmaps"):
        store.add("b8")


def test_remove_frees_the_slot_and_unknown_names_are_errors(
        store: PersistentBitmapFile) -> None:
    store.add("a")
    written(store, 0, 3)
    store.remove("a")
    assert store.names() == []
    store.add("a")  # the same slot again: starts empty
    assert info(store, "a").count == 0
    with pytest.raises(BitmapError, match="no bitmap named 'zz'"):
        store.remove("zz")
    with pytest.raises(UsageError):
        store.remove("bad/name")


def test_busy_bitmap_refuses_clear_remove_merge_into(store: PersistentBitmapFile) -> None:
    store.add("a")
    store.add("b")
    store.set_busy("a", "job-7")
    assert info(store, "a").busy == "job-7"
    ops: list[Callable[[], None]] = [lambda: store.clear("a"), lambda: store.remove("a"),
                                     lambda: store.merge("a", ["b"])]
    for op in ops:
        with pytest.raises(BitmapBusy, match="in use by job job-7"):
            op()
    with pytest.raises(BitmapBusy, match="job-7"):
        store.set_busy("a", "job-8")
    store.merge("b", ["a"])  # a busy bitmap can still be a merge source
    store.set_busy("a", None)
    store.clear("a")


# -- recording, clear, enable/disable ---------------------------------------------------


def test_clear_resets_every_bit(store: PersistentBitmapFile) -> None:
    store.add("a")
    written(store, 5, 9)
    assert info(store, "a").count == 4 * CS
    store.clear("a")
    assert info(store, "a").count == 0
    assert not row_of(store, "a").any()


def test_disable_stops_recording_and_enable_resumes(store: PersistentBitmapFile) -> None:
    store.add("a")
    store.add("b")
    store.disable("b")
    written(store, 0, 2)
    store.enable("b")
    written(store, 10, 11)
    assert np.flatnonzero(row_of(store, "a")).tolist() == [0, 1, 10]
    assert np.flatnonzero(row_of(store, "b")).tolist() == [10]
    assert info(store, "b").enabled


def test_count_is_in_bytes_at_granularity_cut_at_the_device_end(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.raw", SIZE + CS)  # 129 clusters
    with open_store(img) as s:
        s.add("fine")
        s.add("coarse", granularity=16 * CS)
        written(s, 0, 1)
        written(s, 128, 129)  # the last cluster, alone in the last coarse granule
        assert info(s, "fine").count == 2 * CS
        assert info(s, "coarse").count == 16 * CS + CS
        loaded = s.load("coarse")
        assert np.flatnonzero(loaded).tolist() == [*range(16), 128]


# -- merge -----------------------------------------------------------------------------------


def test_merge_same_granularity_is_a_union(store: PersistentBitmapFile) -> None:
    store.add("a")
    store.add("b")
    store.add("t", enabled=False)
    store.disable("b")
    written(store, 1, 2)
    store.store("b", np.isin(np.arange(128), [7, 8]))
    store.merge("t", ["a", "b"])
    assert np.flatnonzero(row_of(store, "t")).tolist() == [1, 7, 8]
    assert info(store, "t").status == "consistent"


def test_merge_coarse_into_fine_marks_every_cluster_of_the_granule(
        store: PersistentBitmapFile) -> None:
    store.add("coarse", granularity=4 * CS)
    store.add("fine", enabled=False)
    written(store, 5, 6)
    store.merge("fine", ["coarse"])
    assert np.flatnonzero(row_of(store, "fine")).tolist() == [4, 5, 6, 7]


def test_merge_fine_into_coarse_reports_the_enclosing_granule(
        store: PersistentBitmapFile) -> None:
    store.add("fine")
    store.add("coarse", granularity=8 * CS, enabled=False)
    written(store, 9, 10)
    store.merge("coarse", ["fine"])
    assert info(store, "coarse").count == 8 * CS
    assert np.flatnonzero(row_of(store, "coarse")).tolist() == list(range(8, 16))


def test_merge_errors(store: PersistentBitmapFile) -> None:
    store.add("a")
    with pytest.raises(UsageError, match="at least one source"):
        store.merge("a", [])
    with pytest.raises(BitmapError, match="no bitmap named 'ghost'"):
        store.merge("a", ["ghost"])
    with pytest.raises(BitmapError, match="no bitmap named 'ghost'"):
        store.merge("ghost", ["a"])


# -- load / store --------------------------------------------------------------------------


def test_store_replaces_and_load_returns_a_copy(store: PersistentBitmapFile) -> None:
    store.add("a", enabled=False)
    want = np.zeros(128, dtype=np.uint8)
    want[[3, 64, 127]] = 7  # any non-zero byte means dirty
    store.store("a", want)
    got = store.load("a")
    assert np.flatnonzero(got).tolist() == [3, 64, 127]
    got[:] = 1
    assert info(store, "a").count == 3 * CS


def test_load_into_an_existing_map(store: PersistentBitmapFile) -> None:
    store.add("a", granularity=2 * CS)
    written(store, 9, 10)
    out = np.full(128, 5, dtype=np.uint8)
    assert store.load("a", out=out) is out
    assert np.flatnonzero(out).tolist() == [8, 9]
    with pytest.raises(UsageError, match=r"load into a uint8 array of shape \(128,\)"):
        store.load("a", out=np.zeros(128, dtype=np.bool_))


@pytest.mark.parametrize("bad", [np.zeros(127, np.uint8), np.zeros(128, np.int64),
                                 np.zeros((2, 64), np.uint8)])
def test_store_validates_the_map(store: PersistentBitmapFile, bad: np.ndarray) -> None:
    store.add("a")
    with pytest.raises(UsageError, match=r"uint8 or bool of shape \(128,\)"):
        store.store("a", bad)


# -- persistence across a clean stop, validation of what is read ------------------------------


def test_bitmaps_survive_a_clean_close_and_reopen(image: Path) -> None:
    with open_store(image, run_id="r1") as s:
        s.add("a")
        s.add("b", granularity=2 * CS, enabled=False)
        written(s, 3, 6)
    with open_store(image, run_id="r2") as s:
        assert s.recovery.stop == "clean"
        assert s.recovery.previous_run == "r1"
        assert [(i.name, i.granularity, i.enabled, i.status) for i in s.list()] == [
            ("a", CS, True, "consistent"), ("b", 2 * CS, False, "consistent")]
        assert np.flatnonzero(s.load("a")).tolist() == [3, 4, 5]
        written(s, 100, 101)
        assert info(s, "a").count == 4 * CS


def corrupt(path: Path, offset: int, data: bytes = b"\xff") -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def maps_path(image: Path) -> Path:
    return store_dir(image) / "maps"


def test_a_corrupt_row_makes_only_that_bitmap_inconsistent(image: Path) -> None:
    with open_store(image) as s:
        s.add("good")
        s.add("bad")
        written(s, 0, 1)
        shape = s.shape
    corrupt(maps_path(image), D.MAPS_OFFSET + shape.map_bytes + 50, b"\1")  # row 1
    with open_store(image) as s:
        assert s.recovery.inconsistent == {
            "bad": "checksum mismatch: the map on disk is corrupt"}
        assert info(s, "good").status == "consistent"
        bad = info(s, "bad")
        assert (bad.status, bad.enabled, bad.count) == ("inconsistent", False, 0)
        assert s.enabled_mask() == 1  # an inconsistent bitmap does not record
        with pytest.raises(BitmapInconsistent, match="checksum mismatch") as err:
            s.require_consistent("bad")
        assert isinstance(err.value, ShmblockError)
        assert (err.value.name, err.value.reason) == (
            "bad", "checksum mismatch: the map on disk is corrupt")
        s.require_consistent("good")
        ops: list[Callable[[], object]] = [
            lambda: s.load("bad"), lambda: s.clear("bad"), lambda: s.merge("good", ["bad"]),
            lambda: s.merge("bad", ["good"]), lambda: s.enable("bad")]
        for op in ops:
            with pytest.raises(BitmapInconsistent, match="inconsistent"):
                op()
        s.remove("bad")  # the one thing an inconsistent bitmap allows
        assert s.names() == ["good"]
    with open_store(image) as s:  # and the verdict itself persisted until then
        assert s.names() == ["good"]


def test_inconsistency_persists_across_reopen(image: Path) -> None:
    with open_store(image) as s:
        s.add("a")
        shape = s.shape
    corrupt(maps_path(image), D.MAPS_OFFSET + 3, b"\1")
    with open_store(image):
        pass
    with open_store(image) as s:
        i = info(s, "a")
        assert (i.status, i.reason) == ("inconsistent",
                                        "checksum mismatch: the map on disk is corrupt")
        assert shape == s.shape


def test_a_torn_directory_entry_becomes_a_removable_inconsistent_bitmap(image: Path) -> None:
    with open_store(image) as s:
        s.add("a")
        s.add("b")
    corrupt(maps_path(image), D.DIR_OFFSET + 1 * D.ENTRY_SIZE + 40, b"\x42")
    with open_store(image) as s:
        assert s.names() == ["a", "corrupt-entry-1"]
        i = info(s, "corrupt-entry-1")
        assert i.status == "inconsistent"
        assert "directory entry checksum mismatch" in i.reason
        s.remove("corrupt-entry-1")


def test_entry_with_valid_checksum_but_bad_fields_is_inconsistent(image: Path) -> None:
    with open_store(image) as s:
        s.add("a")
    bogus = D.Entry("a", 3 * CS, D.F_DEFINED, 0, "").pack()  # granularity not a power of 2
    corrupt(maps_path(image), D.DIR_OFFSET, bogus)
    with open_store(image) as s:
        assert "bad granularity" in info(s, "corrupt-entry-0").reason


@pytest.mark.parametrize(("offset", "data", "message"), [
    (0, b"NOTMAGIC", "not a shmblock bitmap store"),
    (8, b"\x09", "version 9 is not supported"),
    (40, b"\x01", "superblock checksum does not match"),
])
def test_a_corrupt_superblock_is_a_clear_error(image: Path, offset: int, data: bytes,
                                               message: str) -> None:
    with open_store(image):
        pass
    corrupt(maps_path(image), offset, data)
    with pytest.raises(BitmapError, match=message) as err:
        open_store(image)
    assert "remove" in str(err.value) and "to start over" in str(err.value)


def test_a_truncated_maps_file_is_a_clear_error(image: Path) -> None:
    with open_store(image):
        pass
    os.truncate(maps_path(image), D.MAPS_OFFSET + 100)
    with pytest.raises(BitmapError, match="the file has 8292 bytes"):
        open_store(image)
    os.truncate(maps_path(image), 10)
    with pytest.raises(BitmapError, match="truncated"):
        open_store(image)


def test_geometry_change_keeps_names_but_marks_every_bitmap_inconsistent(image: Path) -> None:
    with open_store(image) as s:
        s.add("a")
        s.add("b", granularity=2 * CS, enabled=False)
        written(s, 1, 2)
    os.truncate(image, 2 * SIZE)  # the image grew
    with open_store(image) as s:
        assert s.recovery.stop == "geometry-changed"
        assert s.shape.device_size == 2 * SIZE
        for name in ("a", "b"):
            i = info(s, name)
            assert i.status == "inconsistent"
            assert i.reason.startswith(f"geometry mismatch: recorded for {SIZE} bytes")
        s.remove("a")
        s.add("a")  # a new bitmap at the new size works
        written(s, 255, 256)
        assert info(s, "a").count == CS
    with open_store(image, cluster_size=2 * CS) as s:  # the cluster size changed
        assert "geometry mismatch" in info(s, "a").reason


# -- the region map and note_write --------------------------------------------------------------


def intent_bytes(image: Path, regions: int = SIZE // REGION) -> list[int]:
    raw = (store_dir(image) / "intent").read_bytes()
    return list(raw[D.INTENT_HEADER : D.INTENT_HEADER + regions])


def test_note_write_makes_the_region_durable_once_per_epoch(
        image: Path, store: PersistentBitmapFile) -> None:
    assert store.note_write(0, 1) is True  # first touch of region 0: synced
    assert store.note_write(3, 9) is False  # region 0 again: one byte lookup
    assert store.note_write(15, 17) is True  # crosses into region 1
    assert store.note_write(40, 41) is True
    assert intent_bytes(image) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert store.armed.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize(("c0", "c1"), [(-1, 1), (5, 5), (127, 129), (200, 201)])
def test_note_write_rejects_clusters_outside_the_device(
        store: PersistentBitmapFile, c0: int, c1: int) -> None:
    with pytest.raises(UsageError, match="outside the device"):
        store.note_write(c0, c1)


def test_checkpoint_clears_only_regions_not_written_in_the_new_epoch(
        image: Path, store: PersistentBitmapFile) -> None:
    store.add("a")
    written(store, 0, 1)
    written(store, 20, 21)
    written(store, 40, 41)
    store.clear("a")
    store.begin_epoch()
    written(store, 20, 21)  # region 1 is written again in the new epoch
    assert store.checkpoint() == 2
    assert intent_bytes(image) == [0, 1, 0, 0, 0, 0, 0, 0]
    assert store.note_write(20, 21) is False
    assert store.note_write(0, 1) is True


def test_checkpoint_leaves_a_region_a_writer_is_arming(
        image: Path, store: PersistentBitmapFile) -> None:
    written(store, 0, 1)
    store.begin_epoch()
    fd = os.open(maps_path(image), os.O_RDWR)
    try:
        assert F.lock(fd, fcntl.F_WRLCK, S.REGION_LOCKS + 0)  # a writer mid-arm
        assert store.checkpoint() == 0
        assert intent_bytes(image)[0] == 1
    finally:
        os.close(fd)
    assert store.checkpoint() == 1


def test_note_write_times_out_on_a_stuck_region_lock(
        image: Path, store: PersistentBitmapFile) -> None:
    fd = os.open(maps_path(image), os.O_RDWR)
    try:
        assert F.lock(fd, fcntl.F_WRLCK, S.REGION_LOCKS + 2)
        with pytest.raises(BitmapError, match="region 2 stayed locked"):
            store.note_write(32, 33, timeout=0.05)
        assert store.armed[2] == 0
    finally:
        os.close(fd)
    assert store.note_write(32, 33) is True


class FailingDisk(VolatileDisk):
    """A region-map disk whose syncs fail (EIO) once told to."""

    fail = False

    def sync(self) -> None:
        if self.fail:
            raise BitmapError("intent: cannot fdatasync: Input/output error")
        super().sync()


def test_a_failed_region_sync_fails_the_write_and_does_not_arm(image: Path) -> None:
    disk = FailingDisk()
    with open_store(image, intent=disk) as s:
        disk.fail = True
        with pytest.raises(BitmapError, match="Input/output error"):
            s.note_write(0, 1)
        assert s.armed[0] == 0  # armed only ever promises a durable intent byte
        disk.fail = False
        assert s.note_write(0, 1) is True


def test_checkpoint_order_data_then_maps_then_intent(image: Path) -> None:
    events: list[str] = []

    class Recording(PersistentBitmapFile):
        def _sync_maps(self) -> None:
            events.append("maps-sync")
            super()._sync_maps()

    disk = VolatileDisk(before_op=lambda op: events.append(f"intent-{op}"))
    s = Recording.open(image, cluster_size=CS, region_size=REGION, intent=disk,
                       image_sync=lambda: events.append("image-sync"))
    try:
        s.add("a")
        written(s, 0, 1)
        s.clear("a")
        s.begin_epoch()
        events.clear()
        s.checkpoint()
        assert events == ["image-sync", "maps-sync", "intent-write", "intent-sync"]
        events.clear()
        s.note_write(0, 1)
        assert events == ["intent-write", "intent-sync"]
    finally:
        s.close()


# -- writers attach ---------------------------------------------------------------------------


def test_attach_needs_a_live_owner_and_cannot_manage(image: Path) -> None:
    with open_store(image) as s:
        s.add("a")
    with pytest.raises(BitmapError, match="no run has these bitmaps open"):
        PersistentBitmapFile.attach(image)
    with open_store(image) as owner:
        w = PersistentBitmapFile.attach(image)
        try:
            assert w.enabled_mask() == 1
            assert w.note_write(16, 17) is True
            w.dirty[0, 16] = 1
            assert owner.armed[1] == 1  # the armed map is shared
            assert np.flatnonzero(owner.load("a")).tolist() == [16]
            with pytest.raises(BitmapError, match="only the run that opened"):
                w.add("b")
            for op in (w.begin_epoch, w.checkpoint, lambda: w.set_busy("a", "j"),
                       lambda: w.begin_backup("a", "j"), lambda: w.clear("a"),
                       lambda: w.end_backup("a", "j", put_back=True)):
                with pytest.raises(BitmapError, match="only the run that opened"):
                    op()
        finally:
            w.close()


def test_close_with_a_live_view_is_a_clear_error(image: Path) -> None:
    s = open_store(image)
    view = s.dirty[0]
    with pytest.raises(BitmapError, match="numpy view of the maps is still alive"):
        s.close()
    del view


def test_an_owner_will_not_reopen_under_a_writer_of_a_dead_run(image: Path) -> None:
    s = open_store(image, run_id="dead")
    w = PersistentBitmapFile.attach(image)
    w2 = PersistentBitmapFile.attach(image)  # writers share their lock
    s.abandon()  # the owner died; its writers did not (yet)
    w2.close()
    with pytest.raises(BitmapBusy, match="writer processes of a previous run"):
        open_store(image)
    w.close()
    with open_store(image) as r:
        assert r.recovery.stop == "process-crash"


def test_closed_store_refuses_use(image: Path) -> None:
    s = open_store(image)
    s.close()
    s.close()  # idempotent
    with pytest.raises(BitmapError, match="closed"):
        s.add("a")


# -- persistence backends ------------------------------------------------------------------------


def test_file_persistence_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(BitmapError, match="symlink"):
        FilePersistence(str(tmp_path / "link"))
    with pytest.raises(BitmapError, match="cannot open"):
        FilePersistence(str(tmp_path / "missing"))


def test_file_persistence_round_trip(tmp_path: Path) -> None:
    p = FilePersistence(str(tmp_path / "f"), create_size=16)
    try:
        p.write(3, b"abc")
        p.sync()
        assert p.read(2, 5) == b"\0abc\0"
        assert p.size() == 16
    finally:
        p.close()
    with pytest.raises(BitmapError, match="closed"):
        p.read(0, 1)


def test_volatile_disk_keeps_only_what_was_synced() -> None:
    d = VolatileDisk(bytes(8))
    d.write(0, b"A")
    d.sync()
    d.write(1, b"B")
    d.write(2, b"C")
    assert d.read(0, 3) == b"ABC"  # the page cache sees everything
    assert d.power_loss()[:3] == b"A\0\0"
    d.write(1, b"B")
    d.write(2, b"C")
    assert d.power_loss(keep=lambda i: i == 1)[:3] == b"A\0C"  # adversarial write-back
    assert d.read(0, 3) == b"A\0C"


# -- a backup consumes a bitmap: the frozen copy ----------------------------------------------


def test_begin_backup_hands_over_the_bits_and_records_new_writes(
        store: PersistentBitmapFile) -> None:
    store.add("inc")
    written(store, 2, 4)
    frozen = store.begin_backup("inc", "job-1")
    assert np.flatnonzero(frozen).tolist() == [2, 3]
    assert info(store, "inc").count == 0
    assert info(store, "inc").busy == "job-1"
    assert store.names() == ["inc"]  # the frozen copy is not a bitmap of its own
    written(store, 3, 4)  # a write during the job stays dirty for the next backup
    store.end_backup("inc", "job-1", put_back=False)  # completed
    assert np.flatnonzero(store.load("inc")).tolist() == [3]
    assert info(store, "inc").busy is None
    for k in range(D.MAX_BITMAPS - 1):  # the frozen copy's slot is free again
        store.add(f"x{k}")


def test_a_failed_backup_puts_every_frozen_bit_back(store: PersistentBitmapFile) -> None:
    store.add("inc")
    written(store, 2, 4)
    store.begin_backup("inc", "job-1")
    written(store, 9, 10)
    store.end_backup("inc", "job-1", put_back=True)
    assert np.flatnonzero(store.load("inc")).tolist() == [2, 3, 9]


def test_bitmap_mode_always_puts_back_only_what_was_not_saved(
        store: PersistentBitmapFile) -> None:
    store.add("inc", enabled=False)
    store.store("inc", np.isin(np.arange(128), [1, 2, 3]))
    store.begin_backup("inc", "j")
    not_saved = np.isin(np.arange(128), [3, 50]).astype(np.uint8)
    store.end_backup("inc", "j", put_back=not_saved)
    assert np.flatnonzero(store.load("inc")).tolist() == [3]
    assert info(store, "inc").status == "consistent"


def test_backup_hand_over_errors(image: Path, store: PersistentBitmapFile) -> None:
    store.add("a")
    with pytest.raises(UsageError, match="job id"):
        store.begin_backup("a", "bad job")
    store.begin_backup("a", "j1")
    with pytest.raises(BitmapBusy, match="in use by job j1"):
        store.begin_backup("a", "j2")
    with pytest.raises(BitmapError, match="not held by job j2"):
        store.end_backup("a", "j2", put_back=True)
    with pytest.raises(UsageError, match="put_back must have shape"):
        store.end_backup("a", "j1", put_back=np.zeros(3, np.uint8))
    store.end_backup("a", "j1", put_back=True)
    for k in range(D.MAX_BITMAPS - 1):
        store.add(f"x{k}")
    with pytest.raises(BitmapError, match="no free slot for a frozen copy"):
        store.begin_backup("a", "j3")


def test_a_run_that_dies_mid_backup_gets_its_bits_back_at_the_next_open(image: Path) -> None:
    s = open_store(image)
    s.add("inc")
    written(s, 5, 8)
    s.begin_backup("inc", "job-9")
    written(s, 20, 21)
    s.abandon()  # SIGKILL of the run while the job copies
    with open_store(image) as r:
        assert r.recovery.stop == "process-crash"
        assert r.recovery.restored == {"inc": "job-9"}
        assert np.flatnonzero(r.load("inc")).tolist() == [5, 6, 7, 20]
        assert info(r, "inc").busy is None
        assert r.names() == ["inc"]


def test_a_damaged_frozen_copy_makes_its_bitmap_inconsistent(image: Path) -> None:
    s = open_store(image)
    s.add("inc")
    written(s, 5, 8)
    s.begin_backup("inc", "job-9")
    shape = s.shape
    s.abandon()
    corrupt(maps_path(image), D.MAPS_OFFSET + shape.map_bytes + 100, b"\1")  # row 1: copy
    with open_store(image) as r:
        i = info(r, "inc")
        assert i.status == "inconsistent"
        assert i.reason == ("backup job job-9 did not finish and the copy of the bits it "
                            "held is damaged")


# -- inspect: a read-only look ------------------------------------------------------------------


def test_inspect_reports_clean_open_and_unclean_stores(image: Path) -> None:
    with pytest.raises(BitmapError, match="cannot open"):
        S.inspect(image)
    with open_store(image, run_id="r1") as s:
        s.add("rec")
        s.add("off", enabled=False)
        written(s, 0, 2)
        seen = S.inspect(image)  # while the owner has it open
        assert (seen.state, seen.run_id, seen.owner_pid) == ("open", "r1", os.getpid())
        assert [(b.name, b.status, b.count) for b in seen.bitmaps] == [
            ("off", "consistent", 0), ("rec", "in-use", 2 * CS)]
    seen = S.inspect(image)
    assert seen.state == "clean"
    assert [b.status for b in seen.bitmaps] == ["consistent", "consistent"]
    s = open_store(image, run_id="r2")
    s.begin_backup("rec", "j1")  # the frozen copy is not listed
    s.abandon()  # the run died
    seen = S.inspect(image)
    assert (seen.state, seen.run_id) == ("unclean", "r2")
    assert [(b.name, b.status) for b in seen.bitmaps] == [
        ("off", "consistent"), ("rec", "in-use")]
    with open_store(image) as s:  # inspect changed nothing: recovery still happens
        assert s.recovery.stop == "process-crash"
        assert s.recovery.restored == {"rec": "j1"}


def test_inspect_of_a_corrupt_entry_names_it(image: Path) -> None:
    with open_store(image) as s:
        s.add("a")
    corrupt(maps_path(image), D.DIR_OFFSET + 20, b"\x99")
    seen = S.inspect(image)
    assert [(b.name, b.status) for b in seen.bitmaps] == [("corrupt-entry-0", "inconsistent")]
