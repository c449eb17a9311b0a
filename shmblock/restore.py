"""Restore: write a backup back into a device file or a live device, then verify it.

::

    from shmblock.restore import restore, restore_to_device

    result = restore("incr2.qcow2", "disk.raw")               # a new device file
    result = restore("nbd+unix:///b?socket=s", "disk.raw", overwrite=True)
    result = restore_to_device(engine.devices["dev0"], "incr2.qcow2")  # a live device

Theory of operation
-------------------
**The source** is a raw image, a qcow2 image (with its backing chain, as QEMU reads it:
relative backing names resolve against the image's directory) or an NBD export
(``nbd://``, ``nbd+unix://``; read-only exports are fine). Before a byte is written the
whole chain is opened link by link (:func:`inspect_source`) and refused with a
:class:`ChainError` naming the link when a backing file is missing or unreadable, a
link's virtual size differs from the top's (a chain of backups of one device has one
size; QEMU would read a shorter backing file as zeros past its end, which hides a wrong
link), a link is visited twice (a loop, by inode), the chain is deeper than
``MAX_CHAIN_DEPTH``, a backing format is not raw or qcow2, or a link's contents contradict
its declared format (``raw`` declared over a file with the qcow2 magic would restore
qcow2 metadata as disk contents). Cluster sizes may differ between links: the reader
maps guest bytes, and the restore works at the largest cluster size of the chain, so
nothing depends on them being equal. A corrupt image is a :class:`ChainError` too (the
qcow2 reader checks every offset; see ``docs/architecture.md``, "Verification").

**The copy** never touches single bytes from Python. The chain's allocation is read
from the L2 tables of every qcow2 link (and ``SEEK_DATA``/``SEEK_HOLE`` of a raw base),
so unallocated ranges are skipped without being read; the rest is read through the
chain in chunks of :data:`CHUNK` (8 MiB) into one reused buffer, all-zero clusters are
found with a vectorised check, and only the runs that hold data are written with
``os.pwrite`` from memoryviews of that buffer. A new destination is a sparse file, so
the restored image stays sparse. An NBD export has no allocation information in our
client (it negotiates no structured replies, so no ``NBD_CMD_BLOCK_STATUS``): every
byte is read, and the zero check still keeps the destination sparse.

**The destination file** is never written in place. The restore goes to
``DEST.part`` (created exclusively, ``O_NOFOLLOW``, 0600: :mod:`shmblock.paths`), is
fsynced, verified, and only then renamed onto ``DEST`` (the directory is fsynced too).
A failed or interrupted restore therefore leaves an existing ``DEST`` exactly as it was
(and removes its own ``.part``). Rules:

* an existing ``DEST`` is replaced only with ``overwrite=True`` (``--force``), and only
  if it is a regular file (never a symlink, directory, FIFO or device node) of exactly
  the backup's virtual size (a device file maps a device of its own size, and a size
  that differs means the wrong file), that no live process has open or mapped (a
  running device still writing into it would write on into the replaced inode);
* a new ``DEST`` is created with exactly the backup's virtual size;
* neither ``DEST`` nor ``DEST.part`` may be the source or any link of its chain
  (compared by resolved path and by inode, :func:`shmblock.paths.check_distinct`).

**A live device** of an :class:`~shmblock.engine.Engine` is written through its guest
write path (``DeviceHandle.write``, so copy-before-write and the dirty bitmaps see the
restore like any guest write) while none of its writer processes runs and no backup
job of it is running. The device must be at least as large as the backup; bytes past
the backup's size are left as they were (the result says how many). Only clusters whose
contents differ from the device's are written, so restoring an older backup of the same
device writes (and marks dirty) just what changed.

**Verification** (on by default) re-reads both sides independently — the source through
a freshly opened chain or a new NBD connection, the destination through the file (or
``DeviceHandle.read``) — and compares them cluster by cluster, chunk by chunk. Both
sides of a chunk are in memory together, so the comparison is exact (a vectorised
``!=`` over 64-bit words per cluster), not by digests: as strong as comparing digests of
each cluster and a fraction of the cost of hashing both sides. A mismatch raises
:class:`~shmblock.errors.VerificationError` naming the first differing offsets, and a
file destination is then not published.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from shmblock import paths
from shmblock.bitmaps.store import mark_all_dirty
from shmblock.copier import nonzero_clusters, runs
from shmblock.errors import (
    NoSpaceError,
    ShmblockError,
    TargetError,
    UsageError,
    VerificationError,
)
from shmblock.targets import is_nbd_uri
from shmblock.targets.nbd import NbdTarget
from shmblock.targets.qcow2_format import (
    MAGIC,
    MAX_CHAIN_DEPTH,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    Qcow2Reader,
    resolve_backing,
)

if TYPE_CHECKING:
    from shmblock.engine import DeviceHandle

SOURCE_FORMATS = ("raw", "qcow2", "nbd", "repo")
#: bytes read and written per step: large enough that syscalls and numpy calls are noise,
#: small enough that the buffer stays in a few hundred pages of cache
CHUNK = 8 << 20
#: granularity of the zero check and the digests when the source has no clusters of its
#: own (raw, NBD): shmblock's default cluster size
DEFAULT_GRAIN = 64 << 10
NBD_TIMEOUT = 30.0

U8Array = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]
#: told (phase, bytes done, bytes total) as the copy ("restore"), then the verification
#: ("verify"), advance
Progress = Callable[[str, int, int], None]


class RestoreError(ShmblockError):
    """A restore failed: the source cannot be read, or the destination not written."""


class ChainError(RestoreError):
    """The backup (or a link of its backing chain) is missing, mismatched or corrupt."""


# -- the source ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainLink:
    """One image of a backup's chain, top first."""

    path: str
    format: str  # raw | qcow2 | nbd
    size: int
    cluster_size: int | None = None  # qcow2 only
    backing_file: str | None = None  # as written in the image
    backing_format: str | None = None


