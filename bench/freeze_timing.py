"""A small timing of the freeze at snapshot start (not the bench): p50/p99/max.

    .venv/bin/python bench/freeze_timing.py --size 256M --writers 8 --samples 200

Starts ``--writers`` CPU-bound random writers on a device of ``--size``, then measures
``engine.freeze`` (the quiesce) ``--samples`` times and a few real snapshots
(``create_backup(sync="none").start()``, whose ``freeze_s`` includes setting the maps),
and times the pieces of the in-freeze work (:func:`shmblock.snapshot.take`,
:func:`~shmblock.snapshot.marked`) on the device's own maps with no writer running.
Prints one JSON line. Run it with nothing else on the machine for figures to publish.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from shmblock.engine import Engine
from shmblock.units import parse_size


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="256M")
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--snapshots", type=int, default=10)
    args = ap.parse_args()
    size = parse_size(args.size)
    out: dict[str, object] = {"size": args.size, "writers": args.writers}
    with Engine() as engine, tempfile.TemporaryDirectory() as tmp:
        dev = engine.create_device(size, max_writers=max(args.writers, 1))
        engine.start_writers(dev, args.writers, workload="random", duration=600.0)
        time.sleep(1.0)
        q = []
        for _ in range(args.samples):
            t0 = time.perf_counter()
            with engine.freeze([dev]):
                q.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.01)
        out["quiesce_ms"] = {"p50": statistics.median(q), "p99": pct(q, 99), "max": max(q)}
        real = []
        for i in range(args.snapshots):
            job = engine.create_backup(dev, os.path.join(tmp, f"s{i}.raw"), format="raw",
                                       sync="none")
            job.start()
            real.append(job.freeze_s * 1e3)
            job.complete()
            job.wait(60)
        out["snapshot_freeze_ms"] = {"p50": statistics.median(real), "max": max(real)}
        ops = sum(s.ops for s in engine.writer_stats(dev))
        out["writer_ops"] = ops
        engine.stop_writers()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
