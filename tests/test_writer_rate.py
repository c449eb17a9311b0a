"""A rate-limited guest writer still stops when its duration is up.

The writer loop looked at the clock only every 1024 operations: cheap at full speed (a
few milliseconds apart), but at ``--rate 50`` that is once every 20 s, so a writer told to
run for half a second ran for 20. Tests that slow their writers down to leave holes in a
device (and the CLI's ``--rate`` with ``--duration``) depend on this.
"""

from __future__ import annotations

import time

from shmblock.engine import Engine


def test_rate_limited_writer_honours_its_duration() -> None:
    with Engine() as engine:
        dev = engine.create_device(4 << 20)
        started = time.monotonic()
        engine.start_writers(dev, 1, workload="random", duration=0.5, rate=50)
        assert engine.wait_writers(30)
        elapsed = time.monotonic() - started
        (stats,) = engine.writer_stats(dev)
    assert elapsed < 5.0, f"a 0.5 s writer ran for {elapsed:.1f} s"
    assert 10 <= stats.ops <= 40, stats
