"""Latency histograms: bucket mapping, representative values, percentiles, rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmblock import stats as S

# The top bucket collects everything from here on; below it every bucket is exact.
TOP = (2 * S.SUB_BUCKETS) << (S.HIST_OCTAVES - 2)


def bucket_bounds(index: int) -> tuple[int, int]:
    """[low, high) of the nanoseconds that land in bucket ``index``."""
    if index < S.SUB_BUCKETS:
        return index, index + 1
    exp = index // S.SUB_BUCKETS - 1
    low = (S.SUB_BUCKETS + index % S.SUB_BUCKETS) << exp
    return low, low + (1 << exp)


def test_small_values_are_exact() -> None:
    for ns in range(S.SUB_BUCKETS):
        assert S.bucket_of(ns) == ns
        assert S.bucket_value(ns) == ns


def test_negative_latency_goes_to_bucket_zero() -> None:
    assert S.bucket_of(-5) == 0


def test_bucket_of_is_monotone_and_contiguous() -> None:
    previous = 0
    for ns in range(0, 1 << 16):
        b = S.bucket_of(ns)
        assert b in (previous, previous + 1), ns
        previous = b
    assert previous == S.bucket_of((1 << 16) - 1)


@given(st.integers(min_value=0, max_value=TOP - 1))
def test_value_lies_in_its_bucket(ns: int) -> None:
    b = S.bucket_of(ns)
    low, high = bucket_bounds(b)
    assert low <= ns < high
    assert low <= S.bucket_value(b) < high


@given(st.integers(min_value=1, max_value=TOP - 1))
def test_bucket_value_within_an_eighth(ns: int) -> None:
    value = S.bucket_value(S.bucket_of(ns))
    assert abs(value - ns) <= 0.125 * ns


@given(st.integers(min_value=0, max_value=1 << 60), st.integers(min_value=0, max_value=1 << 60))
def test_bucket_of_monotone(a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    assert S.bucket_of(lo) <= S.bucket_of(hi)


def test_buckets_cover_every_index_once_and_cap() -> None:
    values = [S.bucket_value(i) for i in range(S.HIST_BUCKETS)]
    assert values == sorted(values)
    assert len(set(values)) == S.HIST_BUCKETS
    assert S.bucket_of(TOP) == S.HIST_BUCKETS - 1
    assert S.bucket_of(1 << 80) == S.HIST_BUCKETS - 1
    assert S.bucket_of(TOP - 1) == S.HIST_BUCKETS - 1
    # every index is reachable
    for i in range(S.HIST_BUCKETS):
        low, _ = bucket_bounds(i)
        assert S.bucket_of(low) == i


def hist_of(latencies: list[int]) -> S.U64Array:
    hist = np.zeros(S.HIST_BUCKETS, dtype=np.uint64)
    for ns in latencies:
        hist[S.bucket_of(ns)] += 1
    return hist


def test_percentile_empty_is_zero() -> None:
    assert S.percentile(np.zeros(S.HIST_BUCKETS, dtype=np.uint64), 50) == 0.0


def test_percentile_of_a_single_value() -> None:
    hist = hist_of([10_000] * 7)
    for q in (0, 1, 50, 99, 99.9, 100):
        assert S.percentile(hist, q) == pytest.approx(10_000, rel=0.125)


def test_percentile_uniform() -> None:
    latencies = list(range(1_000, 101_000, 10))  # 10 000 values, 1 µs .. 101 µs
    hist = hist_of(latencies)
    for q in (1, 10, 25, 50, 75, 90, 99, 99.9):
        exact = float(np.percentile(latencies, q, method="inverted_cdf"))
        assert S.percentile(hist, q) == pytest.approx(exact, rel=0.125), q
    assert S.percentile(hist, 100) == pytest.approx(latencies[-1], rel=0.125)
    assert S.percentile(hist, 0) == pytest.approx(latencies[0], rel=0.125)


def test_percentile_two_clusters() -> None:
    """99 fast writes and one slow: p50/p99 are fast, p99.9 and p100 are the slow one."""
    hist = hist_of([2_000] * 99 + [5_000_000])
    assert S.percentile(hist, 50) == pytest.approx(2_000, rel=0.125)
    assert S.percentile(hist, 99) == pytest.approx(2_000, rel=0.125)
    assert S.percentile(hist, 99.9) == pytest.approx(5_000_000, rel=0.125)
    assert S.percentile(hist, 100) == pytest.approx(5_000_000, rel=0.125)


@given(st.lists(st.integers(min_value=1, max_value=1 << 36), min_size=1, max_size=200),
       st.floats(min_value=0, max_value=100))
def test_percentile_matches_exact_within_an_eighth(latencies: list[int], q: float) -> None:
    exact = float(np.percentile(latencies, q, method="inverted_cdf"))
    assert S.percentile(hist_of(latencies), q) == pytest.approx(exact, rel=0.125)


def test_merged_percentiles_in_microseconds() -> None:
    rows = []
    for lat in (1_000, 3_000):
        row = np.zeros(S.STATS_WORDS, dtype=np.uint64)
        row[S.HIST_BASE : S.HIST_BASE + S.HIST_BUCKETS] = hist_of([lat] * 50)
        rows.append(row)
    p50, p99, p999 = S.merged_percentiles(rows)
    assert p50 == pytest.approx(1.0, rel=0.125)
    assert p99 == pytest.approx(3.0, rel=0.125)
    assert p999 == pytest.approx(3.0, rel=0.125)
    assert S.merged_percentiles([]) == (0.0, 0.0, 0.0)


def test_writer_stats_from_row() -> None:
    row = np.zeros(S.STATS_WORDS, dtype=np.uint64)
    row[S.W_PID] = 1234
    row[S.W_OPS] = 1000
    row[S.W_BYTES] = 4096 * 1000
    row[S.W_READS] = 5
    row[S.W_READ_BYTES] = 20
    row[S.W_CBW_SAVES] = 7
    row[S.W_CBW_REQUESTS] = 3
    row[S.W_CBW_WAIT_NS] = 2_500_000_000
    row[S.W_MAX_STALL_NS] = 1_000_000
    row[S.W_ERRORS] = 2
    row[S.W_START_NS] = 10_000_000_000
    row[S.W_END_NS] = 12_000_000_000
    row[S.HIST_BASE : S.HIST_BASE + S.HIST_BUCKETS] = hist_of([4_000] * 1000)
    ws = S.WriterStats.from_row(3, row)
    assert ws.writer == 3
    assert ws.pid == 1234
    assert (ws.ops, ws.bytes, ws.reads, ws.read_bytes) == (1000, 4096000, 5, 20)
    assert (ws.cbw_saves, ws.cbw_requests, ws.errors) == (7, 3, 2)
    assert ws.cbw_wait_s == pytest.approx(2.5)
    assert ws.max_stall_s == pytest.approx(0.001)
    assert ws.elapsed_s == pytest.approx(2.0)
    assert ws.ops_per_s == pytest.approx(500.0)
    assert ws.p50_us == pytest.approx(4.0, rel=0.125)
    assert ws.p999_us == pytest.approx(4.0, rel=0.125)


def test_writer_stats_of_an_empty_row() -> None:
    ws = S.WriterStats.from_row(0, np.zeros(S.STATS_WORDS, dtype=np.uint64))
    assert ws.ops_per_s == 0.0
    assert ws.elapsed_s == 0.0
    assert (ws.p50_us, ws.p99_us, ws.p999_us) == (0.0, 0.0, 0.0)


def test_writer_stats_end_before_start_is_zero_elapsed() -> None:
    row = np.zeros(S.STATS_WORDS, dtype=np.uint64)
    row[S.W_START_NS] = 100
    row[S.W_END_NS] = 50  # a row read while its writer was mid-flush
    assert S.WriterStats.from_row(0, row).elapsed_s == 0.0


def test_row_words_are_distinct_and_below_the_histogram() -> None:
    """Two counters sharing a word would each read the other's count (a merge of two
    branches that both add a column can do that without any other test noticing)."""
    words = {name: getattr(S, name) for name in dir(S) if name.startswith("W_")}
    assert len(set(words.values())) == len(words), words
    assert all(0 <= w < S.HIST_BASE for w in words.values()), words


def test_writer_stats_reads_freeze_timeouts() -> None:
    row = np.zeros(S.STATS_WORDS, dtype=np.uint64)
    row[S.W_FREEZES] = 5
    row[S.W_FREEZE_TIMEOUTS] = 2
    assert S.WriterStats.from_row(0, row).freeze_timeouts == 2
