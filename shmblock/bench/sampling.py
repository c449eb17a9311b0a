"""Guest-writer numbers over a measurement window, from the writers' shared stats rows.

Each writer publishes cumulative counters and a latency histogram to its row in shared
memory every few hundred writes, with the time of that flush (``W_END_NS``). A window is
two samples of every row; its numbers are the differences. Rates use each writer's own
flush times, so a writer that flushed 3 ms before the sample is not charged 3 ms of
idleness. Percentiles and the longest stall come from the difference of the histograms
(each bucket is within 12.5 % of its values, see :mod:`shmblock.stats`), so they cover
the window only, not the warm-up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shmblock import stats as S
from shmblock.engine import DeviceHandle, Engine

U64Array = npt.NDArray[np.uint64]


@dataclass(frozen=True, slots=True)
class Sample:
    """Copies of the stats rows of some writers, and when they were taken."""

    rows: U64Array  # shape (writers, STATS_WORDS)
    taken: float  # time.monotonic()


def sample(engine: Engine, dev: DeviceHandle) -> Sample:
    idents = [w.ident for w in engine.writers if w.device is dev]
    rows = np.array(dev.device.stats[idents], dtype=np.uint64, copy=True)
    return Sample(rows, time.monotonic())


def max_latency_ns(hist: U64Array) -> float:
    """The top of the highest non-empty histogram bucket (an upper bound, within 12.5 %)."""
    used = np.flatnonzero(hist)
    if used.size == 0:
        return 0.0
    top = int(used[-1])
    return S.bucket_value(top + 1) if top + 1 < S.HIST_BUCKETS else S.bucket_value(top)


@dataclass(frozen=True, slots=True)
class Window:
    """What the writers did between two samples."""

    seconds: float
    ops: int
    bytes: int
    ops_per_s: float
    bytes_per_s: float
    p50_us: float
    p99_us: float
    p999_us: float
    max_stall_us: float  # longest single write in the window (histogram upper bound)
    cbw_saves: int  # clusters writers saved into staging themselves
    cbw_requests: int  # clusters writers asked the backup worker to save (and waited)
    cbw_wait_share: float  # share of writer time spent in copy-before-write
    errors: int

    @property
    def cbw_writes(self) -> int:
        return self.cbw_saves + self.cbw_requests


def window(before: Sample, after: Sample) -> Window:
    d = after.rows.astype(np.int64) - before.rows.astype(np.int64)
    d = np.maximum(d, 0)
    busy_ns = d[:, S.W_END_NS].astype(np.float64)
    ops = d[:, S.W_OPS].astype(np.float64)
    nbytes = d[:, S.W_BYTES].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_writer_ops = np.where(busy_ns > 0, ops / busy_ns * 1e9, 0.0)
        per_writer_bytes = np.where(busy_ns > 0, nbytes / busy_ns * 1e9, 0.0)
    hist = d[:, S.HIST_BASE : S.HIST_BASE + S.HIST_BUCKETS].sum(axis=0).astype(np.uint64)
    total_busy = float(busy_ns.sum())
    return Window(
        seconds=after.taken - before.taken,
        ops=int(ops.sum()),
        bytes=int(nbytes.sum()),
        ops_per_s=float(per_writer_ops.sum()),
        bytes_per_s=float(per_writer_bytes.sum()),
        p50_us=S.percentile(hist, 50) / 1e3,
        p99_us=S.percentile(hist, 99) / 1e3,
        p999_us=S.percentile(hist, 99.9) / 1e3,
        max_stall_us=max_latency_ns(hist) / 1e3,
        cbw_saves=int(d[:, S.W_CBW_SAVES].sum()),
        cbw_requests=int(d[:, S.W_CBW_REQUESTS].sum()),
        cbw_wait_share=float(d[:, S.W_CBW_WAIT_NS].sum()) / total_busy if total_busy else 0.0,
        errors=int(d[:, S.W_ERRORS].sum()),
    )


def lifetime_max_stall_us(after: Sample) -> float:
    """The longest single write any writer made since it started (its own counter)."""
    if after.rows.size == 0:
        return 0.0
    return float(after.rows[:, S.W_MAX_STALL_NS].max()) / 1e3
