"""Shared-memory devices: create, attach, header checks, ownership, file backing, cleanup."""

from __future__ import annotations

import errno
import gc
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import posix_ipc
import pytest

from shmblock import layout as L
from shmblock.device import Device, Geometry, UnsupportedPlatformError
from shmblock.errors import AttachError, DeviceError, NoSpaceError, UsageError
from shmblock.names import RunNames
from tests.helpers import CS, create_device, destroy, new_device, pattern, run_names, shm_names

GEO = Geometry(16 * CS, cluster_size=CS, max_writers=2, buffer_slots=4)


def mapped_paths() -> str:
    with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
        return f.read()


@pytest.fixture
def names() -> RunNames:
    return run_names()


@pytest.fixture
def device(names: RunNames) -> Iterator[Device]:
    with new_device(GEO, names=names) as dev:
        yield dev


# -- geometry ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 16 * 4096, "cluster_size": 3000}, "power of two"),
        ({"size": 16 * 4096, "cluster_size": 6144}, "power of two"),
        ({"size": 16 * 4096, "cluster_size": 2048}, "power of two"),
        ({"size": 8 << 20, "cluster_size": 4 << 20}, "power of two"),
        ({"size": 0, "cluster_size": 4096}, "positive multiple"),
        ({"size": -4096, "cluster_size": 4096}, "positive multiple"),
        ({"size": 4096 * 3 + 1, "cluster_size": 4096}, "positive multiple"),
        ({"size": 4096, "cluster_size": 8192}, "positive multiple"),
        ({"size": 4096, "cluster_size": 4096, "max_writers": 0}, "max writers"),
        ({"size": 4096, "cluster_size": 4096, "max_writers": 1025}, "max writers"),
        ({"size": 4096, "cluster_size": 4096, "buffer_slots": -1}, "copy-before-write buffer"),
        ({"size": 4096, "cluster_size": 4096, "buffer_slots": 2}, "copy-before-write buffer"),
    ],
)
def test_geometry_validation(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        Geometry(**kwargs)


def test_geometry_limits_accepted() -> None:
    assert Geometry(4096, cluster_size=4096).clusters == 1
    assert Geometry(2 << 20, cluster_size=2 << 20).clusters == 1
    g = Geometry(64 << 20)
    assert g.cluster_size == 64 << 10
    assert g.clusters == 1024
    assert Geometry(4096, cluster_size=4096, buffer_slots=0).slots == 0


@pytest.mark.parametrize(("size", "slots"), [
    (1 << 20, 16),  # a tiny device: the whole device (never more)
    (64 << 20, 128),  # an eighth...
    (8 << 20, 64),  # ...but at least 64 clusters
    (1 << 30, 2048),  # 128 MiB
    (16 << 30, 4096),  # at most 256 MiB
])
def test_default_buffer_size(size: int, slots: int) -> None:
    assert Geometry(size).slots == slots


def test_layout_regions_are_page_aligned_and_disjoint() -> None:
    lay = Geometry(1000 * CS, cluster_size=CS, max_writers=3, buffer_slots=15).layout()
    regions = [
        (lay.needs_copy_offset, lay.clusters),
        (lay.allocated_offset, lay.clusters),
        (lay.saved_offset, lay.clusters),
        (lay.dirty_offset, L.MAX_BITMAPS * lay.map_bytes),
        (lay.slot_state_offset, lay.slots * 2),
        (lay.slot_cluster_offset, lay.slots * 8),
        (lay.stats_offset, lay.max_writers * lay.stats_words * 8),
        (lay.staging_offset, lay.slots * lay.cluster_size),
    ]
    end = L.HEADER_SIZE
    for offset, size in regions:
        assert offset % L.PAGE == 0
        assert offset >= end
        end = offset + size
    assert lay.total_size >= end
    assert lay.total_size % L.PAGE == 0


# -- create / attach ------------------------------------------------------------------------


def test_create_attach_round_trip(device: Device, names: RunNames) -> None:
    assert device.owner
    assert device.size == 16 * CS
    assert device.clusters == 16
    assert not device.data.any()
    assert not device.needs_copy.any() and not device.allocated.any()
    other = Device.attach(names.meta("dev0"), run_id=names.run_id)
    try:
        assert not other.owner
        assert other.geometry == GEO
        assert other.run_id == names.run_id
        assert other.data_name == names.data("dev0")
        payload = pattern(3 * CS, 1)
        device.data[CS : 4 * CS] = np.frombuffer(payload, np.uint8)
        assert other.data[CS : 4 * CS].tobytes() == payload
        # maps, control words, staging and stats are shared both ways
        other.needs_copy[5] = 1
        other.ctl[L.CTL_EPOCH] = 42
        other.staging[3, :] = 7
        other.stats[1, 2] = 99
        other.slot_cluster[1] = 12
        other.dirty[4, 7] = 1
        assert device.needs_copy[5] == 1
        assert device.ctl[L.CTL_EPOCH] == 42
        assert (device.staging[3] == 7).all()
        assert device.stats[1, 2] == 99
        assert device.slot_cluster[1] == 12
        assert device.dirty[4, 7] == 1 and device.dirty.sum() == 1
        with pytest.raises(DeviceError, match="only the process that created"):
            other.unlink()
    finally:
        other.close()
    # attaching without a run id accepts whatever run made it
    anon = Device.attach(names.meta("dev0"), populate=False)
    try:
        assert anon.run_id == names.run_id
    finally:
        anon.close()


def test_data_view_writes_through(device: Device) -> None:
    view = device.data_view()
    try:
        view[0:4] = b"abcd"
    finally:
        view.release()
    assert device.data[:4].tobytes() == b"abcd"


def test_attach_with_wrong_run_id(device: Device, names: RunNames) -> None:
    with pytest.raises(AttachError, match="belongs to run"):
        Device.attach(names.meta("dev0"), run_id="deadbeef")


def test_attach_missing_name(names: RunNames) -> None:
    with pytest.raises(AttachError, match="no device"):
        Device.attach(names.meta("nothere"))


def raw_segment(name: str, content: bytes) -> None:
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=len(content))
    try:
        with mmap.mmap(shm.fd, len(content)) as m:
            m[:] = content
    finally:
        shm.close_fd()


