"""Incremental backups: what copying only the dirty clusters costs beside a full backup.

Issue 8's goal: a job that copies only dirty clusters takes time proportional to them,
1 % dirty of a 4 GiB device in at most 5 % of a full backup's time. The section runs
the regime a user runs, on one idle device (no writer processes: this is about the
copy, the scenario matrix is about contention)::

    fill the device (half random, half zero: shmblock.bench.content)
    add bitmaps "q" and "r" (one per target format, so each incremental of a round
                             copies the same dirty set)
    full → full.qcow2, bitmap q; full → full.raw, bitmap r      (each timed, repeated)
    for the variants "scattered" (1 % of the clusters, chosen at random) and
    "contiguous" (one run of 1 % of the clusters), repeated:
        write the dirty set as a guest (DeviceHandle.write)
        sync=incremental, bitmap q → inc.qcow2, backing file the previous link
        sync=incremental, bitmap r → inc.raw (only the dirty clusters, at their offsets)
    verification, once, untimed: one more round whose qcow2 incremental also writes a
    reference image of the snapshot; ``qemu-img compare`` reads the whole chain against
    it, ``qemu-img check`` checks every link, and the raw incremental is verified by the
    engine's own digests (``verify=True``).

Times are the job's (``JobResult.duration_s``: snapshot to conclusion, including the
target's fsync and rename), median of the repeats; the ratio compares an incremental
with a full backup to the same format in the same run. End-to-end times (adding the
worker's start and the target's opening, which an incremental pays like a full backup)
are reported beside them. The timed jobs take no verification copy, so the copy's
digest thread does not compete with them; the verification round is apart for that
reason. Each timed job records the CPU other processes used meanwhile
(:class:`~shmblock.bench.load.CpuMeter`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shmblock.bench.common import median, remove_file
from shmblock.bench.content import fill
from shmblock.bench.load import CpuMeter
from shmblock.bench.options import Plan
from shmblock.engine import DeviceHandle, Engine

JOB_TIMEOUT = 600.0
QEMU_TIMEOUT = 600.0
FORMATS = ("qcow2", "raw")
BITMAP = {"qcow2": "q", "raw": "r"}
VARIANTS = ("scattered", "contiguous")
#: the issue's goal: an incremental of 1 % dirty in at most this share of a full backup
GOAL_RATIO = 0.05
#: largest single guest write when dirtying a contiguous run
WRITE_CHUNK = 4 << 20
Note = Callable[[str], None]


class BenchFailure(RuntimeError):
    """A backup of the section did not complete (or did not verify): no figure for it."""




def _allocated(path: str) -> int:
    """Bytes the file occupies (a raw incremental is sparse: only its dirty clusters)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def timed_backup(engine: Engine, dev: DeviceHandle, path: str, fmt: str,
                 **options: Any) -> dict[str, Any]:
    """One backup, timed; BenchFailure unless it completed (and verified, if asked)."""
    meter = CpuMeter()
    t0 = time.perf_counter()
    job = engine.create_backup(dev, path, format=fmt, **options)
    job.start()
    result = job.wait(JOB_TIMEOUT)  # reaps the worker: the meter counts its CPU as ours
    e2e = time.perf_counter() - t0
    if not result.ok:
        raise BenchFailure(f"backup of {dev.name} to {os.path.basename(path)} "
                           f"(sync={result.sync}) {result.outcome.value}: "
                           f"{result.error or result.verify_error}")
    return {"job_s": result.duration_s, "end_to_end_s": e2e,
            "bytes_total": result.bytes_total, "bytes_written": result.bytes_written,
            "clusters_copied": result.clusters_copied, "file_bytes": _allocated(path),
            "verified": result.verified, **meter.record()}


