"""qcow2 image target: a version 3 image written append-only, published by rename.

Theory of operation
-------------------
The image is written to ``<path>.part`` and renamed onto ``path`` only by
:meth:`Qcow2Target.commit`, after an ``fsync`` (then the directory is fsynced too), as
:mod:`shmblock.targets.raw` does: ``path`` is never a half-written backup.

Layout (QEMU ``docs/interop/qcow2.txt``), in file order::

    cluster 0        header, header extensions, backing file name
    clusters 1..D    data clusters, appended in the order writes arrive
    D+1..            L2 tables (only those with a non-zero entry), in guest order
                     L1 table
                     refcount blocks, refcount table

* While the job runs only data goes to the file. The L2 entries of every guest cluster
  live in memory in one flat numpy ``uint64`` array (8 bytes per cluster; ``np.zeros``
  is lazily backed, so untouched tables cost no memory); a run of clusters is one
  ``os.pwrite`` at the end of the file plus one vectorised update of its entries (a
  single cluster, the copy-before-write case, uses plain int bookkeeping instead).
* :meth:`~Qcow2Target.write_zeroes` records zero clusters (L2 entry ``QCOW_OFLAG_ZERO``,
  host offset 0): nothing is written. Clusters never written stay unallocated (entry 0,
  or no L2 table at all) and read from the backing file, or as zeros without one.
* :meth:`~Qcow2Target.commit` appends the L2 tables, the L1 table, then refcount blocks
  and the refcount table sized for the final layout (every cluster in the file has
  refcount exactly 1, so ``QCOW_OFLAG_COPIED`` is set on every L1 entry and data L2
  entry, as QEMU does), in one ``pwrite``; fsyncs; writes the real header; fsyncs;
  renames; fsyncs the directory. A cluster written twice is overwritten in place and
  a data cluster later zeroed keeps its host cluster (a "zero, allocated" entry), so no
  cluster ever leaks.

What a killed run leaves behind
-------------------------------
At open, cluster 0 of ``<path>.part`` gets a *placeholder* header: the qcow2 magic,
version 3, the virtual size, but ``l1_size = 0``, no L1 table, no refcount table, and
the dirty and corrupt bits (``incompatible_features = 0x3``) set. The real header is
written only during ``commit``, after everything it points to is on disk. A process
killed with SIGKILL before ``commit`` therefore leaves only ``<path>.part`` (``path``
itself does not exist), holding that placeholder plus the data clusters written so far,
and QEMU refuses it outright (measured with qemu-img 7.2)::

    $ qemu-img info backup.qcow2.part                                     # exit 1
    qemu-img: Could not open 'backup.qcow2.part': Image does not contain a reference count table
    $ qemu-img check backup.qcow2.part                                    # exit 1
    qemu-img: Could not open 'backup.qcow2.part': L1 table is too small
    $ qemu-img check -r all backup.qcow2.part                             # exit 1, same

``qemu-img convert`` (exit 1) and ``qemu-img compare`` (exit 2) fail with the first
message, and :class:`~shmblock.targets.qcow2_format.Qcow2Reader` refuses it as marked
corrupt. A process killed *during* ``commit`` leaves the same placeholder until the
final header is written (after the first fsync); from then until the rename the
``.part`` is a complete, valid image, but still under the temporary name, so ``path``
is never a partial backup. ``abort()`` removes the ``.part``. It is created exclusively,
never through a symlink, mode 0600 (:func:`shmblock.targets.base.create_part`): a stale
one from a killed run makes the next job to the same path fail clearly until
``shmblock-run cleanup`` removes it, since it cannot be told apart from a running job's.
"""

from __future__ import annotations

import os

import numpy as np

from shmblock.errors import TargetError, TargetIOError, TargetUnreachable
from shmblock.targets.base import (
    PART_SUFFIX,
    Buffer,
    Target,
    Writeback,
    check_file_target,
    create_part,
    discard_part,
    publish_part,
)
from shmblock.targets.qcow2_format import (
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    OFFSET_MASK,
    OFLAG_COPIED,
    OFLAG_ZERO,
    U64,
    ImageReader,
    Qcow2Header,
    Qcow2Reader,
    build_header_cluster,
    ceil_div,
    cluster_bits_of,
    open_image,
    plan_refcounts,
    read_mapped,
    resolve_backing,
)

