"""What an NBD export serves: a live device, or the point-in-time view of a backup job.

:class:`ExportSource` is the contract the server needs (contracts.md C3). Two sources:

* :func:`live_export` -- a device, writable. Every write goes through
  :meth:`DeviceHandle.write <shmblock.device_handle.DeviceHandle.write>`, the
  copy-before-write path the synthetic writers use, so an NBD client is one more guest:
  a running backup saves a cluster's snapshot contents before the client's write lands.
* :func:`fleecing_export` -- read-only, the snapshot of a running ``sync=none`` job
  (QEMU's "fleecing", libvirt's pull-mode backup): the device's contents at the job's
  instant, while guests keep writing.

Theory of operation of the point-in-time read (see ``shmblock/device.py``, the maps):
during a ``sync=none`` job every cluster starts with ``needs_copy[c] == 1``. Whoever
saves c's snapshot contents -- a writer staging them, or the backup worker serving a
copy request -- does so holding the claim on c (:mod:`shmblock.claims`), and clears
``needs_copy[c]`` before letting go; a guest writes c only once it reads 0. So, holding
the claim on c:

* ``needs_copy[c] == 1``: nobody saved c, so nobody wrote it since the instant -- the
  device holds the snapshot contents; we copy them out before we let go.
* ``needs_copy[c] == 0``: the snapshot contents were saved. Once the worker put them on
  the target it sets ``saved[c]`` (after the write); until then they are staged in
  shared memory. We wait for ``saved[c]`` (bounded by :data:`STAGED_WAIT`) and read the
  target -- rather than the staging area, whose layout another part of the engine owns.

Only savers clear ``needs_copy[c]``, and they hold the claim -- except the job's end,
which clears the whole map at once (and a guest may then write c without any claim).
So after copying clusters out under our claims we look again: a cluster whose mark went
while we held its claim means the job is ending, and the read fails.

The job must still be the device's current one (``CTL_JOB_SEQ``, ``CTL_JOB_ACTIVE``)
before and after every read: once it ends the maps are cleared and the target no longer
grows, so a read then fails with EIO instead of returning today's data as yesterday's.
The target is read from its own file (the job's raw ``.part``, written with ``pwrite``,
so ``saved`` means "in the file"). A qcow2 target writes its tables only when it is
sealed, and an NBD target is pipelined (``saved`` comes before the server's answer), so
neither can be read while the job runs: refused.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from shmblock import layout as L
from shmblock import snapshot
from shmblock.claims import Claims
from shmblock.copier import runs
from shmblock.errors import CopyBeforeWriteError, ShmblockError, UsageError
from shmblock.nbd.wire import STATE_DIRTY, STATE_HOLE, STATE_ZERO, NbdError

if TYPE_CHECKING:
    from shmblock.backup_job import BackupJob
    from shmblock.device_handle import DeviceHandle

BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
#: the most a fleecing read waits for a staged cluster to reach the target
STAGED_WAIT = 10.0
#: the most a fleecing read waits for the claims of the clusters it reads
CLAIM_WAIT = 10.0
#: clusters claimed at once by a fleecing read
CLAIM_CLUSTERS = 32
#: zeroes are written through the guest path in pieces of this size
ZERO_CHUNK = 4 * 1024 * 1024


class ExportGone(NbdError):
    """The export cannot serve any more (its job ended, its device closed): EIO."""


class ExportSource(Protocol):
    """What an NBD export reads, writes and describes (contracts.md C3).

    The four descriptive members are read-only here, so a plain attribute or a property
    both satisfy them: ``size`` in bytes, ``block_size`` the preferred one (the
    cluster size), ``writable``, and ``contexts`` the metadata contexts offered
    ("base:allocation", "qemu:dirty-bitmap:NAME"), read at every handshake.
    """

    @property
    def size(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    @property
    def writable(self) -> bool: ...

    @property
    def contexts(self) -> list[str]: ...

    def read(self, offset: int, length: int) -> bytes | memoryview: ...

    def write(self, offset: int, data: memoryview, fua: bool) -> None: ...

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None: ...

    def trim(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def block_status(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents (length, flags) covering at least [offset, offset+1)."""
        ...

    def close(self) -> None: ...


