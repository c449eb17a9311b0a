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
``none`` only what copy-before-write saves during the job (no background copy),
``incremental`` and ``bitmap`` the clusters set in a named dirty bitmap at the instant.

Bitmaps (QEMU's ``docs/interop/bitmaps.rst`` and ``block/backup.c``). A job that names a
bitmap (any mode but ``none``) consumes it at the instant: :func:`take` keeps a copy of
its bits (the *frozen* bits, QEMU's parent) and clears it, so from then on it records
the writes made during the job (QEMU's *successor*): those stay dirty whatever the
outcome. At the end the supervisor decides the bitmap's fate (:func:`settle_bitmap`,
QEMU's ``backup_cleanup_sync_bitmap``) from the outcome and the worker's ``saved`` map:

================  ===========================  ===========================================
bitmap mode       job completed                job failed or cancelled
================  ===========================  ===========================================
``on-success``    successor (cleared)          successor ∪ frozen (as before the job)
``always``        successor (cleared)          successor ∪ (covered ∖ copied)
``never``         successor ∪ frozen           successor ∪ frozen
================  ===========================  ===========================================

"Copied" is the ``saved`` map where it is trustworthy: a file target is written with
``pwrite``, so ``saved`` is what reached it; an NBD target is pipelined, and before the
final ``settle`` a cluster marked saved may still be refused by the server, so a job to
NBD that did not complete counts nothing as copied (an over-approximation, never a
lost bit: DESIGN.md invariant 8). Putting bits back is a store of 1 only, which is safe
while writers run. A failed or cancelled job to a file removes its ``.part``: under
``always`` the bits of clusters that reached it are cleared all the same (QEMU's
meaning; its target file survives, ours does not), so ``always`` suits retries into a
target that is kept, such as an NBD export.

Persistent bitmaps (a file-backed device, :mod:`shmblock.bitmaps`): the frozen bits are
kept on disk too, as the store's *frozen copy* (:meth:`begin_backup
<shmblock.bitmaps.PersistentBitmapFile.begin_backup>` at the instant, which also starts
a new write-intent epoch) and :func:`settle_bitmap` ends it with the table's put-back
(``end_backup``), then checkpoints the region map. A supervisor killed mid-job leaves the
frozen copy, which the next open ORs back: the bits survive the crash.

Granularity: a row holds one byte per cluster whatever the bitmap's granularity, and
writers store only the clusters they write (their hot path does not change); a bitmap
of coarser granularity is read by whole granules — a granule is dirty when any of its
clusters is — when a job consumes it, when it is counted and when it is merged.

Lineage (:mod:`shmblock.lineage`): the consumption gives the bitmap the job's
generation (refused if it no longer has the one the job was prepared against) and the
put-back settles it with the bits.

Supervisor, worker and tests all use these functions; nobody sets the maps by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shmblock import layout as L
from shmblock.bitmaps import PersistentBitmapFile
from shmblock.device import Device
from shmblock.errors import BitmapError
from shmblock.lineage import settled

#: Sync modes the engine knows (QEMU's names).
SYNC_MODES = ("full", "top", "none", "incremental", "bitmap")
#: Sync modes that copy the clusters of a dirty bitmap.
BITMAP_SYNCS = ("incremental", "bitmap")
#: What a job does to its bitmap at the end (QEMU's BitmapSyncMode).
BITMAP_MODES = ("on-success", "always", "never")

BoolArray = npt.NDArray[np.bool_]


@dataclass
class BitmapUse:
    """A dirty bitmap a job consumes: which, how, and its bits at the instant."""

    name: str
    index: int  # the device's dirty row
    mode: str  # one of BITMAP_MODES
    #: the bits at the instant, set by :func:`take`; None before it and once settled
    frozen: BoolArray | None = None
    granule: int = 1  # clusters per granule (granularity / cluster size)
    #: the device file's persistent store when the bitmap is persistent, and the job
    #: that holds it (the frozen copy on disk is named for it)
    store: PersistentBitmapFile | None = None
    job: str = ""
    #: lineage (shmblock.lineage): the generation the job was prepared against, which
    #: the bitmap must still have at the instant ('': none required); the one the job
    #: gives it there; the one it had then (set by take). A device in shared memory
    #: keeps its generations in ``generations`` (its handle's).
    expect: str = ""
    minted: str = ""
    prior: str = ""
    generations: dict[str, str] | None = None


def granules(row: npt.NDArray[np.uint8], granule: int) -> BoolArray:
    """A per-cluster row read by whole granules of ``granule`` clusters: every cluster
    of a granule with any dirty cluster is dirty."""
    dirty = np.asarray(row != 0)
    if granule == 1:
        return dirty
    n = dirty.size
    padded = np.zeros(-(-n // granule) * granule, dtype=np.bool_)
    padded[:n] = dirty
    return np.repeat(padded.reshape(-1, granule).any(axis=1), granule)[:n]


def _consume(device: Device, bitmap: BitmapUse) -> BoolArray:
    """The bitmap's bits at the instant (by granule); its row is then empty."""
    if bitmap.store is not None:
        # The store keeps the bits as an on-disk frozen copy before clearing the row,
        # and starts a new write-intent epoch (writers are frozen: take's contract).
        with bitmap.store.lock:
            bitmap.prior = bitmap.store.generation(bitmap.name)
            frozen = np.asarray(bitmap.store.begin_backup(
                bitmap.name, bitmap.job, bitmap.minted or None, bitmap.expect or None) != 0)
            bitmap.store.begin_epoch()
        return frozen
    gens = {} if bitmap.generations is None else bitmap.generations
    bitmap.prior = gens.get(bitmap.name, "")
    if bitmap.expect and bitmap.prior != bitmap.expect:
        raise BitmapError(f"bitmap {bitmap.name!r} changed (cleared, re-added or disabled) "
                          f"after job {bitmap.job} was prepared against its generation "
                          f"{bitmap.expect}; create the backup again")
    if bitmap.minted:
        gens[bitmap.name] = bitmap.minted
    row = device.dirty[bitmap.index]
    frozen = granules(row, bitmap.granule)
    row[:] = 0
    return frozen


def wire_sync(sync: str) -> str:
    """The sync word JobStart carries: the worker copies what ``needs_copy`` marks, so
    for it ``bitmap`` is ``incremental`` (the protocol names the worker's four ways)."""
    return "incremental" if sync == "bitmap" else sync


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


def take(device: Device, sync: str, bitmap: BitmapUse | None = None) -> int:
    """Set the maps for a job of ``sync`` mode; returns the job's number (CTL_JOB_SEQ).

    Only while no write is in flight (the supervisor's freeze; a one-threaded test).
    ``bitmap`` (required for the bitmap syncs) is consumed: its bits are kept in
    ``bitmap.frozen`` and its row cleared, to record the writes made during the job.

    Its cost is part of every writer's stall: a few byte-per-cluster memsets and at
    most one count, 3-4 µs at 256 MiB and 2 GiB, about 20 µs at 16 GiB (64 KiB
    clusters; a persistent bitmap adds its store's on-disk frozen copy).
    """
    ctl = device.ctl
    # Consumed first: for a persistent bitmap this may fail (a full disk), and then
    # nothing of the snapshot has been set yet.
    if bitmap is not None:
        bitmap.frozen = _consume(device, bitmap)
    device.slot_state[:] = L.SLOT_FREE
    device.saved[:] = 0
    if sync == "top":
        np.copyto(device.needs_copy, device.allocated)
    elif sync in BITMAP_SYNCS:
        assert bitmap is not None and bitmap.frozen is not None, f"sync={sync} needs a bitmap"
        np.copyto(device.needs_copy, bitmap.frozen, casting="unsafe")
    else:
        device.needs_copy[:] = 1
    if not has_background_copy(sync):
        ctl[L.CTL_TOTAL_BYTES] = 0
    elif sync == "full":
        ctl[L.CTL_TOTAL_BYTES] = device.size  # every cluster: no need to count them
    else:
        ctl[L.CTL_TOTAL_BYTES] = int(np.count_nonzero(device.needs_copy)) * device.cluster_size
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


def undo(device: Device, bitmap: BitmapUse | None = None) -> None:
    """Take back a snapshot no worker will copy (its JobStart could not be sent, or its
    worker died while it was taken): the bitmap gets its frozen bits back."""
    release(device)
    if bitmap is not None:
        _put_back(device, bitmap, bitmap.frozen)


def settle_bitmap(device: Device, bitmap: BitmapUse, completed: bool,
                  covered: BoolArray | None, copied_known: bool) -> None:
    """Decide the bitmap's fate at the end of its job (see the table above). Once.

    ``covered``: what the snapshot marked at the instant (None: every cluster);
    ``copied_known``: whether ``saved`` says what reached the target (see above).
    Safe while writers run (stores of 1 only).
    """
    frozen = bitmap.frozen
    if frozen is None:
        return  # no snapshot was taken, or the bitmap was settled already
    synced = (completed or bitmap.mode == "always") and bitmap.mode != "never"
    if not synced:
        _put_back(device, bitmap, frozen)
    elif not completed:
        # always, after a failure: what the job was to copy and did not copy.
        missed = np.ones(device.clusters, dtype=np.bool_) if covered is None else covered.copy()
        if copied_known:
            missed &= device.saved == 0
        _put_back(device, bitmap, missed)
    else:
        _put_back(device, bitmap, None)
    bitmap.frozen = None


def _put_back(device: Device, bitmap: BitmapUse, bits: BoolArray | None) -> None:
    """OR ``bits`` (None: nothing) into the bitmap; a persistent one also ends its
    frozen copy on disk and checkpoints the write-intent map."""
    store = bitmap.store
    if store is not None and bitmap.frozen is not None and not device.closed:
        # The store puts back only frozen bits; what else the job missed (a full job
        # under ``always``) is ORed into the recording row below, as for a row in
        # shared memory (a store of 1, safe while writers run).
        with store.lock:
            store.end_backup(bitmap.name, bitmap.job,
                             False if bits is None else np.asarray(bits, dtype=np.uint8))
            if bits is not None:
                device.dirty[bitmap.index][bits & ~bitmap.frozen] = 1
            bitmap.frozen = None
            # Regions not written since the instant need their intent no more.
            store.checkpoint()
        return
    if bits is not None and not device.closed:
        device.dirty[bitmap.index][bits] = 1
    gens = bitmap.generations
    if gens is not None and bitmap.frozen is not None and \
            gens.get(bitmap.name) == bitmap.minted:  # else ended meanwhile: it stands
        gens[bitmap.name] = settled(bitmap.prior, bitmap.minted, bitmap.frozen, bits)
    bitmap.frozen = None
