"""Request → snapshot instant: how long after a backup is asked for its snapshot is taken.

QEMU takes a backup job's snapshot within milliseconds of ``blockdev-backup``; issue 9's
goal is p99 < 20 ms for shmblock. One idle device of ``plan.latency_size`` (filled half
random, half zero), then for each target format, ``plan.latency_jobs`` times::

    t0 → Engine.create_backup(dev, target) → t1 → BackupJob.start() → t2
    job.wait(); the target removed

``request_ms`` is ``t2 − t0``: :meth:`BackupJob.start` returns once the snapshot is taken
and the writers thawed, so ``t2`` is the snapshot instant plus the thaw (an upper bound
by the freeze, well under a millisecond here). ``create_ms`` (``t1 − t0``) is the part
spent preparing (worker, target); ``start_ms`` the snapshot itself. Percentiles over the
jobs (p99 of 50 is the second largest: the goal is about the tail, so the run needs ≥ 50).
Every job is measured with the CPU other processes used meanwhile; each format is also
backed up once more, untimed, with ``verify=True``.

Two worker models when the engine has both: a worker process per job (the default) and
one per device, started with the device (``Engine(prestart_backup_worker=True)``, its
start-up paid by :meth:`Engine.start_backup_worker` before the first request). The goal
is read on the per-device model when it exists: it is the one made for this.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shmblock.bench.common import remove_file
from shmblock.bench.content import fill
from shmblock.bench.load import CpuMeter
from shmblock.bench.options import Plan
from shmblock.bench.scenarios import verified_backup
from shmblock.engine import Engine

JOB_TIMEOUT = 120.0
GOAL_P99_MS = 20.0


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


def worker_models() -> list[str]:
    """The backup-worker models this engine offers: ``per-job``, and ``per-device`` when
    ``Engine`` takes ``prestart_backup_worker``."""
    params = inspect.signature(Engine.__init__).parameters
    return ["per-job", *(["per-device"] if "prestart_backup_worker" in params else [])]


def run_latency(plan: Plan, target_dir: str, note: Callable[[str], None]) -> dict[str, Any]:
    res: dict[str, Any] = {"size": plan.latency_size, "jobs": plan.latency_jobs,
                           "goal_p99_ms": GOAL_P99_MS, "models": {}, "failures": []}
    for model in worker_models():
        res["models"][model] = _model(plan, model, target_dir, note, res["failures"])
    # The goal's figures: the model made for millisecond starts when the engine has it.
    res["goal_model"] = worker_models()[-1]
    res["formats"] = res["models"][res["goal_model"]]
    return res


def _model(plan: Plan, model: str, target_dir: str, note: Callable[[str], None],
           failures: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kwargs: dict[str, Any] = {"prestart_backup_worker": True} if model == "per-device" else {}
    with Engine(**kwargs) as engine:
        dev = engine.create_device(plan.latency_size, max_writers=1)
        fill(dev, plan.seed)
        if model == "per-device":
            engine.start_backup_worker(dev)  # type: ignore[attr-defined,unused-ignore]
        for fmt in ("raw", "qcow2"):
            request, create, start, failed = [], [], [], 0
            meter = CpuMeter()
            for i in range(plan.latency_jobs):
                note(f"request → snapshot, {model} worker, {fmt}: job {i + 1}/"
                     f"{plan.latency_jobs}")
                path = os.path.join(target_dir, f"latency-{i}.{fmt}")
                t0 = time.perf_counter()
                job = engine.create_backup(dev, path, format=fmt)
                t1 = time.perf_counter()
                job.start()
                t2 = time.perf_counter()
                result = job.wait(JOB_TIMEOUT)
                remove_file(path)
                if not result.ok:
                    failed += 1
                    continue
                request.append((t2 - t0) * 1e3)
                create.append((t1 - t0) * 1e3)
                start.append((t2 - t1) * 1e3)
            load = meter.record()
            path = os.path.join(target_dir, f"latency-verify.{fmt}")
            verification = verified_backup(engine, dev, path, fmt)
            remove_file(path)
            if failed:
                failures.append(f"{model} worker: {failed} of {plan.latency_jobs} jobs to "
                                f"{fmt} did not complete")
            if not verification["verified"]:
                failures.append(f"{model} worker: the verified backup to {fmt} did not "
                                f"verify: {verification}")
            out[fmt] = {
                "runs_request_ms": request,
                "request_p50_ms": _pct(request, 50), "request_p99_ms": _pct(request, 99),
                "request_max_ms": max(request, default=0.0),
                "create_p50_ms": _pct(create, 50), "create_p99_ms": _pct(create, 99),
                "start_p50_ms": _pct(start, 50), "start_p99_ms": _pct(start, 99),
                "verification": verification, **load,
            }
    return out