def cluster_extents(flags: npt.NDArray[np.uint32], first: int, offset: int, length: int,
                    cluster_size: int, size: int) -> list[tuple[int, int]]:
    """Extents of per-cluster ``flags`` (for clusters from ``first``) over the bytes
    ``[offset, offset+length)``: runs of equal flags, cut to the range."""
    out: list[tuple[int, int]] = []
    end = min(offset + length, size)
    edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    bounds = [0, *edges.tolist(), flags.size]
    for i in range(len(bounds) - 1):
        a = max((first + bounds[i]) * cluster_size, offset)
        b = min((first + bounds[i + 1]) * cluster_size, end)
        if b > a:
            out.append((b - a, int(flags[bounds[i]])))
    return out


class _DeviceExport:
    """What both exports share: geometry, bitmap contexts, range bookkeeping."""

    writable = False

    def __init__(self, handle: DeviceHandle) -> None:
        self.handle = handle
        self.size = handle.size
        self.block_size = handle.cluster_size
        self._closed = False

    @property
    def contexts(self) -> list[str]:
        """Read at every handshake, so a bitmap added after the export is offered too."""
        return [BASE_ALLOCATION] + [DIRTY_BITMAP_PREFIX + name
                                    for name in self.handle.bitmaps()]

    def _clusters(self, offset: int, length: int) -> tuple[int, int]:
        cs = self.block_size
        return offset // cs, -(-(offset + length) // cs)

    def _check_open(self) -> None:
        if self._closed or self.handle.device.closed:
            raise ExportGone("the export's device is closed")

    def block_status(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        self._check_open()
        c0, c1 = self._clusters(offset, length)
        # Look at a bounded window: a client asking about a huge range gets its first
        # extents and asks again (proto.md allows a shorter answer).
        c1 = min(c1, c0 + 65536)
        if context == BASE_ALLOCATION:
            flags = self._allocation_flags(c0, c1)
        elif context.startswith(DIRTY_BITMAP_PREFIX):
            name = context[len(DIRTY_BITMAP_PREFIX):]
            try:
                bits = self.handle.bitmap(name)[c0:c1]
            except ShmblockError as exc:
                raise ExportGone(f"dirty bitmap {name!r}: {exc}") from exc
            flags = np.where(bits, STATE_DIRTY, 0).astype(np.uint32)
        else:
            raise UsageError(f"unknown metadata context {context!r}")
        return cluster_extents(flags, c0, offset, length, self.block_size, self.size)

    def _allocation_flags(self, c0: int, c1: int) -> npt.NDArray[np.uint32]:
        alloc = self.handle.device.allocated[c0:c1] != 0
        return np.where(alloc, 0, STATE_HOLE | STATE_ZERO).astype(np.uint32)

    def flush(self) -> None:
        self._check_open()
        dev = self.handle.device
        if dev.backing_file:
            # A file-backed device is a shared mapping of its file: msync makes the
            # writes durable (a device in shared memory has nothing to flush).
            data_map = getattr(dev, "_data_map", None)
            if data_map is not None:
                data_map.flush()

    def trim(self, offset: int, length: int) -> None:
        raise UsageError("trim on a read-only export")

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        raise UsageError("write on a read-only export")

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        raise UsageError("write on a read-only export")

    def close(self) -> None:
        self._closed = True


class LiveExport(_DeviceExport):
    """A device, writable, every write through copy-before-write (see the module doc)."""

    writable = True

    def read(self, offset: int, length: int) -> bytes | memoryview:
        self._check_open()
        return self.handle.read(offset, length)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._check_open()
        self.handle.write(offset, data)
        if fua:
            self.flush()

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        # Zeroes are data written like any other where the device holds data: the
        # snapshot must keep what they overwrite, so they take the guest path (a hole
        # would bypass copy-before-write). A never-written cluster reads as zeroes
        # already (the invariant sync=top and the copier rely on too): nothing to
        # write, nothing for a snapshot or a dirty bitmap to record.
        self._check_open()
        c0, c1 = self._clusters(offset, length)
        cs = self.block_size
        end = offset + length
        zeros: memoryview | None = None
        for a, b, written in runs(self.handle.device.allocated[c0:c1] != 0):
            if not written:
                continue
            at, stop = max((c0 + a) * cs, offset), min((c0 + b) * cs, end)
            if zeros is None:
                zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
            while at < stop:
                n = min(stop - at, ZERO_CHUNK)
                self.handle.write(at, zeros[:n])
                at += n
        if fua:
            self.flush()

    def already_zero(self, offset: int, length: int) -> bool:
        """Whether ``[offset, offset+length)`` was never written (so zeroing it is free:
        NBD_CMD_FLAG_FAST_ZERO succeeds)."""
        self._check_open()
        c0, c1 = self._clusters(offset, length)
        return not self.handle.device.allocated[c0:c1].any()

    def trim(self, offset: int, length: int) -> None:
        # Advisory (proto.md: the data afterwards is unspecified unless zeroes were
        # asked for): we keep the data, which needs no copy-before-write.
        self._check_open()


class FleecingExport(_DeviceExport):
    """The snapshot of a running ``sync=none`` job, read-only (see the module doc)."""

    writable = False

    def __init__(self, handle: DeviceHandle, job: BackupJob) -> None:
        super().__init__(handle)
        if job.sync != "none":
            raise UsageError(f"fleecing needs a sync=none job; job {job.job} is "
                             f"sync={job.sync}")
        if job.device is not handle:
            raise UsageError(f"job {job.job} backs up device {job.device.name}, "
                             f"not {handle.name}")
        if not job.seq or not snapshot.is_current(handle.device, job.seq):
            raise UsageError(f"job {job.job} is not running (state {job.state.value}): "
                             "start it before exporting its snapshot")
        self.job = job
        self._seq = job.seq
        # What the snapshot's allocation was, for the clusters still untouched now
        # (read needs_copy first: a cluster marked then was not written since the
        # instant, and ``allocated`` only grows, so a 0 read after it is the instant's).
        dev = handle.device
        self._untouched_at_export = dev.needs_copy != 0
        self._allocated_at_export = dev.allocated != 0
        self._reader = _open_target_reader(job)
        self._claims = Claims(handle.device.meta_name)
        # OFD claims taken through one file description do not exclude each other, so
        # the threads of this export take theirs one at a time (each holds it for a
        # memcpy of the clusters it reads).
        self._claim_lock = threading.Lock()

    def _check_current(self) -> None:
        self._check_open()
        dev = self.handle.device
        if not snapshot.is_current(dev, self._seq):
            raise ExportGone(f"job {self.job.job} has ended: its point-in-time view is gone")
        if dev.ctl[L.CTL_BROKEN]:
            # on-cbw-error=break-snapshot let a write through unsaved: from then on the
            # device no longer holds the snapshot where needs_copy says it does. The flag
            # is raised before that write, so the check after a read catches it.
            raise ExportGone(f"job {self.job.job}'s snapshot is broken (a guest write "
                             "could not be saved first)")

    def read(self, offset: int, length: int) -> bytes | memoryview:
        self._check_current()
        dev = self.handle.device
        cs = self.block_size
        c0, c1 = self._clusters(offset, length)
        out = bytearray(length)
        view = memoryview(out)
        out_np = np.frombuffer(out, dtype=np.uint8)
        nc = dev.needs_copy
        data = dev.data
        saved_runs: list[tuple[int, int]] = []
        # A few clusters at a time: a writer waits for our claim at most one short
        # memcpy, and a big read does not need every one of its clusters free at once.
        for a in range(c0, c1, CLAIM_CLUSTERS):
            b = min(a + CLAIM_CLUSTERS, c1)
            deadline = time.monotonic() + CLAIM_WAIT
            with self._claim_lock:
                try:
                    self._claims.claim(a, b - a, deadline)
                except CopyBeforeWriteError as exc:
                    raise ExportGone(f"clusters {a}..{b - 1} stayed claimed: {exc}") \
                        from exc
                try:
                    on_device = nc[a:b] != 0
                    for ra, rb, here in runs(on_device):
                        if not here:
                            saved_runs.append((a + ra, a + rb))
                            continue
                        lo = max((a + ra) * cs, offset)
                        hi = min((a + rb) * cs, offset + length)
                        self._copy_out(out_np[lo - offset : hi - offset], data[lo:hi])
                    # Under our claims only the job's end clears needs_copy (the
                    # worker's stop_copy_before_write, or release): a guest may have
                    # written those clusters while we copied them.
                    if not nc[a:b][on_device].all():
                        raise ExportGone(f"job {self.job.job} is ending: its "
                                         "point-in-time view is gone")
                finally:
                    self._claims.release(a, b - a)
        for ra, rb in saved_runs:
            self._read_saved(ra, rb, offset, view)
        # The job may have ended while we read the target (a newer job clears saved):
        # what we read is only the snapshot if the job is still the current one.
        self._check_current()
        return view

    @staticmethod
    def _copy_out(dst: npt.NDArray[np.uint8], src: npt.NDArray[np.uint8]) -> None:
        dst[:] = src

    def _read_saved(self, ca: int, cb: int, offset: int, view: memoryview) -> None:
        """Clusters [ca, cb) from the target, once the worker put them there."""
        dev = self.handle.device
        cs = self.block_size
        saved = dev.saved
        deadline = time.monotonic() + STAGED_WAIT
        pause = 1e-4
        while not saved[ca:cb].all():
            self._check_current()
            if time.monotonic() >= deadline:
                raise ExportGone(f"clusters {ca}..{cb - 1} were saved but did not reach "
                                 f"the target within {STAGED_WAIT} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        lo = max(ca * cs, offset)
        hi = min(cb * cs, offset + len(view))
        try:
            got = self._reader.read(lo, hi - lo)  # pread: safe from several threads
        except OSError as exc:
            raise ExportGone(f"cannot read the backup target: {exc}") from exc
        if len(got) != hi - lo:  # a raw .part not yet extended reads short: zeroes
            got = bytes(got) + bytes(hi - lo - len(got))
        view[lo - offset : hi - offset] = got

    def _allocation_flags(self, c0: int, c1: int) -> npt.NDArray[np.uint32]:
        # A hole in the snapshot: a cluster never written by the instant. For one still
        # untouched, ``allocated`` now says so (needs_copy read first, as above); for
        # one saved since the export began, what we read then; anything saved before
        # is reported as data (always a safe answer).
        dev = self.handle.device
        untouched = dev.needs_copy[c0:c1] != 0
        unwritten_now = dev.allocated[c0:c1] == 0
        unwritten_then = self._untouched_at_export[c0:c1] & ~self._allocated_at_export[c0:c1]
        hole = np.where(untouched, unwritten_now, unwritten_then)
        return np.where(hole, STATE_HOLE | STATE_ZERO, 0).astype(np.uint32)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._claims.close()
        self._reader.close()


class _PartReader:
    """The job's raw ``.part`` file, read with pread (safe from several threads)."""

    def __init__(self, path: str) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cannot open the backup target {path!r}: {exc.strerror}") \
                from exc

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        os.close(self._fd)


def _open_target_reader(job: BackupJob) -> _PartReader:
    """The job's raw ``.part``: the only target whose ``saved`` map means "readable".

    A qcow2 target writes its tables only when sealed; an NBD target is pipelined, so a
    cluster is marked saved before the server acknowledged it, and a second connection
    may not see it yet.
    """
    spec = job.spec
    if spec.format == "raw" and spec.part is not None:
        return _PartReader(spec.part)
    why = ("whose tables are written only at the end" if spec.format == "qcow2" else
           "whose writes are acknowledged after the job marks them saved")
    raise UsageError(f"job {job.job} writes a {spec.format} target, {why}: fleecing needs "
                     "a raw file target")


def live_export(handle: DeviceHandle) -> ExportSource:
    """A writable export of ``handle``'s device; writes go through copy-before-write."""
    return LiveExport(handle)


def fleecing_export(handle: DeviceHandle, job: BackupJob) -> ExportSource:
    """A read-only export of the snapshot of ``job``, a running ``sync=none`` backup of
    ``handle`` into a raw file (UsageError otherwise)."""
    return FleecingExport(handle, job)
