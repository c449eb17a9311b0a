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
from pathlib import Path

import numpy as np
import pytest

from shmblock.errors import TargetError
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
