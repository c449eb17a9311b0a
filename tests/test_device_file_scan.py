"""The allocation scan of a device file reads only its data extents (SEEK_DATA/SEEK_HOLE).

A hole reads as zeros, so skipping it changes nothing in the allocation map; data
extents — even one of zeros, or one that starts or ends inside a cluster — are read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from shmblock.device import Device, Geometry
from tests.helpers import CS, new_device, run_names


def sparse_image(path: Path, size: int, writes: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes:
            os.pwrite(f.fileno(), data, offset)


def expected_allocated(path: Path, clusters: int) -> list[int]:
    image = np.fromfile(path, dtype=np.uint8).reshape(clusters, -1)
    return np.flatnonzero(image.any(axis=1)).tolist()


def test_holes_are_skipped_and_data_extents_scanned(tmp_path: Path) -> None:
    geo = Geometry(600 * CS, cluster_size=CS, max_writers=1, buffer_slots=1)
    path = tmp_path / "disk.raw"
    sparse_image(path, geo.size, [
        (0, b"\1"),                                  # the first byte
        (5 * CS - 4096, b"\0" * 8192 + b"\7"),       # zeros across a cluster edge, then data
        (40 * CS, b"\0" * (3 * CS)),                 # an extent of zeros only
        (255 * CS + CS - 1, b"\2\3"),                # a byte on each side of a 256-chunk edge
        (300 * CS, bytes(range(1, 256)) * 1000),     # several clusters of data
        (geo.size - 1, b"\xff"),                     # the last byte
    ])
    with new_device(geo, backing_file=str(path), names=run_names()) as dev:
        extents = dev._data_extents()
        assert sum(b - a for a, b in extents) < geo.size // 4, "the holes were found"
        assert np.flatnonzero(dev.allocated).tolist() == expected_allocated(path, 600)


def test_a_file_without_holes_is_scanned_whole(tmp_path: Path) -> None:
    geo = Geometry(64 * CS, cluster_size=CS, max_writers=1, buffer_slots=1)
    path = tmp_path / "disk.raw"
    image = np.zeros(geo.size, np.uint8)
    image[[7, 3 * CS + 5, 63 * CS]] = 9
    image.tofile(path)
    with new_device(geo, backing_file=str(path), names=run_names()) as dev:
        assert np.flatnonzero(dev.allocated).tolist() == [0, 3, 63]


def test_the_scan_can_be_left_to_the_caller(tmp_path: Path) -> None:
    geo = Geometry(16 * CS, cluster_size=CS, max_writers=1, buffer_slots=1)
    path = tmp_path / "disk.raw"
    sparse_image(path, geo.size, [(9 * CS, b"x")])
    names = run_names()
    dev = Device.create(names.meta("d"), names.data("d"), geo, names.run_id, str(path),
                        scan=False)
    try:
        assert not dev.allocated.any()
        dev.scan_allocated()
        assert np.flatnonzero(dev.allocated).tolist() == [9]
    finally:
        dev.unlink()
        dev.close()


@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_chunk_sizes_agree(tmp_path: Path, chunk: int) -> None:
    geo = Geometry(40 * CS, cluster_size=CS, max_writers=1, buffer_slots=1)
    path = tmp_path / "disk.raw"
    sparse_image(path, geo.size, [(c * CS + 17, b"z") for c in (1, 2, 19, 39)])
    with new_device(geo, backing_file=str(path), names=run_names()) as dev:
        dev.allocated[:] = 0
        dev.scan_allocated(chunk_clusters=chunk)
        assert np.flatnonzero(dev.allocated).tolist() == [1, 2, 19, 39]
