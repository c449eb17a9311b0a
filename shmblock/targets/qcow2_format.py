"""The qcow2 on-disk format: header codec, refcount planning, and a small image reader.

Everything here follows QEMU's ``docs/interop/qcow2.txt``; section names in comments
refer to that file. All on-disk numbers are big-endian ("General").

* :class:`Qcow2Header` packs and unpacks the fixed header ("Header"); we write version 3
  with a 112-byte header (the 104-byte v3 header plus the ``compression_type`` byte and
  its padding, "Additional fields"), and read versions 2 and 3.
* :func:`build_header_cluster` lays out cluster 0: header, header extensions ("Header
  extensions"), end marker, then the backing file name, which must fit in that cluster.
* :func:`plan_refcounts` sizes the refcount blocks and table for an image whose every
  cluster has refcount 1 ("Host cluster management").
* :class:`Qcow2Reader` opens an existing image and reads guest ranges through its L1/L2
  tables ("Cluster mapping"), following a qcow2 or raw backing chain; :class:`RawReader`
  is the raw end of such a chain. Both are read-only and never trust the file: every
  offset is checked, and anything unsupported (encryption, external data files,
  extended L2 entries, zstd compression) is refused with :class:`Qcow2FormatError`.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import struct
import zlib
from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt

from shmblock.errors import TargetError, TargetIOError, TargetUnreachable

MAGIC = b"QFI\xfb"
MIN_CLUSTER_BITS = 9  # 512-byte clusters ("Header", cluster_bits)
MAX_CLUSTER_BITS = 21  # QEMU's implementation limit: 2 MiB
MAX_BACKING_NAME = 1023  # "Must not be longer than 1023 bytes"
MAX_L1_BYTES = 32 * 1024 * 1024  # QEMU's implementation limit on the L1 table
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QEMU's implementation limit on the refcount table
MAX_CHAIN_DEPTH = 64  # a backing chain deeper than this is treated as a loop
REFCOUNT_ORDER = 4  # 16-bit refcounts, QEMU's default
#: the largest file offset the kernel takes (off_t is signed 64-bit); an on-disk offset
#: field is unsigned 64-bit, so anything above this is refused before it reaches pread
MAX_FILE_OFFSET = (1 << 63) - 1

V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
#: what we write: the v3 header, the compression_type byte, 7 bytes of padding
HEADER_LENGTH = 112

# Header fields through header_length ("Header"), big-endian.
_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
assert _HEADER.size == V3_HEADER_LENGTH

# incompatible_features bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4

# Header extension types ("Header extensions")
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_DATA_FILE = 0x44415441

# L1 and L2 entry bits ("Cluster mapping")
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55: host offset of an L2 table / data cluster
OFLAG_COPIED = 1 << 63  # refcount is exactly one
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0  # v3 standard descriptor: the cluster reads as zeros

# Cluster kinds used while reading.
_UNALLOCATED, _ZERO, _DATA, _COMPRESSED = 0, 1, 2, 3

U64 = npt.NDArray[np.uint64]


class Qcow2FormatError(TargetError, ValueError):
    """A file that is not a qcow2 image we can read, or whose metadata is inconsistent."""


def cluster_bits_of(cluster_size: int) -> int:
    """log2 of a valid qcow2 cluster size; raises TargetError for anything else."""
    bits = cluster_size.bit_length() - 1
    if cluster_size <= 0 or 1 << bits != cluster_size or not (
        MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS
    ):
        raise TargetError(
            f"qcow2 cluster size {cluster_size} must be a power of two from 512 bytes to 2 MiB"
        )
    return bits


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True, slots=True)
class Qcow2Header:
    """The fixed qcow2 header ("Header"); defaults are those of the images we write."""

    cluster_bits: int
    size: int
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = REFCOUNT_ORDER
    header_length: int = HEADER_LENGTH
    compression_type: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def pack(self) -> bytes:
        """The header as written to disk: ``header_length`` bytes (version 3 only)."""
        if self.version != 3 or self.header_length != HEADER_LENGTH:
            raise ValueError("only version 3 headers of 112 bytes are written")
        fixed = _HEADER.pack(
            MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
            self.incompatible_features,
            self.compatible_features,
            self.autoclear_features,
            self.refcount_order,
            self.header_length,
        )
        # compression_type (byte 104) then zero padding to a multiple of 8 ("Header padding")
        return fixed + bytes([self.compression_type]) + bytes(HEADER_LENGTH - V3_HEADER_LENGTH - 1)

    @classmethod
    def unpack(cls, data: bytes, name: str = "image") -> Qcow2Header:
        """Parse and sanity-check a version 2 or 3 header from the start of ``data``."""
        if len(data) < V2_HEADER_LENGTH or data[:4] != MAGIC:
            raise Qcow2FormatError(f"{name}: not a qcow2 image (bad magic)")
        version = struct.unpack_from(">I", data, 4)[0]
        if version not in (2, 3):
            raise Qcow2FormatError(f"{name}: unsupported qcow2 version {version}")
        if version == 3 and len(data) < V3_HEADER_LENGTH:
            raise Qcow2FormatError(f"{name}: truncated qcow2 header")
        padded = data[:V3_HEADER_LENGTH].ljust(V3_HEADER_LENGTH, b"\0")
        fields = _HEADER.unpack(padded)
        (_, _, bf_off, bf_size, bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
         nb_snap, snap_off, incompat, compat, autoclear, rc_order, hlen) = fields  # fmt: skip
        if version == 2:
            incompat = compat = autoclear = 0
            rc_order, hlen = REFCOUNT_ORDER, V2_HEADER_LENGTH
        compression = 0
        if hlen > V3_HEADER_LENGTH and len(data) > V3_HEADER_LENGTH:
            compression = data[V3_HEADER_LENGTH]
        if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
            raise Qcow2FormatError(f"{name}: unsupported cluster_bits {bits}")
        if version == 3 and (hlen < V3_HEADER_LENGTH or hlen % 8 or hlen > 1 << bits):
            raise Qcow2FormatError(f"{name}: bad header_length {hlen}")
        return cls(
            cluster_bits=bits,
            size=size,
            version=version,
            backing_file_offset=bf_off,
            backing_file_size=bf_size,
            crypt_method=crypt,
            l1_size=l1_size,
            l1_table_offset=l1_off,
            refcount_table_offset=rt_off,
            refcount_table_clusters=rt_clusters,
            nb_snapshots=nb_snap,
            snapshots_offset=snap_off,
            incompatible_features=incompat,
            compatible_features=compat,
            autoclear_features=autoclear,
            refcount_order=rc_order,
            header_length=hlen,
            compression_type=compression,
        )


def _extension(ext_type: int, payload: bytes) -> bytes:
    # type, length, data, padding to a multiple of 8 ("Header extensions")
    pad = -len(payload) % 8
    return struct.pack(">II", ext_type, len(payload)) + payload + bytes(pad)


def build_header_cluster(
    header: Qcow2Header, backing_file: str | None, backing_format: str | None
) -> bytes:
    """Cluster 0 of an image: header, extensions, end marker, backing file name.

    ``header.backing_file_offset``/``size`` are filled in here. Raises TargetError when
    the backing file name does not fit in the first cluster (only possible with tiny
    clusters and long names) or exceeds the format's 1023-byte limit.
    """
    body = bytearray()
    if backing_format is not None:
        body += _extension(EXT_BACKING_FORMAT, backing_format.encode())
    body += _extension(EXT_END, b"")
    name = os.fsencode(backing_file) if backing_file is not None else b""
    if len(name) > MAX_BACKING_NAME:
        raise TargetError(
            f"backing file name is {len(name)} bytes; qcow2 allows at most {MAX_BACKING_NAME}"
        )
    name_offset = HEADER_LENGTH + len(body)
    if name_offset + len(name) > header.cluster_size:
        raise TargetError(
            f"backing file name of {len(name)} bytes does not fit in the first "
            f"{header.cluster_size}-byte cluster; use a shorter name or larger clusters"
        )
    if backing_file is not None:
        header = dataclasses.replace(
            header, backing_file_offset=name_offset, backing_file_size=len(name)
        )
    cluster = bytearray(header.cluster_size)
    packed = header.pack()
    cluster[: len(packed)] = packed
    cluster[HEADER_LENGTH:name_offset] = body
    cluster[name_offset : name_offset + len(name)] = name
    return bytes(cluster)


def plan_refcounts(clusters_before: int, cluster_size: int) -> tuple[int, int]:
    """Refcount blocks and refcount-table clusters needed to cover themselves too.

    The image holds ``clusters_before`` clusters, then the refcount blocks, then the
    refcount table, all with refcount 1. Adding blocks can need more table, which covers
    more clusters, so iterate to the fixed point (it converges in two or three steps).
    """
    per_block = cluster_size * 8 >> REFCOUNT_ORDER  # refcount_block_entries
    per_table_cluster = cluster_size // 8
    blocks, table = 0, 0
    while True:
        total = clusters_before + blocks + table
        new_blocks = ceil_div(total, per_block)
        new_table = ceil_div(new_blocks, per_table_cluster)
        if (new_blocks, new_table) == (blocks, table):
            return blocks, table
        blocks, table = new_blocks, new_table


class ImageReader(Protocol):
    """A read-only view of a disk image (one link of a backing chain)."""

    path: str
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def fill(self, offset: int, out: memoryview) -> None:
        """Read ``len(out)`` guest bytes at ``offset`` into ``out``, which is zero-filled."""

    def close(self) -> None: ...


def _preadv_all(fd: int, out: memoryview, offset: int) -> int:
    """pread until ``out`` is full or EOF; returns the bytes read.

    Offsets come from untrusted files: one outside what off_t holds is a format error
    here, not an OverflowError from ``os.preadv``.
    """
    if offset < 0 or offset + len(out) > MAX_FILE_OFFSET:
        raise Qcow2FormatError(f"read of {len(out)} bytes at file offset {offset} is "
                               "outside any file")
    done = 0
    while done < len(out):
        got = os.preadv(fd, [out[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def _pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    """``length`` bytes at ``offset``, or Qcow2FormatError naming ``what`` (which starts
    with the image's name) when the range is outside the file or off_t."""
    if offset < 0 or offset + length > MAX_FILE_OFFSET:
        raise Qcow2FormatError(f"{what} at offset {offset} is outside any file")
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise Qcow2FormatError(f"{what} at offset {offset} is past the end of the file")
    return data


def _open_ro(path: str, what: str) -> int:
    """Open an image read-only; refuse anything but a regular file or a block device.

    Paths can come from a backing-file field of an untrusted image: ``O_NONBLOCK`` keeps
    a FIFO from hanging the open, and the file-type check keeps a directory, a FIFO or a
    character device (``/dev/zero``, a terminal) from being read as an image.
    """
    if "\0" in path:
        raise Qcow2FormatError(f"{what} name {path!r} contains a NUL byte")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise TargetUnreachable(f"cannot open {what} {path!r}: {exc.strerror}") from exc
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise TargetUnreachable(f"{what} {path!r} is not a regular file or block device")
    return fd


def _file_size(fd: int) -> int:
    """Size of a regular file or of a block device (whose st_size is 0)."""
    return os.lseek(fd, 0, os.SEEK_END)


class RawReader:
    """A raw image file; bytes past its end read as zeros (a shorter backing file)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = _open_ro(path, "raw image")
        self.size = _file_size(self._fd)

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.fill(offset, memoryview(out))
        return bytes(out)

    def fill(self, offset: int, out: memoryview) -> None:
        if self._fd is None:
            raise TargetIOError(f"raw image {self.path!r} is closed")
        if offset < 0:
            raise TargetError(f"read at offset {offset} of raw image {self.path!r}")
        if offset >= self.size:
            return  # past the end: zeros (``out`` is zero-filled)
        try:
            _preadv_all(self._fd, out, offset)
        except OSError as exc:
            raise TargetIOError(f"read of raw image {self.path!r} failed: {exc.strerror}") from exc

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> RawReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_backing(image_path: str, backing_file: str) -> str:
    """Where QEMU looks for a backing file: relative names are relative to the image's
    directory, not to the current directory."""
    if os.path.isabs(backing_file):
        return backing_file
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), backing_file)


def open_image(path: str, fmt: str | None = None, *, _depth: int = 0) -> ImageReader:
    """Open a raw or qcow2 image for reading; ``fmt`` None probes the qcow2 magic."""
    if _depth > MAX_CHAIN_DEPTH:
        raise Qcow2FormatError(f"backing chain deeper than {MAX_CHAIN_DEPTH} at {path!r} (a loop?)")
    if fmt is None:
        fd = _open_ro(path, "image")
        try:
            fmt = "qcow2" if os.pread(fd, 4, 0) == MAGIC else "raw"
        except OSError as exc:
            raise TargetIOError(f"cannot read image {path!r}: {exc.strerror}") from exc
        finally:
            os.close(fd)
    if fmt == "qcow2":
        return Qcow2Reader(path, _depth=_depth)
    if fmt == "raw":
        return RawReader(path)
    raise Qcow2FormatError(
        f"cannot read backing image {path!r} of format {fmt!r}: only raw and qcow2"
    )


def read_mapped(
    out: memoryview,
    offset: int,
    entries: U64,
    *,
    fd: int,
    cluster_bits: int,
    zero_flag: bool,
    backing: Callable[[], ImageReader | None],
    name: str,
) -> None:
    """Fill ``out`` (zero-filled) with guest bytes ``[offset, offset + len(out))``.

    ``entries`` are the L2 entries (native uint64) of every guest cluster the range
    touches, starting with cluster ``offset >> cluster_bits``. Runs of clusters of one
    kind (data at consecutive host offsets, unallocated, zero) are found with numpy and
    served with one pread each; ``backing`` is called only if an unallocated run exists.
    """
    if not len(out):
        return
    cs = 1 << cluster_bits
    first = offset >> cluster_bits
    end = offset + len(out)
    compressed = (entries & np.uint64(OFLAG_COMPRESSED)) != 0
    host = entries & np.uint64(OFFSET_MASK)
    zero = ~compressed & ((entries & np.uint64(OFLAG_ZERO)) != 0) if zero_flag else None
    kind = np.full(len(entries), _UNALLOCATED, dtype=np.int8)
    kind[host != 0] = _DATA
    if zero is not None:
        kind[zero] = _ZERO
    kind[compressed] = _COMPRESSED
    data = kind == _DATA
    if np.any(host[data] & np.uint64(cs - 1)):
        raise Qcow2FormatError(f"{name}: L2 entry with a misaligned host offset")
    # A run breaks where the kind changes, at every compressed cluster, and between data
    # clusters that are not adjacent in the file.
    breaks = np.zeros(len(entries), dtype=bool)
    breaks[0] = True
    breaks[1:] = (kind[1:] != kind[:-1]) | (kind[1:] == _COMPRESSED)
    breaks[1:] |= data[1:] & data[:-1] & (host[1:] != host[:-1] + np.uint64(cs))
    starts = np.flatnonzero(breaks).tolist()
    stops = [*starts[1:], len(entries)]
    for a, b in zip(starts, stops, strict=True):
        run_kind = int(kind[a])
        if run_kind == _ZERO:
            continue
        lo = max(offset, (first + a) << cluster_bits)
        hi = min(end, (first + b) << cluster_bits)
        dest = out[lo - offset : hi - offset]
        if run_kind == _DATA:
            where = int(host[a]) + lo - ((first + a) << cluster_bits)
            if _preadv_all(fd, dest, where) != len(dest):
                raise Qcow2FormatError(f"{name}: data cluster at {where} is past end of file")
        elif run_kind == _UNALLOCATED:
            base = backing()
            if base is not None and lo < base.size:
                base.fill(lo, dest[: min(hi, base.size) - lo])
        else:
            cluster = _decompress(fd, int(entries[a]), cluster_bits, name)
            start = lo - ((first + a) << cluster_bits)
            dest[:] = cluster[start : start + len(dest)]


def _decompress(fd: int, entry: int, cluster_bits: int, name: str) -> bytes:
    # "Compressed Clusters Descriptor": x = 62 - (cluster_bits - 8)
    x = 62 - (cluster_bits - 8)
    where = entry & ((1 << x) - 1)
    extra_sectors = (entry >> x) & ((1 << (62 - x)) - 1)
    nbytes = (extra_sectors + 1) * 512 - (where & 511)
    # At most 2^(62-x) sectors (4 MiB with 2 MiB clusters) at an offset below 2^61: the
    # descriptor's own bit widths bound this read, so a forged one cannot overflow it.
    raw = os.pread(fd, nbytes, where)
    try:
        # QEMU writes raw deflate streams (no zlib header), window bits 12.
        cluster = zlib.decompressobj(-12).decompress(raw, 1 << cluster_bits)
    except zlib.error as exc:
        raise Qcow2FormatError(f"{name}: bad compressed cluster at {where}: {exc}") from exc
    if len(cluster) != 1 << cluster_bits:
        raise Qcow2FormatError(f"{name}: short compressed cluster at {where}")
    return cluster


class Qcow2Reader:
    """Read-only access to a qcow2 image and its backing chain.

    ::

        with Qcow2Reader("backup.qcow2") as img:
            img.size, img.cluster_size, img.backing_file, img.backing_format
            data = img.read(offset, length)       # any range, through L1/L2 tables
            entries = img.l2_entries(first, n)    # raw L2 entries of guest clusters

    Unallocated clusters read from the backing file (opened on first need; relative
    names resolve against the image's directory, as QEMU does), or as zeros without one.
    Raises :class:`Qcow2FormatError` for files it cannot or will not read (corrupt bit,
    encryption, external data files, extended L2 entries, zstd), TargetUnreachable when a
    file cannot be opened, TargetIOError when a read fails.
    """

    def __init__(self, path: str, *, follow_backing: bool = True, _depth: int = 0) -> None:
        self.path = path
        self._depth = _depth
        self._follow_backing = follow_backing
        self._backing: ImageReader | None = None
        self._l2_cache: dict[int, U64] = {}
        self._fd: int | None = _open_ro(path, "qcow2 image")
        try:
            self._load()
        except OSError as exc:
            self.close()
            raise TargetIOError(f"cannot read qcow2 image {path!r}: {exc.strerror}") from exc
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        fd = self._require_fd()
        name = repr(self.path)
        # Every table and name the header points at must lie inside the file: checked
        # before it is read, so a forged size never becomes an allocation.
        file_size = _file_size(fd)
        head = os.pread(fd, V3_HEADER_LENGTH, 0)
        header = Qcow2Header.unpack(head, name)
        cluster0 = os.pread(fd, header.cluster_size, 0)
        header = Qcow2Header.unpack(cluster0, name)
        self.header = header
        self.size = header.size
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        incompat = header.incompatible_features
        if incompat & INCOMPAT_CORRUPT:
            raise Qcow2FormatError(
                f"{name} is marked corrupt (an interrupted backup's partial file is too)"
            )
        unsupported = incompat & ~INCOMPAT_DIRTY
        if unsupported:
            raise Qcow2FormatError(
                f"{name} uses qcow2 features this reader does not support "
                f"(incompatible_features {unsupported:#x})"
            )
        if header.crypt_method:
            raise Qcow2FormatError(f"{name} is encrypted")
        # Header extensions follow the header, up to the end of cluster 0.
        self.backing_format: str | None = None
        pos = header.header_length
        while pos + 8 <= len(cluster0):
            ext_type, ext_len = struct.unpack_from(">II", cluster0, pos)
            if ext_type == EXT_END:
                break
            if pos + 8 + ext_len > len(cluster0):
                raise Qcow2FormatError(f"{name}: header extension {ext_type:#x} overruns cluster 0")
            if ext_type == EXT_BACKING_FORMAT:
                self.backing_format = cluster0[pos + 8 : pos + 8 + ext_len].decode(errors="replace")
            pos += 8 + ext_len + (-ext_len % 8)
        self.backing_file: str | None = None
        # An empty name means no backing file, as in QEMU (never the image's directory).
        if header.backing_file_offset and header.backing_file_size:
            if header.backing_file_size > MAX_BACKING_NAME:
                raise Qcow2FormatError(f"{name}: backing file name too long")
            raw_name = _pread_exact(fd, header.backing_file_size, header.backing_file_offset,
                                    f"{name}: backing file name")
            if b"\0" in raw_name:
                raise Qcow2FormatError(f"{name}: backing file name contains a NUL byte")
            self.backing_file = os.fsdecode(raw_name)
        self.l2_entries_per_table = self.cluster_size // 8
        needed = ceil_div(ceil_div(self.size, self.cluster_size), self.l2_entries_per_table)
        if header.l1_size < needed:
            raise Qcow2FormatError(
                f"{name}: L1 table has {header.l1_size} entries, {needed} needed for "
                f"{self.size} bytes (an incomplete image?)"
            )
        if header.l1_size * 8 > MAX_L1_BYTES or header.l1_table_offset % self.cluster_size:
            raise Qcow2FormatError(f"{name}: bad L1 table (size or offset)")
        if header.l1_table_offset + header.l1_size * 8 > file_size:
            raise Qcow2FormatError(
                f"{name}: L1 table of {header.l1_size} entries at offset "
                f"{header.l1_table_offset} is past the end of the {file_size}-byte file"
            )
        l1_bytes = _pread_exact(fd, header.l1_size * 8, header.l1_table_offset,
                                f"{name}: L1 table")
        self._l1: U64 = np.frombuffer(l1_bytes, dtype=">u8").astype(np.uint64)

    @property
    def backing_path(self) -> str | None:
        """The backing file as QEMU resolves it, or None."""
        if self.backing_file is None:
            return None
        return resolve_backing(self.path, self.backing_file)

    @property
    def backing(self) -> ImageReader | None:
        """The opened backing image (lazily), or None without one."""
        if self._backing is None and self._follow_backing and self.backing_file is not None:
            path = resolve_backing(self.path, self.backing_file)
            self._backing = open_image(path, self.backing_format, _depth=self._depth + 1)
        return self._backing

    def _require_fd(self) -> int:
        if self._fd is None:
            raise TargetIOError(f"qcow2 image {self.path!r} is closed")
        return self._fd

    def _l2_table(self, l1_index: int) -> U64 | None:
        if l1_index >= len(self._l1):
            return None
        where = int(self._l1[l1_index]) & OFFSET_MASK
        if where == 0:
            return None
        # Keyed by host offset: a forged L1 table that points every entry at one cluster
        # caches it once, so the cache never outgrows the file.
        table = self._l2_cache.get(where)
        if table is not None:
            return table
        if where % self.cluster_size:
            raise Qcow2FormatError(f"{self.path!r}: misaligned L2 table at {where}")
        raw = _pread_exact(self._require_fd(), self.cluster_size, where,
                           f"{self.path!r}: L2 table")
        table = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        self._l2_cache[where] = table
        return table

    def l2_entries(self, first_cluster: int, count: int) -> U64:
        """The L2 entries (native uint64, flags included) of ``count`` guest clusters."""
        out = np.zeros(count, dtype=np.uint64)
        per = self.l2_entries_per_table
        done = 0
        while done < count:
            cluster = first_cluster + done
            index, within = divmod(cluster, per)
            n = min(count - done, per - within)
            table = self._l2_table(index)
            if table is not None:
                out[done : done + n] = table[within : within + n]
            done += n
        return out

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes ``[offset, offset + length)``; raises TargetError outside the disk."""
        out = bytearray(length)
        self.fill(offset, memoryview(out))
        return bytes(out)

    def fill(self, offset: int, out: memoryview) -> None:
        length = len(out)
        if offset < 0 or offset + length > self.size:
            raise TargetError(
                f"read of {length} bytes at {offset} is outside {self.path!r} ({self.size} bytes)"
            )
        if not length:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        try:
            read_mapped(
                out,
                offset,
                self.l2_entries(first, last - first + 1),
                fd=self._require_fd(),
                cluster_bits=self.cluster_bits,
                zero_flag=self.header.version >= 3,
                backing=lambda: self.backing,
                name=repr(self.path),
            )
        except OSError as exc:
            raise TargetIOError(
                f"read of qcow2 image {self.path!r} failed: {exc.strerror}"
            ) from exc

    def close(self) -> None:
        """Close this image and its backing chain. Idempotent."""
        if self._backing is not None:
            backing, self._backing = self._backing, None
            backing.close()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Qcow2Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
