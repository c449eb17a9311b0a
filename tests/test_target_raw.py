"""The raw target against the conformance suite, read back with plain file reads."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from shmblock.errors import TargetUnreachable
from shmblock.targets import base as base_module
from shmblock.targets import raw as raw_module
from shmblock.targets.base import Target
from shmblock.targets.raw import RawTarget
from tests.target_conformance import CLUSTER, SIZE, FileTargetTests, TargetTests, pattern


class TestRawTarget(TargetTests):
    def make_target(self, tmp_path: Path, size: int, cluster_size: int) -> Target:
        return RawTarget(str(tmp_path / "backup.raw"), size, cluster_size)

    def read_back(self, target: Target, tmp_path: Path) -> bytes:
        return (tmp_path / "backup.raw").read_bytes()

    def published(self, target: Target, tmp_path: Path) -> bool:
        return (tmp_path / "backup.raw").exists() or (tmp_path / "backup.raw.part").exists()


class TestRawFile(FileTargetTests):
    format = "raw"
    name = "backup.raw"

    def open_file(self, path: str, size: int, cluster_size: int) -> Target:
        return RawTarget(path, size, cluster_size)


def test_unwritten_clusters_stay_holes(tmp_path: Path) -> None:
    target = RawTarget(str(tmp_path / "b.raw"), 256 * CLUSTER, CLUSTER)
    target.write(0, pattern(0))
    target.write_zeroes(CLUSTER, 255 * CLUSTER)
    target.commit()
    target.close()
    st = os.stat(tmp_path / "b.raw")
    assert st.st_size == 256 * CLUSTER
    # One cluster of data; allow file-system metadata blocks but nowhere near 16 MiB.
    assert st.st_blocks * 512 <= 4 * CLUSTER


def test_partial_file_until_commit(tmp_path: Path) -> None:
    target = RawTarget(str(tmp_path / "b.raw"), SIZE, CLUSTER)
    target.write(0, pattern(0))
    assert not (tmp_path / "b.raw").exists()
    assert (tmp_path / "b.raw.part").exists()
    target.commit()
    assert (tmp_path / "b.raw").exists()
    assert not (tmp_path / "b.raw.part").exists()
    target.close()


def test_missing_directory_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(TargetUnreachable, match="does not exist"):
        RawTarget(str(tmp_path / "nope" / "b.raw"), SIZE, CLUSTER)


# -- pre-allocation (issue 9 item 4) ----------------------------------------------------------


def _fs_preallocates(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return not raw_module.on_tmpfs(fd)
    finally:
        os.close(fd)


def test_the_part_is_preallocated_then_unwritten_clusters_are_punched(tmp_path: Path) -> None:
    """On a disk file system the whole .part is allocated at open (before the snapshot),
    and what was never written is a hole again once sealed: a sparse device still
    gives a sparse backup."""
    if not _fs_preallocates(tmp_path):
        pytest.skip("tmp_path is on tmpfs, where the raw target does not pre-allocate")
    target = RawTarget(str(tmp_path / "b.raw"), 256 * CLUSTER, CLUSTER)
    try:
        assert os.stat(target.part_path).st_blocks * 512 >= 256 * CLUSTER
        target.write(7 * CLUSTER, pattern(1))
        target.write(200 * CLUSTER, pattern(2) + pattern(3))
        target.write_zeroes(0, 7 * CLUSTER)
        target.seal()
        st = os.stat(target.part_path)
        assert st.st_size == 256 * CLUSTER
        assert st.st_blocks * 512 <= 6 * CLUSTER  # three clusters of data, some metadata
        data = (tmp_path / "b.raw.part").read_bytes()
        assert data[7 * CLUSTER : 8 * CLUSTER] == pattern(1)
        assert data[200 * CLUSTER : 202 * CLUSTER] == pattern(2) + pattern(3)
        assert data[: 7 * CLUSTER] == bytes(7 * CLUSTER)
        assert data[8 * CLUSTER : 200 * CLUSTER] == bytes(192 * CLUSTER)
    finally:
        target.abort()


def test_tmpfs_is_not_preallocated(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or _fs_preallocates(shm):
        pytest.skip("no tmpfs at /dev/shm")
    work = Path(tempfile.mkdtemp(dir=shm, prefix="shmblock-test-raw-"))
    try:
        target = RawTarget(str(work / "b.raw"), 64 * CLUSTER, CLUSTER)
        try:
            assert os.stat(target.part_path).st_blocks == 0
        finally:
            target.abort()
    finally:
        shutil.rmtree(work)


@pytest.mark.parametrize("err", [errno.EOPNOTSUPP, errno.ENOSPC])
def test_no_preallocation_where_the_file_system_cannot(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       err: int) -> None:
    """EOPNOTSUPP (or no room for the whole device): silently sparse, as before."""
    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(raw_module, "fallocate", refuse)
    monkeypatch.setattr(raw_module, "on_tmpfs", lambda fd: False)
    target = RawTarget(str(tmp_path / "b.raw"), 16 * CLUSTER, CLUSTER)
    target.write(CLUSTER, pattern(4))
    target.commit()
    target.close()
    data = (tmp_path / "b.raw").read_bytes()
    assert data == bytes(CLUSTER) + pattern(4) + bytes(14 * CLUSTER)
    assert os.stat(tmp_path / "b.raw").st_blocks * 512 <= 4 * CLUSTER


# -- early writeback ---------------------------------------------------------------------------


class _FakeLibc:
    """Records sync_file_range calls; answers ``result``."""

    def __init__(self, result: int = 0) -> None:
        self.calls: list[tuple[int, int, int, int]] = []
        self.result = result

    def sync_file_range(self, fd: int, offset: int, nbytes: int, flags: int) -> int:
        self.calls.append((fd, offset, nbytes, flags))
        return self.result


def test_writes_start_writeback_every_so_many_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final fsync must not find the whole backup dirty: the target asks the kernel
    to start writing back every WRITEBACK_EVERY bytes (the whole file, asynchronously)."""
    fake = _FakeLibc()
    monkeypatch.setattr(base_module, "_libc", fake)
    monkeypatch.setattr(base_module, "WRITEBACK_EVERY", 4 * CLUSTER)
    target = RawTarget(str(tmp_path / "b.raw"), 64 * CLUSTER, CLUSTER)
    try:
        for c in range(10):
            target.write(c * CLUSTER, pattern(c))
        fd = target._require_fd()
        assert fake.calls == [(fd, 0, 0, base_module.SYNC_FILE_RANGE_WRITE)] * 2
        target.write(10 * CLUSTER, pattern(10) + pattern(11))  # 12 clusters: a third
        assert len(fake.calls) == 3
        target.commit()
        assert (tmp_path / "b.raw").read_bytes()[: 12 * CLUSTER] == b"".join(
            [pattern(c) for c in range(10)] + [pattern(10) + pattern(11)])
    finally:
        target.close()