_COPIED = np.uint64(OFLAG_COPIED)
_ZERO = np.uint64(OFLAG_ZERO)
_OFFSET = np.uint64(OFFSET_MASK)


class Qcow2Target(Target):
    """A qcow2 (version 3) image, written append-only and published by rename on commit.

    ``backing_file`` is stored as given (a relative name is relative to the image's
    directory, as QEMU resolves it) with ``backing_format`` in the backing-format header
    extension; clusters the job never writes or zeroes then read from it.

    Raises TargetError for a bad cluster size or backing name, TargetUnreachable when the
    file (or the named backing file) cannot be opened, TargetIOError when I/O fails.
    """

    kind = "qcow2"
    punches_zeroes = True

    def __init__(
        self,
        path: str,
        size: int,
        cluster_size: int,
        *,
        backing_file: str | None = None,
        backing_format: str | None = None,
    ) -> None:
        self._cluster_bits = cluster_bits_of(cluster_size)
        super().__init__(size, cluster_size)
        self.starts_zeroed = backing_file is None
        self.path = os.path.abspath(path)
        self.part_path = self.path + PART_SUFFIX
        self.backing_file = backing_file
        self.backing_format = backing_format
        self._fd: int | None = None
        self._committed = False
        self._sealed = False  # metadata written (seal): no more data writes
        self._closed = False
        self._reader: Qcow2Reader | None = None
        self._backing: ImageReader | None = None

        self._l2_size = cluster_size // 8  # entries per L2 table
        self._l1_size = ceil_div(size // cluster_size, self._l2_size)
        if self._l1_size * 8 > MAX_L1_BYTES:
            raise TargetError(
                f"a {size}-byte qcow2 image with {cluster_size}-byte clusters needs an L1 "
                f"table larger than QEMU's 32 MiB limit; use larger clusters"
            )
        if backing_format is not None and backing_file is None:
            raise TargetError("a qcow2 backing format was given without a backing file")
        if backing_file is not None:
            if not backing_file:
                raise TargetError("the qcow2 backing file name is empty")
            if not os.path.exists(resolve_backing(self.path, backing_file)):
                raise TargetUnreachable(
                    f"qcow2 backing file {backing_file!r} does not exist (relative names "
                    f"are relative to the directory of {path!r})"
                )
        # Fails early (before any file exists) if the backing name cannot fit.
        build_header_cluster(self._final_header(0, 0, 0), backing_file, backing_format)

        check_file_target(self.kind, path)
        # Guest cluster c's L2 entry is _entries[c]; padded to whole L2 tables so the
        # array reshapes to (l1_size, l2_size) at commit.
        self._entries: U64 = np.zeros(self._l1_size * self._l2_size, dtype=np.uint64)
        self._end = cluster_size  # next free host offset: data starts after the header
        self._fd = create_part(self.part_path, self.kind)
        # Data appended during the job starts going to disk at once (see Writeback):
        # the fsync in seal then finds little left to write.
        self._writeback = Writeback(self._fd)
        try:
            self._pwrite(self._fd, memoryview(self._placeholder_header()), 0, "header")
        except TargetIOError:
            self._discard()
            raise

    # -- headers ---------------------------------------------------------------------------

    def _placeholder_header(self) -> bytes:
        """Cluster 0 while the job runs: no L1 or refcount table, dirty and corrupt.

        QEMU refuses to open it ("Image does not contain a reference count table"), so a
        partial file left by a killed process never passes for a backup.
        """
        header = Qcow2Header(
            cluster_bits=self._cluster_bits,
            size=self.size,
            incompatible_features=INCOMPAT_DIRTY | INCOMPAT_CORRUPT,
        )
        return build_header_cluster(header, None, None)

    def _final_header(
        self, l1_offset: int, reftable_offset: int, reftable_clusters: int
    ) -> Qcow2Header:
        return Qcow2Header(
            cluster_bits=self._cluster_bits,
            size=self.size,
            l1_size=self._l1_size,
            l1_table_offset=l1_offset,
            refcount_table_offset=reftable_offset,
            refcount_table_clusters=reftable_clusters,
        )

    # -- I/O helpers -----------------------------------------------------------------------

    def _writable_fd(self) -> int:
        if self._committed or self._sealed:
            raise TargetError(f"qcow2 target {self.path!r} is already committed")
        return self._require_open_fd()

    def _require_open_fd(self) -> int:
        if self._fd is None:
            raise TargetIOError(f"qcow2 target {self.path!r} is closed")
        return self._fd

    def _pwrite(self, fd: int, view: memoryview, offset: int, what: str) -> None:
        try:
            while view:
                # pwrite may write less than asked (signals, huge sizes): loop on the rest.
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
                self._writeback.wrote(written)
        except OSError as exc:
            raise TargetIOError(
                f"write of {what} to qcow2 target {self.part_path!r} at offset {offset} "
                f"failed: {exc.strerror}"
            ) from exc

    def _check_aligned(self, offset: int, length: int) -> None:
        mask = self.cluster_size - 1
        if offset & mask or length & mask:
            raise TargetError(
                f"qcow2 target writes must be whole {self.cluster_size}-byte clusters: "
                f"got {length} bytes at offset {offset}"
            )

    # -- the Target interface --------------------------------------------------------------

    def write(self, offset: int, data: Buffer) -> None:
        fd = self._writable_fd()
        view = memoryview(data).cast("B")
        length = len(view)
        self._check_range(offset, length)
        self._check_aligned(offset, length)
        if not length:
            return
        first = offset >> self._cluster_bits
        count = length >> self._cluster_bits
        if count == 1:
            # A single copy-before-write cluster: plain int bookkeeping beats numpy's
            # per-call overhead (~1 µs against ~7 µs).
            if int(self._entries[first]) & OFFSET_MASK:
                self._rewrite(fd, first, view)
                return
            host = self._end
            self._pwrite(fd, view, host, "data")
            self._end = host + length
            self._entries[first] = host | OFLAG_COPIED
            return
        entries = self._entries[first : first + count]
        if (entries & _OFFSET).any():
            self._rewrite(fd, first, view)
            return
        # The normal case: fresh clusters, appended contiguously in one pwrite.
        host = self._end
        self._pwrite(fd, view, host, "data")
        self._end = host + length
        entries[:] = np.arange(host, host + length, self.cluster_size, dtype=np.uint64)
        entries |= _COPIED

    def _rewrite(self, fd: int, first: int, view: memoryview) -> None:
        """Clusters of which some already own a host cluster: overwrite those in place.

        Never happens in a normal job (each cluster is saved once); kept correct and
        leak-free, not fast.
        """
        cs = self.cluster_size
        for i in range(len(view) // cs):
            cluster = first + i
            host = int(self._entries[cluster]) & OFFSET_MASK
            if host:
                self._pwrite(fd, view[i * cs : (i + 1) * cs], host, "data")
            else:
                host = self._end
                self._pwrite(fd, view[i * cs : (i + 1) * cs], host, "data")
                self._end = host + cs
            self._entries[cluster] = host | OFLAG_COPIED

    def write_zeroes(self, offset: int, length: int) -> None:
        self._writable_fd()
        self._check_range(offset, length)
        self._check_aligned(offset, length)
        first = offset >> self._cluster_bits
        entries = self._entries[first : first + (length >> self._cluster_bits)]
        host = entries & _OFFSET
        # A cluster that already owns a host cluster keeps it ("zero, allocated"): the
        # host cluster stays referenced, so it does not leak.
        entries[:] = np.where(host != 0, host | _COPIED | _ZERO, _ZERO)

    def commit(self) -> None:
        if not self._sealed:
            self.seal()
        publish_part(self._require_open_fd(), self.part_path, self.path, self.kind)
        self._committed = True
        self._close_fd()

    def seal(self) -> None:
        """Write the metadata and the final header and make them durable: the ``.part``
        is a complete image, not yet published (the supervisor renames it when the
        job is finalized, :mod:`shmblock.backup_job`)."""
        fd = self._writable_fd()
        cs = self.cluster_size
        tables = self._entries.reshape(self._l1_size, self._l2_size)
        used = np.flatnonzero(tables.any(axis=1))
        l2_offset = self._end
        l1_offset = l2_offset + len(used) * cs
        l1_clusters = ceil_div(self._l1_size * 8, cs)
        refblock_offset = l1_offset + l1_clusters * cs
        refblocks, reftable_clusters = plan_refcounts(refblock_offset // cs, cs)
        if reftable_clusters * cs > MAX_REFTABLE_BYTES:
            raise TargetIOError(f"qcow2 target {self.path!r} outgrew QEMU's refcount table limit")
        reftable_offset = refblock_offset + refblocks * cs
        image_end = reftable_offset + reftable_clusters * cs

        # All metadata in one buffer, one pwrite; big-endian views fill its parts.
        meta = np.zeros(image_end - l2_offset, dtype=np.uint8)
        parts = np.cumsum([0, len(used) * cs, l1_clusters * cs, refblocks * cs])
        l2_part = meta[parts[0] : parts[1]].view(">u8").reshape(len(used), self._l2_size)
        l2_part[:] = tables[used]
        l1 = meta[parts[1] : parts[2]].view(">u8")
        l1[used] = np.uint64(l2_offset) + np.arange(len(used), dtype=np.uint64) * np.uint64(cs)
        l1[used] |= _COPIED
        meta[parts[2] : parts[3]].view(">u2")[: image_end // cs] = 1
        reftable = meta[parts[3] :].view(">u8")
        reftable[:refblocks] = np.arange(refblocks, dtype=np.uint64) * np.uint64(cs)
        reftable[:refblocks] += np.uint64(refblock_offset)

        header = build_header_cluster(
            self._final_header(l1_offset, reftable_offset, reftable_clusters),
            self.backing_file,
            self.backing_format,
        )
        self._pwrite(fd, memoryview(meta.data), l2_offset, "metadata")
        try:
            # Drop anything past the image (a write that failed half-way), then make the
            # data and metadata durable before the header that points at them.
            os.ftruncate(fd, image_end)
            os.fsync(fd)
        except OSError as exc:
            raise TargetIOError(
                f"cannot flush qcow2 target {self.part_path!r}: {exc.strerror}"
            ) from exc
        self._pwrite(fd, memoryview(header), 0, "header")
        self._sealed = True

    def read(self, offset: int, length: int) -> bytes:
        """Read back through the image's tables: after commit, the published file's own
        L1/L2 tables parsed from disk; before, the in-memory ones."""
        if self._closed:
            raise TargetIOError(f"qcow2 target {self.path!r} is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TargetError(
                f"read of {length} bytes at offset {offset} is outside the target "
                f"({self.size} bytes)"
            )
        if self._committed:
            if self._reader is None:
                self._reader = Qcow2Reader(self.path)
            return self._reader.read(offset, length)
        fd = self._writable_fd()
        out = bytearray(length)
        if not length:
            return bytes(out)
        first = offset >> self._cluster_bits
        last = (offset + length - 1) >> self._cluster_bits
        try:
            read_mapped(
                memoryview(out),
                offset,
                self._entries[first : last + 1],
                fd=fd,
                cluster_bits=self._cluster_bits,
                zero_flag=True,
                backing=self._open_backing,
                name=repr(self.part_path),
            )
        except OSError as exc:
            raise TargetIOError(
                f"read-back of qcow2 target {self.part_path!r} failed: {exc.strerror}"
            ) from exc
        return bytes(out)

    def _open_backing(self) -> ImageReader | None:
        if self._backing is None and self.backing_file is not None:
            path = resolve_backing(self.path, self.backing_file)
            self._backing = open_image(path, self.backing_format)
        return self._backing

    def abort(self) -> None:
        if not self._committed:
            self._discard()

    def _discard(self) -> None:
        self.close()
        discard_part(self.part_path)

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def close(self) -> None:
        self._closed = True
        self._close_fd()
        for reader in (self._reader, self._backing):
            if reader is not None:
                reader.close()
        self._reader = self._backing = None

    def describe(self) -> str:
        return self.path
