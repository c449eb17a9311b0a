"""Guest retention against ``--speed``: how much a slower backup spares the guest.

For each workload of ``plan.speed_workloads`` (zipf, first-touch) and writer count of
``plan.speed_writers``, one engine, one device of ``plan.speed_size`` (half random, half
zero), the same writer processes throughout::

    warm up → window "off" (no job) → for each speed of plan.speeds (0 = unlimited):
        full backup to raw at that speed; the window is the job, snapshot to conclusion
    → one more backup, unlimited, with verify=True (point-in-time check, untimed)

Each speed gives guest ops/s, retention (ops/s during the job ÷ ops/s off), the job's
duration, the backup worker's CPU over the job (``worker_cores``, from its
``/proc/PID/stat`` when the job has a worker process of its own; ``None`` otherwise) and
the CPU-share bound of :mod:`shmblock.bench.bound` for that worker load — with the worker
taken as busy (``u = 1``) and as measured — and retention as a fraction of the bound.
Every window records the CPU other processes used meanwhile.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from shmblock.bench.bound import cpu_share_bound
from shmblock.bench.common import buffer_stats, remove_file
from shmblock.bench.content import fill
from shmblock.bench.load import CpuMeter, read_stat
from shmblock.bench.options import Plan
from shmblock.bench.sampling import sample, window
from shmblock.bench.scenarios import verified_backup
from shmblock.engine import Engine
from shmblock.errors import JobError

JOB_TIMEOUT = 600.0


def _cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    p = read_stat(pid, os.sysconf("SC_CLK_TCK"))
    return None if p is None else p.own


def run_group(plan: Plan, workload: str, writers: int, target_dir: str,
              note: Callable[[str], None]) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    group: dict[str, Any] = {"workload": workload, "writers": writers, "cells": []}
    with Engine() as engine:
        dev = engine.create_device(plan.speed_size, max_writers=writers)
        fill(dev, plan.seed)
        engine.start_writers(dev, writers, workload=workload, block_size=plan.block_size,
                             seed=plan.seed)
        time.sleep(plan.warmup_s)
        note(f"speed: {workload} × {writers}, no backup")
        meter = CpuMeter()
        s0 = sample(engine, dev)
        time.sleep(plan.idle_window_s)
        off = window(s0, sample(engine, dev))
        group["off"] = {"guest_ops_per_s": off.ops_per_s, "p99_us": off.p99_us,
                        **meter.record()}
        for speed in plan.speeds:
            note(f"speed: {workload} × {writers}, backup at "
                 f"{'unlimited' if not speed else f'{speed >> 20} MiB/s'}")
            path = os.path.join(target_dir, f"speed-{workload}-{writers}-{speed}.raw")
            meter = CpuMeter()
            job = engine.create_backup(dev, path, format="raw", speed=speed)
            proc = getattr(job, "proc", None)
            pid = getattr(proc, "pid", None)
            job.start()
            cpu0, s0 = _cpu_s(pid), sample(engine, dev)
            if not job.tracker.wait(JOB_TIMEOUT):
                raise JobError(f"the backup to {path} did not finish in {JOB_TIMEOUT:.0f} s")
            cpu1, s1 = _cpu_s(pid), sample(engine, dev)
            result = job.wait(JOB_TIMEOUT)
            remove_file(path)
            w = window(s0, s1)
            worker = None if cpu0 is None or cpu1 is None or not w.seconds else \
                max(cpu1 - cpu0, 0.0) / w.seconds
            retention = w.ops_per_s / off.ops_per_s if off.ops_per_s else None
            bound_busy = cpu_share_bound(writers, cores, 1.0)
            bound_measured = None if worker is None else cpu_share_bound(writers, cores, worker)
            group["cells"].append({
                "speed": speed, "outcome": result.outcome.value, "error": result.error,
                "backup_s": result.duration_s, "guest_ops_per_s": w.ops_per_s,
                "p99_us": w.p99_us, "max_stall_ms": w.max_stall_us / 1e3,
                "retention": retention, "worker_cores": worker,
                "bound_busy_worker": bound_busy, "bound_measured_worker": bound_measured,
                "of_bound": None if retention is None else retention / (
                    bound_measured if bound_measured is not None else bound_busy),
                "cbw_buffer": buffer_stats(result), **meter.record()})
        note(f"speed: {workload} × {writers}, verified backup")
        path = os.path.join(target_dir, f"speed-{workload}-{writers}-verify.raw")
        group["verification"] = verified_backup(engine, dev, path, "raw")
        remove_file(path)
        engine.stop_writers()
    return group


def run_speed(plan: Plan, target_dir: str, note: Callable[[str], None]) -> dict[str, Any]:
    res: dict[str, Any] = {"size": plan.speed_size, "speeds": list(plan.speeds),
                           "cores": os.cpu_count(), "groups": [], "failures": []}
    for workload in plan.speed_workloads:
        for writers in plan.speed_writers:
            g = run_group(plan, workload, writers, target_dir, note)
            res["groups"].append(g)
            bad = [c for c in g["cells"] if c["outcome"] != "completed"]
            for c in bad:
                res["failures"].append(f"{workload} × {writers} at speed {c['speed']}: "
                                       f"{c['outcome']}: {c['error']}")
            if not g["verification"]["verified"]:
                res["failures"].append(f"{workload} × {writers}: the verified backup did "
                                       f"not verify: {g['verification']}")
    return res
