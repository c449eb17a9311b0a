"""Benchmark device contents: half random data, half zeros, in extents of mixed length.

Every comparison copies the same bytes: the engine backs up the device, and the QEMU
tools read the device's own shared-memory segment (``/dev/shm/<data name>``), so "the
same content" is literally the same pages. Data extents and zero extents alternate, each
1 to 32 clusters long (64 KiB to 2 MiB with the default cluster size), so both kinds of
copier meet a realistic mix of runs instead of one long run of each.

Zero extents are never written: they are what a half-used disk has, clusters that read
as zeros. Every copier must still look at them (a zero check over the bytes), but none
has to store them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shmblock.engine import DeviceHandle

MAX_EXTENT_CLUSTERS = 32
POOL_BYTES = 32 << 20


@dataclass(frozen=True, slots=True)
class Content:
    """What :func:`fill` wrote."""

    size: int
    data_bytes: int
    data_extents: int
    zero_bytes: int

    @property
    def data_share(self) -> float:
        return self.data_bytes / self.size if self.size else 0.0


def fill(dev: DeviceHandle, seed: int = 1) -> Content:
    """Write alternating random-data and zero extents over the whole device.

    Data goes through the device's guest write path (so the allocation map is right),
    from a random pool sliced at random offsets: cheap to make, impossible to compress
    or deduplicate across clusters.
    """
    rng = np.random.default_rng(seed)
    cs = dev.cluster_size
    clusters = dev.size // cs
    pool_size = min(POOL_BYTES, max(dev.size, MAX_EXTENT_CLUSTERS * cs * 2))
    pool = np.frombuffer(rng.bytes(pool_size + MAX_EXTENT_CLUSTERS * cs), dtype=np.uint8)
    lengths = rng.integers(1, MAX_EXTENT_CLUSTERS + 1, clusters // 8 + 2)
    while int(lengths.sum()) < clusters:
        lengths = np.concatenate([lengths, rng.integers(1, MAX_EXTENT_CLUSTERS + 1, 64)])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    data_bytes = extents = 0
    first_is_data = bool(rng.integers(0, 2))
    for i, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
        if start >= clusters:
            break
        if (i % 2 == 0) != first_is_data:
            continue
        n = min(length, clusters - start) * cs
        src = int(rng.integers(0, pool_size // 8)) * 8
        dev.write(start * cs, pool[src : src + n].data)
        data_bytes += n
        extents += 1
    return Content(dev.size, data_bytes, extents, dev.size - data_bytes)
