"""Per-writer statistics kept in shared memory, and latency histograms.

Each writer owns one row of uint64 words in the metadata segment and is the only process
that stores to it; the supervisor only reads. Keeping the numbers in shared memory rather
than sending them at exit means a writer killed with SIGKILL still leaves its counts.

Latencies go into a log-linear histogram: 8 sub-buckets per power of two of nanoseconds,
so every bucket is within 12.5 % of its values, from 1 ns to about 70 minutes, in
:data:`HIST_BUCKETS` words. Percentiles are read off the merged histograms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# Word indices of a writer's row.
W_PID = 0
W_OPS = 1  # writes completed
W_BYTES = 2
W_READS = 3
W_READ_BYTES = 4
W_CBW_SAVES = 5  # clusters this writer saved into staging itself
W_CBW_REQUESTS = 6  # clusters it asked the backup worker to save
W_CBW_WAIT_NS = 7  # time spent in copy-before-write (claims, saves, waits)
W_MAX_STALL_NS = 8  # longest single guest write
W_ERRORS = 9  # writes that failed (break-guest-write), target errors included
W_START_NS = 10
W_END_NS = 11
W_RUNNING = 12
W_FREEZES = 13
W_TARGET_ERRORS = 14  # of W_ERRORS: writes refused because the target failed the save
HIST_BASE = 16
# (word 15, kept apart from the counters above so each can grow on its own)
W_FREEZE_TIMEOUTS = 15  # freezes this writer gave up on (no Thaw in time) and wrote on

SUB_BITS = 3
SUB_BUCKETS = 1 << SUB_BITS
HIST_OCTAVES = 40
HIST_BUCKETS = HIST_OCTAVES * SUB_BUCKETS
STATS_WORDS = HIST_BASE + HIST_BUCKETS

U64Array = npt.NDArray[np.uint64]


def bucket_of(ns: int) -> int:
    """Histogram bucket of a latency in nanoseconds (pure integer arithmetic: fast)."""
    if ns < SUB_BUCKETS:
        return max(ns, 0)
    exp = ns.bit_length() - 1 - SUB_BITS
    index = (exp + 1) * SUB_BUCKETS + ((ns >> exp) & (SUB_BUCKETS - 1))
    return min(index, HIST_BUCKETS - 1)


def bucket_value(index: int) -> float:
    """A representative latency (the middle) of bucket ``index``, in nanoseconds."""
    if index < SUB_BUCKETS:
        return float(index)
    exp = index // SUB_BUCKETS - 1
    low = (SUB_BUCKETS + index % SUB_BUCKETS) << exp
    return low + (1 << exp) / 2


def percentile(hist: U64Array, q: float) -> float:
    """The ``q``-th percentile (0-100) of a histogram, in nanoseconds; 0 when empty."""
    total = int(hist.sum())
    if total == 0:
        return 0.0
    rank = q / 100 * total
    index = int(np.searchsorted(np.cumsum(hist), max(rank, 1)))
    return bucket_value(min(index, len(hist) - 1))


@dataclass(frozen=True, slots=True)
class WriterStats:
    """A snapshot of one writer's counters, in plain Python numbers."""

    writer: int
    pid: int
    ops: int
    bytes: int
    reads: int
    read_bytes: int
    cbw_saves: int
    cbw_requests: int
    cbw_wait_s: float
    max_stall_s: float
    errors: int
    elapsed_s: float
    p50_us: float
    p99_us: float
    p999_us: float
    #: freezes the writer stopped waiting for (no Thaw within its timeout): it then
    #: wrote on while the supervisor may still have believed it frozen
    freeze_timeouts: int = 0
    #: of ``errors``: writes refused because the target failed to save their cluster
    target_errors: int = 0

    @classmethod
    def from_row(cls, writer: int, row: U64Array) -> WriterStats:
        hist = row[HIST_BASE : HIST_BASE + HIST_BUCKETS]
        start, end = int(row[W_START_NS]), int(row[W_END_NS])
        return cls(
            writer=writer,
            pid=int(row[W_PID]),
            ops=int(row[W_OPS]),
            bytes=int(row[W_BYTES]),
            reads=int(row[W_READS]),
            read_bytes=int(row[W_READ_BYTES]),
            cbw_saves=int(row[W_CBW_SAVES]),
            cbw_requests=int(row[W_CBW_REQUESTS]),
            cbw_wait_s=int(row[W_CBW_WAIT_NS]) / 1e9,
            max_stall_s=int(row[W_MAX_STALL_NS]) / 1e9,
            errors=int(row[W_ERRORS]),
            elapsed_s=max(end - start, 0) / 1e9,
            p50_us=percentile(hist, 50) / 1e3,
            p99_us=percentile(hist, 99) / 1e3,
            p999_us=percentile(hist, 99.9) / 1e3,
            freeze_timeouts=int(row[W_FREEZE_TIMEOUTS]),
            target_errors=int(row[W_TARGET_ERRORS]),
        )

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.elapsed_s if self.elapsed_s else 0.0


def merged_percentiles(rows: list[U64Array]) -> tuple[float, float, float]:
    """p50, p99 and p99.9 in microseconds over several writers' histograms."""
    if not rows:
        return (0.0, 0.0, 0.0)
    hist = np.sum([r[HIST_BASE : HIST_BASE + HIST_BUCKETS] for r in rows], axis=0)
    return tuple(percentile(hist, q) / 1e3 for q in (50, 99, 99.9))  # type: ignore[return-value]