@pytest.mark.parametrize("size", [1, 100, 4096, 64 * 1024])
def test_attach_refuses_a_segment_that_is_not_ours(names: RunNames, size: int) -> None:
    name = names.meta("alien")
    raw_segment(name, pattern(size, size))
    try:
        with pytest.raises(AttachError):
            Device.attach(name)
    finally:
        posix_ipc.unlink_shared_memory(name)


def header(geometry: Geometry, run_id: str, data_name: bytes, *,
           cluster_size: int | None = None, clusters: int | None = None,
           version: int = L.VERSION, flags: int = 0, backing: bytes = b"") -> bytes:
    buf = bytearray(L.HEADER_SIZE)
    L.HEADER_STRUCT.pack_into(
        buf, 0, L.MAGIC, version, L.HEADER_SIZE, geometry.size,
        cluster_size or geometry.cluster_size,
        geometry.clusters if clusters is None else clusters,
        geometry.max_writers, geometry.slots, L.MAX_BITMAPS, flags,
        run_id.encode(), data_name, backing)
    return bytes(buf)


@pytest.mark.parametrize(
    "fields",
    [
        {"cluster_size": 3000},  # not a geometry at all
        {"clusters": 5},  # disagrees with size / cluster size
        {"version": L.VERSION + 1},
        {"data_name": b"/\xff\xfe-data"},  # not UTF-8
        {"data_name": b""},  # shared-memory contents without a name
        {"data_name": b"/a/b"},  # not a valid shared-memory name
        {"flags": L.FLAG_FILE_BACKED},  # file-backed without a file name
        {"flags": L.FLAG_FILE_BACKED, "backing": b"/\xff.raw"},
    ],
    ids=["bad-geometry", "bad-clusters", "future-version", "bad-data-name", "empty-data-name",
         "slashed-data-name", "no-backing", "bad-backing"],
)
def test_attach_refuses_a_corrupt_header(names: RunNames, fields: dict[str, Any]) -> None:
    """A segment with our magic but an impossible header is an AttachError, not a crash."""
    name = names.meta("corrupt")
    fields.setdefault("data_name", names.data("corrupt").encode())
    content = header(GEO, names.run_id, **fields)
    raw_segment(name, content + bytes(GEO.layout().total_size - len(content)))
    try:
        with pytest.raises(AttachError):
            Device.attach(name)
    finally:
        posix_ipc.unlink_shared_memory(name)


