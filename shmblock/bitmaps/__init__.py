"""Persistent dirty bitmaps that survive crashes: every file-backed device keeps its bitmaps here.

Theory of operation
===================

A device backed by an image file ``disk.raw`` keeps its named dirty bitmaps in
``disk.raw.bitmaps/`` (mode 0700), in two files (byte formats in :mod:`.ondisk`):

``maps``
    superblock, a directory of up to 8 bitmaps (name, granularity, flags, CRC32, the
    reason if inconsistent), one row of one byte per cluster per bitmap — the same shape
    as the device's ``dirty`` rows — and ``armed``, one byte per *region*. Every process
    maps it ``MAP_SHARED``.
``intent``
    the **region map** (write-intent log): one byte per region (default 64 MiB), written
    with ``pwrite`` and made durable with ``fdatasync`` through an injectable
    :class:`~.persistence.Persistence`.

Who writes what
---------------

* **Guest writers** (any number of processes), per write of clusters ``[c0, c1)``, in
  this order: ``note_write(c0, c1)``; then a store of 1 into ``dirty[i, c0:c1]`` for each
  recording bitmap ``i``; then the data. Stores of 1 are idempotent, so writers need no
  lock among themselves (as with the device's maps).
* ``note_write`` reads ``armed[r]`` for the write's regions: all 1 → return at once (one
  byte lookup, the common case). Otherwise, for each unarmed region, under an OFD lock on
  byte ``REGION_LOCKS + r`` of the maps file: ``pwrite(intent[r] = 1)``; then one
  ``fdatasync``; then ``armed[r] = 1``; unlock. So **armed[r] = 1 implies intent[r] = 1
  on stable storage**, and the guest write waits for that sync before its data can reach
  the page cache, let alone the disk. This is md's write-intent bitmap rule (a bit is
  durable before the write it covers) and dm-era's (a block's era is committed before
  the write completes), at region granularity so it costs one sync per region per epoch.
* Each attached writer holds a shared OFD lock for as long as it is attached; an owner
  opening after an unclean stop refuses (``BitmapBusy``) while any writer of the dead run
  still holds it, because resetting the region map under a writer that trusts its old
  ``armed`` bytes would break the rule above.
* **The owner** (the run's supervisor; one at a time, enforced by an OFD lock the kernel
  drops when it dies) alone changes the directory: add, remove, clear, enable, disable,
  merge, store. Each change is made durable before it returns (msync + fdatasync), and a
  bitmap that does not record gets a CRC32 of its row. Changes to a recording bitmap's
  row (clear, merge, store) must happen while writers are frozen, so no concurrent store
  of 1 is lost — the engine's freeze, as for the shared-memory maps today.
* **Epochs.** ``begin_epoch()`` (owner, writers frozen — typically the snapshot instant
  of a backup that consumes a bitmap) zeroes ``armed``. ``checkpoint()`` (owner, after
  the thaw, writers running) then, in this order, each step durable before the next:
  1. ``fdatasync`` the image: every write issued before the epoch began is on disk;
  2. sync the maps: every bit of those writes is on disk (writers were frozen at step 0,
     so each of them had stored its bits before ``armed`` was zeroed);
  3. for each region with ``intent[r] = 1`` and ``armed[r] = 0``: take its lock, re-check
     ``armed[r]``, ``pwrite(intent[r] = 0)``, unlock; then one ``fdatasync``.
  A writer that arms r during step 3 either finds the lock taken (it waits, then writes
  its 1 after our 0 and syncs it itself) or takes it first (we see ``armed[r] = 1`` and
  leave it). A region is therefore cleared only when neither the data nor the bits of
  any write to it depend on the intent byte any more. Why step 1 matters: a backup may
  have copied a write's data from the page cache and consumed its bit; if that data
  never reaches the disk, the device after a power loss differs from the backup chain,
  and only the intent byte tells the next incremental to look there.
* **A backup consumes a bitmap** with ``begin_backup(name, job)`` (owner, writers
  frozen, at the snapshot instant): the bits are copied into a hidden *frozen copy* (a
  free row, synced, then its checksummed entry, synced), then the bitmap is cleared and
  keeps recording the writes made during the job. ``end_backup(name, job, put_back)``
  drops the copy after ORing back what was not safely backed up (all of it if the job
  failed under ``on-success``, the unsaved clusters under ``always``, none if it
  completed). This is QEMU's successor bitmap kept on disk: a frozen copy still present
  at the next open means its job died with the run, and it is ORed back, so no crash
  loses a bit that was not backed up (DESIGN.md invariant 8).
* ``close()`` (owner, clean stop): sync the image, CRC every row, sync the maps, reset
  the region map, mark the superblock CLEAN, sync.

What survives which stop
------------------------

Every open (owner) reads the superblock and classifies the previous stop:

``clean``
    State CLEAN. Each row must match its CRC32, else the bitmap is inconsistent
    ("checksum mismatch").
``process-crash`` (SIGKILL of every process; the superblock says OPEN and the boot id is
this boot's)
    The rows are exactly what was recorded: every store of 1 went to the page cache of
    the maps file, which belongs to the kernel, not to the processes — it survives their
    death and is written back later like any dirty page. Nothing is lost and nothing is
    marked inconsistent: this is where we do better than QEMU, which has its bitmaps
    only in process memory and marks an "in-use" bitmap inconsistent at the next open.
``machine-crash`` (OPEN, and the boot id differs: the page cache is gone)
    The rows on disk may miss recent bits (or be torn page by page); the data on disk may
    hold writes whose bits never got there. Recovery marks every cluster of every region
    set in the durable region map dirty in every recording bitmap: a superset of the
    writes since the last checkpoint, never a miss. Non-recording bitmaps are checked
    against their CRC32. If the region map itself is unusable (missing, torn header,
    another store's, wrong geometry), the recording bitmaps are marked inconsistent with
    that reason.
``geometry-changed``
    The image's size or the cluster size differs from the store's: every bitmap is kept
    by name but marked inconsistent.

After classifying, the open puts back every frozen copy left by a job that did not
finish (a damaged one makes its bitmap inconsistent), syncs the image and the maps,
starts a fresh region map, marks the recording bitmaps in-use, and records this run, pid
and boot id as the owner.

Crash points are tested exhaustively, not only sampled: tests/test_bitmap_crash.py cuts
the power at every durability point of a scripted backup regime (and at random points of
random ones, with Hypothesis), with a model disk that keeps only what was synced plus an
arbitrary subset of the rest, and checks that recovery never misses a write.

An inconsistent bitmap does not record and cannot be cleared, merged or loaded;
``require_consistent(name)`` raises :class:`~shmblock.errors.BitmapInconsistent` with the
reason, so an incremental from it is refused instead of silently wrong. Only ``remove``
accepts it (QEMU's rule).

Cost
----

The fast path of ``note_write`` is a bounds check, two divisions and one byte read
(~0.25 µs a call from Python). The first write to a region in an epoch waits for one
``fdatasync`` of the region-map file: 0.5–5 ms on this project's disk-backed file
system, ~8 µs on tmpfs (docs/architecture.md has the measurement). With 64 MiB regions a 4 GiB
device pays it at most 64 times per epoch. Smaller regions make recovery after a power
loss more precise and the first-touch cost more frequent.

How the engine uses it
----------------------

A file-backed device opens the store as its owner in ``Device.create`` (workers attach
in ``Device.attach``) and views ``PersistentBitmapFile.dirty`` as ``Device.dirty`` (no
copy); ``CTL_BITMAP_MASK`` follows ``enabled_mask()``; ``GuestIO._write`` calls
``note_write`` before storing the dirty bytes; ``snapshot.take`` calls ``begin_backup``
and ``begin_epoch`` in the freeze that consumes a bitmap, ``snapshot.settle_bitmap``
``end_backup`` (with the bitmap mode's put-back) and ``checkpoint`` at the job's end;
``Device.close`` closes the store cleanly. ``DeviceHandle`` is the management API, and
``shmblock-run bitmap`` the offline one (docs/architecture.md, "Persistent dirty
bitmaps").
"""

from shmblock.bitmaps.persistence import FilePersistence, Persistence, VolatileDisk
from shmblock.bitmaps.store import (
    DEFAULT_REGION_SIZE,
    BitmapInfo,
    PersistentBitmapFile,
    Recovery,
    StoreInfo,
    inspect,
    store_dir,
)

__all__ = [
    "DEFAULT_REGION_SIZE",
    "BitmapInfo",
    "FilePersistence",
    "Persistence",
    "PersistentBitmapFile",
    "Recovery",
    "StoreInfo",
    "VolatileDisk",
    "inspect",
    "store_dir",
]
