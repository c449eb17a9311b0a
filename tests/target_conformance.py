"""Conformance suite every backup target passes (the zarr ``StoreTests`` habit).

A test module subclasses :class:`TargetTests` and implements two hooks:

* ``make_target(tmp_path, size, cluster_size)`` opens a fresh target;
* ``read_back(target, tmp_path)`` returns the full contents the target holds after
  ``commit``, read *around* the target's own code: the raw file read directly, a qcow2
  image converted with ``qemu-img``, an NBD export read over a second connection.

The suite checks the contract of :mod:`shmblock.targets.base`: out-of-order cluster
writes, explicit zeroes, holes, commit publishing and abort never leaving something that
looks like a finished backup.
"""

from __future__ import annotations

import abc
import os
import socket
import stat
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from shmblock.errors import TargetError, TargetUnreachable, VerificationError
from shmblock.targets.base import Target

CLUSTER = 64 * 1024
SIZE = 32 * CLUSTER


def pattern(cluster: int, cluster_size: int = CLUSTER) -> bytes:
    """Recognisable, non-zero contents for one cluster."""
    rng = np.random.default_rng(cluster + 1)
    data = rng.integers(1, 256, cluster_size, dtype=np.uint8)
    return data.tobytes()


class TargetTests(abc.ABC):
    """Subclass per target kind; implement the two hooks."""

    @abc.abstractmethod
    def make_target(self, tmp_path: Path, size: int, cluster_size: int) -> Target: ...

    @abc.abstractmethod
    def read_back(self, target: Target, tmp_path: Path) -> bytes: ...

    def published(self, target: Target, tmp_path: Path) -> bool:
        """Whether something that looks like a finished backup exists (file targets)."""
        return True

    def test_out_of_order_writes_read_back(self, tmp_path: Path) -> None:
        target = self.make_target(tmp_path, SIZE, CLUSTER)
        expected = bytearray(SIZE)
        order = [7, 3, 31, 0, 12, 13, 14, 1]
        for c in order:
            target.write(c * CLUSTER, pattern(c))
            expected[c * CLUSTER : (c + 1) * CLUSTER] = pattern(c)
        target.commit()
        assert self.read_back(target, tmp_path) == bytes(expected)
        target.close()

    def test_multi_cluster_run_and_memoryview(self, tmp_path: Path) -> None:
        target = self.make_target(tmp_path, SIZE, CLUSTER)
        run = b"".join(pattern(c) for c in range(4, 12))
        target.write(4 * CLUSTER, memoryview(run))
        target.commit()
        data = self.read_back(target, tmp_path)
        assert data[4 * CLUSTER : 12 * CLUSTER] == run
        assert data[: 4 * CLUSTER] == bytes(4 * CLUSTER)
        assert data[12 * CLUSTER :] == bytes(SIZE - 12 * CLUSTER)
        target.close()

    def test_explicit_zeroes_read_as_zero(self, tmp_path: Path) -> None:
        target = self.make_target(tmp_path, SIZE, CLUSTER)
        target.write(0, pattern(0) + pattern(1))
        target.write_zeroes(2 * CLUSTER, 3 * CLUSTER)
        target.write(5 * CLUSTER, pattern(5))
        target.commit()
        data = self.read_back(target, tmp_path)
        assert data[: 2 * CLUSTER] == pattern(0) + pattern(1)
        assert data[2 * CLUSTER : 5 * CLUSTER] == bytes(3 * CLUSTER)
        assert data[5 * CLUSTER : 6 * CLUSTER] == pattern(5)
        target.close()

    def test_target_read_matches_read_back(self, tmp_path: Path) -> None:
        target = self.make_target(tmp_path, SIZE, CLUSTER)
        target.write(9 * CLUSTER, pattern(9))
        target.commit()
        assert target.read(9 * CLUSTER, CLUSTER) == pattern(9)
        assert target.read(10 * CLUSTER, CLUSTER) == bytes(CLUSTER)
        target.close()

    def test_write_outside_target_rejected(self, tmp_path: Path) -> None:
        target = self.make_target(tmp_path, SIZE, CLUSTER)
        with pytest.raises(TargetError):
            target.write(SIZE, pattern(0))
        with pytest.raises(TargetError):
            target.write_zeroes(SIZE - CLUSTER, 2 * CLUSTER)
        target.abort()
        target.close()

    def test_abort_leaves_no_finished_backup(self, tmp_path: Path) -> None:
        target = self.make_target(tmp_path, SIZE, CLUSTER)
        target.write(0, pattern(0))
        target.abort()
        target.close()
        assert not self.published(target, tmp_path)

    def test_close_is_idempotent(self, tmp_path: Path) -> None:
        target = self.make_target(tmp_path, SIZE, CLUSTER)
        target.commit()
        target.close()
        target.close()


