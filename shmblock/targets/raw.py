"""Raw image target: a sparse file holding the device byte for byte.

The backup is written to ``<path>.part`` in the same directory and renamed onto ``path``
only by :meth:`RawTarget.commit`, after an ``fsync``; rename within one directory is
atomic (rename(2)), so ``path`` is either absent, a previous file, or a finished backup —
never a half-written one. The ``.part`` is created exclusively, never through a symlink,
mode 0600 (:func:`shmblock.targets.base.create_part`), and an existing ``path`` that is
not a regular file is refused. A failed job removes the partial file; a process killed
mid-job leaves ``<path>.part``, which ``shmblock-run cleanup`` removes (until then a new
job to the same target is refused: it cannot tell that file from a running job's).

Zero clusters stay holes: the file is created empty and extended with ``ftruncate``, so
any range never written reads back as zeros without using disk space.

Pre-allocation. Copy-before-write saves land in random order, and random 64 KiB writes
into a sparse file on ext4 cost the file system an extent allocation each (measured
here: 7-13k writes/s sparse, 12-15k/s into a pre-allocated file, and the pre-allocation
of 256 MiB took under 20 ms). So when the target is opened -- before the snapshot -- the
whole file is allocated with ``fallocate(2)`` (the Linux call, not ``posix_fallocate``,
whose C library fallback would write zeros), and at :meth:`~RawTarget.seal` the ranges
never written are punched out again (``FALLOC_FL_PUNCH_HOLE``): zero clusters still end
as holes. Not on tmpfs, where allocating means zeroing RAM up front (170-270 ms per
256 MiB, and memory the size of the device) for no seek to save; and silently not where
the file system cannot (EOPNOTSUPP) or has no room for the whole device (ENOSPC: a
sparse backup may still fit).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

import numpy as np
import numpy.typing as npt

from shmblock.errors import TargetIOError
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

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
TMPFS_MAGIC = 0x01021994
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux ``fallocate(2)``; OSError on failure (EOPNOTSUPP where unsupported)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def on_tmpfs(fd: int) -> bool:
    """Whether ``fd`` lives on tmpfs (``statfs``'s f_type, the first word)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64
    if _libc.fstatfs(fd, buf) != 0:
        return False
    return bool(struct.unpack_from("@l", buf.raw)[0] == TMPFS_MAGIC)


def preallocate(fd: int, size: int) -> bool:
    """Allocate ``size`` bytes of the empty file ``fd`` where that helps; True if done."""
    if on_tmpfs(fd):
        return False
    try:
        fallocate(fd, 0, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            # Give back whatever was allocated before the file system ran out.
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            return False
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise
    return True


class RawTarget(Target):
    """A sparse raw file, published by rename on commit."""

    kind = "raw"
    starts_zeroed = True
    punches_zeroes = True

    def __init__(self, path: str, size: int, cluster_size: int) -> None:
        super().__init__(size, cluster_size)
        self.path = os.path.abspath(path)
        self.part_path = self.path + PART_SUFFIX
        check_file_target(self.kind, path)
        self._fd: int | None = create_part(self.part_path, self.kind)
        try:
            os.ftruncate(self._fd, size)
            preallocated = preallocate(self._fd, size)
        except OSError as exc:
            self._discard()
            raise TargetIOError(
                f"cannot size raw target {self.part_path!r}: {exc.strerror}") from exc
        #: clusters written with data (pre-allocated only): the rest is punched at seal
        self._written: npt.NDArray[np.bool_] | None = \
            np.zeros(size // cluster_size, dtype=np.bool_) if preallocated else None
        self._committed = False
        self._writeback = Writeback(self._fd)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise TargetIOError(f"raw target {self.path!r} is closed")
        return self._fd

    def write(self, offset: int, data: Buffer) -> None:
        fd = self._require_fd()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if self._written is not None:
            cs = self.cluster_size
            self._written[offset // cs : (offset + len(view) + cs - 1) // cs] = True
        try:
            while view:
                # pwrite may write less than asked (signals, huge sizes): loop on the rest.
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
                self._writeback.wrote(written)
        except OSError as exc:
            raise TargetIOError(
                f"write to raw target {self.part_path!r} at offset {offset} failed: "
                f"{exc.strerror}"
            ) from exc

    def write_zeroes(self, offset: int, length: int) -> None:
        self._require_fd()
        self._check_range(offset, length)
        # The file was created empty and sized with ftruncate (or pre-allocated, and then
        # what is never written is punched at seal), and every cluster is saved exactly
        # once per job, so a cluster not written is still a hole: nothing to do.

    def _punch_unwritten(self) -> None:
        """Give the pre-allocated clusters never written back as holes (once)."""
        written, self._written = self._written, None
        if written is None:
            return
        fd, cs = self._require_fd(), self.cluster_size
        edges = np.flatnonzero(np.diff(written.astype(np.int8), prepend=1, append=1))
        # edges alternate: start of an unwritten run, its end, the next start, ...
        for a, b in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, a * cs, (b - a) * cs)

    def seal(self) -> None:
        try:
            self._punch_unwritten()
            os.fsync(self._require_fd())
        except OSError as exc:
            raise TargetIOError(
                f"cannot flush raw target {self.part_path!r}: {exc.strerror}") from exc

    def commit(self) -> None:
        try:
            self._punch_unwritten()
        except OSError as exc:
            raise TargetIOError(
                f"cannot punch holes in raw target {self.part_path!r}: {exc.strerror}") from exc
        publish_part(self._require_fd(), self.part_path, self.path, self.kind)
        self._committed = True

    def read(self, offset: int, length: int) -> bytes:
        fd = self._require_fd()
        self._check_range(offset, length)
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise TargetIOError(
                f"read-back of raw target {self.path!r} failed: {exc.strerror}") from exc

    def abort(self) -> None:
        if not self._committed:
            self._discard()

    def _discard(self) -> None:
        self.close()
        discard_part(self.part_path)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def describe(self) -> str:
        return self.path
