"""A backup job as the supervisor sees it: control, observation, its snapshot and its end.

:class:`BackupJob` is what :meth:`Engine.create_backup
<shmblock.engine.Engine.create_backup>` returns. It sends control messages to the job's
worker (with the job's token), takes the job's snapshot inside a freeze
(:mod:`shmblock.freeze`, maps set by :mod:`shmblock.snapshot`), and makes sure the job's
end releases the device even when the worker died (:meth:`BackupJob.end`, called by the
pump before it concludes the job).
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

import protocol
from shmblock import layout as L
from shmblock import snapshot
from shmblock.errors import (
    JobError,
    PeerGone,
    StateError,
    TransportError,
    UsageError,
    VerificationError,
)
from shmblock.job import JobEvent, JobResult, JobState, JobTracker, Outcome
from shmblock.options import BackupOptions, check_speed
from shmblock.targets import TargetSpec
from shmblock.transport import Queue
from shmblock.verify import SnapshotCapture, verify_target

if TYPE_CHECKING:
    from shmblock.device_handle import DeviceHandle
    from shmblock.engine import Engine

STOP_TIMEOUT = 10.0
#: A worker blocked in one target call beats again after at most the target timeout;
#: it is only called stuck after twice that plus this margin (a commit is a flush and
#: a rename or two), so a hung target is reported by the worker, naming the target,
#: before the supervisor would blame the worker.
STUCK_MARGIN = 10.0


@dataclass
class BackupJob:
    """Handle on a running backup job."""

    engine: Engine
    job: str
    device: DeviceHandle
    spec: TargetSpec
    sync: str
    proc: subprocess.Popen[bytes]
    queue: Queue
    tracker: JobTracker
    options: BackupOptions | None = None  # None only for a job built by hand (tests)
    bitmap: snapshot.BitmapUse | None = None  # the dirty bitmap the job consumes
    capture: SnapshotCapture | None = None
    freeze_s: float = 0.0  # writers frozen, without the verification copy
    verify_copy_s: float = 0.0  # the verification copy, taken inside the freeze
    speed: int = 0
    stuck_timeout: float = 30.0 + STUCK_MARGIN
    result: JobResult | None = None
    covered: npt.NDArray[np.bool_] | None = None
    seq: int = 0  # the device's CTL_JOB_SEQ of this job's snapshot (0: never started)
    token: str = field(default="", repr=False)  # the secret shared with its worker
    #: Set by a grouped transaction (:mod:`shmblock.transaction`): :meth:`end` leaves the
    #: bitmap busy and unsettled, the transaction settles it (:meth:`settle_bitmap`) once
    #: every job of the group has concluded. Moves onto the lifecycle's JobTxn later.
    defer_bitmap: bool = False
    #: Called once at the end of :meth:`end` (before the job is concluded) with the
    #: outcome: how a grouped transaction learns that one of its jobs ended.
    on_end: Callable[[BackupJob, Outcome], None] | None = None
    _final_lock: threading.Lock = field(default_factory=threading.Lock)
    _end_lock: threading.Lock = field(default_factory=threading.Lock)
    _ended: bool = False

    # -- control --------------------------------------------------------------------

    def start(self) -> None:
        """Take the snapshot now (writers frozen for the instant) and start copying."""
        if self.tracker.state is not JobState.CREATED:
            raise StateError(f"cannot start a job that is {self.tracker.state.value}",
                             self.tracker.state.value, ("created",))
        self._take_snapshot()

    def _send(self, msg: protocol.Message) -> None:
        try:
            self.queue.send(msg, timeout=5.0)
        except TransportError as exc:
            raise PeerGone(f"the backup worker of job {self.job} is not answering: {exc}") from exc

    def pause(self) -> None:
        """Stop background copying; copy-before-write goes on. Only a running job."""
        self.tracker.apply("pause", "paused")
        self._send(protocol.Pause(job=self.job, token=self.token))

    def resume(self) -> None:
        """Resume background copying of a paused job (StateError in any other state)."""
        self.tracker.apply("resume", "resumed")
        self._send(protocol.Resume(job=self.job, token=self.token))

    def set_speed(self, speed: int) -> None:
        """Limit background copying to ``speed`` bytes per second (0 = unlimited)."""
        check_speed(speed)
        if self.tracker.concluded:
            raise StateError("cannot set the speed of a concluded job", "concluded",
                             ("created", "running", "paused"))
        self.speed = speed  # a created job's JobStart carries it too
        self._send(protocol.SetSpeed(job=self.job, speed=speed, token=self.token))
        self.tracker.note("speed", speed=speed)

    def cancel(self) -> None:
        """Ask the job to stop; the target is discarded. Wait with :meth:`wait`."""
        if not self.tracker.concluded:
            with contextlib.suppress(PeerGone):
                self._send(protocol.Cancel(job=self.job, token=self.token))

    def complete(self) -> None:
        """Finish a ``sync=none`` job now (the target keeps what was saved)."""
        if self.sync != "none":
            raise UsageError("only a sync=none job is completed on request")
        self._send(protocol.Complete(job=self.job, token=self.token))

    # -- observation ----------------------------------------------------------------

    @property
    def state(self) -> JobState:
        return self.tracker.state

    @property
    def progress(self) -> tuple[int, int]:
        """(bytes done, bytes to do), read live from shared memory."""
        ctl = self.device.device.ctl
        if self.tracker.concluded:
            return self.tracker.done, self.tracker.total
        return int(ctl[L.CTL_DONE_BYTES]), int(ctl[L.CTL_TOTAL_BYTES])

    @property
    def events(self) -> list[JobEvent]:
        return list(self.tracker.events)

    def wait(self, timeout: float | None = None) -> JobResult:
        """Wait for the job to conclude, verify if asked, and return its result.

        Raises JobError on timeout; a failed job is a result, not an exception. If the
        supervisor's pump thread (which turns the worker's reports into the job's state)
        is dead, the job is concluded failed instead of waited for forever.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.tracker.wait(0.5 if deadline is None
                                    else min(max(deadline - time.monotonic(), 0.0), 0.5)):
            if failure := self.engine.pump.failure():
                self.engine.pump.fail_jobs(failure)
            elif deadline is not None and time.monotonic() >= deadline:
                raise JobError(f"job {self.job} did not conclude within {timeout} s")
        with self._final_lock:
            if self.result is None:
                self.result = self._finalise()
        return self.result

    def _finalise(self) -> JobResult:
        t = self.tracker
        assert t.outcome is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.end(t.outcome)
        start = t.running_since or t.started
        result = JobResult(
            job=self.job, outcome=t.outcome, error=t.error, target=self.spec.target,
            format=self.spec.format, sync=self.sync, bytes_total=t.total,
            bytes_written=t.final.get("bytes_written", 0),
            clusters_copied=t.final.get("clusters_copied", 0),
            cbw_clusters=t.final.get("cbw_clusters", 0),
            duration_s=max(t.ended - start, 0.0), freeze_s=self.freeze_s,
            verify_copy_s=self.verify_copy_s)
        if self.capture is not None:
            self.capture.join()
            if t.outcome is Outcome.COMPLETED:
                try:
                    verify_target(self.spec, self.capture, self.covered)
                    result.verified = True
                except VerificationError as exc:
                    result.verified = False
                    result.verify_error = str(exc)
                t.note("verified", ok=result.verified, error=result.verify_error)
            elif self.capture.error:
                result.verify_error = self.capture.error
        return result

    # -- the snapshot and the job's end (supervisor side) ---------------------------

    def _take_snapshot(self) -> None:
        """Freeze the writers, set the maps for the sync mode, thaw, start copying."""
        start = self.snapshot_before_freeze()
        try:
            t0 = time.monotonic()
            with self.engine.freeze([self.device]):
                self.snapshot_in_freeze(t0)
            self.snapshot_after_freeze(start)
        except BaseException:
            self.snapshot_abort()
            raise
        self.snapshot_started()

    # The snapshot in parts, so that a transaction (:mod:`shmblock.transaction`) takes the
    # snapshots of several jobs inside one freeze: before (no writer stopped), inside
    # (every writer of every device quiesced), after (thawed), and abort for any
    # exception between the first and the last.

    def snapshot_before_freeze(self) -> protocol.JobStart:
        """Store the copy-before-write policy; build the JobStart (nothing set yet)."""
        assert self.options is not None, "a job built by hand has no snapshot to take"
        opts = self.options
        snapshot.configure(self.device.device, opts.cbw_mode, opts.cbw_timeout,
                           opts.on_cbw_error)
        # Built before the freeze: a message that cannot be built (a bad speed) must
        # fail before the snapshot, not leave a snapshot that no worker copies.
        return protocol.JobStart(job=self.job, sync=snapshot.wire_sync(self.sync),
                                 speed=self.speed, token=self.token)

    def snapshot_in_freeze(self, t0: float) -> None:
        """Set the maps (and copy for verification): only while the device is frozen.

        ``t0`` is when the freeze was asked for, for :attr:`freeze_s`.
        """
        dev = self.device.device
        capture = self.capture
        copy_s = 0.0
        self.seq = snapshot.take(dev, self.sync, self.bitmap)
        if capture is not None:
            c0 = time.monotonic()
            capture.capture()
            copy_s = time.monotonic() - c0
        self.covered = snapshot.marked(dev)
        # What the writers feel, reported apart from the verification copy
        # (which grows with the device and is only there when asked for).
        self.verify_copy_s = copy_s
        self.freeze_s = time.monotonic() - t0 - copy_s

    def snapshot_after_freeze(self, start: protocol.JobStart) -> None:
        """Thawed: start digesting the capture, then tell the worker to copy."""
        # Digests first, JobStart after: an exception in between (Ctrl-C raises
        # wherever shmblock-run's main thread is) must not leave a job running
        # whose snapshot nobody digests.
        if self.capture is not None:
            self.capture.finish_async()
        # A worker that never gets JobStart would leave the writers saving
        # clusters that nobody copies: undo the snapshot if it cannot be sent.
        self.queue.send(start, timeout=5.0)

    def snapshot_abort(self) -> None:
        """Take back a snapshot whose JobStart was not sent (the bitmap gets its bits
        back), and cancel the worker."""
        with self._end_lock:
            snapshot.undo(self.device.device, self.bitmap)
        self.cancel()

    def snapshot_started(self) -> None:
        """The JobStart is sent: the job runs (unless its worker ended meanwhile)."""
        dev = self.device.device
        with contextlib.suppress(StateError):  # the worker may have failed already
            self.tracker.apply("start", "running")
        if self.tracker.concluded:
            # The worker ended (died) while the snapshot was taken; its end may have
            # been handled before the maps were set, and nobody would copy them now.
            with self._end_lock:
                if snapshot.is_current(dev, self.seq):
                    snapshot.undo(dev, self.bitmap)

    def end(self, outcome: Outcome) -> None:
        """Make sure a job that ends with ``outcome`` leaves writers free and no partial file.

        Runs once per job: the pump calls it *before* it concludes the job, so whoever
        sees a concluded job sees the device released, and a later call (from
        :meth:`wait`, however late) does nothing. It would otherwise clear the map of
        the device's next job, or delete that job's partial file when it writes to the
        same target. The map is only touched if no newer job has started.
        """
        with self._end_lock:
            if self._ended:
                return
            self._ended = True
            # What the target covers, read now: a sync=none job covers what it saved,
            # and the ``saved`` map is cleared by the device's next snapshot, which may
            # be taken long before anyone calls wait().
            dev = self.device.device
            if not dev.closed and int(dev.ctl[L.CTL_JOB_SEQ]) == self.seq:
                self.covered = snapshot.covered(dev, self.sync, self.covered)
            # The worker died without releasing the snapshot (SIGKILL): do it for it.
            snapshot.release_if_current(self.device.device, self.seq)
            if self.bitmap is not None and not self.defer_bitmap:
                self.settle_bitmap(outcome is Outcome.COMPLETED)
            if self.spec.part is not None and outcome is not Outcome.COMPLETED:
                # Only if it is still the .part our worker created (not another job's).
                self.engine.record.discard_part(self.spec.part)
            if self.on_end is not None:
                self.on_end(self, outcome)

    def settle_bitmap(self, completed: bool) -> None:
        """Decide the bitmap's fate (:func:`snapshot.settle_bitmap`) and free it. Once.

        ``completed``: whether to settle as a success; a grouped transaction passes the
        group's outcome, not the job's. Only after :meth:`end` (the worker is done: its
        ``saved`` map is final), or for a job whose snapshot was never taken.
        """
        if self.bitmap is None:
            return
        # The worker's saved map belongs to this job only while no newer job has
        # taken a snapshot of the device; after that nothing counts as copied.
        dev = self.device.device
        own = not dev.closed and int(dev.ctl[L.CTL_JOB_SEQ]) == self.seq
        snapshot.settle_bitmap(dev, self.bitmap, completed, self.covered,
                               copied_known=self.spec.is_file and own)
        self.device.release_bitmap(self.bitmap.name, self.job)