def test_writeback_that_fails_is_not_tried_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeLibc(result=-1)
    monkeypatch.setattr(base_module, "_libc", fake)
    monkeypatch.setattr(base_module, "WRITEBACK_EVERY", CLUSTER)
    target = RawTarget(str(tmp_path / "b.raw"), 8 * CLUSTER, CLUSTER)
    try:
        for c in range(8):
            target.write(c * CLUSTER, pattern(c))
        assert len(fake.calls) == 1  # refused once: never again, and the writes went on
        target.commit()
        assert (tmp_path / "b.raw").read_bytes() == b"".join(
            pattern(c) for c in range(8))
    finally:
        target.close()


def test_real_writeback_call_works_here(tmp_path: Path) -> None:
    """The ctypes call itself, on this kernel and file system (and on /dev/shm)."""
    for directory in (str(tmp_path), "/dev/shm"):
        fd, name = tempfile.mkstemp(dir=directory, prefix=os.environ["SHMBLOCK_PREFIX"])
        try:
            wb = base_module.Writeback(fd, every=CLUSTER)
            os.pwrite(fd, pattern(1) + pattern(2), 0)
            wb.wrote(2 * CLUSTER)
            assert wb.kicks == 1 and wb.enabled
        finally:
            os.close(fd)
            os.unlink(name)
