"""`PersistentBitmapFile`: named dirty bitmaps kept beside a device image file.

See the package docstring (:mod:`shmblock.bitmaps`) for the theory of operation: who
writes what, in which order, and what survives which crash. This module is the code.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import numpy.typing as npt

from shmblock.bitmaps import files as F
from shmblock.bitmaps import ondisk as D
from shmblock.bitmaps.persistence import FilePersistence, Persistence, VolatileDisk
from shmblock.errors import BitmapBusy, BitmapError, BitmapInconsistent, UsageError
from shmblock.lineage import GENERATION_RE, new_generation, settled
from shmblock.names import NAME_RE

U8Array = npt.NDArray[np.uint8]

DEFAULT_CLUSTER_SIZE = 64 * 1024
DEFAULT_REGION_SIZE = 64 * 1024 * 1024
MAX_GRANULARITY = 1 << 31  # QEMU's upper bound for block-dirty-bitmap-add
ARM_TIMEOUT = 10.0  # seconds a writer waits for a region lock a checkpoint holds

# OFD byte-range locks on the maps file (fcntl(2)); they need not lie inside the file.
# The owner holds OWNER_LOCK for as long as it has the store open, so the kernel says
# whether the owner is alive (it drops the lock when the owner dies, even by SIGKILL).
# Every attached writer holds a shared (read) lock on WRITERS_LOCK, so an owner opening
# after an unclean stop can tell that a writer of the dead run still runs: it must not
# reset the region map under a writer that trusts the old ``armed`` bytes.
# Region r is locked at REGION_LOCKS + r while its intent byte is being changed.
OWNER_LOCK = 1 << 50
WRITERS_LOCK = OWNER_LOCK + 1
REGION_LOCKS = 1 << 51

STATUS_CONSISTENT = "consistent"
STATUS_INCONSISTENT = "inconsistent"
STATUS_IN_USE = "in-use"  # only from inspect(): a run has it open, or died with it open

JOB_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
RUN_RE = re.compile(r"^[A-Za-z0-9_.-]{0,16}$")


def store_dir(image: str | os.PathLike[str]) -> Path:
    """The directory that holds the bitmaps of ``image``: ``<image>.bitmaps``."""
    return Path(os.fspath(image) + ".bitmaps")


def _key(e: D.Entry) -> str:
    """Directory uniqueness key: a bitmap and its frozen copy share a name."""
    return e.name + "@frozen" if e.flags & D.F_FROZEN else e.name


def validate_name(name: str) -> None:
    """UsageError unless ``name`` is 1-32 of ``[A-Za-z0-9_.-]``."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UsageError(f"bitmap name {name!r} must be 1-32 of [A-Za-z0-9_.-]")


def validate_granularity(granularity: int, cluster_size: int) -> None:
    """UsageError unless a power of two from the cluster size to 2 GiB."""
    g = granularity
    if (not isinstance(g, int) or g < cluster_size or g > MAX_GRANULARITY or g & (g - 1)):
        raise UsageError(f"bitmap granularity {granularity!r} must be a power of two from "
                         f"the cluster size ({cluster_size}) to {MAX_GRANULARITY}")


@dataclass(frozen=True, slots=True)
class BitmapInfo:
    """One bitmap as ``list()`` reports it (QEMU's ``BlockDirtyInfo``, roughly)."""

    name: str
    granularity: int
    enabled: bool  # recording guest writes (QEMU: ``recording``)
    status: str  # "consistent", "inconsistent", or (from inspect() only) "in-use"
    reason: str  # why inconsistent ('' when consistent)
    in_use: bool  # a run has the store open and this bitmap records (QEMU's in-use flag)
    busy: str | None  # the job using it, if any
    count: int  # dirty bytes: dirty granules × granularity, the last cut at the device end
    #: its lineage generation (shmblock.lineage); '' only from inspect() of a store
    #: written by a shmblock before lineage (the next open gives it one)
    generation: str = ""


@dataclass(slots=True)
class Recovery:
    """What :meth:`PersistentBitmapFile.open` found and did."""

    # "new", "clean", "process-crash", "machine-crash", "geometry-changed"; a writer's
    # handle (attach) says "attached"
    stop: str
    previous_run: str = ""
    regions_replayed: int = 0  # machine crash: regions marked dirty from the region map
    inconsistent: dict[str, str] = field(default_factory=dict)  # name → reason, found now
    restored: dict[str, str] = field(default_factory=dict)  # name → job whose copy came back


