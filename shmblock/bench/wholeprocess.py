"""Whole processes, as a user runs them: ``shmblock-run run`` against ``qemu-img convert``.

Issue 9's goal: an idle backup of a 1 GiB device file takes no longer, start to exit,
than ``qemu-img convert`` of the same file (≤ 1.0× its time), to raw and to qcow2. The
section makes one device file of ``plan.process_size`` (half random data, half zero
extents never written, as :mod:`shmblock.bench.content` lays them out) and times, as
whole processes from ``fork`` to exit::

    shmblock-run run --device-file F --writers 0 --target OUT.{raw,qcow2} --no-verify --quiet
    qemu-img convert -f raw -O {raw,qcow2} F OUT.{raw,qcow2}

``plan.process_repeats`` times each (median kept), alternating which of the two goes
first so that neither always finds the page cache warmed by the other. ``--no-verify``
because ``qemu-img convert`` does not verify either; the default ``shmblock-run run``
(which verifies against digests taken at the snapshot) is timed once per format apart,
and is the section's point-in-time check. ``shmblock-run`` is the console script next
to this Python (``python -m shmblock.cli`` when there is none). Each run records the
CPU other processes used meanwhile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shmblock.bench.common import median, remove_file
from shmblock.bench.content import MAX_EXTENT_CLUSTERS
from shmblock.bench.load import CpuMeter
from shmblock.bench.options import Plan
from shmblock.run import python_module

RUN_TIMEOUT = 600.0
CLUSTER = 64 << 10
GOAL_RATIO = 1.0


def make_device_file(path: str, size: int, seed: int) -> int:
    """A raw image of alternating random-data and zero extents (1-32 clusters each);
    the zero extents are holes. Returns the bytes of data written."""
    rng = np.random.default_rng(seed)
    pool = rng.bytes(MAX_EXTENT_CLUSTERS * CLUSTER * 4)
    data = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, size)
        off, is_data = 0, bool(rng.integers(0, 2))
        while off < size:
            n = min(int(rng.integers(1, MAX_EXTENT_CLUSTERS + 1)) * CLUSTER, size - off)
            if is_data:
                src = int(rng.integers(0, len(pool) - n + 1))
                os.pwrite(fd, pool[src : src + n], off)
                data += n
            off += n
            is_data = not is_data
    finally:
        os.close(fd)
    return data


def shmblock_command() -> tuple[list[str], dict[str, str]]:
    """``shmblock-run`` as installed beside this Python (what a user runs), else
    ``python -m shmblock.cli``."""
    script = os.path.join(os.path.dirname(sys.executable), "shmblock-run")
    if os.access(script, os.X_OK):
        return [script], dict(os.environ)
    return python_module("shmblock.cli", [])


def _timed(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    meter = CpuMeter()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT,
                          check=False, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[-400:]}")
    return {"wall_s": wall, **meter.record()}


def run_whole_process(plan: Plan, target_dir: str,
                      note: Callable[[str], None]) -> dict[str, Any]:
    res: dict[str, Any] = {"size": plan.process_size, "repeats": plan.process_repeats,
                           "goal_ratio": GOAL_RATIO, "formats": {}, "notes": [],
                           "failures": []}
    if shutil.which("qemu-img") is None:
        res["notes"].append("qemu-img is not installed (Debian: qemu-utils): the whole-"
                            "process comparison was skipped")
        return res
    work = os.path.join(target_dir, "process")
    os.mkdir(work, 0o700)
    try:
        device = os.path.join(work, "device.img")
        note("whole process: making the device file")
        res["data_bytes"] = make_device_file(device, plan.process_size, plan.seed)
        sb, env = shmblock_command()
        for fmt in ("raw", "qcow2"):
            out = os.path.join(work, f"out.{fmt}")
            ours = [*sb, "run", "--device-file", device, "--writers", "0", "--target", out,
                    "--format", fmt, "--quiet"]
            theirs = ["qemu-img", "convert", "-f", "raw", "-O", fmt, device, out]
            runs: dict[str, list[dict[str, Any]]] = {"shmblock": [], "qemu_img": []}
            for i in range(plan.process_repeats):
                order = [("shmblock", [*ours, "--no-verify"], env), ("qemu_img", theirs, None)]
                for name, argv, e in order if i % 2 == 0 else order[::-1]:
                    note(f"whole process → {fmt}: {name} {i + 1}/{plan.process_repeats}")
                    runs[name].append(_timed(argv, e))
                    remove_file(out)
            note(f"whole process → {fmt}: shmblock-run run with --verify")
            verified = _timed(ours, env)  # the default: verify on; exit 0 means verified
            remove_file(out)
            s = median([r["wall_s"] for r in runs["shmblock"]])
            q = median([r["wall_s"] for r in runs["qemu_img"]])
            res["formats"][fmt] = {
                "shmblock_command": " ".join(["shmblock-run", *ours[len(sb):],
                                              "--no-verify"]).replace(work, "$DIR"),
                "qemu_img_command": " ".join(theirs).replace(work, "$DIR"),
                "shmblock_runs": runs["shmblock"], "qemu_img_runs": runs["qemu_img"],
                "shmblock_s": s, "qemu_img_s": q, "ratio": s / q if q else None,
                "verified_run": verified, "verified": True,
                "foreign_cores": max(r["foreign_cores"] for r in
                                     runs["shmblock"] + runs["qemu_img"]),
                "under_load": any(r["under_load"] for r in
                                  runs["shmblock"] + runs["qemu_img"]),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res