def test_attach_refuses_a_segment_of_the_wrong_size(names: RunNames) -> None:
    name = names.meta("short")
    raw_segment(name, header(GEO, names.run_id, names.data("short").encode()))  # header only
    try:
        with pytest.raises(AttachError, match="header says otherwise"):
            Device.attach(name)
    finally:
        posix_ipc.unlink_shared_memory(name)


def test_attach_when_contents_are_gone(device: Device, names: RunNames) -> None:
    posix_ipc.unlink_shared_memory(names.data("dev0"))
    with pytest.raises(AttachError, match="are gone"):
        Device.attach(names.meta("dev0"))
    # a replacement of the wrong size is refused too
    raw_segment(names.data("dev0"), bytes(CS))
    with pytest.raises(AttachError, match="does not have"):
        Device.attach(names.meta("dev0"))
    # (the fixture's unlink removes the replacement)


def test_exclusive_create(device: Device, names: RunNames) -> None:
    device.data[:8] = 5
    device.allocated[3] = 1
    with pytest.raises(DeviceError, match="already exists"):
        create_device(names, GEO)
    # the first device is untouched and still attachable
    assert (device.data[:8] == 5).all()
    assert device.allocated[3] == 1
    again = Device.attach(names.meta("dev0"), run_id=names.run_id)
    try:
        assert (again.data[:8] == 5).all()
    finally:
        again.close()


def test_create_unlinks_meta_when_data_name_is_taken(names: RunNames, shm_prefix: str) -> None:
    """Exclusive create of the contents fails: the metadata segment made first is removed,
    and the segment that was already there (not ours) is left alone."""
    raw_segment(names.data("dev0"), b"not ours")
    try:
        with pytest.raises(DeviceError, match="already exists"):
            create_device(names, GEO)
        assert shm_names(shm_prefix) == [names.data("dev0").lstrip("/")]
    finally:
        posix_ipc.unlink_shared_memory(names.data("dev0"))


def test_no_space_is_refused_up_front(monkeypatch: pytest.MonkeyPatch, names: RunNames,
                                      shm_prefix: str) -> None:
    monkeypatch.setattr("shmblock.device.shm_free_bytes", lambda directory="": 4096)
    with pytest.raises(NoSpaceError) as info:
        create_device(names, GEO)
    message = str(info.value)
    assert "/dev/shm" in message and "MiB" in message and "free" in message
    assert shm_names(shm_prefix) == []


def test_fallocate_failure_unlinks_everything(monkeypatch: pytest.MonkeyPatch,
                                              names: RunNames, shm_prefix: str) -> None:
    """ENOSPC while reserving the contents (after the metadata was made): nothing is left."""
    calls: list[int] = []
    real = os.posix_fallocate

    def fallocate(fd: int, offset: int, length: int) -> None:
        calls.append(length)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    with pytest.raises(NoSpaceError, match="cannot reserve") as info:
        create_device(names, GEO)
    assert "No space left" in str(info.value)
    assert len(calls) == 2
    assert shm_names(shm_prefix) == []


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", "riscv64", "i686", ""])
def test_weakly_ordered_cpus_are_refused(monkeypatch: pytest.MonkeyPatch, names: RunNames,
                                         shm_prefix: str, device: Device,
                                         machine: str) -> None:
    """The maps rely on x86-64 store ordering (no fences): elsewhere nothing is created
    or attached, and the error names the architecture and the reason."""
    monkeypatch.setattr("platform.machine", lambda: machine)
    before = shm_names(shm_prefix)
    with pytest.raises(UnsupportedPlatformError) as info:
        create_device(names, GEO, name="dev1")
    message = str(info.value)
    assert repr(machine or "unknown") in message
    assert "x86-64" in message and "needs_copy" in message and "fences" in message
    assert shm_names(shm_prefix) == before
    with pytest.raises(UnsupportedPlatformError):
        Device.attach(device.meta_name, run_id=names.run_id)


