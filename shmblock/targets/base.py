"""The small interface every backup target implements.

A target is the destination of one backup job. Only the backup worker writes to it
(DESIGN.md invariant 4), always in whole clusters, in any order: copy-before-write saves
arrive out of order, background copying runs in cluster order.

Lifecycle::

    t = open_target(spec, size=..., cluster_size=...)   # opened / connected, checked
    t.write(offset, data)          # any order, cluster aligned, len a multiple of clusters
    t.write_zeroes(offset, length) # the snapshot holds zeros here: record them explicitly
    t.settle()                     # wait until every write so far is acknowledged
    t.commit()                     # flush; make the result visible as a finished backup
    t.read(offset, length)         # optional read-back through the target (verification)
    t.close()                      # release handles (after commit or abort)

or, when the job fails or is cancelled, ``t.abort()`` then ``t.close()``: the result must
never look like a finished backup (partial files stay under a temporary name or are
removed; see each target).

Capability flags tell the worker what it may skip:

* ``starts_zeroed``: a region never written reads back as zeros (a fresh sparse file, a
  qcow2 image without a backing file). The worker may then skip clusters that the device
  never allocated. Targets whose prior contents are unknown (an NBD export) say False, so
  the worker sends explicit zeroes for every zero cluster the sync mode covers.
* ``punches_zeroes``: ``write_zeroes`` is cheap (a hole, a zero flag, NBD WRITE_ZEROES)
  rather than a write of zero bytes.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import ctypes.util
import os
from typing import ClassVar

from shmblock import paths
from shmblock.errors import TargetError, TargetIOError, TargetUnreachable, UsageError

Buffer = bytes | bytearray | memoryview


class Target(abc.ABC):
    """Destination of a backup. Writes are whole clusters at cluster-aligned offsets."""

    #: short name used in messages and summaries: "raw", "qcow2", "nbd"
    kind: ClassVar[str]
    #: regions never written read back as zeros
    starts_zeroed: bool = True
    #: write_zeroes costs no data transfer
    punches_zeroes: bool = True

    def __init__(self, size: int, cluster_size: int) -> None:
        if size <= 0 or cluster_size <= 0 or size % cluster_size:
            raise TargetError(
                f"target size {size} must be a positive multiple of the cluster size "
                f"{cluster_size}"
            )
        self.size = size
        self.cluster_size = cluster_size

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TargetError(
                f"write of {length} bytes at offset {offset} is outside the target "
                f"({self.size} bytes)"
            )

    @abc.abstractmethod
    def write(self, offset: int, data: Buffer) -> None:
        """Store ``data`` at ``offset``. Raises TargetIOError on failure."""

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int) -> None:
        """Record that ``length`` bytes at ``offset`` are zeros in the snapshot."""

    def settle(self) -> None:
        """Return once every write and write_zeroes sent so far has been acknowledged.

        Raises TargetIOError if one of them failed. A target whose writes are done when
        they return (raw and qcow2 files: the data is in the page cache, where a later
        fsync in ``commit`` finds it) has nothing to wait for. The worker calls this
        before it tells a writer its cluster is saved.
        """
        return None  # nothing in flight by default

    @abc.abstractmethod
    def commit(self) -> None:
        """Flush everything and publish the target as a finished backup."""

    def seal(self) -> None:
        """Make the finished backup complete and durable without publishing it.

        Files: everything ``commit`` does but the rename, so the ``.part`` is a finished
        image that the supervisor publishes when the job is finalized (or discards when
        it is aborted). A target with nothing to publish (NBD) commits here. No write
        may follow.
        """
        self.commit()

    @abc.abstractmethod
    def abort(self) -> None:
        """The job did not finish: leave nothing that looks like a finished backup."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release files and connections. Idempotent."""

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Read back what the target holds (for verification, after ``commit``).

        Reads go through the target's own format (the qcow2 L1/L2 tables, an NBD READ),
        so a verification that uses them checks the whole path, not a cached copy.
        """

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the backup went, for summaries ("b.qcow2", "nbd://host/export")."""

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- files published by rename (raw and qcow2) ---------------------------------------

#: A file target is written under this suffix and renamed into place on commit.
PART_SUFFIX = paths.PART_SUFFIX


def check_file_target(kind: str, path: str) -> None:
    """Refuse a file target whose directory is missing or that exists but is not a
    regular file (a symlink, FIFO, device node, socket or directory is never replaced).
    Raises TargetUnreachable."""
    try:
        paths.check_output(f"{kind} target", path)
    except UsageError as exc:
        raise TargetUnreachable(str(exc)) from exc


def create_part(part_path: str, kind: str) -> int:
    """Create ``part_path`` exclusively (O_EXCL, O_NOFOLLOW, 0600); returns its fd.

    Never replaces anything: a ``.part`` that exists belongs to another job (or to a
    crashed run, which ``shmblock-run cleanup`` removes), and a symlink there is refused.
    Raises TargetUnreachable naming the file.
    """
    try:
        return paths.create_part(part_path)
    except OSError as exc:
        raise TargetUnreachable(
            paths.explain_create_error(part_path, exc, f"{kind} target")) from exc


def publish_part(fd: int, part_path: str, path: str, kind: str) -> None:
    """Make ``part_path`` durable and rename it onto ``path``, atomically (rename(2)).

    fsync(file) before the rename, fsync(directory) after (:func:`shmblock.paths.publish`).
    Raises TargetIOError naming the file and the reason.
    """
    try:
        paths.publish(fd, part_path, path)
    except OSError as exc:
        raise TargetIOError(f"cannot publish {kind} target {path!r}: {exc.strerror}") from exc


def discard_part(part_path: str) -> None:
    """Remove an unfinished file (it may already be gone)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(part_path)


# -- early writeback ------------------------------------------------------------------

#: Start writing a file target's dirty pages back every this many bytes written.
WRITEBACK_EVERY = 32 << 20
SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


class Writeback:
    """Starts the kernel writing a target file back while the job is still copying.

    A finished file backup is fsynced before it is published, and that fsync used to
    find the whole backup dirty in the page cache: for a 1 GiB device file half full,
    the copy took about 0.15 s and the fsync 0.35-0.45 s after it. Every
    :data:`WRITEBACK_EVERY` bytes written, ``sync_file_range(SYNC_FILE_RANGE_WRITE)``
    over the whole file queues what is dirty for writeback and returns (it waits
    only for pages already being written, never for the disk to finish), so the disk
    works alongside the copy and the final fsync has only the tail left. Python has
    no ``os.sync_file_range``: called through ctypes. Nothing depends on it
    succeeding (the fsync still does all the work), so errors are ignored, and where the
    call is missing or refused (tmpfs makes it a no-op) it is simply not called again.
    """

    def __init__(self, fd: int, every: int | None = None) -> None:
        self.fd = fd
        self.every = WRITEBACK_EVERY if every is None else every
        self.pending = 0
        self.kicks = 0
        self.enabled = self.every > 0

    def wrote(self, nbytes: int) -> None:
        """``nbytes`` more were written; start writeback when enough have piled up."""
        if not self.enabled:
            return
        self.pending += nbytes
        if self.pending < self.every:
            return
        self.pending = 0
        self.kicks += 1
        # offset 0, nbytes 0: to the end of the file.
        if _libc.sync_file_range(self.fd, 0, 0, SYNC_FILE_RANGE_WRITE) != 0:
            self.enabled = False  # ENOSYS, ESPIPE, EINVAL: do not try again