class PersistentBitmapFile:
    """Named dirty bitmaps of one device image, kept in ``<image>.bitmaps/``.

    Two kinds of handle, as with :class:`shmblock.device.Device`:

    * :meth:`open` — the **owner** (the supervisor of a run): creates the store if
      needed, recovers it after an unclean stop, marks it in use, and alone may add,
      remove, clear, enable, disable, merge, start epochs and checkpoint. One owner at a
      time (an OFD lock the kernel drops when the owner dies).
    * :meth:`attach` — a **writer** process: maps the same rows and records writes
      (:meth:`note_write`, then stores of 1 into :attr:`dirty`). Never changes the
      directory.

    ``dirty`` has shape ``(MAX_BITMAPS, clusters)``, one byte per cluster, like the
    device's rows; ``enabled_mask()`` says which rows record (like ``CTL_BITMAP_MASK``).
    """

    dirty: U8Array
    armed: U8Array
    _armed_bytes: memoryview  # the same bytes as ``armed``, for the fast path

    def __init__(self, image: str, fd: int, sup: D.Super, intent: Persistence,
                 owner: bool, image_sync: Callable[[], None]) -> None:
        self.image = image
        self.path = str(store_dir(image) / "maps")
        self.owner = owner
        self.shape = sup.shape
        self.recovery = Recovery("attached")
        self._fd: int | None = fd
        self._super = sup
        self._intent = intent
        self._image_sync = image_sync
        self._busy: dict[str, str] = {}
        #: Held by the engine around every change to the directory: a job's end (the
        #: supervisor's pump thread) may meet an add or a clear from the API's thread.
        self.lock = threading.RLock()
        self._map: mmap.mmap | None = mmap.mmap(fd, sup.shape.maps_file_size,
                                               flags=mmap.MAP_SHARED)
        self._bind_views()
        self._entries = [D.Entry() for _ in range(D.MAX_BITMAPS)]
        self._cpr = sup.shape.clusters_per_region

    def _bind_views(self) -> None:
        assert self._map is not None
        s = self.shape
        rows = np.frombuffer(self._map, dtype=np.uint8, count=D.MAX_BITMAPS * s.map_bytes,
                             offset=D.MAPS_OFFSET)
        self.dirty = np.lib.stride_tricks.as_strided(
            rows, shape=(D.MAX_BITMAPS, s.clusters), strides=(s.map_bytes, 1), writeable=True)
        self.armed = np.frombuffer(self._map, dtype=np.uint8, count=s.regions,
                                   offset=s.armed_offset)
        self._armed_bytes = memoryview(self._map)[s.armed_offset : s.armed_offset + s.regions]
        self._clusters = s.clusters

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, image: str | os.PathLike[str], cluster_size: int | None = None,
             region_size: int = DEFAULT_REGION_SIZE, run_id: str = "",
             intent: Persistence | None = None,
             image_sync: Callable[[], None] | None = None,
             boot_id: bytes | None = None) -> Self:
        """Open (creating if missing) the bitmaps of ``image`` as their owner.

        ``cluster_size``: the device's (default: the store's own, or 64 KiB for a new
        store); a different one from the store's makes every bitmap inconsistent.
        ``region_size`` applies when the store is created; an existing store keeps its
        own. ``run_id`` (up to 16 of ``[A-Za-z0-9_.-]``) names this run in messages.
        ``intent`` replaces the region-map file (tests pass a
        :class:`~shmblock.bitmaps.persistence.VolatileDisk`), ``image_sync`` the
        ``fdatasync`` of the image, ``boot_id`` this boot's id. Raises BitmapBusy if
        another live run has the store open, BitmapError if it cannot be read at all;
        a bitmap that cannot be trusted is opened *inconsistent*, with the reason.
        """
        image = os.fspath(image)
        try:
            st = os.stat(image)
        except OSError as exc:
            raise BitmapError(f"device image {image!r}: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise BitmapError(f"device image {image!r} is not a regular file")
        if not isinstance(run_id, str) or not RUN_RE.match(run_id):
            raise UsageError(f"run id {run_id!r} must be up to 16 of [A-Za-z0-9_.-]")
        directory = store_dir(image)
        maps_path = directory / "maps"
        if cluster_size is None:
            cluster_size = F.stored_cluster_size(maps_path) or DEFAULT_CLUSTER_SIZE
        try:
            D.check_geometry(st.st_size, cluster_size, region_size)
        except D.FormatError as exc:
            raise UsageError(f"bitmaps of {image!r}: {exc}") from None
        shape = D.Shape(st.st_size, cluster_size, region_size)
        boot = F.current_boot_id() if boot_id is None else boot_id
        sync_image = image_sync if image_sync is not None else (lambda: F.fdatasync_path(image))
        F.make_private_dir(directory)
        intent_path = str(directory / "intent")
        created = False
        if not maps_path.exists() and not maps_path.is_symlink():
            F.create_maps_file(maps_path, shape)
            created = True
        fd = F.open_nofollow(str(maps_path))
        try:
            if not F.lock(fd, fcntl.F_WRLCK, OWNER_LOCK):
                raise BitmapBusy(F.busy_message(fd, str(maps_path)))
            if F.lock_held(fd, WRITERS_LOCK):
                raise BitmapBusy(f"{maps_path}: writer processes of a previous run still "
                                 "have the bitmaps attached; stop them before reopening")
            sup = F.read_super(fd, str(maps_path))
            own_intent = intent is None
            if intent is None:
                if created or not os.path.lexists(intent_path):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(intent_path)
                    intent = FilePersistence(intent_path, create_size=0)
                    try:
                        F.fsync_dir(directory)
                    except BitmapError:
                        intent.close()
                        raise
                else:
                    intent = FilePersistence(intent_path)
            try:
                store = cls(image, fd, sup, intent, owner=True, image_sync=sync_image)
            except BaseException:
                if own_intent:
                    intent.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        try:
            store._recover(shape, boot, created, run_id)
        except BaseException:
            store._release()
            raise
        return store

    @classmethod
    def attach(cls, image: str | os.PathLike[str],
               intent: Persistence | None = None) -> Self:
        """A writer's handle on a store some live owner has open."""
        image = os.fspath(image)
        maps_path = str(store_dir(image) / "maps")
        fd = F.open_nofollow(maps_path)
        try:
            if not F.lock_held(fd, OWNER_LOCK):
                raise BitmapError(f"{maps_path}: no run has these bitmaps open; the owner "
                                  "opens them before writers attach")
            # Shared, so writers never exclude each other; only an owner's probe sees it.
            if not F.lock(fd, fcntl.F_RDLCK, WRITERS_LOCK):
                raise BitmapError(f"{maps_path}: cannot register as a writer")
            sup = F.read_super(fd, maps_path)
            if intent is None:
                intent = FilePersistence(str(store_dir(image) / "intent"))
            store = cls(image, fd, sup, intent, owner=False, image_sync=lambda: None)
        except BaseException:
            os.close(fd)
            raise
        store._load_directory()
        return store

    def _recover(self, shape: D.Shape, boot: bytes, created: bool, run_id: str) -> None:
        """Bring the store from whatever state it was left in to open-by-us."""
        sup = self._super
        rec = Recovery("new" if created else "clean", previous_run=sup.run_id)
        self.recovery = rec
        self._load_directory()
        if (sup.shape.device_size, sup.shape.cluster_size) != (shape.device_size,
                                                               shape.cluster_size):
            self._rebuild_for(shape)  # every bitmap inconsistent, with the reason
        elif created:
            pass
        elif sup.state == D.STATE_CLEAN:
            self._verify_checksums(lambda e: True)
        elif sup.boot_id == boot:
            # Same boot: the previous owner died, the machine did not. Every store of 1
            # any process made went to the page cache of the maps file, which the kernel
            # keeps when processes die, so the rows are exactly what was recorded.
            rec.stop = "process-crash"
            self._verify_checksums(lambda e: not e.flags & D.F_ENABLED)
        else:
            rec.stop = "machine-crash"
            self._replay_intent(rec)
        self._restore_frozen_copies()
        for i, e in enumerate(self._entries):
            if e.defined and not e.flags & D.F_FROZEN and not e.generation:
                # A version-1 store (no lineage yet): a fresh generation, which no
                # backup has recorded, so the next incremental from it is refused
                # until a backup records this one (shmblock.lineage).
                e.generation = new_generation()
                self._write_entry(i)
        # Make what we found durable, then start a fresh region map: the image sync
        # makes every earlier write durable and the maps sync every earlier bit, so no
        # intent byte of a previous run is needed any more.
        self._image_sync()
        self._sync_maps()
        self._reset_intent()
        for i, e in enumerate(self._entries):
            if e.defined and e.flags & D.F_ENABLED and not e.flags & D.F_INCONSISTENT:
                e.flags = (e.flags | D.F_IN_USE) & ~D.F_CRC_VALID
                self._write_entry(i)
        sup.state = D.STATE_OPEN
        sup.boot_id = boot
        sup.owner_pid = os.getpid()
        sup.owner_start = F.start_time(os.getpid())
        sup.run_id = run_id
        self._write_super()
        self._sync_maps()

    def _load_directory(self) -> None:
        assert self._map is not None
        taken: set[str] = set()
        for i in range(D.MAX_BITMAPS):
            off = D.DIR_OFFSET + i * D.ENTRY_SIZE
            raw = bytes(self._map[off : off + D.ENTRY_SIZE])
            try:
                e = D.unpack_entry(raw)
                if e.defined:
                    self._check_entry(e, taken)
            except D.FormatError as exc:
                e = D.Entry(f"corrupt-entry-{i}", self.shape.cluster_size,
                            D.F_DEFINED | D.F_INCONSISTENT, 0, str(exc))
            if e.defined:
                taken.add(_key(e))
            self._entries[i] = e

    def _check_entry(self, e: D.Entry, taken: set[str]) -> None:
        if not NAME_RE.match(e.name) or _key(e) in taken:
            raise D.FormatError(f"directory entry has a bad or duplicate name {e.name!r}")
        if e.flags & D.F_FROZEN and (e.flags & D.F_ENABLED
                                     or not JOB_RE.match(e.reason.removeprefix("job:"))):
            raise D.FormatError(f"directory entry for a frozen copy of {e.name!r} is bad")
        g = e.granularity
        if g < self.shape.cluster_size or g > MAX_GRANULARITY or g & (g - 1):
            raise D.FormatError(f"directory entry {e.name!r} has a bad granularity {g}")
        if e.flags & ~D.F_ALL:
            raise D.FormatError(f"directory entry {e.name!r} has unknown flags {e.flags:#x}")

    def _verify_checksums(self, which: Callable[[D.Entry], bool]) -> None:
        for i, e in enumerate(self._entries):
            if (not e.defined or e.flags & (D.F_INCONSISTENT | D.F_FROZEN)
                    or not which(e)):
                continue  # frozen copies: _restore_frozen_copies checks them
            actual = D.crc32(self._row_bytes(i))
            if not e.flags & D.F_CRC_VALID:
                self._mark_inconsistent(i, "no checksum was recorded for the map (it was "
                                           "not stored cleanly)")
            elif e.flags & D.F_CHANGING and actual in (e.map_crc, e.new_crc):
                # A change was cut short, but the row is wholly the old or the new one.
                e.map_crc = actual
                e.flags &= ~D.F_CHANGING
                self._write_entry(i)
            elif e.flags & D.F_CHANGING:
                self._mark_inconsistent(i, "a change to the map was cut short by a crash "
                                           "and left it half old, half new")
            elif actual != e.map_crc:
                self._mark_inconsistent(i, "checksum mismatch: the map on disk is corrupt")

    def _replay_intent(self, rec: Recovery) -> None:
        """After a machine crash: every region the durable region map names becomes
        dirty in every recording bitmap (an over-approximation, never a miss)."""
        try:
            D.check_intent_header(self._intent.read(0, D.INTENT_HEADER), self.shape,
                                  self._super.store_id)
            raw = self._intent.read(D.INTENT_HEADER, self.shape.regions)
            if len(raw) != self.shape.regions:
                raise D.FormatError(f"the region map is truncated ({len(raw)} of "
                                    f"{self.shape.regions} region bytes)")
        except BitmapError as exc:  # FormatError, or the file could not be read
            why = (f"the machine stopped while run {self._super.run_id or '?'} had the "
                   f"bitmap open, and the region map is unusable: {exc}")
            for i, e in enumerate(self._entries):
                if e.defined and e.flags & D.F_ENABLED and not e.flags & D.F_INCONSISTENT:
                    self._mark_inconsistent(i, why)
            self._verify_checksums(lambda e: not e.flags & D.F_ENABLED)
            return
        regions = np.flatnonzero(np.frombuffer(raw, dtype=np.uint8))
        rec.regions_replayed = int(regions.size)
        cpr, n = self._cpr, self.shape.clusters
        for i, e in enumerate(self._entries):
            if not e.defined or e.flags & D.F_INCONSISTENT or not e.flags & D.F_ENABLED:
                continue
            row = self.dirty[i]
            for r in regions:
                row[int(r) * cpr : min((int(r) + 1) * cpr, n)] = 1
        # A disabled bitmap changed only through synced operations, each of which
        # recorded its checksum: check it.
        self._verify_checksums(lambda e: not e.flags & D.F_ENABLED)

    def _rebuild_for(self, shape: D.Shape) -> None:
        """The image's geometry changed: keep the names, lose the maps (inconsistent)."""
        old = self._super.shape
        why = (f"geometry mismatch: recorded for {old.device_size} bytes in "
               f"{old.cluster_size}-byte clusters, the device now has {shape.device_size} "
               f"bytes in {shape.cluster_size}-byte clusters")
        entries = self._entries
        assert self._map is not None and self._fd is not None
        self._drop_views()
        self._map.close()
        new_shape = D.Shape(shape.device_size, shape.cluster_size, old.region_size
                            if old.region_size >= shape.cluster_size else shape.cluster_size)
        try:
            os.ftruncate(self._fd, D.MAPS_OFFSET)  # drop the old rows
            os.ftruncate(self._fd, new_shape.maps_file_size)
        except OSError as exc:
            raise BitmapError(f"{self.path}: cannot resize for the new geometry: "
                              f"{exc.strerror}") from exc
        self._super.shape = new_shape
        self.shape = new_shape
        self._cpr = new_shape.clusters_per_region
        self._map = mmap.mmap(self._fd, new_shape.maps_file_size, flags=mmap.MAP_SHARED)
        self._bind_views()
        self._write_super()
        for i, e in enumerate(entries):
            if e.defined:
                e.granularity = max(e.granularity, shape.cluster_size)
                if not e.flags & (D.F_INCONSISTENT | D.F_FROZEN):
                    self._mark_inconsistent(i, why)
                self._write_entry(i)
        self.recovery.stop = "geometry-changed"

    def _reset_intent(self) -> None:
        s = self.shape
        self._intent.write(0, D.pack_intent_header(s, self._super.store_id)
                           + bytes(D.align(s.regions)))
        self._intent.sync()
        self.armed[:] = 0

    # -- the write path (every writer process) ------------------------------------------

    def note_write(self, c0: int, c1: int, timeout: float = ARM_TIMEOUT) -> bool:
        """Call before writing clusters ``[c0, c1)``; True if it had to wait for a sync.

        Fast path: the clusters' regions are armed in this epoch (one byte lookup), so
        their intent is already durable; returns False at once. Otherwise makes those
        regions' intent bytes durable (pwrite + one fdatasync) *before returning*, so
        the guest write that follows cannot reach the disk before its intent does.
        """
        # Bounds first: a negative index would wrap around and read another region.
        if not 0 <= c0 < c1 <= self._clusters:
            raise UsageError(f"clusters [{c0}, {c1}) outside the device "
                             f"({self._clusters} clusters)")
        cpr = self._cpr
        r0 = c0 // cpr
        r1 = (c1 - 1) // cpr + 1
        # The common case, kept to plain integer work and one memoryview byte read.
        if r1 - r0 == 1 and self._armed_bytes[r0]:
            return False
        armed = self.armed
        if armed[r0:r1].all():
            return False
        self._arm([r for r in range(r0, r1) if not armed[r]], timeout)
        return True

    def _arm(self, regions: list[int], timeout: float) -> None:
        fd = self._require_open()
        deadline = time.monotonic() + timeout
        held: list[int] = []
        try:
            for r in regions:
                pause = 20e-6
                # A checkpoint holds a region's lock only for one pwrite: wait, bounded.
                while not F.lock(fd, fcntl.F_WRLCK, REGION_LOCKS + r):
                    if time.monotonic() >= deadline:
                        raise BitmapError(f"{self.path}: region {r} stayed locked for "
                                          f"{timeout:g} s (a stuck checkpoint?)")
                    time.sleep(pause)
                    pause = min(pause * 2, 1e-3)
                held.append(r)
                self._intent.write(D.INTENT_HEADER + r, b"\1")
            self._intent.sync()
            # Only now: armed[r] == 1 promises the intent byte is on stable storage.
            for r in regions:
                self.armed[r] = 1
        finally:
            for r in held:
                F.lock(fd, fcntl.F_UNLCK, REGION_LOCKS + r)

    def enabled_mask(self) -> int:
        """Bit i set: row i records guest writes (defined, enabled, consistent)."""
        if not self.owner:
            self._load_directory()
        mask = 0
        for i, e in enumerate(self._entries):
            if e.defined and e.flags & D.F_ENABLED and not e.flags & D.F_INCONSISTENT:
                mask |= 1 << i
        return mask

    # -- epochs (owner) -----------------------------------------------------------------

    def begin_epoch(self) -> int:
        """End the current epoch: disarm every region. Call while writers are frozen.

        Typically at the snapshot instant of a backup that consumes a bitmap. From now
        on the first write to each region makes its intent durable again; the
        :meth:`checkpoint` that follows can then clear the regions nobody wrote to.
        """
        self._require_owner()
        self.armed[:] = 0
        # Counted in memory; stored with the superblock at close. The superblock is
        # rewritten only at open and close, so a power loss rarely finds it mid-write
        # (and its fields fit in the first 512-byte sector, which disks write whole).
        self._super.epoch += 1
        return self._super.epoch

    def checkpoint(self) -> int:
        """Clear the intent of every region not written since :meth:`begin_epoch`.

        Order (each step durable before the next starts): the image's data (every write
        before the epoch began), then the maps (every bit of those writes), then zero
        the intent bytes of regions still disarmed, each under its region lock so a
        writer arming it at the same moment is never undone. Returns how many regions
        were cleared. Safe to run while writers run.
        """
        self._require_owner()
        self._image_sync()
        self._sync_maps()
        current = np.frombuffer(self._intent.read(D.INTENT_HEADER, self.shape.regions),
                                dtype=np.uint8)
        # A fresh open file description: OFD locks of one description do not exclude
        # each other, and the owner's own process may be a writer too.
        lock_fd = F.open_nofollow(self.path)
        cleared = 0
        try:
            for found in np.flatnonzero(current & (self.armed == 0)):
                r = int(found)
                if not F.lock(lock_fd, fcntl.F_WRLCK, REGION_LOCKS + r):
                    continue  # a writer is arming it: it stays set, which is safe
                try:
                    if not self.armed[r]:
                        self._intent.write(D.INTENT_HEADER + r, b"\0")
                        cleared += 1
                finally:
                    F.lock(lock_fd, fcntl.F_UNLCK, REGION_LOCKS + r)
            # Unlocking before this sync is safe: a writer that arms r afterwards writes
            # 1 after our 0 in the same page cache and syncs it itself before its write.
            self._intent.sync()
        finally:
            os.close(lock_fd)
        return cleared

    # -- management (owner) ---------------------------------------------------------------

    def add(self, name: str, granularity: int | None = None, enabled: bool = True) -> None:
        """Define bitmap ``name``, empty. Call while writers are frozen."""
        self._require_owner()
        validate_name(name)
        g = self.shape.cluster_size if granularity is None else granularity
        validate_granularity(g, self.shape.cluster_size)
        if self._find(name) is not None:
            raise BitmapError(f"{self.image}: a bitmap named {name!r} already exists")
        i = self._free_slot(f"{self.image}: already has {D.MAX_BITMAPS} bitmaps (frozen "
                            "copies held by running backups included)")
        self.dirty[i] = 0
        flags = D.F_DEFINED | (D.F_ENABLED | D.F_IN_USE if enabled else 0)
        self._entries[i] = D.Entry(name, g, flags, 0, "", generation=new_generation())
        self._after_change(i)

    def remove(self, name: str) -> None:
        """Forget bitmap ``name`` (inconsistent ones too). Refused while a job uses it."""
        self._require_owner()
        i = self._index(name)
        self._refuse_busy(name, "remove")
        self._drop_slot(i)

    def _drop_slot(self, i: int) -> None:
        # The entry goes first: a crash in between leaves no entry, never an entry
        # whose checksum describes a row that is half zeroed.
        self._entries[i] = D.Entry()
        self._write_entry(i)
        self._sync_maps()
        self.dirty[i] = 0
        self._sync_maps()

    def _free_slot(self, message: str) -> int:
        for i, e in enumerate(self._entries):
            if not e.defined:
                return i
        raise BitmapError(message)

    def clear(self, name: str) -> None:
        """Reset every bit of ``name``. Call while writers are frozen; refused if busy."""
        i = self._usable(name, "clear")
        # The new generation is durable before any bit goes: a crash in between leaves
        # the old bits under a generation no backup has (safe), never fewer bits under
        # the old one.
        self._entries[i].generation = new_generation()
        self._write_entry(i)
        self._sync_maps()
        self._change_row(i, np.zeros(self.shape.clusters, dtype=np.uint8))

    def enable(self, name: str) -> None:
        """Start recording guest writes into ``name``."""
        i = self._usable(name, "enable", busy_ok=True)
        e = self._entries[i]
        e.flags = (e.flags | D.F_ENABLED | D.F_IN_USE) & ~D.F_CRC_VALID
        self._after_change(i)

    def disable(self, name: str) -> None:
        """Stop recording into ``name``; its contents are then fixed (and checksummed)."""
        i = self._usable(name, "disable", busy_ok=True)
        e = self._entries[i]
        e.flags &= ~(D.F_ENABLED | D.F_IN_USE)
        # Writes are missed from now on: the interval the bits described ends here.
        e.generation = new_generation()
        self._after_change(i)

    def merge(self, target: str, sources: Iterable[str]) -> None:
        """OR every source into ``target`` (QEMU's ``block-dirty-bitmap-merge``).

        Granularities may differ: a source's dirty granules are expanded to clusters
        and then reported at the target's granularity, so a coarser source marks every
        cluster of its granules, and a finer one marks the target's enclosing granule.
        Either way the target only gains bits (never misses a write).
        """
        t = self._usable(target, "merge into")
        indices = []
        for name in sources:
            i = self._index(name)
            self._require_consistent_index(i)
            indices.append(i)
        if not indices:
            raise UsageError("merge needs at least one source bitmap")
        row = self.dirty[t].copy()
        for i in indices:
            row |= self._expanded(i)
        self._change_row(t, row)

    def set_busy(self, name: str, job: str | None) -> None:
        """Mark ``name`` in use by ``job`` (None: free). Busy bitmaps refuse clear/remove."""
        self._require_owner()
        self._index(name)
        if job is None:
            self._busy.pop(name, None)
        elif self._busy.get(name, job) != job:
            raise BitmapBusy(f"bitmap {name!r} is in use by job {self._busy[name]}")
        else:
            self._busy[name] = job

    # -- a backup consumes a bitmap (owner) ---------------------------------------------------

    def begin_backup(self, name: str, job: str, generation: str | None = None,
                     expect: str | None = None) -> U8Array:
        """Hand bitmap ``name`` to backup ``job``: returns what the job must copy.

        Call at the snapshot instant, writers frozen. The bitmap's bits move into a
        *frozen copy* (a hidden row, checksummed and synced before anything else
        changes) and the bitmap starts empty, recording the writes made during the job,
        which stay dirty for the next backup whatever the outcome. The bitmap is busy
        until :meth:`end_backup`. This is QEMU's successor bitmap, kept on disk: if the
        run dies before the job ends, the next open puts the frozen copy back, so a
        crash never loses a bit that was not safely backed up (DESIGN.md invariant 8).
        Typically followed by :meth:`begin_epoch` in the same freeze.

        Lineage (:mod:`shmblock.lineage`): the bitmap gets ``generation`` (default: a
        new one) and the frozen copy keeps the one it had, which :meth:`end_backup`
        or the next open restores with the bits. ``expect``: refuse (BitmapError,
        nothing changed) unless the bitmap has this generation now.
        """
        i = self._usable(name, "back up")
        if not isinstance(job, str) or not JOB_RE.match(job):
            raise UsageError(f"job id {job!r} must be 1-64 of [A-Za-z0-9_.:-]")
        minted = new_generation() if generation is None else generation
        if not GENERATION_RE.match(minted):
            raise UsageError(f"bitmap generation {minted!r} must be 32 hex digits")
        if expect is not None and self._entries[i].generation != expect:
            raise BitmapError(
                f"bitmap {name!r} of {self.image} changed (cleared, re-added or disabled) "
                f"after job {job} was prepared against its generation {expect or '-'}; "
                "create the backup again")
        f = self._free_slot(f"{self.image}: no free slot for a frozen copy of {name!r} "
                            f"({D.MAX_BITMAPS} bitmaps): remove one")
        e = self._entries[i]
        self.dirty[f] = self.dirty[i]
        self._sync_maps()  # the row before the entry that vouches for it
        self._entries[f] = D.Entry(e.name, e.granularity, D.F_DEFINED | D.F_FROZEN
                                   | D.F_CRC_VALID, D.crc32(self._row_bytes(f)), f"job:{job}",
                                   generation=minted, prior=e.generation)
        self._write_entry(f)
        self._sync_maps()
        frozen = self._expanded(f)
        # Entry and row may reach the disk in either order: the frozen copy, put back
        # at the next open, restores the bits and then (if the bitmap has the minted
        # generation) the prior one.
        e.generation = minted
        if e.flags & D.F_ENABLED:
            self._write_entry(i)  # synced with the row (a disabled one: by _change_row)
        self._change_row(i, np.zeros(self.shape.clusters, dtype=np.uint8))
        self._busy[name] = job
        return frozen

    def end_backup(self, name: str, job: str,
                   put_back: bool | npt.NDArray[np.uint8 | np.bool_]) -> None:
        """End ``job``'s hold on ``name``: put back what was not safely backed up.

        ``put_back``: True — every frozen bit (job failed or cancelled, bitmap-mode
        ``on-success``); False — none (job completed); a per-cluster map — the frozen
        bits it marks (bitmap-mode ``always`` after a failure: the clusters not saved).
        """
        self._require_owner()
        i = self._index(name)
        f = self._find_frozen(name)
        if f is None or self._entries[f].reason != f"job:{job}":
            raise BitmapError(f"bitmap {name!r} is not held by job {job}")
        frozen = self._expanded(f)
        taken = frozen.copy()
        if isinstance(put_back, np.ndarray):
            if put_back.shape != (self.shape.clusters,):
                raise UsageError(f"put_back must have shape ({self.shape.clusters},)")
            frozen &= (put_back != 0).astype(np.uint8)
        elif not put_back:
            frozen[:] = 0
        if frozen.any():
            self._restore_into(i, frozen)
        # The generation after the bits (a crash in between puts the frozen copy back
        # again and restores the prior generation), before the copy goes.
        fe, e = self._entries[f], self._entries[i]
        if e.generation == fe.generation:  # else something ended it meanwhile: stands
            after = settled(fe.prior, fe.generation, taken,
                            None if put_back is False else frozen)
            if after != e.generation:
                e.generation = after
                self._write_entry(i)
                self._sync_maps()
        self._drop_slot(f)
        self._busy.pop(name, None)

    def _restore_into(self, i: int, bits: U8Array) -> None:
        e = self._entries[i]
        if e.flags & D.F_ENABLED:
            # Recording: OR in place (writers may store 1s concurrently; an OR loses none).
            self.dirty[i] |= bits
            self._sync_maps()
        else:
            self._change_row(i, self.dirty[i] | bits)

    def _restore_frozen_copies(self) -> None:
        """At open: a frozen copy left behind means its job died with its run."""
        for f, e in enumerate(self._entries):
            if not e.defined or not e.flags & D.F_FROZEN:
                continue
            job = e.reason.removeprefix("job:")
            i = self._find(e.name)
            if i is not None and not self._entries[i].flags & D.F_INCONSISTENT:
                if (e.flags & D.F_CRC_VALID and not e.flags & D.F_INCONSISTENT
                        and D.crc32(self._row_bytes(f)) == e.map_crc):
                    self._restore_into(i, self._expanded(f))
                    self.recovery.restored[e.name] = job
                    b = self._entries[i]
                    if b.generation == e.generation:  # as if the job had not run
                        b.generation = e.prior
                        self._write_entry(i)
                        self._sync_maps()
                else:
                    self._mark_inconsistent(i, f"backup job {job} did not finish and the "
                                               "copy of the bits it held is damaged")
                    self._sync_maps()  # the verdict before the copy goes
            self._drop_slot(f)

    # -- reading --------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(e.name for e in self._entries
                      if e.defined and not e.flags & D.F_FROZEN)

    def rows(self) -> dict[str, int]:
        """Each bitmap's row in :attr:`dirty` (frozen copies left out): for the device,
        whose ``dirty`` rows these are, to find a bitmap by name."""
        return {e.name: i for i, e in enumerate(self._entries)
                if e.defined and not e.flags & D.F_FROZEN}

    def free_rows(self) -> int:
        """Rows no bitmap or frozen copy uses (a backup needs one for its frozen copy)."""
        return sum(1 for e in self._entries if not e.defined)

    def info(self, name: str) -> BitmapInfo:
        return self._info(self._index(name), in_use_status=False)

    def _info(self, i: int, in_use_status: bool) -> BitmapInfo:
        e = self._entries[i]
        bad = bool(e.flags & D.F_INCONSISTENT)
        in_use = bool(e.flags & D.F_IN_USE)
        status = (STATUS_INCONSISTENT if bad else
                  STATUS_IN_USE if in_use and in_use_status else STATUS_CONSISTENT)
        return BitmapInfo(
            name=e.name, granularity=e.granularity,
            enabled=bool(e.flags & D.F_ENABLED) and not bad, status=status,
            reason=e.reason if bad else "", in_use=in_use,
            busy=self._busy.get(e.name), count=0 if bad else self._count(i),
            generation=e.generation)

    def list(self) -> list[BitmapInfo]:
        """Every bitmap with its state and dirty count in bytes, sorted by name."""
        return [self.info(n) for n in self.names()]

    def generation(self, name: str) -> str:
        """``name``'s lineage generation (:mod:`shmblock.lineage`)."""
        return self._entries[self._index(name)].generation

    def set_generation(self, name: str, generation: str) -> None:
        """Give ``name`` this generation, durably: only to undo an action exactly (a
        transaction that fails at its instant), never to claim a lineage."""
        self._require_owner()
        i = self._index(name)
        if not GENERATION_RE.match(generation):
            raise UsageError(f"bitmap generation {generation!r} must be 32 hex digits")
        self._entries[i].generation = generation
        self._write_entry(i)
        self._sync_maps()

    def require_consistent(self, name: str) -> None:
        """Raise BitmapInconsistent (with the reason) unless ``name`` can be trusted."""
        self._require_consistent_index(self._index(name))

    def load(self, name: str, out: U8Array | None = None) -> U8Array:
        """``name`` as one byte per cluster (1 = dirty), at its granularity: every
        cluster of a dirty granule is 1. Into ``out`` if given (e.g. a device's
        ``needs_copy`` row), else a new array. Refused if inconsistent."""
        i = self._index(name)
        self._require_consistent_index(i)
        if out is not None and (out.shape != (self._clusters,) or out.dtype != np.uint8):
            raise UsageError(f"load into a uint8 array of shape ({self._clusters},), not "
                             f"{out.dtype} {out.shape}")
        bits = self._expanded(i)
        if out is None:
            return bits
        out[:] = bits
        return out

    def store(self, name: str, cluster_map: npt.NDArray[np.uint8 | np.bool_]) -> None:
        """Replace ``name``'s contents with a per-cluster map (non-zero = dirty).

        For the engine's bitmap modes (put back what a failed job consumed). Call while
        writers are frozen.
        """
        i = self._usable(name, "store into", busy_ok=True)
        arr = np.asarray(cluster_map)
        if arr.shape != (self.shape.clusters,) or arr.dtype not in (np.uint8, np.bool_):
            raise UsageError(f"a map for bitmap {name!r} must be uint8 or bool of shape "
                             f"({self.shape.clusters},), not {arr.dtype} {arr.shape}")
        self._change_row(i, (arr != 0).astype(np.uint8))

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Owner: store cleanly (data, maps with checksums, empty region map, CLEAN).
        Writer: just unmap. Idempotent. Writers must have stopped writing."""
        if self._map is None:
            return
        if self.owner:
            self._image_sync()
            for i, e in enumerate(self._entries):
                if e.defined and not e.flags & D.F_INCONSISTENT:
                    e.flags = (e.flags & ~D.F_IN_USE) | D.F_CRC_VALID
                    e.map_crc = D.crc32(self._row_bytes(i))
                    self._write_entry(i)
            self._sync_maps()
            # Data and maps are durable: no region's intent is needed any more.
            self._reset_intent()
            self._super.state = D.STATE_CLEAN
            self._write_super()
            self._sync_maps()
        self._release()

    def abandon(self) -> None:
        """Unmap without storing anything, as if this process had died (tests, errors)."""
        self._release()

    def _release(self) -> None:
        self._drop_views()
        stuck: BufferError | None = None
        if self._map is not None:
            m, self._map = self._map, None
            try:
                m.close()
            except BufferError as exc:
                stuck = exc
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # drops the owner lock (once the mapping's own fd goes too)
        self._intent.close()
        if stuck is not None:
            raise BitmapError(
                f"{self.path}: closed, but a numpy view of the maps is still alive, so the "
                "mapping (and the owner lock) stays until that view is dropped") from stuck

    def _drop_views(self) -> None:
        for attr in ("dirty", "armed"):
            self.__dict__.pop(attr, None)
        if "_armed_bytes" in self.__dict__:
            self.__dict__.pop("_armed_bytes").release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _require_open(self) -> int:
        if self._fd is None:
            raise BitmapError(f"{self.path}: the bitmap store is closed")
        return self._fd

    def _require_owner(self) -> None:
        self._require_open()
        if not self.owner:
            raise BitmapError("only the run that opened the bitmaps may change them")

    def _find(self, name: str) -> int | None:
        for i, e in enumerate(self._entries):
            if e.defined and e.name == name and not e.flags & D.F_FROZEN:
                return i
        return None

    def _find_frozen(self, name: str) -> int | None:
        for i, e in enumerate(self._entries):
            if e.defined and e.name == name and e.flags & D.F_FROZEN:
                return i
        return None

    def _index(self, name: str) -> int:
        validate_name(name)
        i = self._find(name)
        if i is None:
            raise BitmapError(f"{self.image}: no bitmap named {name!r}")
        return i

    def _usable(self, name: str, verb: str, busy_ok: bool = False) -> int:
        self._require_owner()
        i = self._index(name)
        if not busy_ok:
            self._refuse_busy(name, verb)
        e = self._entries[i]
        if e.flags & D.F_INCONSISTENT:
            raise BitmapInconsistent(f"cannot {verb} bitmap {name!r}: it is inconsistent "
                                     f"({e.reason}); it can only be removed", name, e.reason)
        return i

    def _refuse_busy(self, name: str, verb: str) -> None:
        if name in self._busy:
            raise BitmapBusy(f"cannot {verb} bitmap {name!r}: it is in use by job "
                             f"{self._busy[name]}")

    def _require_consistent_index(self, i: int) -> None:
        e = self._entries[i]
        if e.flags & D.F_INCONSISTENT:
            raise BitmapInconsistent(
                f"bitmap {e.name!r} of {self.image} is inconsistent ({e.reason}): an "
                "incremental backup from it could miss writes; take a full backup and "
                "remove or re-add the bitmap", e.name, e.reason)

    def _mark_inconsistent(self, i: int, reason: str) -> None:
        e = self._entries[i]
        e.flags = (e.flags | D.F_INCONSISTENT) & ~(D.F_IN_USE | D.F_CRC_VALID)
        e.reason = reason
        self._write_entry(i)
        self.recovery.inconsistent[e.name] = reason

    def _after_change(self, i: int) -> None:
        """Make row i durable, then its entry (checksummed if it does not record).

        Two syncs, in this order, so that an entry on disk that carries a checksum never
        describes a row that is not on disk yet (a power loss between them leaves the
        old entry, which is still true of the old row or over-approximates it).
        """
        self._sync_maps()
        e = self._entries[i]
        if e.flags & D.F_ENABLED:
            e.flags &= ~D.F_CRC_VALID
        else:
            e.flags |= D.F_CRC_VALID
            e.map_crc = D.crc32(self._row_bytes(i))
        self._write_entry(i)
        self._sync_maps()

    def _change_row(self, i: int, new: U8Array) -> None:
        """Replace row i with ``new``, so that a crash at any point leaves a row the
        next open can trust.

        A recording bitmap is simply overwritten and synced: after a machine crash its
        row is rebuilt from the region map anyway, and after a process crash the page
        cache holds whatever was stored. A bitmap that does not record is trusted by its
        checksum, and its row may reach the disk page by page before or after its entry,
        so: entry with both checksums and CHANGING (synced), then the row (synced), then
        the entry with the new checksum (synced). The next open accepts a row that is
        wholly old or wholly new, and names a half-written one inconsistent.
        """
        e = self._entries[i]
        if e.flags & D.F_ENABLED:
            self.dirty[i] = new
            self._sync_maps()
            return
        e.new_crc = D.crc32(new.tobytes())
        e.flags |= D.F_CHANGING | D.F_CRC_VALID
        self._write_entry(i)
        self._sync_maps()
        self.dirty[i] = new
        self._sync_maps()
        e.map_crc = e.new_crc
        e.flags &= ~D.F_CHANGING
        self._write_entry(i)
        self._sync_maps()

    def _row_bytes(self, i: int) -> bytes:
        return bytes(self.dirty[i].tobytes())

    def _granule_any(self, i: int) -> tuple[U8Array, int]:
        k = self._entries[i].granularity // self.shape.cluster_size
        row = self.dirty[i]
        n = self.shape.clusters
        pad = -n % k
        if pad:
            row = np.concatenate([row, np.zeros(pad, dtype=np.uint8)])
        return row.reshape(-1, k).any(axis=1).astype(np.uint8), k

    def _expanded(self, i: int) -> U8Array:
        granules, k = self._granule_any(i)
        return np.repeat(granules, k)[: self.shape.clusters]

    def _count(self, i: int) -> int:
        granules, _ = self._granule_any(i)
        g = self._entries[i].granularity
        total = int(np.count_nonzero(granules)) * g
        tail = self.shape.device_size - (granules.size - 1) * g
        if granules[-1]:
            total -= g - tail  # the last granule ends at the device end
        return total

    def _write_entry(self, i: int) -> None:
        assert self._map is not None
        off = D.DIR_OFFSET + i * D.ENTRY_SIZE
        self._map[off : off + D.ENTRY_SIZE] = self._entries[i].pack()

    def _write_super(self) -> None:
        assert self._map is not None
        raw = self._super.pack()
        self._map[0 : len(raw)] = raw

    def _sync_maps(self) -> None:
        """Make the maps file durable (msync + fdatasync). Tests override this to
        model a disk that holds only what was synced."""
        assert self._map is not None and self._fd is not None
        try:
            self._map.flush()
            os.fdatasync(self._fd)
        except OSError as exc:
            raise BitmapError(f"{self.path}: cannot sync the bitmaps: {exc.strerror}") from exc


def mark_all_dirty(image: str | os.PathLike[str]) -> list[str]:
    """Mark every cluster dirty in every recording bitmap of ``image``, if it has any.

    For a writer that replaces the image's contents behind the write path (a restore
    into a device file): the bitmaps cannot know what changed, so the next incremental
    from them copies everything instead of missing a change. Bitmaps that do not record
    keep their bits (they describe a past interval); inconsistent ones stay so. Returns
    the names marked. BitmapBusy if a live run has the store open.
    """
    if not (store_dir(image) / "maps").exists() or not os.path.exists(image):
        return []
    marked = []
    with PersistentBitmapFile.open(image, run_id="restore") as store:
        ones = np.ones(store.shape.clusters, dtype=np.uint8)
        for info in store.list():
            if info.enabled and info.status == STATUS_CONSISTENT:
                store.store(info.name, ones)
                marked.append(info.name)
    return marked


@dataclass(frozen=True, slots=True)
class StoreInfo:
    """What :func:`inspect` sees, without opening the store as its owner."""

    state: str  # "clean"; "open" (a live run has it); "unclean" (its run died)
    run_id: str  # the run that has it open, or last had it
    owner_pid: int
    bitmaps: list[BitmapInfo]


def inspect(image: str | os.PathLike[str]) -> StoreInfo:
    """List the bitmaps of ``image`` read-only (for ``shmblock-run bitmap list``).

    Changes nothing and needs no ownership. A bitmap that a run has open — or had open
    when it died — is reported ``in-use`` with its count as recorded so far: the open
    that follows an unclean stop decides whether it is still consistent (after a
    process crash it is; after a machine crash the region map is replayed first).
    Raises BitmapError if there is no store or its superblock is unreadable.
    """
    image = os.fspath(image)
    maps_path = str(store_dir(image) / "maps")
    fd = F.open_nofollow(maps_path)
    try:
        sup = F.read_super(fd, maps_path)
        if sup.state == D.STATE_CLEAN:
            state = "clean"
        else:
            state = "open" if F.lock_held(fd, OWNER_LOCK) else "unclean"
        # Read-only use of a reader handle: nothing here writes the maps or the region
        # map, so an in-memory stand-in for the latter is enough.
        reader = PersistentBitmapFile(image, fd, sup, VolatileDisk(), owner=False,
                                      image_sync=lambda: None)
    except BaseException:
        os.close(fd)
        raise
    try:
        reader._load_directory()
        infos = [reader._info(i, in_use_status=state != "clean")
                 for i, e in sorted(enumerate(reader._entries), key=lambda p: p[1].name)
                 if e.defined and not e.flags & D.F_FROZEN]
    finally:
        reader.abandon()
    return StoreInfo(state, sup.run_id, sup.owner_pid, infos)