@pytest.mark.parametrize("machine", ["x86_64", "amd64", "AMD64"])
def test_x86_64_is_accepted(monkeypatch: pytest.MonkeyPatch, names: RunNames,
                            machine: str) -> None:
    monkeypatch.setattr("platform.machine", lambda: machine)
    with new_device(GEO, names=names) as dev:
        Device.attach(dev.meta_name, run_id=names.run_id).close()


# -- close / unlink -------------------------------------------------------------------------


def test_close_drops_views_and_is_idempotent(names: RunNames) -> None:
    dev = create_device(names, GEO)
    try:
        assert names.data("dev0") in mapped_paths()
        dev.close()
        assert dev.closed
        for attr in ("data", "needs_copy", "allocated", "saved", "dirty", "slot_state",
                     "slot_cluster", "stats", "staging", "ctl"):
            assert not hasattr(dev, attr), attr
        dev.close()
        assert dev.closed
        maps = mapped_paths()
        assert names.data("dev0") not in maps
        assert names.meta("dev0") not in maps
    finally:
        dev.unlink()
    dev.unlink()  # twice is harmless


def test_close_with_an_outside_view_alive(names: RunNames) -> None:
    dev = create_device(names, GEO)
    try:
        outside = dev.data[:16]
        with pytest.raises(DeviceError, match="still alive"):
            dev.close()
        del outside
        dev.close()
        assert dev.closed
        gc.collect()
        maps = mapped_paths()
        assert names.data("dev0") not in maps
        assert names.meta("dev0") not in maps
    finally:
        destroy(dev)


def test_unlink_keeps_mappings_valid(names: RunNames, shm_prefix: str) -> None:
    dev = create_device(names, GEO)
    try:
        dev.unlink()
        assert shm_names(shm_prefix) == []
        dev.data[:4] = 9  # still mapped
        assert (dev.data[:4] == 9).all()
        with pytest.raises(AttachError):
            Device.attach(names.meta("dev0"))
    finally:
        dev.close()


def test_context_manager_owner_unlinks(names: RunNames, shm_prefix: str) -> None:
    with create_device(names, GEO) as dev:
        assert len(shm_names(shm_prefix)) == 2
        with Device.attach(names.meta("dev0")) as other:
            other.data[0] = 1
        # the attached handle closed without unlinking anything
        assert len(shm_names(shm_prefix)) == 2
        assert dev.data[0] == 1
    assert dev.closed
    assert shm_names(shm_prefix) == []


# -- file-backed devices --------------------------------------------------------------------


def test_file_backed_contents_persist(tmp_path: Path, names: RunNames, shm_prefix: str) -> None:
    path = tmp_path / "disk.raw"
    dev = create_device(names, GEO, backing_file=str(path))
    try:
        assert dev.data_name == ""
        # only the metadata lives in /dev/shm
        assert shm_names(shm_prefix) == [names.meta("dev0").lstrip("/")]
        assert path.stat().st_size == GEO.size
        assert not dev.allocated.any()
        payload = pattern(CS, 3)
        dev.data[5 * CS : 6 * CS] = np.frombuffer(payload, np.uint8)
        other = Device.attach(names.meta("dev0"), run_id=names.run_id)
        try:
            assert other.backing_file == str(path)
            assert other.data[5 * CS : 6 * CS].tobytes() == payload
        finally:
            other.close()
    finally:
        destroy(dev)
    content = path.read_bytes()
    assert content[5 * CS : 6 * CS] == payload
    assert content.count(0) == len(content) - CS + payload.count(0)


def test_file_backed_existing_file_marks_allocated(tmp_path: Path, names: RunNames) -> None:
    path = tmp_path / "disk.raw"
    image = bytearray(GEO.size)
    nonzero = [0, 3, 4, 15]
    for c in nonzero:
        image[c * CS + 123] = 1  # one byte is enough
    image[7 * CS + CS - 1] = 0xFF  # the very last byte of cluster 7
    nonzero.append(7)
    path.write_bytes(bytes(image))
    with new_device(GEO, backing_file=str(path), names=names) as dev:
        assert sorted(np.flatnonzero(dev.allocated).tolist()) == sorted(nonzero)
        assert dev.data.tobytes() == bytes(image)


