"""Restore of a three-link qcow2 chain, beside ``qemu-img convert`` of the same chain.

The engine makes the chain as a regime would, on a device of ``--restore-size`` filled
by :func:`shmblock.bench.content.fill` (half random data, half zeros)::

    base.qcow2  full backup (it resets bitmap "chain")
    inc1.qcow2  write 10 % of the clusters, scattered; incremental, backing base.qcow2
    inc2.qcow2  write 10 % more, one contiguous run; incremental, backing inc1.qcow2,
                with a reference image of its snapshot

and closes the device (its memory is free before anything is timed). Both copiers then
turn ``inc2.qcow2`` (read through its chain) into a new raw file in the same directory,
on a disk file system (the scaling directory, ``/var/tmp`` unless told), alternating
which goes first, ``os.sync()`` before each so neither pays for the other's write-back:

* ``shmblock.restore.restore(top, dest, verify=False)``: the whole call (checks the
  chain, copies, fsyncs the file, renames it, fsyncs the directory), in this process;
* ``qemu-img convert -t writeback -f qcow2 -O raw top dest``: the process's wall time.
  ``-t writeback`` makes qemu-img flush the output when it closes it (``fdatasync``;
  its default for convert, ``unsafe``, flushes nothing), so both times include making
  the data durable.

The ratio is restore's median time over qemu-img's. Once more, untimed for the ratio, a
verified restore (``verify=True``, its verification time reported apart) is compared
with the reference image by ``qemu-img compare``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shmblock.bench.common import median, remove_file
from shmblock.bench.content import fill
from shmblock.bench.incremental import BenchFailure, check_chain, dirty, timed_backup
from shmblock.bench.load import CpuMeter
from shmblock.bench.options import Plan
from shmblock.engine import Engine
from shmblock.restore import restore

QEMU_TIMEOUT = 600.0
#: share of the clusters each incremental of the chain writes
LINK_DIRTY = 0.10
Note = Callable[[str], None]




def make_chain(plan: Plan, chain_dir: str, note: Note) -> tuple[list[str], str, int]:
    """base ← inc1 ← inc2 and the reference image of inc2's snapshot; (links, reference,
    bytes of data the device held)."""
    rng = np.random.default_rng(plan.seed + 9)
    links = [os.path.join(chain_dir, f"{n}.qcow2") for n in ("base", "inc1", "inc2")]
    reference = os.path.join(chain_dir, "reference.raw")
    with Engine() as engine:
        dev = engine.create_device(plan.restore_size, max_writers=1)
        note(f"restore: making a three-link chain of {plan.restore_size >> 20} MiB")
        content = fill(dev, plan.seed)
        dev.add_bitmap("chain")
        timed_backup(engine, dev, links[0], "qcow2", sync="full", bitmap="chain",
                     bitmap_mode="on-success")
        dirty(dev, "scattered", LINK_DIRTY, rng)
        timed_backup(engine, dev, links[1], "qcow2", sync="incremental", bitmap="chain",
                     backing_file=links[0], backing_format="qcow2")
        dirty(dev, "contiguous", LINK_DIRTY, rng)
        timed_backup(engine, dev, links[2], "qcow2", sync="incremental", bitmap="chain",
                     backing_file=links[1], backing_format="qcow2",
                     reference_image=reference)
    return links, reference, content.data_bytes


def _time_restore(top: str, dest: str) -> dict[str, Any]:
    os.sync()
    meter = CpuMeter()
    t0 = time.perf_counter()
    result = restore(top, dest, verify=False)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "copy_s": result.copy_s, "data_bytes": result.data_bytes,
            "read_bytes": result.read_bytes, "skipped_bytes": result.skipped_bytes,
            **meter.record()}


def _time_convert(top: str, dest: str) -> dict[str, Any]:
    argv = ["qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O", "raw", top, dest]
    os.sync()
    meter = CpuMeter()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=QEMU_TIMEOUT,
                          check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise BenchFailure(f"qemu-img convert failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[:300]}")
    return {"wall_s": wall, **meter.record()}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"runs": runs, "wall_s": median([r["wall_s"] for r in runs]),
            "foreign_cores": max(r["foreign_cores"] for r in runs),
            "under_load": any(r["under_load"] for r in runs)}


def run_restore(plan: Plan, out_dir: str, fs: str, note: Note) -> dict[str, Any]:
    """The section's results (see the module docstring); BenchFailure if a step fails."""
    chain_dir = tempfile.mkdtemp(prefix="shmblock-bench-restore-", dir=out_dir)
    res: dict[str, Any] = {"size": plan.restore_size, "repeats": plan.restore_repeats,
                           "directory_fs": fs, "notes": [],
                           "chain": "base.qcow2 (full) ← inc1.qcow2 (10 % of the clusters, "
                                    "scattered) ← inc2.qcow2 (10 %, one run)"}
    try:
        links, reference, data_bytes = make_chain(plan, chain_dir, note)
        res["content_data_bytes"] = data_bytes
        res["chain_check"] = check_chain(links[-1], reference, links)
        top, dest = links[-1], os.path.join(chain_dir, "restored.raw")
        have_qemu = shutil.which("qemu-img") is not None
        if not have_qemu:
            res["notes"].append("qemu-img is not installed (Debian: qemu-utils): the "
                                "qemu-img convert comparison was skipped")
        ours: list[dict[str, Any]] = []
        theirs: list[dict[str, Any]] = []
        for i in range(plan.restore_repeats):
            steps = ["restore", "convert"] if i % 2 == 0 else ["convert", "restore"]
            for step in steps:
                note(f"restore: {step} ({i + 1}/{plan.restore_repeats})")
                if step == "restore":
                    ours.append(_time_restore(top, dest))
                elif have_qemu:
                    theirs.append(_time_convert(top, dest))
                remove_file(dest)
        res["restore"] = {**_summary(ours), "copy_s": median([r["copy_s"] for r in ours]),
                          "data_bytes": ours[0]["data_bytes"],
                          "how": "shmblock.restore.restore(top, dest, verify=False): "
                                 "checks the chain, copies, fsyncs the file, renames it, "
                                 "fsyncs the directory (in this process: no interpreter "
                                 "start)"}
        if theirs:
            res["qemu_img_convert"] = {
                **_summary(theirs),
                "command": "qemu-img convert -t writeback -f qcow2 -O raw inc2.qcow2 "
                           "restored.raw",
                "how": "wall time of the process; -t writeback flushes the output "
                       "(fdatasync) when qemu-img closes it"}
            res["ratio"] = res["restore"]["wall_s"] / res["qemu_img_convert"]["wall_s"]
        else:
            res["ratio"] = None
        note("restore: a verified restore, compared with the reference image")
        t0 = time.perf_counter()
        verified = restore(top, dest, verify=True)
        res["verified_restore"] = {
            "wall_s": time.perf_counter() - t0, "copy_s": verified.copy_s,
            "verify_s": verified.verify_s, "verified": verified.verified}
        if have_qemu:  # an independent reader of the restored file
            proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", dest,
                                   reference], capture_output=True, text=True,
                                  timeout=QEMU_TIMEOUT, check=False)
            res["verified_restore"]["compare_ok"] = proc.returncode == 0
        else:
            res["verified_restore"]["compare_ok"] = None
        res["verified_restore"]["ok"] = verified.verified is True and \
            res["verified_restore"]["compare_ok"] is not False and \
            res["chain_check"]["compare_ok"] is not False and \
            res["chain_check"]["check_ok"] is not False
    finally:
        shutil.rmtree(chain_dir, ignore_errors=True)
    return res
