"""Small helpers for the in-process unit tests of the engine.

Every shared object is named from the test's own ``SHMBLOCK_PREFIX`` (set by the autouse
fixture in ``conftest.py``), and every helper that creates one removes it again, so the
leak check after each test stays meaningful.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shmblock import cbw_buffer as cbw_buffer_module
from shmblock import snapshot
from shmblock.device import Device, Geometry
from shmblock.names import RunNames, new_run_id

KIB = 1024
CS = 4 * KIB  # the smallest cluster size: keeps test devices tiny


def run_names(run_id: str | None = None) -> RunNames:
    """Names of a fresh run under this test's prefix."""
    return RunNames(run_id or new_run_id(), os.environ["SHMBLOCK_PREFIX"])


def create_device(names: RunNames, geometry: Geometry, name: str = "dev0",
                  backing_file: str | None = None) -> Device:
    """``Device.create`` with the run's names for ``name``."""
    return Device.create(names.meta(name), names.data(name), geometry, names.run_id,
                         backing_file=backing_file)


def destroy(device: Device) -> None:
    """Close and unlink (owner) a device, whatever state it is in."""
    try:
        device.close()
    finally:
        if device.owner:
            device.unlink()


@contextlib.contextmanager
def new_device(geometry: Geometry, name: str = "dev0",
               backing_file: str | None = None,
               names: RunNames | None = None) -> Iterator[Device]:
    """A device that is closed and unlinked when the block ends."""
    device = create_device(names or run_names(), geometry, name, backing_file)
    try:
        yield device
    finally:
        destroy(device)


def shm_names(prefix: str | None = None) -> list[str]:
    """Names in /dev/shm that carry ``prefix`` (the test's prefix by default)."""
    prefix = prefix or os.environ["SHMBLOCK_PREFIX"]
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


def begin_job(device: Device, sync: str = "full", cbw_mode: str = "stage",
              on_cbw_error: str = "break-guest-write", cbw_timeout: float = 5.0,
              cbw_buffer: int | None = None) -> int:
    """Set the maps for a job the way the supervisor does while writers are frozen.

    In-process tests have no write in flight when they call this, which is all the
    freeze guarantees. Returns the job's number.
    """
    snapshot.configure(device, cbw_mode, cbw_timeout, on_cbw_error)
    cbw_buffer_module.configure(device, cbw_buffer, cbw_mode)
    return snapshot.take(device, sync)


def end_job(device: Device) -> None:
    """What the backup worker does when a (failed) job ends."""
    snapshot.release(device)


@contextlib.contextmanager
def small_tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (like "2m") under ``tmp_path``: a target file system that fills
    up. Skips the test when it cannot be mounted (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "shmblock-test",
                           str(mount)], capture_output=True, text=True, timeout=30,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=30, check=False)


def pattern(length: int, seed: int) -> bytes:
    """Deterministic non-zero-ish bytes."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, length, dtype=np.uint8).tobytes()
