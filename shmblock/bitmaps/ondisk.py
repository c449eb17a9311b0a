"""Byte formats of the bitmap store's two files, and their validation.

``<image>.bitmaps/maps`` (mapped ``MAP_SHARED`` by every process that records writes)::

    offset 0       superblock (4 KiB): magic, version, geometry, region size, store id,
                   state (CLEAN / OPEN), the owning run (boot id, pid, start time, run
                   id), epoch; CRC32 of all that
    4096           directory: MAX_BITMAPS entries of 256 bytes: name, granularity,
                   flags, CRC32 of the map (and of its replacement while one is
                   being written), reason text if inconsistent; CRC32 of the entry;
                   then (version 2) the lineage tail: the bitmap's generation and,
                   for a backup's frozen copy, the generation the bitmap had before
                   the backup (16 bytes each), with a CRC32 of the whole entry
    8192           dirty[i], one byte per cluster, page-aligned rows, i < MAX_BITMAPS
                   (exactly the shape of the device's ``dirty`` region, layout.py, so the
                   engine can view these rows in place of its shared-memory ones)
    then           armed[r], one byte per region: 1 = region r's intent byte is durable
                   in this epoch (process-shared, recomputed at every open)

``<image>.bitmaps/intent`` (written with pwrite + fdatasync through
:class:`~shmblock.bitmaps.persistence.Persistence`)::

    offset 0       header (4 KiB): magic, version, region size, regions, store id,
                   device size; CRC32
    4096           intent[r], one byte per region: 1 = writes to region r may be on disk
                   that the maps on disk do not show

Version 2 added only the lineage tail (:mod:`shmblock.lineage`) in bytes a version-1
entry leaves zero, so a version-1 store reads as one whose bitmaps have no generation
yet; the owner's open gives each a fresh one and writes the superblock as version 2,
which a version-1 shmblock refuses (it would rewrite entries without their tail, or
clear a recording bitmap without ending its generation).

Every number read from either file is checked (magic, version, sizes against the
geometry, CRCs); a failure raises :class:`FormatError` with the reason, which the store
turns into an inconsistent bitmap or a clear :class:`~shmblock.errors.BitmapError`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from shmblock import layout as L
from shmblock.errors import BitmapError

PAGE = 4096
MAX_BITMAPS = L.MAX_BITMAPS  # the device keeps this many dirty rows

MAPS_MAGIC = b"SHMBMAP1"
INTENT_MAGIC = b"SHMBINT1"
VERSION = 2  # 2: the entries' lineage tail (generations); 1 is read and upgraded
READ_VERSIONS = (1, 2)
INTENT_VERSION = 1  # the region map's header did not change
SUPER_SIZE = PAGE
DIR_OFFSET = PAGE
ENTRY_SIZE = 256
MAPS_OFFSET = 2 * PAGE
INTENT_HEADER = PAGE

STATE_CLEAN = 0
STATE_OPEN = 1

# Directory entry flags.
F_DEFINED = 1
F_ENABLED = 2
F_IN_USE = 4  # set while a run has the store open and the bitmap records (QEMU's in-use)
F_CRC_VALID = 8  # map_crc matches the map (bitmap disabled, or store closed cleanly)
F_INCONSISTENT = 16
F_CHANGING = 32  # the row is being replaced: it matches map_crc (old) or new_crc (new)
# A frozen copy of bitmap ``name`` taken by a backup job (whose id is in the reason
# field, "job:<id>"): what the job copies, put back into ``name`` if the job fails.
F_FROZEN = 64
F_ALL = (F_DEFINED | F_ENABLED | F_IN_USE | F_CRC_VALID | F_INCONSISTENT | F_CHANGING
         | F_FROZEN)

NAME_BYTES = 32
REASON_BYTES = 160

# magic, version, super size, device size, cluster size, clusters, max bitmaps,
# region size, store id, boot id, state, owner pid, owner start time, run id, epoch
SUPER = struct.Struct("<8sIIQIQIQ16s16sIQQ16sQ")
# name, granularity, flags, map crc, new map crc (while F_CHANGING), reason
ENTRY = struct.Struct(f"<{NAME_BYTES}sQIII{REASON_BYTES}s")
# magic, version, header size, region size, regions, store id, device size
INTENT = struct.Struct("<8sIIQQ16sQ")
CRC = struct.Struct("<I")
# The superblock fits in one 512-byte sector, which a disk writes whole or not at all.
assert SUPER.size + CRC.size <= 512
# The lineage tail, after the version-1 entry and its CRC: generation, prior
# generation (frozen copies), CRC32 of everything before it in the entry.
TAIL = struct.Struct("<16s16s")
TAIL_OFFSET = ENTRY.size + CRC.size
GENERATION_BYTES = 16
assert ENTRY.size + CRC.size <= ENTRY_SIZE
assert TAIL_OFFSET + TAIL.size + CRC.size <= ENTRY_SIZE
assert DIR_OFFSET + MAX_BITMAPS * ENTRY_SIZE <= MAPS_OFFSET


class FormatError(BitmapError):
    """Bytes read from a store file are not what we wrote (torn, corrupt, or foreign)."""


def crc32(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def align(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True, slots=True)
class Shape:
    """Sizes and offsets of the maps file for one geometry."""

    device_size: int
    cluster_size: int
    region_size: int

    @property
    def clusters(self) -> int:
        return self.device_size // self.cluster_size

    @property
    def regions(self) -> int:
        return -(-self.device_size // self.region_size)

    @property
    def clusters_per_region(self) -> int:
        return self.region_size // self.cluster_size

    @property
    def map_bytes(self) -> int:
        return align(self.clusters)

    @property
    def armed_offset(self) -> int:
        return MAPS_OFFSET + MAX_BITMAPS * self.map_bytes

    @property
    def maps_file_size(self) -> int:
        return self.armed_offset + align(self.regions)

    @property
    def intent_file_size(self) -> int:
        return INTENT_HEADER + align(self.regions)


@dataclass(slots=True)
class Super:
    """The superblock, decoded."""

    shape: Shape
    store_id: bytes
    boot_id: bytes
    state: int
    owner_pid: int
    owner_start: int
    run_id: str
    epoch: int

    def pack(self) -> bytes:
        s = self.shape
        body = SUPER.pack(MAPS_MAGIC, VERSION, SUPER_SIZE, s.device_size, s.cluster_size,
                          s.clusters, MAX_BITMAPS, s.region_size, self.store_id,
                          self.boot_id, self.state, self.owner_pid, self.owner_start,
                          self.run_id.encode()[:16], self.epoch)
        return body + CRC.pack(crc32(body))


def check_geometry(device_size: int, cluster_size: int, region_size: int) -> None:
    """Raise FormatError unless the three sizes make a valid store shape."""
    if cluster_size < 512 or cluster_size > 1 << 31 or cluster_size & (cluster_size - 1):
        raise FormatError(f"cluster size {cluster_size} is not a power of two in 512..2G")
    if device_size <= 0 or device_size % cluster_size:
        raise FormatError(f"device size {device_size} is not a positive multiple of the "
                          f"cluster size {cluster_size}")
    if (region_size < cluster_size or region_size & (region_size - 1)
            or region_size > 1 << 40):
        raise FormatError(f"region size {region_size} is not a power of two from the "
                          f"cluster size {cluster_size} to 1T")


def unpack_super(raw: bytes) -> Super:
    """Decode and validate a superblock; FormatError says what is wrong."""
    if len(raw) < SUPER.size + CRC.size:
        raise FormatError(f"the superblock is truncated ({len(raw)} bytes)")
    body = raw[: SUPER.size]
    (magic, version, super_size, device_size, cluster_size, clusters, max_bitmaps,
     region_size, store_id, boot_id, state, pid, start, raw_run, epoch) = SUPER.unpack(body)
    if magic != MAPS_MAGIC:
        raise FormatError(f"not a shmblock bitmap store (magic {magic!r})")
    if version not in READ_VERSIONS or super_size != SUPER_SIZE:
        raise FormatError(f"bitmap store version {version} is not supported (want {VERSION})")
    (stored,) = CRC.unpack_from(raw, SUPER.size)
    if stored != crc32(body):
        raise FormatError("the superblock checksum does not match (torn or corrupt write)")
    check_geometry(device_size, cluster_size, region_size)
    if clusters != device_size // cluster_size or max_bitmaps != MAX_BITMAPS:
        raise FormatError(f"the superblock is inconsistent ({clusters} clusters, "
                          f"{max_bitmaps} bitmaps)")
    if state not in (STATE_CLEAN, STATE_OPEN):
        raise FormatError(f"the superblock has an unknown state {state}")
    try:
        run_id = raw_run.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise FormatError("the superblock has a corrupt run id") from None
    return Super(Shape(device_size, cluster_size, region_size), store_id, boot_id, state,
                 pid, start, run_id, epoch)


@dataclass(slots=True)
class Entry:
    """One directory entry, decoded (``name`` is '' for a free slot)."""

    name: str = ""
    granularity: int = 0
    flags: int = 0
    map_crc: int = 0
    reason: str = ""
    new_crc: int = 0
    #: lineage (shmblock.lineage): the bitmap's generation, 32 hex digits ('' if none
    #: was recorded: a version-1 entry); for a frozen copy, ``generation`` is the one
    #: its backup gave the bitmap and ``prior`` the one the bitmap had before
    generation: str = ""
    prior: str = ""

    @property
    def defined(self) -> bool:
        return bool(self.flags & F_DEFINED)

    def pack(self) -> bytes:
        reason = self.reason.encode("utf-8", "replace")[:REASON_BYTES]
        # Cut on a character boundary so the stored reason always decodes.
        reason = reason.decode("utf-8", "ignore").encode()
        body = ENTRY.pack(self.name.encode("ascii"), self.granularity, self.flags,
                          self.map_crc, self.new_crc, reason)
        head = body + CRC.pack(crc32(body))
        if self.generation or self.prior:
            head += TAIL.pack(_gen_bytes(self.generation), _gen_bytes(self.prior))
            head += CRC.pack(crc32(head))
        return head.ljust(ENTRY_SIZE, b"\0")


def _gen_bytes(generation: str) -> bytes:
    return bytes.fromhex(generation) if generation else bytes(GENERATION_BYTES)


def _gen_text(raw: bytes) -> str:
    return raw.hex() if any(raw) else ""


def unpack_entry(raw: bytes) -> Entry:
    """Decode one directory entry; FormatError if its checksum or fields are bad.

    The name is checked by the caller (it knows the naming rule); this checks the bytes.
    """
    body = raw[: ENTRY.size]
    if raw == bytes(len(raw)):
        return Entry()  # never written: a free slot
    (stored,) = CRC.unpack_from(raw, ENTRY.size)
    if stored != crc32(body):
        raise FormatError("directory entry checksum mismatch (torn or corrupt write)")
    raw_name, granularity, flags, map_crc, new_crc, raw_reason = ENTRY.unpack(body)
    try:
        name = raw_name.rstrip(b"\0").decode("ascii")
        reason = raw_reason.rstrip(b"\0").decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("directory entry has undecodable text") from None
    generation = prior = ""
    tail = raw[TAIL_OFFSET : TAIL_OFFSET + TAIL.size + CRC.size]
    if any(tail):  # a version-1 entry leaves these bytes zero: no generation yet
        (tail_crc,) = CRC.unpack_from(raw, TAIL_OFFSET + TAIL.size)
        if tail_crc != crc32(raw[: TAIL_OFFSET + TAIL.size]):
            raise FormatError("directory entry lineage checksum mismatch (torn or corrupt "
                              "write)")
        raw_gen, raw_prior = TAIL.unpack_from(raw, TAIL_OFFSET)
        generation, prior = _gen_text(raw_gen), _gen_text(raw_prior)
    return Entry(name, granularity, flags, map_crc, reason, new_crc, generation, prior)


def pack_intent_header(shape: Shape, store_id: bytes) -> bytes:
    body = INTENT.pack(INTENT_MAGIC, INTENT_VERSION, INTENT_HEADER, shape.region_size,
                       shape.regions, store_id, shape.device_size)
    return (body + CRC.pack(crc32(body))).ljust(INTENT_HEADER, b"\0")


def check_intent_header(raw: bytes, shape: Shape, store_id: bytes) -> None:
    """Raise FormatError unless ``raw`` is the region-map header of this store."""
    if len(raw) < INTENT.size + CRC.size:
        raise FormatError(f"the region map is truncated ({len(raw)} bytes)")
    body = raw[: INTENT.size]
    magic, version, header, region_size, regions, sid, device_size = INTENT.unpack(body)
    if magic != INTENT_MAGIC:
        raise FormatError(f"the region map has a bad magic {magic!r}")
    if version != INTENT_VERSION or header != INTENT_HEADER:
        raise FormatError(f"region map version {version} is not supported")
    (stored,) = CRC.unpack_from(raw, INTENT.size)
    if stored != crc32(body):
        raise FormatError("the region map header checksum does not match")
    if sid != store_id:
        raise FormatError("the region map belongs to another store")
    if (region_size, regions, device_size) != (shape.region_size, shape.regions,
                                               shape.device_size):
        raise FormatError(f"the region map is for {regions} regions of {region_size} bytes "
                          f"over {device_size} bytes, not this geometry")