def test_file_backed_existing_file_scans_in_chunks(tmp_path: Path, names: RunNames) -> None:
    geo = Geometry(600 * CS, cluster_size=CS, max_writers=1, buffer_slots=1)
    path = tmp_path / "disk.raw"
    image = np.zeros(geo.size, np.uint8)
    marked = [0, 255, 256, 257, 511, 512, 599]  # around the 256-cluster scan chunks
    for c in marked:
        image[c * CS + CS // 2] = 3
    path.write_bytes(image.tobytes())
    with new_device(geo, backing_file=str(path), names=names) as dev:
        assert np.flatnonzero(dev.allocated).tolist() == marked


def test_file_backed_wrong_size(tmp_path: Path, names: RunNames, shm_prefix: str) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"x" * (GEO.size - CS))
    with pytest.raises(DeviceError, match="expected"):
        create_device(names, GEO, backing_file=str(path))
    assert shm_names(shm_prefix) == []
    assert path.read_bytes() == b"x" * (GEO.size - CS)  # not touched


def test_file_backed_missing_directory(tmp_path: Path, names: RunNames,
                                       shm_prefix: str) -> None:
    with pytest.raises(DeviceError, match="cannot open device file"):
        create_device(names, GEO, backing_file=str(tmp_path / "nodir" / "disk.raw"))
    assert shm_names(shm_prefix) == []


# -- maps and bitmaps -----------------------------------------------------------------------


def test_scan_allocated_only_adds(device: Device) -> None:
    device.allocated[2] = 1  # written once, zero now: stays allocated
    device.data[9 * CS] = 1
    device.scan_allocated(chunk_clusters=3)
    assert np.flatnonzero(device.allocated).tolist() == [2, 9]


def test_iter_chunks_covers_the_device(device: Device) -> None:
    device.data[:] = np.arange(device.size, dtype=np.uint64).astype(np.uint8)
    chunks = list(device.iter_chunks(3 * CS))
    assert [off for off, _ in chunks] == list(range(0, device.size, 3 * CS))
    assert b"".join(v.tobytes() for _, v in chunks) == device.data.tobytes()
    del chunks


def test_bitmap_names(device: Device, names: RunNames) -> None:
    assert device.bitmap_names() == {}
    device.set_bitmap_name(0, "daily")
    device.set_bitmap_name(3, "weekly-ünï")
    device.set_bitmap_name(7, "x" * (L.BITMAP_NAME_BYTES - 1))
    expected = {"daily": 0, "weekly-ünï": 3, "x" * (L.BITMAP_NAME_BYTES - 1): 7}
    assert device.bitmap_names() == expected
    # a shorter name replaces a longer one completely
    device.set_bitmap_name(7, "y")
    expected.pop("x" * (L.BITMAP_NAME_BYTES - 1))
    expected["y"] = 7
    assert device.bitmap_names() == expected
    device.set_bitmap_name(0, "")
    expected.pop("daily")
    assert device.bitmap_names() == expected
    with pytest.raises(UsageError, match="longer than"):
        device.set_bitmap_name(1, "z" * L.BITMAP_NAME_BYTES)
    with pytest.raises(UsageError, match="longer than"):
        device.set_bitmap_name(1, "é" * 32)  # 64 bytes in UTF-8
    other = Device.attach(names.meta("dev0"))
    try:
        assert other.bitmap_names() == expected
    finally:
        other.close()
    # names live apart from the control words (all zero but the buffer's size)
    ctl = device.ctl.copy()
    assert ctl[L.CTL_BUF_LIMIT] == GEO.slots
    ctl[L.CTL_BUF_LIMIT] = 0
    assert not ctl.any()


@pytest.mark.parametrize("index", [-1, L.MAX_BITMAPS, 100])
def test_bitmap_index_out_of_range(device: Device, index: int) -> None:
    with pytest.raises(UsageError, match="bitmap index"):
        device.set_bitmap_name(index, "oops")
    ctl = device.ctl.copy()
    ctl[L.CTL_BUF_LIMIT] = 0  # the buffer's size, set at creation
    assert not ctl.any()
    assert device.bitmap_names() == {}