def _probe_format(path: str, what: str = "backup") -> str:
    # Through _open_regular: a FIFO named as a backing file must not hang the probe.
    fd, _ = _open_regular(path, what)
    try:
        return "qcow2" if os.pread(fd, 4, 0) == MAGIC else "raw"
    except OSError as exc:
        raise ChainError(f"cannot read {what} {path!r}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _open_regular(path: str, what: str) -> tuple[int, os.stat_result]:
    """Open a link read-only; refuse what is not a regular file or block device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ChainError(f"{what} {path!r} does not exist") from None
    except OSError as exc:
        raise ChainError(f"cannot open {what} {path!r}: {exc.strerror}") from exc
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        os.close(fd)
        raise ChainError(f"{what} {path!r} is {paths.describe_mode(st.st_mode)}, not an "
                         "image file")
    return fd, st


def inspect_source(source: str, fmt: str | None = None,
                   timeout: float = NBD_TIMEOUT) -> list[ChainLink]:
    """Open and check every link of a backup's chain, top first; nothing is copied.

    Raises UsageError for a bad format name and ChainError (naming the link) for a
    chain that cannot be restored: see the module docstring for the rules.
    """
    if fmt is not None and fmt not in SOURCE_FORMATS:
        raise UsageError(f"unknown source format {fmt!r} (expected one of "
                         f"{', '.join(SOURCE_FORMATS)})")
    from shmblock.repo.url import is_repo_url
    if is_repo_url(source) or fmt == "repo":
        # A backup in a repository (s3://bucket/prefix/<backup-id>): one manifest, no
        # chain; every chunk is checked against its digest as it is read.
        from shmblock.repo.source import open_backup
        try:
            with contextlib.closing(open_backup(source, timeout=timeout)) as backup:
                m = backup.manifest
        except UsageError:
            raise
        except ShmblockError as exc:
            raise ChainError(f"cannot read backup {source!r}: {exc}") from exc
        return [ChainLink(source, "repo", m.size, m.chunk_size)]
    if is_nbd_uri(source):
        if fmt not in (None, "nbd"):
            raise UsageError(f"{source!r} is an NBD URI; its format can only be nbd")
        with _open_nbd(source, timeout) as nbd:
            return [ChainLink(source, "nbd", nbd.size)]
    if fmt == "nbd":
        raise UsageError(f"format nbd needs an nbd:// or nbd+unix:// URI, not {source!r}")
    fd, _ = _open_regular(source, "backup")
    os.close(fd)
    probed = _probe_format(source)
    if fmt is None:
        fmt = probed
    elif fmt == "raw" and probed == "qcow2":
        raise UsageError(f"{source!r} is a qcow2 image: restoring it as raw would copy its "
                         "metadata as disk contents (use --format qcow2, or leave it out)")
    links: list[ChainLink] = []
    seen: dict[tuple[int, int], int] = {}
    path, link_fmt, parent = source, fmt, ""
    while True:
        n = len(links) + 1
        what = "backup" if n == 1 else f"link {n} of the chain (backing file of {parent!r})"
        if n > MAX_CHAIN_DEPTH:
            raise ChainError(f"the backing chain of {source!r} is deeper than "
                             f"{MAX_CHAIN_DEPTH} links at {path!r}")
        fd, st = _open_regular(path, what)
        os.close(fd)
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            raise ChainError(f"the backing chain of {source!r} has a loop: {what} {path!r} "
                             f"is link {seen[ident]} again")
        seen[ident] = n
        if link_fmt not in ("raw", "qcow2"):
            raise ChainError(f"{parent!r} names backing file {path!r} of format "
                             f"{link_fmt!r}; only raw and qcow2 backing files can be "
                             "restored")
        probed = _probe_format(path, what)
        if link_fmt == "raw":
            if probed == "qcow2" and n > 1:
                raise ChainError(f"{what} {path!r} is declared raw but is a qcow2 image "
                                 "(a wrong backing format: it would be read as raw bytes)")
            link = ChainLink(path, "raw", _size_of(path, what))
        else:
            if probed != "qcow2":
                raise ChainError(f"{what} {path!r} is not a qcow2 image (bad magic)")
            try:
                with Qcow2Reader(path, follow_backing=False) as img:
                    link = ChainLink(path, "qcow2", img.size, img.cluster_size,
                                     img.backing_file, img.backing_format)
                    # The L2 tables must be readable too: a corrupt table is found
                    # here, before the destination exists.
                    _qcow2_allocated(img)
            except TargetError as exc:
                raise ChainError(f"{what} {path!r} cannot be read: {exc}") from exc
        if links and link.size != links[0].size:
            raise ChainError(f"{what} {path!r} has a virtual size of {link.size} bytes, "
                             f"the backup {source!r} has {links[0].size}: not a link of "
                             "this chain")
        links.append(link)
        if link.backing_file is None:
            return links
        parent = path
        path = resolve_backing(path, link.backing_file)
        if link.backing_format is None:
            # QEMU probes when no format is recorded; so do we (for raw/qcow2 only).
            # A missing file is reported by name at the top of the loop.
            link_fmt = _probe_format(path, f"link {len(links) + 1} of the chain (backing "
                                     f"file of {parent!r})") if os.path.lexists(path) else "raw"
        else:
            link_fmt = link.backing_format


def _size_of(path: str, what: str) -> int:
    fd, _ = _open_regular(path, what)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _qcow2_allocated(img: Qcow2Reader) -> BoolArray:
    """Which guest clusters of this one image hold data (plain or compressed)."""
    n = -(-img.size // img.cluster_size)
    entries = img.l2_entries(0, n)
    mask = np.uint64(OFFSET_MASK | OFLAG_COMPRESSED)
    return np.asarray((entries & mask) != 0, dtype=np.bool_)


def _raw_extents(path: str, size: int) -> list[tuple[int, int]]:
    """Data extents of a raw file by SEEK_DATA/SEEK_HOLE (all of it if unsupported)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        out: list[tuple[int, int]] = []
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # nothing but a hole from pos on
                return [(0, size)]  # no SEEK_DATA here: treat everything as data
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if start >= size:
                break
            out.append((start, end))
            pos = end
        return out
    finally:
        os.close(fd)


def allocation(links: list[ChainLink], grain: int) -> BoolArray:
    """Clusters of ``grain`` bytes that some link of the chain may hold data in.

    An over-approximation (a zero flag in an upper link may hide data below): every
    candidate is read through the chain and zero-checked, so it only costs reads.
    """
    size = links[0].size
    n = -(-size // grain)
    found = np.zeros(n, dtype=np.bool_)
    if links[0].format == "nbd":
        found[:] = True  # no allocation information over our NBD client
        return found
    if links[0].format == "repo":
        from shmblock.repo.source import open_backup
        with contextlib.closing(open_backup(links[0].path)) as backup:
            return backup.allocated(grain)
    for link in links:
        if link.format == "raw":
            for a, b in _raw_extents(link.path, min(link.size, size)):
                found[a // grain : -(-b // grain)] = True
            continue
        assert link.cluster_size is not None
        with Qcow2Reader(link.path, follow_backing=False) as img:
            per_link = _qcow2_allocated(img)
        ratio = grain // link.cluster_size  # grain is the chain's largest cluster size
        padded = np.zeros(n * ratio, dtype=np.bool_)
        padded[: min(per_link.size, padded.size)] = per_link[: padded.size]
        found |= padded.reshape(n, ratio).any(axis=1)
    return found


class _Reader(Protocol):
    size: int

    def fill(self, offset: int, out: memoryview) -> None: ...

    def close(self) -> None: ...


class _NbdSource(NbdTarget):
    """An NBD export opened for reading: any size, read-only exports welcome."""

    def __init__(self, uri: str, timeout: float) -> None:
        # The export's size is only known after the handshake: start from a placeholder
        # that passes the target's checks, then take the export's (_check_export).
        super().__init__(uri, 4096, 4096, timeout=timeout)

    def _check_export(self) -> None:
        export = self.export
        minimum = export.minimum_block
        if minimum <= 0 or minimum & (minimum - 1) or export.size % minimum:
            raise TargetError(f"NBD export {self.uri} has {export.size} bytes in blocks of "
                              f"{minimum}: not something a block device restores from")
        if export.size == 0:
            raise TargetError(f"NBD export {self.uri} is empty")
        self.size = export.size

    def fill(self, offset: int, out: memoryview) -> None:
        out[:] = self.read(offset, len(out))


@contextlib.contextmanager
def _open_nbd(uri: str, timeout: float) -> Iterator[_NbdSource]:
    try:
        source = _NbdSource(uri, timeout)
    except UsageError:
        raise  # a malformed URI (NbdUriError) is bad usage, not a broken backup
    except TargetError as exc:
        raise ChainError(f"cannot read the NBD export: {exc}") from exc
    try:
        yield source
    finally:
        source.close()


class _RawSource:
    def __init__(self, path: str) -> None:
        self.fd, _ = _open_regular(path, "backup")
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.path = path

    def fill(self, offset: int, out: memoryview) -> None:
        done = 0
        while done < len(out):
            got = os.preadv(self.fd, [out[done:]], offset + done)
            if got == 0:
                raise RestoreError(f"backup {self.path!r} ended at {offset + done} bytes")
            done += got

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def open_source(links: list[ChainLink], timeout: float = NBD_TIMEOUT) -> Iterator[_Reader]:
    """A reader of the whole chain (guest bytes of the top), opened afresh."""
    top = links[0]
    if top.format == "nbd":
        with _open_nbd(top.path, timeout) as nbd:
            yield nbd
        return
    if top.format == "repo":
        from shmblock.repo.source import open_backup
        with contextlib.closing(open_backup(top.path, timeout=timeout)) as backup:
            yield backup
        return
    reader: _Reader
    try:
        reader = _RawSource(top.path) if top.format == "raw" else Qcow2Reader(top.path)
    except TargetError as exc:
        raise ChainError(f"cannot open backup {top.path!r}: {exc}") from exc
    try:
        yield reader
    finally:
        reader.close()


def _grain(links: list[ChainLink]) -> int:
    sizes = [link.cluster_size for link in links if link.cluster_size]
    # At least 64 KiB: a finer grain only adds per-run Python work, and a coarser one
    # is a whole number of every link's clusters (all powers of two).
    return max([DEFAULT_GRAIN, *sizes])


# -- the result ---------------------------------------------------------------------------


@dataclass
class RestoreResult:
    """What a restore did; ``to_dict`` is the CLI's ``--json``."""

    source: str
    format: str
    destination: str
    size: int
    chain: list[ChainLink]
    grain: int
    data_bytes: int = 0  # bytes of non-zero clusters written
    read_bytes: int = 0  # bytes read from the source while copying
    skipped_bytes: int = 0  # never read: unallocated in every link
    tail_bytes_untouched: int = 0  # live device larger than the backup
    copy_s: float = 0.0
    verified: bool | None = None  # None: not asked
    verify_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verified is not False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["throughput_bytes_per_s"] = self.size / self.copy_s if self.copy_s else 0.0
        return d


# -- copying ------------------------------------------------------------------------------


def _chunks(mask: BoolArray, grain: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, candidate) pieces of at most CHUNK bytes, in order."""
    step = max(CHUNK // grain, 1)
    for a, b, value in runs(mask):
        for c in range(a, b, step):
            lo = c * grain
            hi = min(min(c + step, b) * grain, size)
            yield lo, hi - lo, value


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class _Buffer:
    """One reused, grain-padded buffer: numpy view for checks, memoryview for I/O."""

    def __init__(self, grain: int) -> None:
        self.array: U8Array = np.zeros(max(CHUNK, grain), dtype=np.uint8)
        self.view = self.array.data
        self.grain = grain

    def load(self, reader: _Reader, offset: int, length: int) -> U8Array:
        """Fill with ``length`` source bytes at ``offset``; returns the padded slice."""
        padded = -(-length // self.grain) * self.grain
        self.array[:padded] = 0  # the qcow2 reader fills a zeroed buffer
        reader.fill(offset, self.view[:length])
        return self.array[:padded]


def _copy_to_file(reader: _Reader, fd: int, mask: BoolArray, result: RestoreResult,
                  progress: Progress | None) -> None:
    grain, size = result.grain, result.size
    buf = _Buffer(grain)
    done = 0
    for offset, length, candidate in _chunks(mask, grain, size):
        if candidate:
            data = buf.load(reader, offset, length)
            result.read_bytes += length
            for a, b, nonzero in runs(nonzero_clusters(data, grain)):
                if nonzero:
                    lo, hi = a * grain, min(b * grain, length)
                    _pwrite_all(fd, buf.view[lo:hi], offset + lo)
                    result.data_bytes += hi - lo
        else:
            result.skipped_bytes += length
        done += length
        if progress is not None:
            progress("restore", done, size)


def _copy_to_device(reader: _Reader, handle: DeviceHandle, mask: BoolArray,
                    result: RestoreResult, progress: Progress | None) -> None:
    grain, size = result.grain, result.size
    buf = _Buffer(grain)
    done = 0
    for offset, length, candidate in _chunks(mask, grain, size):
        padded = -(-length // grain) * grain
        if candidate:
            data = buf.load(reader, offset, length)
            result.read_bytes += length
        else:
            buf.array[:padded] = 0
            data = buf.array[:padded]
            result.skipped_bytes += length
        current = np.zeros(padded, dtype=np.uint8)
        current[:length] = np.frombuffer(handle.read(offset, length), dtype=np.uint8)
        # Write only the clusters that differ: an unchanged cluster is not rewritten (nor
        # marked dirty), a zero cluster over old data is written as zeros.
        words = (data.view(np.uint64) != current.view(np.uint64)).reshape(-1, grain // 8)
        for a, b, differs in runs(words.any(axis=1)):
            if differs:
                lo, hi = a * grain, min(b * grain, length)
                handle.write(offset + lo, buf.view[lo:hi])
                result.data_bytes += hi - lo
        done += length
        if progress is not None:
            progress("restore", done, size)


# -- verification ------------------------------------------------------------------------


def _compare(reader: _Reader, read_dest: Callable[[int, int], U8Array], result: RestoreResult,
             progress: Progress | None) -> None:
    """Raise VerificationError unless the destination holds the source, cluster by cluster."""
    grain, size = result.grain, result.size
    buf = _Buffer(grain)
    bad: list[int] = []
    t0 = time.monotonic()
    for offset in range(0, size, CHUNK):  # CHUNK is a multiple of every grain
        length = min(CHUNK, size - offset)
        src = buf.load(reader, offset, length)
        dst = read_dest(offset, length)
        # Both sides of the chunk are in memory at once, so they are compared byte for
        # byte (one vectorised pass, exact) rather than by digests of each (a digest
        # pays off only when the two sides are not at hand together, as in a backup's
        # verification against its snapshot; for a 1 GiB half-data chain, hashing
        # both sides made the verification take 2.7 s, this takes about 0.5 s).
        differs = (src.view(np.uint64) != dst.view(np.uint64)).reshape(-1, grain // 8)
        bad += [offset + c * grain for c in np.flatnonzero(differs.any(axis=1)).tolist()]
        if progress is not None:
            progress("verify", offset + length, size)
    result.verify_s = time.monotonic() - t0
    result.verified = not bad
    if bad:
        shown = ", ".join(str(b) for b in sorted(bad)[:10])
        raise VerificationError(
            f"{len(bad)} cluster(s) of {grain} bytes of the restored {result.destination!r} "
            f"differ from the backup {result.source!r} (first offsets: {shown})")


def _file_reader(fd: int, grain: int) -> Callable[[int, int], U8Array]:
    def read(offset: int, length: int) -> U8Array:
        padded = -(-length // grain) * grain
        out = np.zeros(padded, dtype=np.uint8)
        view = out.data[:length]
        done = 0
        while done < length:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise VerificationError(f"the restored file is short at {offset + done}")
            done += got
        return out
    return read


# -- destinations ---------------------------------------------------------------------------


def check_destination(dest: str, links: list[ChainLink], overwrite: bool) -> None:
    """Refuse a destination file that must not be written (UsageError); see the rules."""
    if is_nbd_uri(dest):
        raise UsageError(f"destination {dest!r}: restore writes a device file or a live "
                         "device, not an NBD export")
    paths.check_output("destination", dest)
    # First: "the same file as the backup" says more than any size or existence rule.
    files = paths.with_parts("destination", dest)
    files += [("the backup" if i == 0 else f"link {i + 1} of the backup's chain", link.path)
              for i, link in enumerate(links) if link.format not in ("nbd", "repo")]
    paths.check_distinct(files)
    size = links[0].size
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not overwrite:
            raise UsageError(f"destination {dest!r} exists; give --force (overwrite=True) "
                             "to replace it with the restored backup")
        if st.st_size != size:
            raise UsageError(f"destination {dest!r} has {st.st_size} bytes, the backup "
                             f"{size}: a device file is replaced only by a backup of its "
                             "own size")
    paths.check_no_part("destination", dest)
    if st is not None and (st.st_dev, st.st_ino) in paths.inodes_in_use():
        raise UsageError(f"destination {dest!r} is open or mapped by a running process "
                         "(a device of a live run?); stop it first")


def _check_free_space(dest: str, links: list[ChainLink], needed: int) -> None:
    """Refuse (NoSpaceError) a restore whose allocated data cannot fit where ``dest`` goes.

    ``needed`` counts every grain some link allocates: an upper bound for a qcow2 chain
    or a sparse raw image. An NBD export gives no allocation, so nothing is refused (its
    zeros are never written, and a full disk still fails cleanly as ENOSPC).
    """
    if links[0].format in ("nbd", "repo"):
        return
    st = os.statvfs(os.path.dirname(os.path.abspath(dest)))
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise NoSpaceError(f"restoring {links[0].path!r} needs up to {needed / 2**20:.0f} MiB "
                           f"of data in {os.path.dirname(os.path.abspath(dest))!r}, which "
                           f"has {free / 2**20:.0f} MiB free")


def restore(source: str, dest: str, *, format: str | None = None, overwrite: bool = False,
            verify: bool = True, progress: Progress | None = None,
            timeout: float = NBD_TIMEOUT) -> RestoreResult:
    """Restore ``source`` (raw, qcow2 chain or NBD URI) into the device file ``dest``.

    Returns a :class:`RestoreResult`. Raises UsageError (bad format, destination
    exists without ``overwrite``, wrong size, symlink, same file as a link), ChainError
    (missing, mismatched or corrupt link), VerificationError (the copy does not match;
    ``dest`` is left as it was) or RestoreError (an I/O error).
    """
    links = inspect_source(source, format, timeout)
    check_destination(dest, links, overwrite)
    result = RestoreResult(source, links[0].format, dest, links[0].size, links, _grain(links))
    mask = allocation(links, result.grain)
    _check_free_space(dest, links, int(np.count_nonzero(mask)) * result.grain)
    part = dest + paths.PART_SUFFIX
    try:
        fd = paths.create_part(part)
    except OSError as exc:
        raise RestoreError(paths.explain_create_error(part, exc, "restore")) from exc
    created = os.fstat(fd)
    published = False
    try:
        t0 = time.monotonic()
        os.ftruncate(fd, result.size)
        with open_source(links, timeout) as reader:
            _copy_to_file(reader, fd, mask, result, progress)
        os.fsync(fd)
        result.copy_s = time.monotonic() - t0
        if verify:
            with open_source(links, timeout) as reader:
                _compare(reader, _file_reader(fd, result.grain), result, progress)
        # The device file's recording bitmaps cannot see this write: all dirty, before
        # the new contents appear (and after, for a store a deleted file left behind).
        existed = os.path.exists(dest)
        mark_all_dirty(dest)
        paths.publish(fd, part, dest)
        published = True
        if not existed:
            mark_all_dirty(dest)
    except OSError as exc:
        raise RestoreError(f"restore into {dest!r} failed: {exc.strerror or exc}") from exc
    except TargetError as exc:
        raise RestoreError(f"restore from {source!r} failed: {exc}") from exc
    finally:
        os.close(fd)
        if not published:
            # Only the .part we made (same inode): never another process's file.
            paths.remove_part(part, (created.st_dev, created.st_ino), 0.0)
    return result


def restore_to_device(handle: DeviceHandle, source: str, *, format: str | None = None,
                      verify: bool = True, progress: Progress | None = None,
                      timeout: float = NBD_TIMEOUT) -> RestoreResult:
    """Restore ``source`` into a live device through its guest write path.

    None of the device's writer processes may be running and no backup job of it may
    be running (UsageError). The device must be at least as large as the backup; bytes
    past it are left as they were. Raises as :func:`restore`; after a VerificationError
    the device holds whatever was written.
    """
    engine = handle.engine
    if any(w.alive for w in engine.writers if w.device is handle):
        raise UsageError(f"device {handle.name} has writer processes running; restore "
                         "only while no writers run")
    if any(not j.tracker.concluded for j in engine.jobs.values() if j.device is handle):
        raise UsageError(f"device {handle.name} has a backup job running")
    links = inspect_source(source, format, timeout)
    size = links[0].size
    if size > handle.size:
        raise UsageError(f"the backup {source!r} holds {size} bytes, more than device "
                         f"{handle.name} ({handle.size} bytes)")
    backing = handle.device.backing_file
    if backing:
        paths.check_distinct([(f"the file of device {handle.name}", backing)]
                             + [(f"link {i + 1} of the backup's chain", link.path)
                                for i, link in enumerate(links)
                                if link.format not in ("nbd", "repo")])
    grain = max(_grain(links), handle.cluster_size)
    result = RestoreResult(source, links[0].format, f"device {handle.name}", size, links,
                           grain, tail_bytes_untouched=handle.size - size)
    mask = allocation(links, grain)
    t0 = time.monotonic()
    try:
        with open_source(links, timeout) as reader:
            _copy_to_device(reader, handle, mask, result, progress)
        result.copy_s = time.monotonic() - t0
        if verify:
            def read_device(offset: int, length: int) -> U8Array:
                out = np.zeros(-(-length // grain) * grain, dtype=np.uint8)
                out[:length] = np.frombuffer(handle.read(offset, length), dtype=np.uint8)
                return out

            with open_source(links, timeout) as reader:
                _compare(reader, read_device, result, progress)
    except TargetError as exc:
        raise RestoreError(f"restore from {source!r} failed: {exc}") from exc
    return result


def summary_lines(result: RestoreResult) -> list[str]:
    """The human summary the CLI prints."""
    from shmblock.units import format_rate, format_size

    chain = " → ".join(os.path.basename(link.path) if link.format not in ("nbd", "repo")
                       else link.path
                       for link in result.chain)
    lines = [f"restore  {result.source} ({result.format}, {len(result.chain)} link(s): "
             f"{chain}) → {result.destination}",
             f"         {format_size(result.size)} in {result.copy_s:.2f} s "
             f"({format_rate(result.size / result.copy_s if result.copy_s else 0)}): "
             f"{format_size(result.data_bytes)} written, "
             f"{format_size(result.skipped_bytes)} unallocated (skipped)"]
    if result.verified is True:
        lines.append(f"verify   ok: every {format_size(result.grain)} cluster matches the "
                     f"backup ({result.verify_s:.2f} s)")
    elif result.verified is None:
        lines.append("verify   skipped (--no-verify)")
    return lines
