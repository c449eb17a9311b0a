"""Shared-memory block devices: the contents, the cluster maps and their ownership.

Ownership follows CPython's ``multiprocessing.shared_memory``: the supervisor *creates*
(exclusive create, so a stale name is never reused by accident) and is the only one to
*unlink*; workers *attach* by name and only ever *close*. A failed create unlinks
whatever it made before re-raising. Attaching checks the header (magic, version, run id,
segment sizes), so a name left by another run or another program is refused.

Theory of operation of the cluster maps (one byte per cluster; a byte store is atomic,
so no process ever does a read-modify-write of shared bits and no lock is needed):

``needs_copy[c]``
    Set to 1 for every cluster the snapshot covers by the supervisor, and only while
    every writer of the device is frozen (no write in flight). During a job it only goes
    1 → 0, and only by the party that saved cluster c's snapshot contents, while holding
    the exclusive claim on c (:mod:`shmblock.claims`): a guest writer that copied them
    into a slot of the copy-before-write buffer, or the backup worker that wrote them to
    the target. A writer that reads 0 may write c without a claim: 0 never goes back
    to 1 during a job, and the next job sets it only while writers are frozen. When a
    job ends (completed, failed or cancelled) the ending party clears the whole map, so
    writers run free.
``allocated[c]``
    Stores of 1 by every guest write (idempotent: any number of writers may store it
    concurrently); read by ``sync=top`` at snapshot start and to skip never-written
    clusters on targets that start zeroed.
``saved[c]``
    Set to 1 by the backup worker, and only by it, once cluster c's snapshot contents
    are on the target; cleared by the supervisor at snapshot start while writers are
    frozen. It is what a ``sync=none`` job covers, and what is safely backed up.
``dirty[i][c]``
    Stores of 1 by every guest write while bitmap i is enabled (bit i of the
    ``CTL_BITMAP_MASK`` control word). Cleared only by the supervisor while writers are
    frozen, so a concurrent store of 1 is never lost. For a file-backed device these
    rows are not in the shared-memory segment: they *are* the rows of the device
    file's persistent bitmap store (:mod:`shmblock.bitmaps`, ``<file>.bitmaps/maps``,
    mapped ``MAP_SHARED`` by every process), so they survive the death of every
    process; :attr:`Device.bitmap_store` is this process's handle on it (the owner's
    for the creator, a writer's for every process that attaches).
``slot_state[s]``, ``slot_cluster[s]``, ``staging[s]``
    The copy-before-write buffer, shared by every writer of the device
    (:mod:`shmblock.cbw_buffer` has its theory of operation). A slot goes FREE → HELD+w
    only under the buffer's lock (a writer reserving a batch), HELD+w → FULL only by
    writer w (after the data and ``slot_cluster`` are stored), FULL → FREE only by the
    backup worker (after the data is on the target), HELD+w → FREE by writer w, or under
    the lock once w is dead. Each transition has one party that may make it, so no
    compare-and-swap is needed. Writers store the slot data, then FULL, then clear
    ``needs_copy``; x86-64 keeps stores in order (TSO), so a worker that sees
    ``needs_copy == 0`` everywhere and then drains every FULL slot has every saved
    cluster.

Memory ordering: the maps, slots and control words are plain numpy stores and loads with
no fences, which is only correct where the CPU keeps stores in program order and loads
in program order (x86-64's TSO). On a weakly ordered CPU (ARM, POWER, RISC-V) the
worker could see ``needs_copy[c] == 0`` or a FULL slot before the slot's data, and save
stale bytes into the backup. :func:`check_memory_ordering` therefore refuses to create
or attach a device on any other architecture.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import platform
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import posix_ipc

from shmblock import layout as L
from shmblock import membarrier
from shmblock.bitmaps import PersistentBitmapFile
from shmblock.errors import AttachError, BitmapError, DeviceError, NoSpaceError, UsageError
from shmblock.stats import STATS_WORDS

DEFAULT_CLUSTER_SIZE = 64 * 1024
DEFAULT_MAX_WRITERS = 16
#: The copy-before-write buffer by default: an eighth of the device, at least 64 clusters
#: (a burst of first writes from several writers) and at most 256 MiB (it lives in
#: shared memory next to the device); never more than the device (docs/architecture.md).
BUFFER_FRACTION = 8
BUFFER_MIN_CLUSTERS = 64
BUFFER_MAX_BYTES = 256 << 20


def default_buffer_slots(size: int, cluster_size: int) -> int:
    """The default size of a device's copy-before-write buffer, in clusters."""
    clusters = size // cluster_size
    slots = max(clusters // BUFFER_FRACTION, BUFFER_MIN_CLUSTERS)
    return max(min(slots, BUFFER_MAX_BYTES // cluster_size, clusters), 1)
SHM_DIR = "/dev/shm"

U8Array = npt.NDArray[np.uint8]
U64Array = npt.NDArray[np.uint64]

#: architectures whose memory model (TSO) the lock-free maps rely on; what
#: ``platform.machine()`` says on Linux, the BSDs and Windows for x86-64
TSO_MACHINES = frozenset({"x86_64", "amd64", "AMD64"})


class UnsupportedPlatformError(DeviceError):
    """The CPU does not keep stores in order, which the device's maps rely on."""


def check_memory_ordering() -> None:
    """Refuse to run on a CPU that is not x86-64 (see "Memory ordering" above)."""
    machine = platform.machine()
    if machine not in TSO_MACHINES:
        raise UnsupportedPlatformError(
            f"shmblock needs an x86-64 CPU, this one is {machine or 'unknown'!r}: guest "
            "writers store a slot's data, then mark it FULL, then clear needs_copy with "
            "plain stores and no memory fences, which only x86-64 (TSO) keeps in order; "
            "on a weakly ordered CPU the backup worker could save stale data"
        )
    # The freeze's handshake needs a store-load fence that numpy cannot issue; it gets it
    # from membarrier(2) (shmblock.freeze). Refused here, before anything is created.
    membarrier.require()


@dataclass(frozen=True, slots=True)
class Geometry:
    """Size and shape of a device, validated once."""

    size: int
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    max_writers: int = DEFAULT_MAX_WRITERS
    #: clusters the copy-before-write buffer holds; None: :func:`default_buffer_slots`
    buffer_slots: int | None = None

    def __post_init__(self) -> None:
        cs = self.cluster_size
        if cs < 4096 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
            raise UsageError(f"cluster size {cs} must be a power of two from 4K to 2M")
        if self.size <= 0 or self.size % cs:
            raise UsageError(
                f"device size {self.size} must be a positive multiple of the cluster size {cs}"
            )
        if not 1 <= self.max_writers <= 1024:
            raise UsageError(f"max writers {self.max_writers} must be between 1 and 1024")
        if self.buffer_slots is None:
            object.__setattr__(self, "buffer_slots", default_buffer_slots(self.size, cs))
        elif not 0 <= self.buffer_slots <= self.clusters:
            raise UsageError(
                f"copy-before-write buffer of {self.buffer_slots} clusters must be from 0 "
                f"to the device's {self.clusters} clusters")

    @property
    def clusters(self) -> int:
        return self.size // self.cluster_size

    def layout(self) -> L.Layout:
        return L.Layout(self.size, self.cluster_size, self.max_writers,
                        self.slots, STATS_WORDS)

    @property
    def slots(self) -> int:
        """Clusters the copy-before-write buffer holds (the default filled in)."""
        assert self.buffer_slots is not None
        return self.buffer_slots


def shm_free_bytes(directory: str = SHM_DIR) -> int:
    """Bytes available to us in the shared-memory file system."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _map(fd: int, size: int, populate: bool) -> mmap.mmap:
    flags = mmap.MAP_SHARED
    if populate:
        flags |= getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def open_bitmap_store(image: str, cluster_size: int, run_id: str) -> PersistentBitmapFile:
    """The owner's open of a device file's persistent bitmaps.

    A seam for tests, which model the disk under it (a region map that keeps only what
    was synced, another boot); the engine itself never passes anything else.
    """
    return PersistentBitmapFile.open(image, cluster_size=cluster_size, run_id=run_id)


def _unlink_quietly(name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(name)


class Device:
    """A handle on a device: its contents as a numpy array, and its cluster maps.

    Create with :meth:`create` (the owner) or :meth:`attach` (workers). Use as a context
    manager, or call :meth:`close` (every handle) and :meth:`unlink` (the owner, once).
    """

    data: U8Array
    needs_copy: U8Array
    allocated: U8Array
    saved: U8Array
    dirty: U8Array  # shape (MAX_BITMAPS, clusters)
    slot_state: npt.NDArray[np.uint16]
    slot_cluster: U64Array
    stats: U64Array  # shape (max_writers, STATS_WORDS)
    staging: U8Array  # shape (slots, cluster_size)
    ctl: U64Array
    in_write: U64Array  # shape (max_writers, IN_WRITE_STRIDE // 8); column 0 is the word

    def __init__(
        self,
        meta_name: str,
        geometry: Geometry,
        run_id: str,
        meta_map: mmap.mmap,
        data_map: mmap.mmap,
        data_name: str,
        backing_file: str | None,
        owner: bool,
        bitmap_store: PersistentBitmapFile | None = None,
    ) -> None:
        self.meta_name = meta_name
        self.data_name = data_name
        self.geometry = geometry
        self.run_id = run_id
        self.backing_file = backing_file
        self.owner = owner
        #: the persistent dirty bitmaps of a file-backed device (None in shared memory)
        self.bitmap_store = bitmap_store
        self._meta_map: mmap.mmap | None = meta_map
        self._data_map: mmap.mmap | None = data_map
        self._bind_views()

    # -- construction -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        meta_name: str,
        data_name: str,
        geometry: Geometry,
        run_id: str,
        backing_file: str | None = None,
        prefault: bool = True,
        scan: bool = True,
    ) -> Device:
        """Create a new device (exclusive create); unlinks what it made if anything fails.

        ``backing_file``: map this raw image file as the contents instead of shared
        memory (created sparse if missing; an existing file must have the device size).
        ``prefault``: reserve every page now with ``posix_fallocate``, so a full
        /dev/shm fails here with ENOSPC instead of SIGBUS on a later first touch.
        ``scan`` False: the caller runs :meth:`scan_allocated` of a device file itself
        (the engine starts the device's backup worker first, to overlap the two).
        Raises UnsupportedPlatformError on a CPU other than x86-64.
        """
        check_memory_ordering()
        lay = geometry.layout()
        need = lay.total_size + (0 if backing_file else geometry.size)
        free = shm_free_bytes()
        if need > free:
            raise NoSpaceError(
                f"/dev/shm has {free / 2**20:.0f} MiB free, the device needs "
                f"{need / 2**20:.0f} MiB (contents and maps): use a smaller --size or "
                "a file-backed device"
            )
        made: list[str] = []
        maps: list[mmap.mmap] = []
        store: PersistentBitmapFile | None = None
        try:
            meta_map = cls._create_segment(meta_name, lay.total_size, prefault=True)
            made.append(meta_name)
            maps.append(meta_map)
            if backing_file is None:
                data_map = cls._create_segment(data_name, geometry.size, prefault=prefault)
                made.append(data_name)
            else:
                data_map = cls._map_file(backing_file, geometry.size, create=True)
                data_name = ""
            maps.append(data_map)
            if backing_file:
                # The device file's bitmaps: recovered here if the last run died (the
                # rows are its dirty rows); BitmapBusy if a live run has the file.
                try:
                    store = open_bitmap_store(backing_file, geometry.cluster_size, run_id)
                except BitmapError as exc:
                    raise DeviceError(f"device file {backing_file!r}: {exc}") from exc
            L.HEADER_STRUCT.pack_into(
                meta_map, 0, L.MAGIC, L.VERSION, L.HEADER_SIZE, geometry.size,
                geometry.cluster_size, geometry.clusters, geometry.max_writers,
                geometry.slots, L.MAX_BITMAPS,
                L.FLAG_FILE_BACKED if backing_file else 0,
                run_id.encode(), data_name.encode(),
                os.path.abspath(backing_file).encode() if backing_file else b"",
            )
            device = cls(meta_name, geometry, run_id, meta_map, data_map, data_name,
                         backing_file, owner=True, bitmap_store=store)
            # A job configures its part of the buffer; until then (tests) all of it.
            device.ctl[L.CTL_BUF_LIMIT] = geometry.slots
            device.load_bitmap_directory()
        except BaseException:
            if store is not None:
                store.abandon()  # as found: the next open recovers it again
            for m in maps:
                m.close()
            for name in made:
                _unlink_quietly(name)
            raise
        if backing_file and scan:
            device.scan_allocated()
        return device

    @staticmethod
    def _create_segment(name: str, size: int, prefault: bool) -> mmap.mmap:
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.ExistentialError as exc:
            raise DeviceError(f"shared memory {name!r} already exists (another run?)") from exc
        except (posix_ipc.Error, OSError) as exc:
            raise DeviceError(f"cannot create shared memory {name!r}: {exc}") from exc
        try:
            if prefault:
                try:
                    os.posix_fallocate(shm.fd, 0, size)
                except OSError as exc:
                    raise NoSpaceError(
                        f"cannot reserve {size / 2**20:.0f} MiB in /dev/shm for {name!r}: "
                        f"{exc.strerror}"
                    ) from exc
            return _map(shm.fd, size, populate=prefault)
        except BaseException:
            _unlink_quietly(name)
            raise
        finally:
            shm.close_fd()

    @staticmethod
    def _map_file(path: str, size: int, create: bool) -> mmap.mmap:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise DeviceError(f"cannot open device file {path!r}: {exc.strerror}") from exc
        try:
            actual = os.fstat(fd).st_size
            if actual == 0 and create:
                free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
                if free < size:
                    raise NoSpaceError(
                        f"{path!r}: the file system has {free / 2**20:.0f} MiB free, the "
                        f"device needs {size / 2**20:.0f} MiB"
                    )
                os.ftruncate(fd, size)
            elif actual != size:
                raise DeviceError(
                    f"device file {path!r} has {actual} bytes, expected {size}"
                )
            return _map(fd, size, populate=False)
        finally:
            os.close(fd)

    @classmethod
    def attach(cls, meta_name: str, run_id: str | None = None, populate: bool = True) -> Device:
        """Attach to a device by its metadata name; checks the header.

        ``populate`` maps every page up front (MAP_POPULATE), so this process takes no
        page fault on first touch later: 0.1-0.3 s per GiB now instead of 3-10 µs per
        4 KiB page in the middle of a timed write or copy.
        """
        check_memory_ordering()
        try:
            shm = posix_ipc.SharedMemory(meta_name)
        except posix_ipc.ExistentialError as exc:
            raise AttachError(f"no device {meta_name!r} (has its run ended?)") from exc
        try:
            seg_size = os.fstat(shm.fd).st_size
            if seg_size < L.HEADER_SIZE:
                raise AttachError(f"{meta_name!r} is too small to be a shmblock device")
            meta_map = _map(shm.fd, seg_size, populate=populate)
        finally:
            shm.close_fd()
        try:
            (magic, version, header_size, size, cluster_size, clusters, max_writers, slots,
             max_bitmaps, flags, raw_run, raw_data, raw_backing) = L.HEADER_STRUCT.unpack_from(
                meta_map, 0)
            if magic != L.MAGIC or version != L.VERSION or header_size != L.HEADER_SIZE:
                raise AttachError(f"{meta_name!r} is not a shmblock v{L.VERSION} device")
            found_run = raw_run.rstrip(b"\0").decode(errors="replace")
            if run_id is not None and found_run != run_id:
                raise AttachError(f"{meta_name!r} belongs to run {found_run}, not {run_id}")
            try:
                geometry = Geometry(size, cluster_size, max_writers, slots)
            except UsageError as exc:
                raise AttachError(f"{meta_name!r} has a corrupt header: {exc}") from exc
            if clusters != geometry.clusters or max_bitmaps != L.MAX_BITMAPS:
                raise AttachError(f"{meta_name!r} has an inconsistent header")
            if seg_size != geometry.layout().total_size:
                raise AttachError(f"{meta_name!r} has {seg_size} bytes, header says otherwise")
            try:
                data_name = raw_data.rstrip(b"\0").decode()
                backing = raw_backing.rstrip(b"\0").decode() or None
            except UnicodeDecodeError as exc:
                raise AttachError(f"{meta_name!r} has a corrupt header: {exc}") from exc
            if flags & L.FLAG_FILE_BACKED:
                if backing is None:
                    raise AttachError(f"{meta_name!r} is file-backed but names no file")
                data_map = cls._map_file(backing, size, create=False)
                try:
                    store = PersistentBitmapFile.attach(backing)
                except BitmapError as exc:
                    data_map.close()
                    raise AttachError(f"{meta_name!r}: the bitmaps of {backing!r}: "
                                      f"{exc}") from exc
            else:
                store = None
                try:
                    dshm = posix_ipc.SharedMemory(data_name)
                except posix_ipc.ExistentialError as exc:
                    raise AttachError(f"device contents {data_name!r} are gone") from exc
                except ValueError as exc:  # posix_ipc: not a valid name
                    raise AttachError(f"{meta_name!r} has a corrupt header: contents name "
                                      f"{data_name!r}") from exc
                try:
                    if os.fstat(dshm.fd).st_size != size:
                        raise AttachError(f"{data_name!r} does not have {size} bytes")
                    data_map = _map(dshm.fd, size, populate=populate)
                finally:
                    dshm.close_fd()
        except BaseException:
            meta_map.close()
            raise
        return cls(meta_name, geometry, found_run, meta_map, data_map, data_name, backing,
                   owner=False, bitmap_store=store)

    def _bind_views(self) -> None:
        assert self._meta_map is not None and self._data_map is not None
        lay = self.geometry.layout()
        meta, n = self._meta_map, lay.clusters

        def u8(offset: int, count: int) -> U8Array:
            return np.frombuffer(meta, dtype=np.uint8, count=count, offset=offset)

        self.data = np.frombuffer(self._data_map, dtype=np.uint8)
        self.ctl = np.frombuffer(meta, dtype=np.uint64, count=L.CTL_WORDS, offset=L.CTL_OFFSET)
        line = L.IN_WRITE_STRIDE // 8
        self.in_write = np.frombuffer(meta, dtype=np.uint64, count=lay.max_writers * line,
                                      offset=lay.in_write_offset).reshape(-1, line)
        self.needs_copy = u8(lay.needs_copy_offset, n)
        self.allocated = u8(lay.allocated_offset, n)
        self.saved = u8(lay.saved_offset, n)
        if self.bitmap_store is not None:
            # No copy: guest writes store straight into the persistent rows.
            self.dirty = self.bitmap_store.dirty
        else:
            self.dirty = np.lib.stride_tricks.as_strided(
                u8(lay.dirty_offset, L.MAX_BITMAPS * lay.map_bytes),
                shape=(L.MAX_BITMAPS, n), strides=(lay.map_bytes, 1), writeable=True)
        self.slot_state = np.frombuffer(meta, dtype=np.uint16, count=lay.slots,
                                        offset=lay.slot_state_offset)
        self.slot_cluster = np.frombuffer(meta, dtype=np.uint64, count=lay.slots,
                                          offset=lay.slot_cluster_offset)
        self.stats = np.frombuffer(
            meta, dtype=np.uint64, count=lay.max_writers * lay.stats_words,
            offset=lay.stats_offset).reshape(lay.max_writers, lay.stats_words)
        self.staging = u8(lay.staging_offset, lay.slots * lay.cluster_size).reshape(
            lay.slots, lay.cluster_size)

    # -- properties -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.geometry.size

    @property
    def cluster_size(self) -> int:
        return self.geometry.cluster_size

    @property
    def clusters(self) -> int:
        return self.geometry.clusters

    @property
    def closed(self) -> bool:
        return self._meta_map is None

    def data_view(self) -> memoryview:
        """A memoryview of the whole contents, for ``os.pwrite`` straight from the mapping."""
        assert self._data_map is not None
        return memoryview(self._data_map)

    # -- dirty bitmaps ------------------------------------------------------------------

    def bitmap_names(self) -> dict[str, int]:
        """Names of defined dirty bitmaps → their index."""
        assert self._meta_map is not None
        names = {}
        for i in range(L.MAX_BITMAPS):
            off = L.BITMAP_NAMES_OFFSET + i * L.BITMAP_NAME_BYTES
            raw = bytes(self._meta_map[off : off + L.BITMAP_NAME_BYTES]).rstrip(b"\0")
            if raw:
                names[raw.decode()] = i
        return names

    def set_bitmap_name(self, index: int, name: str) -> None:
        """Owner only, while writers are frozen or the bitmap is disabled."""
        assert self._meta_map is not None
        if not 0 <= index < L.MAX_BITMAPS:
            # Out of range would land on the control words or the cluster maps.
            raise UsageError(f"bitmap index {index} out of range 0-{L.MAX_BITMAPS - 1}")
        raw = name.encode()
        if len(raw) >= L.BITMAP_NAME_BYTES:
            raise UsageError(f"bitmap name {name!r} is longer than {L.BITMAP_NAME_BYTES - 1} bytes")
        off = L.BITMAP_NAMES_OFFSET + index * L.BITMAP_NAME_BYTES
        self._meta_map[off : off + L.BITMAP_NAME_BYTES] = raw.ljust(L.BITMAP_NAME_BYTES, b"\0")

    def load_bitmap_directory(self) -> None:
        """Owner: mirror the persistent store's names and recording rows into the
        header (names) and ``CTL_BITMAP_MASK``. After every change to the store; the
        mask part only while writers are frozen or when it only gains bits."""
        store = self.bitmap_store
        if store is None:
            return
        rows = {i: name for name, i in store.rows().items()}
        for i in range(L.MAX_BITMAPS):
            self.set_bitmap_name(i, rows.get(i, ""))
        self.ctl[L.CTL_BITMAP_MASK] = store.enabled_mask()

    # -- maintenance ----------------------------------------------------------------------

    def scan_allocated(self, chunk_clusters: int = 256) -> None:
        """Mark every cluster with non-zero contents allocated (file-backed devices).

        Only the file's data extents are read: a hole reads as zeros, and reading it
        through the mapping would fault in a zero page per 4 KiB for nothing.
        """
        cs = self.cluster_size
        per = cs // 8
        for lo, hi in self._data_extents():
            for start in range(lo // cs, -(-hi // cs), chunk_clusters):
                stop = min(start + chunk_clusters, -(-hi // cs), self.clusters)
                words = self.data[start * cs : stop * cs].view(np.uint64).reshape(-1, per)
                self.allocated[start:stop] |= words.any(axis=1).astype(np.uint8)

    def _data_extents(self) -> list[tuple[int, int]]:
        """[start, end) byte ranges of the device file that may hold data (lseek(2)
        SEEK_DATA/SEEK_HOLE); the whole device where the file system cannot say."""
        whole = [(0, self.size)]
        if self.backing_file is None:
            return whole
        try:
            fd = os.open(self.backing_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return whole
        extents: list[tuple[int, int]] = []
        try:
            if os.fstat(fd).st_size != self.size:
                return whole
            offset = 0
            while offset < self.size:
                try:
                    start = os.lseek(fd, offset, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no data after offset
                        break
                    return whole
                offset = min(os.lseek(fd, start, os.SEEK_HOLE), self.size)
                extents.append((start, offset))
        except OSError:
            return whole
        finally:
            os.close(fd)
        return extents

    def iter_chunks(self, chunk: int) -> Iterator[tuple[int, U8Array]]:
        """(offset, view) pairs covering the contents in ``chunk``-byte pieces."""
        for off in range(0, self.size, chunk):
            yield off, self.data[off : off + chunk]

    def close(self) -> None:
        """Release this handle's mappings. Idempotent. Drops the numpy views first."""
        if self._meta_map is None:
            return
        views: dict[str, Any] = {}
        self.__dict__.pop("in_write", None)
        for name in ("data", "ctl", "needs_copy", "allocated", "saved", "dirty", "slot_state",
                     "slot_cluster", "stats", "staging"):
            views[name] = self.__dict__.pop(name, None)
        del views
        meta, data = self._meta_map, self._data_map
        self._meta_map = self._data_map = None
        store, self.bitmap_store = self.bitmap_store, None
        try:
            for m in (data, meta):
                if m is None:
                    continue
                try:
                    m.close()
                except BufferError as exc:
                    raise DeviceError(
                        "cannot close the device: a numpy view or memoryview of it is "
                        "still alive (drop it first)"
                    ) from exc
        finally:
            if store is not None:
                # The owner stores the bitmaps cleanly (data, rows and checksums synced,
                # marked clean); a writer's handle only unmaps.
                store.close()

    def unlink(self) -> None:
        """Destroy the names (owner only). Mappings stay valid until :meth:`close`."""
        if not self.owner:
            raise DeviceError("only the process that created a device may unlink it")
        _unlink_quietly(self.meta_name)
        if self.data_name:
            _unlink_quietly(self.data_name)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            if self.owner:
                self.unlink()
