"""The idle-copy fast paths (issue 9) keep backups exact, with writers racing them.

The background copy reads only clusters the device ever allocated (a device file's
holes, a fresh device's untouched clusters are left out on targets that start zeroed),
copies bursts of chunks per loop step, and the file targets start writeback early.
Here a *device file* with data extents, holes and an extent of zeros that the file
system holds as data is backed up while guest-writer processes write it (first writes
into holes and into data alike, so copy-before-write races the background pass); the
finished raw or qcow2 target must equal the reference image the engine took at the
snapshot instant, judged around our code (``qemu-img check``/``convert``/``compare``).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from shmblock.engine import Engine
from shmblock.job import Outcome
from tests.procs import (
    MiB,
    assert_same_image,
    needs_qemu_img,
    qcow2_as_raw,
    run_cli,
    unthrottle,
    wait_for_cbw,
)

SIZE = 32 * MiB
EXTENT = 1 * MiB


def make_device_file(path: Path, seed: int) -> bytes:
    """Data extents, holes and one extent of stored zeros, alternating."""
    rng = np.random.default_rng(seed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, SIZE)
        for i, off in enumerate(range(0, SIZE, 2 * EXTENT)):
            if i == 3:
                os.pwrite(fd, bytes(EXTENT), off)  # allocated by the file system, zeros
            else:
                os.pwrite(fd, rng.integers(0, 256, EXTENT, dtype=np.uint8).tobytes(), off)
    finally:
        os.close(fd)
    return path.read_bytes()


@needs_qemu_img
@pytest.mark.parametrize(("fmt", "workload", "cbw_mode"),
                         [("raw", "random", "stage"), ("qcow2", "first-touch", "stage"),
                          ("raw", "first-touch", "request"), ("qcow2", "random", "request")])
def test_device_file_backup_with_writers_is_exact(tmp_path: Path, fmt: str, workload: str,
                                                  cbw_mode: str) -> None:
    device_file = tmp_path / "disk.img"
    make_device_file(device_file, seed=len(fmt) + len(workload))
    target = tmp_path / f"backup.{fmt}"
    reference = tmp_path / "reference.raw"
    with Engine(prestart_backup_worker=True) as engine:
        dev = engine.create_device(SIZE, backing_file=str(device_file), max_writers=2)
        engine.start_writers(dev, 2, workload=workload, duration=60.0, seed=7)
        time.sleep(0.2)
        # Slow at first, so writers meet clusters the background pass has not reached.
        job = engine.create_backup(dev, str(target), format=fmt, sync="full",
                                   cbw_mode=cbw_mode, speed=2 * MiB, cbw_timeout=30.0,
                                   verify=True, reference_image=str(reference))
        job.start()
        wait_for_cbw(job, 4, timeout=30.0)
        unthrottle(job)
        result = job.wait(120.0)
        engine.stop_writers()
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    assert result.cbw_clusters > 0
    restored = target if fmt == "raw" else qcow2_as_raw(target, tmp_path / "converted.raw")
    assert_same_image(reference, restored)
    proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(reference),
                           str(target)], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_qemu_img
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_idle_device_file_backup_through_the_cli(tmp_path: Path, fmt: str) -> None:
    """`shmblock-run run --device-file F --target T --writers 0`, the issue's command:
    the target equals the file (qemu-img compare), and a raw target keeps the holes."""
    device_file = tmp_path / "disk.img"
    make_device_file(device_file, seed=3)
    target = tmp_path / f"out.{fmt}"
    proc = run_cli("run", "--device-file", device_file, "--target", target,
                   "--writers", "0", "--quiet")
    assert proc.returncode == 0, proc.stderr
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(device_file),
                          str(target)], check=False, capture_output=True, text=True,
                          timeout=120)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    if fmt == "raw":
        # 15 of the 16 data extents hold data; holes and the stored zeros end as holes
        # (slack for file-system metadata).
        assert os.stat(target).st_blocks * 512 <= SIZE // 2 + 4 * MiB
    else:
        assert qcow2_as_raw(target, tmp_path / "c.raw").read_bytes() == \
            device_file.read_bytes()
