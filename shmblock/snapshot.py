"""Sync modes: what a snapshot covers, how its maps are set at the instant and released.

Theory of operation. A backup job's snapshot lives in the device's maps (see
``docs/architecture.md``, "Who writes which map"):

* :func:`configure` stores the job's copy-before-write policy (mode, timeout,
  ``on-cbw-error``) in the control words; writers read them on every save, so this may
  run before the freeze.
* :func:`take` runs **while every writer is frozen** (no write in flight): it frees the
  staging slots, clears ``saved``, marks ``needs_copy`` with what the sync mode covers,
  sets the job's total, bumps ``CTL_JOB_SEQ`` and raises ``CTL_JOB_ACTIVE``. From then
  on ``needs_copy`` only goes 1 → 0, by whoever saved the cluster under its claim.
* :func:`release` ends a job whatever its outcome: nothing needs copying any more,
  staged data is dropped. The backup worker calls it; :func:`release_if_current` is the
  supervisor's version for a worker that died without calling it (it must not touch the
  map of the device's next job), and :func:`undo` takes back a snapshot that no worker
  will copy.
* :func:`covered` says which clusters a finished job's target holds the snapshot of:
  what the mode marked for ``full``/``top``, what was saved for ``none``.

Sync modes (QEMU's names): ``full`` covers every cluster, ``top`` the allocated ones,
``none`` only what copy-before-write saves during the job (no background copy).

Supervisor, worker and tests all use these functions; nobody sets the maps by hand.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shmblock import layout as L
from shmblock.device import Device

#: Sync modes the engine knows (QEMU's names). ``incremental`` is refused by
#: :class:`shmblock.options.BackupOptions` until dirty bitmaps are consumed by jobs.
SYNC_MODES = ("full", "top", "none", "incremental")

BoolArray = npt.NDArray[np.bool_]


def has_background_copy(sync: str) -> bool:
    """Whether the job copies in the background (``none`` only saves on guest writes)."""
    return sync != "none"


def configure(device: Device, cbw_mode: str, cbw_timeout: float, on_cbw_error: str) -> None:
    """Store the job's copy-before-write policy and reset its broken flag and progress."""
    ctl = device.ctl
    ctl[L.CTL_CBW_MODE] = L.CBW_MODES.index(cbw_mode)
    ctl[L.CTL_CBW_TIMEOUT_US] = int(cbw_timeout * 1e6)
    ctl[L.CTL_ON_CBW_ERROR] = L.ON_CBW_ERROR.index(on_cbw_error)
    ctl[L.CTL_BROKEN] = 0
    ctl[L.CTL_DONE_BYTES] = 0


def take(device: Device, sync: str) -> int:
    """Set the maps for a job of ``sync`` mode; returns the job's number (CTL_JOB_SEQ).

    Only while no write is in flight (the supervisor's freeze; a one-threaded test).
    """
    ctl = device.ctl
    device.slot_state[:] = L.SLOT_FREE
    device.saved[:] = 0
    if sync == "top":
        np.copyto(device.needs_copy, device.allocated)
    else:
        device.needs_copy[:] = 1
    ctl[L.CTL_TOTAL_BYTES] = 0 if not has_background_copy(sync) else \
        int(np.count_nonzero(device.needs_copy)) * device.cluster_size
    ctl[L.CTL_JOB_SEQ] += 1
    ctl[L.CTL_JOB_ACTIVE] = 1
    return int(ctl[L.CTL_JOB_SEQ])


def marked(device: Device) -> BoolArray:
    """The clusters marked ``needs_copy`` now (right after :func:`take`: what it covers)."""
    return np.asarray(device.needs_copy != 0)


def covered(device: Device, sync: str, at_start: BoolArray | None) -> BoolArray | None:
    """What a finished job's target holds the snapshot of (None: every cluster).

    ``at_start`` is :func:`marked` taken at the instant; a ``none`` job covers what it
    saved, which only the ``saved`` map knows at the end.
    """
    if not has_background_copy(sync):
        return np.asarray(device.saved != 0)
    return at_start


def release(device: Device, released_job: int = 0) -> None:
    """The job is over: nothing needs copying any more, staged data is dropped.

    Called by the backup worker when its job ends, whatever the outcome; answer the copy
    requests after this. ``released_job`` is the job's number when it completed or was
    cancelled: a writer still waiting for an answer (its request may have missed the
    worker's last look at its queue) then goes ahead without one. A failed job passes 0
    -- its failure may be that writer's save -- and such a writer fails its write at its
    deadline, as break-guest-write requires.
    """
    if released_job:
        device.ctl[L.CTL_JOB_RELEASED] = released_job
    device.ctl[L.CTL_JOB_ACTIVE] = 0
    device.needs_copy[:] = 0
    device.slot_state[:] = L.SLOT_FREE


def is_current(device: Device, seq: int) -> bool:
    """Whether job ``seq``'s snapshot is still set on the device (no newer job, not ended)."""
    return bool(device.ctl[L.CTL_JOB_ACTIVE]) and int(device.ctl[L.CTL_JOB_SEQ]) == seq


def release_if_current(device: Device, seq: int) -> None:
    """The supervisor's release of job ``seq`` whose worker died without releasing it.

    Writers still waiting for that worker go ahead (no save of theirs was reported
    failed). A newer job's maps are left alone.
    """
    if not device.closed and is_current(device, seq):
        release(device, released_job=seq)


def undo(device: Device) -> None:
    """Take back a snapshot no worker will copy (its JobStart could not be sent)."""
    release(device)
