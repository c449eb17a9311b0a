"""Synthetic guest workloads: where the next I/O goes, generated in vectorised batches.

Each workload yields batches of (offsets, is_write) numpy arrays so the writer loop does
no per-op random-number work in Python:

``random``      uniform block-aligned offsets over the whole device, all writes
``sequential``  block after block, wrapping at the end, all writes
``zipf``        a hot set: Zipf-distributed (s=1.2) ranks over a fixed random permutation
                of the blocks, so a few blocks take most writes, all writes
``mixed``       uniform offsets, 70 % reads and 30 % writes
``first-touch`` one write to a random block of every cluster, clusters in random order:
                during a backup every write needs a copy-before-write (the worst case)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from shmblock.errors import UsageError
from shmblock.guest import WORKLOADS

BATCH = 4096
ZIPF_S = 1.2
READ_SHARE = 0.7

Batch = tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]


def batches(kind: str, size: int, cluster_size: int, block_size: int,
            seed: int) -> Iterator[Batch]:
    """Endless batches of (offsets, is_write) for workload ``kind``."""
    if kind not in WORKLOADS:
        raise UsageError(f"unknown workload {kind!r} (expected one of {', '.join(WORKLOADS)})")
    if block_size <= 0 or block_size > size or size % block_size:
        raise UsageError(f"block size {block_size} must divide the device size {size}")
    rng = np.random.default_rng(seed)
    blocks = size // block_size
    all_writes = np.ones(BATCH, dtype=np.bool_)
    if kind == "random":
        while True:
            yield rng.integers(0, blocks, BATCH, dtype=np.int64) * block_size, all_writes
    elif kind == "sequential":
        start = int(rng.integers(0, blocks))
        while True:
            idx = (start + np.arange(BATCH, dtype=np.int64)) % blocks
            start = int(idx[-1] + 1)
            yield idx * block_size, all_writes
    elif kind == "zipf":
        perm = rng.permutation(blocks).astype(np.int64)
        while True:
            ranks = (rng.zipf(ZIPF_S, BATCH) - 1) % blocks
            yield perm[ranks] * block_size, all_writes
    elif kind == "mixed":
        while True:
            offsets = rng.integers(0, blocks, BATCH, dtype=np.int64) * block_size
            yield offsets, rng.random(BATCH) >= READ_SHARE
    else:  # first-touch
        per_cluster = max(cluster_size // block_size, 1)
        clusters = size // cluster_size
        while True:
            order = rng.permutation(clusters).astype(np.int64)
            within = rng.integers(0, per_cluster, clusters, dtype=np.int64)
            offsets = order * cluster_size + within * block_size
            for i in range(0, clusters, BATCH):
                chunk = offsets[i : i + BATCH]
                yield chunk, np.ones(chunk.size, dtype=np.bool_)
