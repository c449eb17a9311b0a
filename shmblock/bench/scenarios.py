"""The scenario matrix: guest writers under contention, with and without a backup.

One *group* per (workload, writer count) runs on one engine, one device and one set of
writer processes, so that "with backup" and "without" are measured against the very same
processes, minutes apart at most::

    fill the device (half random, half zero) → start N writers → warm up
    → window "off":   no job, a fixed time
    → window "raw":   from the snapshot instant to the job's conclusion
    → window "qcow2": the same, a fresh target
    → stop the writers, remove everything

Each window yields one :class:`Cell`: guest ops/s and MB/s, latency percentiles and the
longest stall in the window, the share of writer time spent in copy-before-write, and
for backup windows the freeze at snapshot start and the job's duration and throughput.
The backup worker is started (and the target opened) before the snapshot instant, as
:meth:`Engine.create_backup` intends, so job time is copying time.

Every cell also records the CPU other processes used during it (``load``,
:mod:`shmblock.bench.load`), the copy-before-write buffer's occupancy when the engine
reports it (``cbw_buffer``, contract C1; ``None`` from an engine without the buffer),
and, for backup cells, a verification: once the timed backups are done, one more
backup per target with ``verify=True`` (the writers still running) checks that the
point-in-time copy is exact. Its freeze and its verification copy are reported apart
(``verification``); the timed cell's figures never include a verification copy.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from shmblock.bench.common import buffer_stats
from shmblock.bench.content import fill
from shmblock.bench.load import CpuMeter
from shmblock.bench.options import Plan
from shmblock.bench.sampling import Sample, lifetime_max_stall_us, sample, window
from shmblock.engine import DeviceHandle, Engine
from shmblock.errors import JobError

JOB_TIMEOUT = 600.0
EXT = {"raw": "raw", "qcow2": "qcow2"}


@dataclass
class Cell:
    """One measurement of the matrix."""

    workload: str
    writers: int
    backup: bool
    target: str  # "" when backup is off
    device_size: int
    window_s: float
    guest_ops: int
    guest_ops_per_s: float
    guest_mb_per_s: float
    p50_us: float
    p99_us: float
    p999_us: float
    max_stall_ms: float
    max_stall_run_ms: float  # longest write since the writers started (whole group)
    cbw_saves: int
    cbw_requests: int
    cbw_wait_share: float
    write_errors: int
    freeze_ms: float | None = None
    backup_s: float | None = None
    backup_mb_per_s: float | None = None
    backup_outcome: str | None = None
    backup_error: str = ""
    clusters_copied: int | None = None
    cbw_clusters: int | None = None
    bytes_written: int | None = None
    cbw_buffer: dict[str, Any] | None = None  # C1 occupancy; None: engine has no buffer
    verification: dict[str, Any] | None = None  # the untimed verified backup (see above)
    foreign_cores: float = 0.0
    under_load: bool = False
    load: dict[str, Any] | None = None

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.workload, self.writers, self.target or "off")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[str], None]


def run_group(plan: Plan, workload: str, writers: int, target_dir: str,
              note: Progress) -> list[Cell]:
    """Measure one (workload, writers) group: off, then one backup per target."""
    cells: list[Cell] = []
    with Engine() as engine:
        dev = engine.create_device(plan.scenario_size, max_writers=writers)
        fill(dev, plan.seed)
        engine.start_writers(dev, writers, workload=workload, block_size=plan.block_size,
                             seed=plan.seed)
        time.sleep(plan.warmup_s)
        note(f"{workload} × {writers}: no backup")
        meter = CpuMeter()
        s0 = sample(engine, dev)
        time.sleep(plan.idle_window_s)
        s1 = sample(engine, dev)
        cells.append(_with_load(_cell(workload, writers, "", plan, s0, s1), meter))
        timed: dict[str, Cell] = {}
        for fmt in plan.targets:
            note(f"{workload} × {writers}: backup to {fmt}")
            path = os.path.join(target_dir, f"scenario-{workload}-{writers}.{EXT[fmt]}")
            meter = CpuMeter()
            job = engine.create_backup(dev, path, format=fmt)
            # The writers ran on while the worker started; measure from the snapshot on.
            job.start()
            s0 = sample(engine, dev)
            if not job.tracker.wait(JOB_TIMEOUT):
                raise JobError(f"the backup to {path} did not finish in {JOB_TIMEOUT:.0f} s")
            s1 = sample(engine, dev)
            result = job.wait(JOB_TIMEOUT)
            cell = _cell(workload, writers, fmt, plan, s0, s1)
            cell.freeze_ms = result.freeze_s * 1e3
            cell.backup_s = result.duration_s
            cell.backup_mb_per_s = result.throughput / 1e6
            cell.backup_outcome = result.outcome.value
            cell.backup_error = result.error
            cell.clusters_copied = result.clusters_copied
            cell.cbw_clusters = result.cbw_clusters
            cell.bytes_written = result.bytes_written
            cell.cbw_buffer = buffer_stats(result)
            cells.append(_with_load(cell, meter))
            timed[fmt] = cell
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            time.sleep(plan.settle_s)
        for fmt, cell in timed.items():
            note(f"{workload} × {writers}: verified backup to {fmt}")
            path = os.path.join(target_dir, f"scenario-{workload}-{writers}-verify.{EXT[fmt]}")
            cell.verification = verified_backup(engine, dev, path, fmt)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        engine.stop_writers()
    return cells


def verified_backup(engine: Engine, dev: DeviceHandle, path: str, fmt: str,
                    **options: Any) -> dict[str, Any]:
    """One untimed backup with ``verify=True``: is the point-in-time copy exact?

    The device is copied inside the freeze for the digests, so this job's freeze is
    longer by that copy (``verify_copy_ms``, reported apart) and its digest thread
    competes with the writers: that is why the timed cells never verify.
    """
    job = engine.create_backup(dev, path, format=fmt, verify=True, **options)
    job.start()
    result = job.wait(JOB_TIMEOUT)
    return {"verified": result.verified is True and result.outcome.value == "completed",
            "outcome": result.outcome.value, "error": result.error or result.verify_error,
            "freeze_ms": result.freeze_s * 1e3, "verify_copy_ms": result.verify_copy_s * 1e3,
            "backup_s": result.duration_s}


def _with_load(cell: Cell, meter: CpuMeter) -> Cell:
    load = meter.record()
    cell.foreign_cores = load["foreign_cores"]
    cell.under_load = load["under_load"]
    cell.load = load
    return cell


def _cell(workload: str, writers: int, target: str, plan: Plan, s0: Sample, s1: Sample) -> Cell:
    w = window(s0, s1)
    return Cell(
        workload=workload, writers=writers, backup=bool(target), target=target,
        device_size=plan.scenario_size, window_s=w.seconds, guest_ops=w.ops,
        guest_ops_per_s=w.ops_per_s, guest_mb_per_s=w.bytes_per_s / 1e6,
        p50_us=w.p50_us, p99_us=w.p99_us, p999_us=w.p999_us,
        max_stall_ms=w.max_stall_us / 1e3, max_stall_run_ms=lifetime_max_stall_us(s1) / 1e3,
        cbw_saves=w.cbw_saves, cbw_requests=w.cbw_requests,
        cbw_wait_share=w.cbw_wait_share, write_errors=w.errors)


def run_matrix(plan: Plan, target_dir: str, note: Progress,
               step: Callable[[], None]) -> list[Cell]:
    cells: list[Cell] = []
    for workload in plan.workloads:
        for writers in plan.writers:
            cells += run_group(plan, workload, writers, target_dir, note)
            step()
    return cells
