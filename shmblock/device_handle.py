"""A device owned by an engine, and the guest-writer processes that write to it.

:class:`DeviceHandle` is the engine's side of one device: guest reads and writes from the
calling process (through the same copy-before-write path as writer processes, under the
device's last writer index), and its dirty bitmaps. :class:`WriterProcess` is what the
supervisor knows of one guest-writer process.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from shmblock import layout as L
from shmblock.bitmaps import PersistentBitmapFile
from shmblock.bitmaps.store import validate_granularity, validate_name
from shmblock.copier import runs
from shmblock.device import Device
from shmblock.errors import BitmapBusy, BitmapError, ShmblockError, UsageError
from shmblock.guest import GuestIO, WriteData
from shmblock.lineage import new_generation
from shmblock.snapshot import BitmapUse, granules
from shmblock.transport import BACKUP_RECEIVES, WRITER_REPLY_RECEIVES, Queue

if TYPE_CHECKING:
    from shmblock.engine import Engine


@dataclass
class WriterProcess:
    """A guest-writer worker process and what the supervisor knows of it."""

    ident: int
    device: DeviceHandle
    proc: subprocess.Popen[bytes]
    control: Queue
    reply: Queue
    token: str = field(default="", repr=False)  # its secret; its Frozen must carry it
    ready: bool = False
    done: bool = False
    ok: bool = True
    error: str = ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def status(self) -> str:
        """How the writer ended: "running", "ok", "killed by signal N", "exit code N: …"."""
        code = self.proc.poll()
        if code is None:
            return "running"
        if code < 0:
            return f"killed by signal {-code}"
        if code == 0 and self.ok:
            return "ok"
        return f"exit code {code}" + (f": {self.error}" if self.error else "")


@dataclass(frozen=True, slots=True)
class DeviceBitmapInfo:
    """One dirty bitmap of a device, as :meth:`DeviceHandle.bitmap_info` lists it
    (QEMU's ``BlockDirtyInfo``)."""

    name: str
    granularity: int  # bytes per bit
    count: int  # dirty bytes (dirty granules × granularity, cut at the device end)
    enabled: bool  # records guest writes (QEMU: recording)
    busy: str | None  # the job that consumes it, if any
    consistency: str  # "consistent" or "inconsistent"
    reason: str  # why inconsistent ('' if consistent)
    persistent: bool  # kept beside the device file across runs and crashes
    #: lineage (shmblock.lineage): changes whenever the bits stop meaning "every write
    #: since the last backup that consumed it"
    generation: str = ""


class DeviceHandle:
    """A device owned by an engine; guest reads and writes go through copy-before-write."""

    def __init__(self, engine: Engine, name: str, device: Device, io_writer: int) -> None:
        self.engine = engine
        self.name = name
        self.device = device
        #: held by guest writes of this process: its one GuestIO serves one thread at a
        #: time (freezes do not take it: they wait on the in-write words, shmblock.freeze)
        self.gate = threading.Lock()
        self.freeze_lock = threading.Lock()  # one freeze of this device at a time
        self._io_lock = threading.Lock()  # two threads' first I/O make one GuestIO
        self._io_writer = io_writer
        self._io: GuestIO | None = None
        self._reply: Queue | None = None
        self._backup_queue: Queue | None = None
        #: bitmap name → the id of the job that consumes it (busy until the job ends)
        self.busy_bitmaps: dict[str, str] = {}
        #: granularity of each bitmap of a device in shared memory (the store keeps
        #: those of a file-backed device)
        self._granularity: dict[str, int] = {}
        #: bitmaps of a file-backed device added with persistent=False
        self._transient: set[str] = set()
        #: lineage generation of each bitmap of a device in shared memory
        #: (shmblock.lineage; the store keeps those of a file-backed device)
        self.generations: dict[str, str] = {}

    @property
    def size(self) -> int:
        return self.device.size

    @property
    def cluster_size(self) -> int:
        return self.device.cluster_size

    def backup_queue(self) -> Queue:
        """The queue of this device's backup worker (created on first use, kept)."""
        if self._backup_queue is None:
            self._backup_queue = self.engine.run.create_queue(
                self.engine.names.backup_queue(self.name), BACKUP_RECEIVES)
        return self._backup_queue

    def _guest(self) -> GuestIO:
        io = self._io
        if io is None:
            with self._io_lock:  # else two threads' first writes both create the queue
                if self._io is None:
                    self._reply = self.engine.run.create_queue(
                        self.engine.names.writer_reply_queue(self.name, self._io_writer),
                        WRITER_REPLY_RECEIVES, small=True)
                    self._io = GuestIO(self.device, self._io_writer,
                                       self.engine.names.backup_queue(self.name),
                                       reply_queue=self._reply, gate=self.gate)
                io = self._io
        return io

    def write(self, offset: int, data: WriteData) -> None:
        """A guest write from this process (copy-before-write applies)."""
        self._guest().write(offset, data)

    def read(self, offset: int, length: int) -> bytes:
        """A guest read from this process."""
        return self._guest().read(offset, length)

    def fill(self, fraction: float, seed: int = 0) -> int:
        """Write random data to ``fraction`` of the clusters (chosen at random), as a guest.

        For benchmarks and demos that need a device with data and holes. Returns the
        number of clusters written.
        """
        if not 0 <= fraction <= 1:
            raise UsageError(f"fill fraction {fraction} must be between 0 and 1")
        rng = np.random.default_rng(seed)
        n = self.device.clusters
        chosen = np.sort(rng.choice(n, size=round(n * fraction), replace=False))
        cs = self.cluster_size
        pool = rng.integers(0, 256, 8 << 20, dtype=np.uint8)
        # Write maximal runs of chosen clusters, up to 4 MiB at a time.
        step = max((4 << 20) // cs, 1)
        for a, b, picked in runs(np.isin(np.arange(n), chosen)):
            if not picked:
                continue
            for c in range(a, b, step):
                e = min(c + step, b)
                start = int(rng.integers(0, pool.size - (e - c) * cs + 1))
                self.write(c * cs, pool[start : start + (e - c) * cs])
        return int(chosen.size)

    # -- dirty bitmaps ------------------------------------------------------------------
    #
    # A file-backed device keeps its bitmaps in the device file's persistent store
    # (shmblock.bitmaps): names, granularity, enabled state and consistency come from
    # it, and its rows are the device's dirty rows. A device in shared memory keeps them
    # in its header and rows, for the run only. Every change that touches a row or the
    # set of recording rows is made while the writers are frozen, so no guest write is
    # half-recorded and no store of 1 is lost.

    @property
    def bitmap_store(self) -> PersistentBitmapFile | None:
        """The device file's persistent bitmaps (None for a device in shared memory)."""
        return self.device.bitmap_store

    def add_bitmap(self, name: str, granularity: int | None = None,
                   persistent: bool = True) -> None:
        """Define an empty dirty bitmap that records every guest write from now on.

        ``granularity``: bytes per bit, a power of two from the cluster size (the
        default) to 2 GiB; a write marks the whole granule. ``persistent``: on a
        file-backed device the bitmap is kept beside the file and survives restarts
        and crashes; ``False`` removes it when the engine closes. A device in shared
        memory has nowhere to keep it: its bitmaps last as long as the run.
        """
        validate_name(name)
        g = self.cluster_size if granularity is None else granularity
        validate_granularity(g, self.cluster_size)
        if name in self.device.bitmap_names():
            raise UsageError(f"device {self.name} already has a bitmap named {name!r}")
        store = self.bitmap_store
        if store is not None:
            with self.engine.freeze([self]), store.lock:
                try:
                    store.add(name, g)
                finally:
                    self.device.load_bitmap_directory()
            if not persistent:
                self._transient.add(name)
            return
        names = self.device.bitmap_names()
        free = [i for i in range(L.MAX_BITMAPS) if i not in names.values()]
        if not free:
            raise UsageError(f"device {self.name} already has {L.MAX_BITMAPS} bitmaps")
        index = free[0]
        with self.engine.freeze([self]):
            self.device.dirty[index] = 0
            self.device.set_bitmap_name(index, name)
            self._granularity[name] = g
            self.generations[name] = new_generation()
            ctl = self.device.ctl
            ctl[L.CTL_BITMAP_MASK] = int(ctl[L.CTL_BITMAP_MASK]) | (1 << index)

    def remove_bitmap(self, name: str) -> None:
        """Stop recording into bitmap ``name`` and forget it (BitmapBusy while a job uses
        it). The only operation an inconsistent bitmap allows."""
        index = self._bitmap_index(name)
        self.check_bitmap_free(name)
        store = self.bitmap_store
        with self.engine.freeze([self]), self._store_lock():
            if store is not None:
                try:
                    store.remove(name)
                finally:
                    self.device.load_bitmap_directory()
                self._transient.discard(name)
                return
            ctl = self.device.ctl
            ctl[L.CTL_BITMAP_MASK] = int(ctl[L.CTL_BITMAP_MASK]) & ~(1 << index)
            self.device.set_bitmap_name(index, "")
            self._granularity.pop(name, None)
            self.generations.pop(name, None)

    def clear_bitmap(self, name: str) -> None:
        """Reset every bit of ``name`` (BitmapBusy while a job uses it)."""
        index = self._bitmap_index(name)
        self.check_bitmap_free(name)
        store = self.bitmap_store
        with self.engine.freeze([self]), self._store_lock():
            if store is not None:
                store.clear(name)
            else:
                self.generations[name] = new_generation()
                self.device.dirty[index] = 0

    def enable_bitmap(self, name: str) -> None:
        """Record guest writes into ``name`` again (a no-op if it records)."""
        self._set_enabled(name, True)

    def disable_bitmap(self, name: str) -> None:
        """Stop recording into ``name``: its bits stay as they are until enabled."""
        self._set_enabled(name, False)

    def _set_enabled(self, name: str, enabled: bool) -> None:
        index = self._bitmap_index(name)
        store = self.bitmap_store
        with self.engine.freeze([self]), self._store_lock():
            if store is not None:
                try:
                    (store.enable if enabled else store.disable)(name)
                finally:
                    self.device.load_bitmap_directory()
                return
            ctl = self.device.ctl
            mask = int(ctl[L.CTL_BITMAP_MASK])
            ctl[L.CTL_BITMAP_MASK] = mask | (1 << index) if enabled else mask & ~(1 << index)
            if not enabled:  # writes are missed from now on (shmblock.lineage)
                self.generations[name] = new_generation()

    def merge_bitmaps(self, target: str, sources: list[str]) -> None:
        """OR every source bitmap into ``target`` (QEMU's block-dirty-bitmap-merge).

        Sources are read by their granules, so ``target`` only gains bits. Refused if
        ``target`` is busy or any name is unknown (or, persistent, inconsistent).
        """
        if isinstance(sources, str) or not sources:
            raise UsageError("merge needs a list of at least one source bitmap")
        index = self._bitmap_index(target)
        for src in sources:
            self._bitmap_index(src)
        self.check_bitmap_free(target)
        store = self.bitmap_store
        with self.engine.freeze([self]), self._store_lock():
            if store is not None:
                store.merge(target, sources)
                return
            row = self.device.dirty[index]
            for src in sources:
                row[self.bitmap(src)] = 1

    def bitmap_info(self) -> list[DeviceBitmapInfo]:
        """Every bitmap with its granularity, dirty count in bytes, state and users."""
        store = self.bitmap_store
        out = []
        if store is not None:
            with store.lock:
                infos = store.list()
            for info in infos:
                out.append(DeviceBitmapInfo(
                    name=info.name, granularity=info.granularity, count=info.count,
                    enabled=info.enabled, busy=self.busy_bitmaps.get(info.name),
                    consistency=info.status, reason=info.reason,
                    persistent=info.name not in self._transient, generation=info.generation))
            return out
        mask = int(self.device.ctl[L.CTL_BITMAP_MASK])
        for name, index in sorted(self.device.bitmap_names().items()):
            g = self._granularity.get(name, self.cluster_size)
            count = int(np.count_nonzero(self.bitmap(name))) * self.cluster_size
            out.append(DeviceBitmapInfo(
                name=name, granularity=g, count=count, enabled=bool(mask >> index & 1),
                busy=self.busy_bitmaps.get(name), consistency="consistent", reason="",
                persistent=False, generation=self.generations.get(name, "")))
        return out

    def bitmaps(self) -> list[str]:
        """Names of the device's dirty bitmaps."""
        return sorted(self.device.bitmap_names())

    def bitmap(self, name: str) -> npt.NDArray[np.bool_]:
        """A copy of bitmap ``name``, per cluster: True for every cluster of every granule
        written since it was added or last cleared (BitmapInconsistent if it cannot be
        trusted)."""
        index = self._bitmap_index(name)
        store = self.bitmap_store
        if store is not None:
            with store.lock:
                return np.asarray(store.load(name) != 0)
        return granules(self.device.dirty[index], self._granule(name))

    def bitmap_generation(self, name: str) -> str:
        """Bitmap ``name``'s lineage generation (:mod:`shmblock.lineage`)."""
        self._bitmap_index(name)
        store = self.bitmap_store
        if store is not None:
            with store.lock:
                return store.generation(name)
        return self.generations.get(name, "")

    def bitmap_lineage(self, name: str, mode: str | None) -> tuple[str, str, str | None]:
        """For a job that will consume ``name`` under ``mode``: (the generation it has
        now, which the job requires at its instant; the one the job will give it; that
        one again if the backup may record it, else None — the bitmap does not record,
        so it will not hold the writes since the backup, or ``never`` keeps the old
        bits)."""
        index = self._bitmap_index(name)
        store = self.bitmap_store
        if store is not None:
            with store.lock:
                records = store.info(name).enabled
        else:
            records = bool(int(self.device.ctl[L.CTL_BITMAP_MASK]) >> index & 1)
        minted = new_generation()
        return (self.bitmap_generation(name), minted,
                minted if records and mode != "never" else None)

    def use_bitmap(self, name: str, mode: str, job: str, expect: str = "",
                   minted: str = "") -> BitmapUse:
        """Mark bitmap ``name`` busy for ``job`` (see :meth:`check_bitmap`).

        ``expect``: the generation the bitmap must still have at the job's instant (its
        target depends on it), ``minted`` the one the job gives it there (default new).
        """
        index = self.check_bitmap(name)
        self.busy_bitmaps[name] = job
        store = self.bitmap_store
        return BitmapUse(name, index, mode, granule=self._granule(name),
                         store=store, job=job, expect=expect,
                         minted=minted or new_generation(),
                         generations=self.generations if store is None else None)

    def check_bitmap(self, name: str) -> int:
        """The index of bitmap ``name`` if a job may consume it now: UsageError if
        unknown, BitmapBusy if a job uses it, BitmapInconsistent (with the reason) if it
        cannot be trusted, BitmapError if the store has no row left for its frozen copy."""
        index = self._bitmap_index(name)
        self.check_bitmap_free(name)
        store = self.bitmap_store
        if store is not None:
            store.require_consistent(name)
            if not store.free_rows():
                raise BitmapError(
                    f"device {self.name} has {L.MAX_BITMAPS} bitmaps: a backup from "
                    f"bitmap {name!r} needs a free one for the bits it holds; remove one")
        return index

    def check_bitmap_free(self, name: str) -> None:
        if (job := self.busy_bitmaps.get(name)) is not None:
            raise BitmapBusy(f"bitmap {name!r} of device {self.name} is busy: job {job} "
                             "uses it")

    def release_bitmap(self, name: str, job: str) -> None:
        """``job`` is over: its bitmap is free again."""
        if self.busy_bitmaps.get(name) == job:
            del self.busy_bitmaps[name]

    def apply_persistent_action(self, kind: str, name: str,
                                sources: tuple[str, ...] = ()) -> Callable[[], None]:
        """A transaction's bitmap action on a file-backed device, applied to the store
        while the device is frozen; returns its undo (valid while it stays frozen).

        ``kind``: add, clear, merge (into ``name`` from ``sources``), remove, enable,
        disable. The undo restores the row and the entry as they were (a removed
        bitmap comes back with its granularity, bits and recording state).
        """
        store = self.bitmap_store
        assert store is not None, "only for a file-backed device"
        device = self.device

        def reload(step: Callable[[], object]) -> None:
            with store.lock:
                try:
                    step()
                finally:
                    device.load_bitmap_directory()

        def undo_to(bits: npt.NDArray[np.uint8], generation: str) -> Callable[[], None]:
            def back() -> None:
                store.store(name, bits)
                store.set_generation(name, generation)
            return lambda: reload(back)

        if kind == "add":
            reload(lambda: store.add(name))
            return lambda: reload(lambda: store.remove(name))
        generation = store.generation(name)  # an exact undo restores the lineage too
        if kind in ("enable", "disable"):
            was = store.info(name).enabled

            def undo_switch() -> None:
                (store.enable if was else store.disable)(name)
                store.set_generation(name, generation)
            reload(lambda: (store.enable if kind == "enable" else store.disable)(name))
            return lambda: reload(undo_switch)
        with store.lock:
            before = device.dirty[device.bitmap_names()[name]].copy()
        if kind == "clear":
            reload(lambda: store.clear(name))
            return undo_to(before, generation)
        if kind == "merge":
            reload(lambda: store.merge(name, sources))
            return undo_to(before, generation)
        assert kind == "remove", kind
        info = store.info(name)
        reload(lambda: store.remove(name))

        def undo_remove() -> None:
            def back() -> None:
                store.add(name, info.granularity, enabled=info.enabled)
                store.store(name, before)
                store.set_generation(name, generation)
            reload(back)
        return undo_remove

    def _store_lock(self) -> contextlib.AbstractContextManager[object]:
        store = self.bitmap_store
        return contextlib.nullcontext() if store is None else store.lock

    def _granule(self, name: str) -> int:
        store = self.bitmap_store
        if store is not None:
            return store.info(name).granularity // self.cluster_size
        return self._granularity.get(name, self.cluster_size) // self.cluster_size

    def _bitmap_index(self, name: str) -> int:
        try:
            return self.device.bitmap_names()[name]
        except KeyError:
            raise UsageError(f"device {self.name} has no bitmap named {name!r}") from None

    def close(self) -> None:
        if self._io is not None:
            self._io.close()
            self._io = None
        store = self.bitmap_store
        if store is not None and not self.device.closed:
            for name in sorted(self._transient):  # non-persistent: gone with the run
                with contextlib.suppress(ShmblockError):
                    store.remove(name)
            self._transient.clear()