def dirty(dev: DeviceHandle, variant: str, share: float, rng: np.random.Generator) -> int:
    """Write random data to ``share`` of the clusters as a guest; returns the count.

    ``scattered``: clusters chosen at random, one write each; ``contiguous``: one run at
    a random place, in writes of up to :data:`WRITE_CHUNK`.
    """
    cs = dev.cluster_size
    n = dev.size // cs
    k = max(1, round(n * share))
    pool = np.frombuffer(rng.bytes(WRITE_CHUNK + cs), dtype=np.uint8)
    if variant == "scattered":
        for c in np.sort(rng.choice(n, size=k, replace=False)).tolist():
            at = int(rng.integers(0, WRITE_CHUNK // 8)) * 8
            dev.write(c * cs, pool[at : at + cs].data)
        return k
    first = int(rng.integers(0, n - k + 1))
    for start in range(first * cs, (first + k) * cs, WRITE_CHUNK):
        length = min(WRITE_CHUNK, (first + k) * cs - start)
        dev.write(start, pool[:length].data)
    return k


def _dirty_bytes(dev: DeviceHandle, name: str) -> int:
    return int(np.count_nonzero(dev.bitmap(name))) * dev.cluster_size


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the runs of one kind, and whether any was taken under load."""
    return {
        "runs": runs,
        "job_s": median([r["job_s"] for r in runs]),
        "end_to_end_s": median([r["end_to_end_s"] for r in runs]),
        "bytes_written": median([r["bytes_written"] for r in runs]),
        "file_bytes": median([r["file_bytes"] for r in runs]),
        "foreign_cores": max(r["foreign_cores"] for r in runs),
        "under_load": any(r["under_load"] for r in runs),
    }


def _qemu_img(argv: list[str]) -> tuple[bool, str]:
    """Run a qemu-img check or compare: (ok, its last line of output)."""
    try:
        proc = subprocess.run(["qemu-img", *argv], capture_output=True, text=True,
                              timeout=QEMU_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    text = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return proc.returncode == 0, text[-1] if text else f"exit code {proc.returncode}"


def check_chain(top: str, reference: str, links: list[str]) -> dict[str, Any]:
    """``qemu-img compare`` of the chain read from ``top`` against ``reference``, and
    ``qemu-img check`` of every qcow2 link. None for what qemu-img is not there to do."""
    if not shutil.which("qemu-img"):
        return {"compare_ok": None, "check_ok": None,
                "how": "qemu-img is not installed: the chain was not checked"}
    compare_ok, compare_says = _qemu_img(["compare", "-f", "qcow2", "-F", "raw", top,
                                          reference])
    checks = [(os.path.basename(p), *_qemu_img(["check", "-f", "qcow2", p])) for p in links]
    return {"compare_ok": compare_ok, "compare_says": compare_says,
            "check_ok": all(ok for _, ok, _ in checks), "links": len(links),
            "checks": [{"link": name, "ok": ok, "says": says} for name, ok, says in checks],
            "how": "qemu-img compare -f qcow2 -F raw TOP REFERENCE (the whole chain against "
                   "the snapshot's reference image); qemu-img check -f qcow2 on every link"}


def run_incremental(plan: Plan, out_dir: str, note: Note) -> dict[str, Any]:
    """The section's results (see the module docstring); BenchFailure if a job fails."""
    rng = np.random.default_rng(plan.seed + 8)
    made: list[str] = []

    def path(name: str) -> str:
        p = os.path.join(out_dir, name)
        made.append(p)
        return p

    res: dict[str, Any] = {"size": plan.inc_size, "dirty_share": plan.inc_dirty,
                           "repeats": plan.inc_repeats, "goal_ratio": GOAL_RATIO,
                           "notes": []}
    try:
        with Engine() as engine:
            dev = engine.create_device(plan.inc_size, max_writers=1)
            note(f"incremental: filling {plan.inc_size >> 20} MiB")
            content = fill(dev, plan.seed)
            res["content_data_bytes"] = content.data_bytes
            res["cluster_size"] = dev.cluster_size
            for fmt in FORMATS:
                dev.add_bitmap(BITMAP[fmt])
            full: dict[str, Any] = {}
            chain: list[str] = []
            for fmt in FORMATS:
                runs = []
                for i in range(plan.inc_repeats):
                    note(f"incremental: full backup to {fmt} ({i + 1}/{plan.inc_repeats})")
                    target = path(f"inc-full-{i}.{fmt}")
                    # Each full backup resets its bitmap (bitmap mode on-success, as a
                    # regime's first backup does); the last is the chain's base.
                    runs.append(timed_backup(engine, dev, target, fmt, sync="full",
                                             bitmap=BITMAP[fmt], bitmap_mode="on-success"))
                    if fmt == "qcow2" and i == plan.inc_repeats - 1:
                        chain.append(target)
                    else:  # nothing reads it again: give its room in /dev/shm back
                        remove_file(target)
                full[fmt] = _summary(runs)
            res["full"] = full
            variants: list[dict[str, Any]] = []
            for variant in VARIANTS:
                runs_by_fmt: dict[str, list[dict[str, Any]]] = {f: [] for f in FORMATS}
                dirty_bytes: list[float] = []
                for i in range(plan.inc_repeats):
                    note(f"incremental: {variant} {plan.inc_dirty:.0%} dirty "
                         f"({i + 1}/{plan.inc_repeats})")
                    clusters = dirty(dev, variant, plan.inc_dirty, rng)
                    counts = {f: _dirty_bytes(dev, BITMAP[f]) for f in FORMATS}
                    if len(set(counts.values())) != 1 or \
                            counts["raw"] != clusters * dev.cluster_size:
                        raise BenchFailure(f"the bitmaps hold {counts} bytes after "
                                           f"{clusters} clusters were written")
                    dirty_bytes.append(counts["raw"])
                    top = path(f"inc-{variant}-{i}.qcow2")
                    runs_by_fmt["qcow2"].append(timed_backup(
                        engine, dev, top, "qcow2", sync="incremental", bitmap="q",
                        backing_file=chain[-1], backing_format="qcow2"))
                    chain.append(top)
                    raw = path(f"inc-{variant}-{i}.raw")
                    runs_by_fmt["raw"].append(timed_backup(
                        engine, dev, raw, "raw", sync="incremental", bitmap="r"))
                    remove_file(raw)  # not a chain: nothing reads it again
                per_fmt = {}
                for fmt in FORMATS:
                    s = _summary(runs_by_fmt[fmt])
                    s["ratio_job"] = s["job_s"] / full[fmt]["job_s"] \
                        if full[fmt]["job_s"] else None
                    s["ratio_end_to_end"] = s["end_to_end_s"] / full[fmt]["end_to_end_s"] \
                        if full[fmt]["end_to_end_s"] else None
                    s["under_load"] = s["under_load"] or full[fmt]["under_load"]
                    per_fmt[fmt] = s
                variants.append({"variant": variant, "dirty_bytes": median(dirty_bytes),
                                 **per_fmt})
            res["variants"] = variants
            note("incremental: verifying the chain (qemu-img compare, check)")
            res["verification"] = _verify(engine, dev, plan, rng, chain, path)
    finally:
        for p in made:
            remove_file(p)
    return res


def _verify(engine: Engine, dev: DeviceHandle, plan: Plan, rng: np.random.Generator,
            chain: list[str], path: Callable[[str], str]) -> dict[str, Any]:
    """One more untimed round, checked end to end (see the module docstring)."""
    dirty(dev, "scattered", plan.inc_dirty, rng)
    reference = path("inc-reference.raw")
    top = path("inc-verify.qcow2")
    qcow2 = timed_backup(engine, dev, top, "qcow2", sync="incremental", bitmap="q",
                         backing_file=chain[-1], backing_format="qcow2",
                         reference_image=reference)
    chain.append(top)
    raw = timed_backup(engine, dev, path("inc-verify.raw"), "raw", sync="incremental",
                       bitmap="r", verify=True)
    checked = check_chain(top, reference, chain)
    checked["raw_incremental_verified"] = raw["verified"]
    checked["raw_how"] = ("the raw incremental's dirty clusters read back and compared "
                          "with digests of the snapshot (Engine.backup verify=True)")
    checked["qcow2_bytes_written"] = qcow2["bytes_written"]
    checked["ok"] = raw["verified"] is True and checked["compare_ok"] is not False \
        and checked["check_ok"] is not False
    return checked
