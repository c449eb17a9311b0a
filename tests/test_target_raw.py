"""The raw target against the conformance suite, read back with plain file reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shmblock.errors import TargetUnreachable
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
