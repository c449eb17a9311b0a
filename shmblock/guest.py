"""Guest I/O: reads and writes of a device through the copy-before-write path.

:class:`GuestIO` is what every guest writer uses — the writer worker processes and a
program writing through the Python API alike — so there is exactly one write path.

Theory of operation
===================

A write of bytes ``[off, off+n)`` touches clusters ``c0..c1-1``. The common case costs
one map lookup: if ``needs_copy`` is 0 for all of them, the snapshot no longer needs
their old contents (or no job runs), and the write goes straight to shared memory.
``needs_copy[c]`` only goes 1 → 0 during a job, so once a writer has seen 0 it may write
c without any claim. For each cluster c still marked (DESIGN.md invariant 2):

* *stage* mode: claim c (an OFD lock the kernel drops if we die), re-check
  ``needs_copy[c]``, copy the old contents into a slot of the device's shared
  copy-before-write buffer (:mod:`shmblock.cbw_buffer`: slots reserved in batches under
  a lock, kept privately), mark the slot FULL, clear ``needs_copy[c]`` — in that order,
  so whoever sees c unmarked finds the slot — release; then pay the buffer's graded
  back-pressure (nothing below half full). The backup worker drains the buffer to the
  target in cluster order.
* *request* mode, or the buffer full: hold **no** claim (a writer that
  waited while holding one would make every stale request unsafe to serve), send
  COPY_REQ carrying the device's job number, wait for COPY_DONE; the worker saves c
  under the claim. Then re-check ``needs_copy[c]`` and ask again until it is 0 or the
  deadline passes.

Then write. If saving fails (COPY_DONE with ``ok=False``) or takes longer than the
copy-before-write timeout, ``on-cbw-error`` decides (QEMU's names):
``break-guest-write`` fails this write with
:class:`~shmblock.errors.CopyBeforeWriteError` and leaves the device unchanged — even if
the job ends right after and the map is cleared, since the cluster was never saved;
``break-snapshot`` lets the write through and marks the snapshot broken (``CTL_BROKEN``),
so the job fails instead, and from then on writes do not attempt copy-before-write at
all. The worker answers ``ok=True`` when nothing needs saving any more (the job
completed or was cancelled), so those writes go ahead.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

import protocol
from shmblock import layout as L
from shmblock import membarrier
from shmblock import stats as S
from shmblock.cbw_buffer import Producer
from shmblock.claims import Claims
from shmblock.device import Device
from shmblock.errors import CopyBeforeWriteError, QueueTimeout, TransportError, UsageError
from shmblock.transport import Queue

#: What a guest write accepts: anything with the buffer protocol, numpy arrays included.
WriteData = bytes | bytearray | memoryview | npt.NDArray[np.uint8]

WORKLOADS = ("random", "sequential", "zipf", "mixed", "first-touch")
STATS_FLUSH_OPS = 256
STATS_FLUSH_NS = 50_000_000
#: How often a writer waiting for COPY_DONE looks whether the job ended without it.
RELEASE_POLL = 0.02
#: How long a writer waits for a thaw before it writes on (counted: a supervisor that
#: never thaws must not stop the guest for good), and its futex slice between looks.
FREEZE_TIMEOUT = 30.0
FREEZE_POLL = 0.05

log = logging.getLogger("shmblock.guest")


class GuestIO:
    """Reads and writes of one device by one writer identity (``writer`` index)."""

    def __init__(
        self,
        device: Device,
        writer: int,
        backup_queue: str,
        reply_queue: Queue | None = None,
        on_epoch: Callable[[], None] | None = None,
        gate: threading.Lock | None = None,
    ) -> None:
        if not 0 <= writer < device.geometry.max_writers:
            raise UsageError(f"writer index {writer} out of range for this device")
        self.device = device
        self.writer = writer
        self.backup_queue_name = backup_queue
        self._claims = Claims(device.meta_name)
        self._reply = reply_queue
        self._on_epoch = on_epoch
        self._gate = gate
        self._cs = device.cluster_size
        self._size = device.size
        self._data = device.data
        self._nc = device.needs_copy
        self._alloc = device.allocated
        self._dirty = device.dirty
        # A file-backed device's bitmaps are persistent: the region of a write must be
        # durably marked in the store's write-intent map before the write's data can
        # reach the disk (one byte lookup unless this is the region's first write of
        # the epoch), so that a power loss cannot lose the write's dirty bit.
        store = device.bitmap_store
        self._note_write = None if store is None else store.note_write
        self._ctl = device.ctl
        self._buffer = Producer(device, writer, self._claims)
        self._row = device.stats[writer]
        # The freeze handshake (shmblock.freeze): our "in a write" word holds our pid
        # while we write; the freeze word's address is what we sleep on when frozen.
        self._in_write = device.in_write[writer, :1]
        self._freeze_word = device.ctl.ctypes.data + L.CTL_FREEZE * 8
        self._pid = os.getpid()
        self._freezes = self._freeze_timeouts = 0
        #: called between futex slices while frozen (a writer process checks its parent)
        self.on_freeze_wait: Callable[[], None] | None = None
        self.freeze_timeout = FREEZE_TIMEOUT
        membarrier.register()  # once per process: the freezer's barrier then reaches us
        # -1: the first write always looks at the control queue (a Freeze may be there).
        self._epoch_seen = -1
        self._mask_seen = -1
        self._dirty_rows: list[int] = []
        self._seq = itertools.count(1)
        self._backup_queue: Queue | None = None
        self._backup_job_seq = -1
        # Counters kept in Python and flushed to shared memory every few hundred ops, or
        # every STATS_FLUSH_NS for a slow (rate-limited) writer.
        self._hist = [0] * S.HIST_BUCKETS
        self._ops = self._bytes = self._reads = self._read_bytes = 0
        self._cbw_saves = self._cbw_requests = self._cbw_wait_ns = self._errors = 0
        self._target_errors = 0
        # Set when the save that failed this write failed because the target did.
        self._failed_on_target = False
        self._max_stall = 0
        self._unflushed = 0
        self._last_flush = time.monotonic_ns()
        self._flush_due = time.perf_counter_ns() + STATS_FLUSH_NS
        row = self._row
        row[:] = 0
        row[S.W_START_NS] = self._last_flush
        row[S.W_PID] = os.getpid()
        row[S.W_RUNNING] = 1

    # -- the write path -----------------------------------------------------------------

    def write(self, offset: int, data: WriteData) -> None:
        """Write ``data`` at ``offset`` as a guest; raises CopyBeforeWriteError per policy."""
        buf = np.frombuffer(data, dtype=np.uint8)
        n = buf.size
        if offset < 0 or n == 0 or offset + n > self._size:
            raise UsageError(f"write of {n} bytes at {offset} is outside the device")
        if self._gate is not None:
            with self._gate:
                self._fenced_write(offset, buf, n)
        else:
            self._fenced_write(offset, buf, n)

    def _fenced_write(self, offset: int, buf: npt.NDArray[np.uint8], n: int) -> None:
        """The write inside the freeze handshake (see :mod:`shmblock.freeze`).

        Store "in a write", *then* load the freeze word: the freezer stores the freeze
        word, runs membarrier, then loads every in-write word, so one of us sees the
        other's store. A freeze on: step back (clear the word) and sleep until the thaw.
        """
        iw = self._in_write
        ctl = self._ctl
        while True:
            iw[0] = self._pid
            if not ctl[L.CTL_FREEZE]:
                break
            iw[0] = 0
            if not self._wait_for_thaw():
                iw[0] = self._pid
                break
        try:
            self._write(offset, buf, n)
        finally:
            iw[0] = 0  # after the data: TSO keeps our stores in order

    def _wait_for_thaw(self) -> bool:
        """Sleep until the freeze word is cleared; False if we gave up (and write on)."""
        self._freezes += 1
        self._row[S.W_FREEZES] = self._freezes
        ctl = self._ctl
        deadline = time.monotonic() + self.freeze_timeout
        while word := int(ctl[L.CTL_FREEZE]):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Writing on is the lesser evil, but the supervisor must be able to see
                # it: a write during its freeze breaks the snapshot instant. The count
                # is in shared memory (WriterStats.freeze_timeouts), even if we die.
                self._freeze_timeouts += 1
                self._row[S.W_FREEZE_TIMEOUTS] = self._freeze_timeouts
                log.warning("no thaw within %.0f s: writing on without it (a snapshot "
                            "taken in that freeze is no longer point-in-time)",
                            self.freeze_timeout)
                return False
            membarrier.futex_wait(self._freeze_word, word, min(remaining, FREEZE_POLL))
            if self.on_freeze_wait is not None:
                self.on_freeze_wait()
        return True

    def _write(self, offset: int, buf: npt.NDArray[np.uint8], n: int) -> None:
        t0 = time.perf_counter_ns()
        ctl = self._ctl
        if ctl[L.CTL_EPOCH] != self._epoch_seen:
            self._epoch_seen = int(ctl[L.CTL_EPOCH])
            if self._on_epoch is not None:
                self._on_epoch()
            t0 = time.perf_counter_ns()  # a freeze is not the write's latency
        cs = self._cs
        c0 = offset // cs
        c1 = (offset + n - 1) // cs + 1
        nc = self._nc
        if nc[c0] if c1 - c0 == 1 else nc[c0:c1].any():
            try:
                self._copy_before_write(c0, c1)
            except CopyBeforeWriteError:
                self._errors += 1
                if self._failed_on_target:
                    self._target_errors += 1
                self._account(t0, 0)
                raise
        if c1 - c0 == 1:
            self._alloc[c0] = 1
        else:
            self._alloc[c0:c1] = 1
        mask = int(ctl[L.CTL_BITMAP_MASK])
        if mask:
            if mask != self._mask_seen:
                self._mask_seen = mask
                self._dirty_rows = [i for i in range(L.MAX_BITMAPS) if mask >> i & 1]
            if self._note_write is not None:
                self._note_write(c0, c1)
            for i in self._dirty_rows:
                self._dirty[i, c0:c1] = 1
        self._data[offset : offset + n] = buf
        self._in_write[0] = 0  # its last store is done: a freeze need not wait for the rest
        self._ops += 1
        self._account(t0, n)

    def _account(self, t0: int, n: int) -> None:
        now = time.perf_counter_ns()
        elapsed = now - t0
        self._bytes += n
        self._hist[S.bucket_of(elapsed)] += 1
        self._max_stall = max(self._max_stall, elapsed)
        self._unflushed += 1
        if self._unflushed >= STATS_FLUSH_OPS or now >= self._flush_due:
            self.flush_stats()

    def _copy_before_write(self, c0: int, c1: int) -> None:
        ctl = self._ctl
        if ctl[L.CTL_BROKEN] and int(ctl[L.CTL_ON_CBW_ERROR]) == 1:
            return  # break-snapshot, already broken: the job fails anyway, do not wait
        t0 = time.monotonic()
        deadline = t0 + int(ctl[L.CTL_CBW_TIMEOUT_US]) / 1e6
        nc = self._nc
        self._failed_on_target = False
        try:
            for c in range(c0, c1):
                if nc[c]:
                    self._save_cluster(c, deadline)
        except CopyBeforeWriteError:
            # Re-raise here, not in a helper that holds the exception: that helper's
            # frame in the traceback would hold the exception in a reference cycle, with
            # every frame's views of the device, and device.close() would then fail with
            # BufferError until the garbage collector happened to run.
            if not self._cbw_failed():
                raise
        finally:
            self._cbw_wait_ns += int((time.monotonic() - t0) * 1e9)

    def _save_cluster(self, c: int, deadline: float) -> None:
        """Have cluster c's snapshot contents saved; needs_copy[c] was 1 when we looked."""
        if int(self._ctl[L.CTL_CBW_MODE]) == 0:
            nc = self._nc
            self._claims.claim(c, 1, deadline)
            try:
                if not nc[c]:
                    return  # saved by someone else while we waited for the claim
                # Order matters (see the module docstring): data, FULL, then unmark.
                saved = self._buffer.save(c, deadline)
                if saved:
                    nc[c] = 0
                    self._cbw_saves += 1
            finally:
                self._claims.release(c, 1)
            if saved:
                if self._ctl[L.CTL_WORKER_IDLE]:
                    self._ring_doorbell()
                self._buffer.pace()  # graded back-pressure, never under a claim
                return
        # Buffer full, or request mode: ask the worker, holding no claim while we wait.
        self._request_copy(c, deadline)

    def _backup(self) -> Queue:
        job_seq = int(self._ctl[L.CTL_JOB_SEQ])
        if self._backup_queue is None or job_seq != self._backup_job_seq:
            if self._backup_queue is not None:
                self._backup_queue.close()
                self._backup_queue = None
            try:
                self._backup_queue = Queue.attach(self.backup_queue_name)
            except TransportError as exc:
                raise CopyBeforeWriteError(f"no backup worker to save the cluster: {exc}") from exc
            self._backup_job_seq = job_seq
        return self._backup_queue

    def _ring_doorbell(self) -> None:
        # The worker polls its slots anyway; a doorbell only saves latency.
        with contextlib.suppress(CopyBeforeWriteError, TransportError):
            self._backup().try_send(protocol.Staged(writer=self.writer))

    def _request_copy(self, c: int, deadline: float) -> None:
        """Ask the backup worker to save c until ``needs_copy[c]`` is 0 or the deadline."""
        if self._reply is None:
            raise CopyBeforeWriteError(
                "the copy-before-write buffer is full and this writer has no reply queue")
        job = int(self._ctl[L.CTL_JOB_SEQ])
        nc = self._nc
        while nc[c]:
            seq = next(self._seq)
            if not self._send_request(protocol.CopyRequest(
                    writer=self.writer, seq=seq, cluster=c, count=1, job=job), deadline):
                return  # the job ended needing no more saves (a dead worker's full queue)
            self._cbw_requests += 1
            reply = self._await_copy_done(c, seq, job, deadline)
            if reply is None:
                return  # the job ended needing no more saves (completed or cancelled)
            if not reply.ok:
                self._failed_on_target = reply.target_error
                raise CopyBeforeWriteError(f"the backup worker could not save cluster {c}: "
                                           f"{reply.error}")
            # ok: the worker saved c, found it saved, or the job no longer needs it (and
            # cleared the map before answering); the loop re-checks the map rather than
            # trusting the answer.

    def _send_request(self, req: protocol.CopyRequest, deadline: float) -> bool:
        """Queue ``req`` for the worker; False if its job was released while we waited."""
        queue = self._backup()
        while True:
            remaining = deadline - time.monotonic()
            try:
                queue.send(req, timeout=min(max(remaining, 0.0), RELEASE_POLL))
                return True
            except QueueTimeout as exc:
                if int(self._ctl[L.CTL_JOB_RELEASED]) == req.job:
                    return False
                if remaining <= RELEASE_POLL:
                    raise CopyBeforeWriteError(
                        f"cannot ask the backup worker to save cluster {req.cluster}: its "
                        "queue stayed full until the copy-before-write deadline (is the "
                        "worker alive?)") from exc
            except TransportError as exc:
                raise CopyBeforeWriteError(f"cannot ask the backup worker to save cluster "
                                           f"{req.cluster}: {exc}") from exc

    def _await_copy_done(self, c: int, seq: int, job: int,
                         deadline: float) -> protocol.CopyDone | None:
        """The answer to request ``seq``; None if the job ended without needing it."""
        assert self._reply is not None
        ctl = self._ctl
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CopyBeforeWriteError(
                    f"the backup worker did not save cluster {c} within the copy-before-write "
                    "timeout")
            # Look up now and then: a request sent just after the worker's last look at
            # its queue gets no answer, but a job that completed or was cancelled -- or
            # whose worker died, released by the supervisor -- says so in
            # CTL_JOB_RELEASED. A job whose worker failed (a target error) does not: its
            # save may have been the one that failed, so we time out and fail.
            reply = self._reply.receive(min(remaining, RELEASE_POLL))
            if isinstance(reply, protocol.CopyDone) and reply.seq == seq:
                return reply
            if reply is None and int(ctl[L.CTL_JOB_RELEASED]) == job:
                return None
            # Anything else is a late answer to a request that already timed out.

    def _cbw_failed(self) -> bool:
        """Apply on-cbw-error after a save failed; True when the write may proceed.

        The map is not consulted: under break-guest-write a write whose save failed fails,
        even if the job ended meanwhile and cleared ``needs_copy`` — the cluster was never
        saved, so the snapshot (if it is still wanted) cannot have it.
        """
        ctl = self._ctl
        if int(ctl[L.CTL_ON_CBW_ERROR]) == 1:
            if ctl[L.CTL_JOB_ACTIVE]:
                ctl[L.CTL_BROKEN] = 1  # break-snapshot: the job fails, the guest goes on
            return True
        return False

    # -- reads ------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (guest reads never wait for the backup)."""
        if offset < 0 or length < 0 or offset + length > self._size:
            raise UsageError(f"read of {length} bytes at {offset} is outside the device")
        t0 = time.perf_counter_ns()
        out = self._data[offset : offset + length].tobytes()
        self._reads += 1
        self._read_bytes += length
        self._hist[S.bucket_of(time.perf_counter_ns() - t0)] += 1
        return out

    # -- stats --------------------------------------------------------------------------------

    def flush_stats(self) -> None:
        """Publish the counters to this writer's row in shared memory."""
        row = self._row
        row[S.W_OPS] = self._ops
        row[S.W_BYTES] = self._bytes
        row[S.W_READS] = self._reads
        row[S.W_READ_BYTES] = self._read_bytes
        row[S.W_CBW_SAVES] = self._cbw_saves
        row[S.W_CBW_REQUESTS] = self._cbw_requests
        row[S.W_CBW_WAIT_NS] = self._cbw_wait_ns
        row[S.W_MAX_STALL_NS] = self._max_stall
        row[S.W_ERRORS] = self._errors
        row[S.W_TARGET_ERRORS] = self._target_errors
        row[S.HIST_BASE : S.HIST_BASE + S.HIST_BUCKETS] = self._hist
        now = time.monotonic_ns()
        row[S.W_END_NS] = now
        self._unflushed = 0
        self._last_flush = now
        self._flush_due = time.perf_counter_ns() + STATS_FLUSH_NS

    def close(self) -> None:
        """Flush stats and release claims and queues. Idempotent."""
        if self.device.closed or not hasattr(self, "_row"):
            return
        self.flush_stats()
        self._row[S.W_RUNNING] = 0
        self._buffer.close()
        self._claims.close()
        if self._backup_queue is not None:
            self._backup_queue.close()
            self._backup_queue = None
        # Drop our views of the mapping so the device can be closed (else BufferError).
        del self._data, self._nc, self._alloc, self._dirty, self._ctl, self._row
        del self._in_write
        self._note_write = None
