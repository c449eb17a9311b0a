"""Small helpers for the in-process unit tests of the engine.

Every shared object is named from the test's own ``SHMBLOCK_PREFIX`` (set by the autouse
fixture in ``conftest.py``), and every helper that creates one removes it again, so the
leak check after each test stays meaningful.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np

from shmblock import layout as L
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
              on_cbw_error: str = "break-guest-write", cbw_timeout: float = 5.0) -> None:
    """Initialise the maps for a job the way the supervisor does while writers are frozen.

    In-process tests have no write in flight when they call this, which is all the
    freeze guarantees (see ``Engine._take_snapshot``).
    """
    ctl = device.ctl
    ctl[L.CTL_CBW_MODE] = L.CBW_MODES.index(cbw_mode)
    ctl[L.CTL_CBW_TIMEOUT_US] = int(cbw_timeout * 1e6)
    ctl[L.CTL_ON_CBW_ERROR] = L.ON_CBW_ERROR.index(on_cbw_error)
    ctl[L.CTL_BROKEN] = 0
    ctl[L.CTL_DONE_BYTES] = 0
    device.slot_state[:] = L.SLOT_FREE
    device.saved[:] = 0
    if sync == "top":
        np.copyto(device.needs_copy, device.allocated)
    else:
        device.needs_copy[:] = 1
    ctl[L.CTL_JOB_SEQ] += 1
    ctl[L.CTL_JOB_ACTIVE] = 1


def end_job(device: Device) -> None:
    """What the backup worker does when a job ends (``release_writers``)."""
    device.ctl[L.CTL_JOB_ACTIVE] = 0
    device.needs_copy[:] = 0
    device.slot_state[:] = L.SLOT_FREE


def pattern(length: int, seed: int) -> bytes:
    """Deterministic non-zero-ish bytes."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, length, dtype=np.uint8).tobytes()