# -- file targets: what they may create and replace -------------------------------------


class FakeCapture:
    """What :func:`shmblock.verify.verify_target` reads of a snapshot: its digests."""

    def __init__(self, data: bytes, cluster_size: int) -> None:
        from shmblock.verify import cluster_digest

        self.cluster_size = cluster_size
        self.size = len(data)
        self.error = ""
        self.digests = [cluster_digest(data[i : i + cluster_size])
                        for i in range(0, len(data), cluster_size)]

    def join(self) -> None:
        pass


class FileTargetTests(abc.ABC):
    """Subclass per file target kind (raw, qcow2): creation, replacement, privacy."""

    #: the target format and file name used by these tests
    format: str
    name: str

    @abc.abstractmethod
    def open_file(self, path: str, size: int, cluster_size: int) -> Target: ...

    def test_part_is_created_exclusively(self, tmp_path: Path) -> None:
        """Two jobs to one target: the second fails clearly, the first is unharmed."""
        path = str(tmp_path / self.name)
        first = self.open_file(path, SIZE, CLUSTER)
        first.write(0, pattern(0))
        with pytest.raises(TargetUnreachable, match=r"\.part' already exists: another backup"):
            self.open_file(path, SIZE, CLUSTER)
        first.commit()
        assert first.read(0, CLUSTER) == pattern(0)
        first.close()

    def test_symlink_at_part_is_not_followed(self, tmp_path: Path) -> None:
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        (tmp_path / (self.name + ".part")).symlink_to(victim)
        with pytest.raises(TargetUnreachable, match=r"already exists and is a symbolic link"):
            self.open_file(str(tmp_path / self.name), SIZE, CLUSTER)
        assert victim.read_bytes() == b"precious"
        assert (tmp_path / (self.name + ".part")).is_symlink(), "not ours to remove"

    @pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "fifo", "directory",
                                      "socket", "device node"])
    def test_non_regular_target_is_refused(self, tmp_path: Path, kind: str) -> None:
        path = tmp_path / self.name
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        if kind == "symlink":
            path.symlink_to(victim)
        elif kind == "dangling symlink":
            path.symlink_to(tmp_path / "nowhere")
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "directory":
            path.mkdir()
        elif kind == "socket":
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(str(path))
            sock.close()
        else:
            if os.geteuid() != 0:
                pytest.skip("mknod of a device node needs root")
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
        before = os.lstat(path)
        with pytest.raises(TargetUnreachable, match=r"exists and is a"):
            self.open_file(str(path), SIZE, CLUSTER)
        after = os.lstat(path)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
        assert victim.read_bytes() == b"precious"
        assert not (tmp_path / (self.name + ".part")).exists()

    def test_backup_is_private_whatever_the_umask(self, tmp_path: Path) -> None:
        old = os.umask(0)
        try:
            target = self.open_file(str(tmp_path / self.name), SIZE, CLUSTER)
            part = os.stat(tmp_path / (self.name + ".part"))
            target.write(0, pattern(0))
            target.commit()
            target.close()
        finally:
            os.umask(old)
        assert stat.S_IMODE(part.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / self.name).st_mode) == 0o600

    def test_verification_catches_one_wrong_byte_near_the_end(self, tmp_path: Path) -> None:
        """The oracle itself: a 64 MiB backup whose only wrong byte is 100 bytes from the
        end is caught (a verify loop that read only the first 8 MiB would pass it)."""
        from shmblock.targets import TargetSpec
        from shmblock.verify import SnapshotCapture, verify_target

        size = 64 << 20
        rng = np.random.default_rng(7)
        snapshot = rng.integers(0, 256, size, dtype=np.uint8)
        backup = snapshot.copy()
        backup[size - 100] ^= 0x01
        path = str(tmp_path / self.name)
        target = self.open_file(path, size, CLUSTER)
        target.write(0, backup.data)
        target.commit()
        target.close()
        spec = TargetSpec(path, self.format)
        capture = cast(SnapshotCapture, FakeCapture(snapshot.tobytes(), CLUSTER))
        with pytest.raises(VerificationError, match=rf"1 cluster.*first: {size // CLUSTER - 1}"):
            verify_target(spec, capture)
        # And the same backup with the byte right passes: the test can tell them apart.
        os.unlink(path)
        target = self.open_file(path, size, CLUSTER)
        target.write(0, snapshot.data)
        target.commit()
        target.close()
        verify_target(spec, capture)
