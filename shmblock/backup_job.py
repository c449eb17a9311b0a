"""A backup job as the supervisor sees it: control, observation, its snapshot and its end.

:class:`BackupJob` is what :meth:`Engine.create_backup
<shmblock.engine.Engine.create_backup>` returns. It sends control messages to the job's
worker (with the job's token), takes the job's snapshot inside a freeze
(:mod:`shmblock.freeze`, maps set by :mod:`shmblock.snapshot`), and makes sure the job's
end releases the device even when the worker died (:meth:`BackupJob.end`, called by the
pump before it reports the work's end to the lifecycle).

Theory of operation: the job's status is QEMU's job lifecycle (:class:`shmblock.job.
JobLifecycle`, driven through the job's :class:`~shmblock.job.JobTracker`). The verbs
(:meth:`~BackupJob.pause`, :meth:`~BackupJob.resume`, :meth:`~BackupJob.cancel`,
:meth:`~BackupJob.set_speed`, :meth:`~BackupJob.complete`, :meth:`~BackupJob.finalize`,
:meth:`~BackupJob.dismiss`) are checked against QEMU's verb table first (a refused one
raises :class:`~shmblock.errors.StateError` "Job 'job1' in state 'concluded' cannot
accept command verb 'pause'") and only then reach the worker.

The work and the outcome are apart. The worker copies, drains, seals the target (a file
target is then a complete, durable ``.part``; :meth:`Target.seal
<shmblock.targets.base.Target.seal>`), releases the writers and reports
``JobCompleted``, then exits: nothing of the job runs any more, so no heartbeat is
watched while the job waits in ``pending``. The outcome and the bitmap's fate are
decided by the lifecycle's hooks, which are this class's methods:

* :meth:`BackupJob.prepare` (``pending``, before any job of the transaction commits):
  the ``.part`` is still the file our worker created, durable; an error aborts;
* :meth:`BackupJob.commit`: publish the ``.part`` by rename (the supervisor owns the
  file record; the worker is gone), then settle the bitmap as completed;
* :meth:`BackupJob.abort` (failed, cancelled, or its transaction aborted, including a
  ``cancel`` in ``pending``): discard the ``.part``, put the bitmap's bits back as the
  bitmap mode says for a job that did not complete;
* :meth:`BackupJob.clean`: the bitmap is free for other jobs.

With ``auto_finalize`` (the default) the pump runs them as soon as the work ends; with
``auto_finalize=False`` the job waits in ``pending`` — target not published, bitmap not
settled — until :meth:`finalize` (or :meth:`cancel`, which aborts). ``auto_dismiss`` is
off by default here, unlike QEMU: a Python caller holds the handle, and a job that
vanished to ``null`` by itself would surprise a caller that reads ``state``. Either way
:meth:`wait` returns the result, which the handle keeps after ``dismiss``. Transactions
(``shmblock/transaction.py``) plug into the same hooks through the lifecycle's
:class:`~shmblock.job.JobTxn`.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

import protocol
from shmblock import cbw_buffer, snapshot
from shmblock import layout as L
from shmblock.errors import (
    JobError,
    PeerGone,
    StateError,
    TransportError,
    UsageError,
    VerificationError,
)
from shmblock.job import (
    WORK_ENDED,
    JobEvent,
    JobHooks,
    JobLifecycle,
    JobResult,
    JobState,
    JobTracker,
    Outcome,
)
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
    #: ``proc`` is the device's worker, which outlives the job (per-device workers,
    #: :mod:`shmblock.backup_workers`): not waited for, not killed at the job's end
    shared_worker: bool = False
    part_identity: tuple[int, int] | None = None  # (dev, ino) of the worker's .part
    publish_error: str = ""  # the rename in commit failed (practically never)
    _final_lock: threading.Lock = field(default_factory=threading.Lock)
    _end_lock: threading.Lock = field(default_factory=threading.Lock)
    _ended: bool = False
    _part_fd: int | None = None  # the .part, opened and checked by prepare()
    cbw_buffer: cbw_buffer.BufferStats | None = None  # read by end()

    def __post_init__(self) -> None:
        # The lifecycle calls these when it decides the outcome (see the module docstring).
        self.tracker.lifecycle.hooks = JobHooks(
            on_prepare=lambda _: self.prepare(), on_commit=lambda _: self.commit(),
            on_abort=lambda _: self.abort(), on_clean=lambda _: self.clean(),
            on_cancel=lambda _: self._tell_cancel())

    @property
    def lifecycle(self) -> JobLifecycle:
        return self.tracker.lifecycle

    # -- control --------------------------------------------------------------------

    def start(self) -> None:
        """Take the snapshot now (writers frozen for the instant) and start copying."""
        if self.tracker.state is not JobState.CREATED:
            raise StateError(f"Job '{self.job}' in state '{self.tracker.state.value}' "
                             "cannot accept command verb 'start'",
                             self.tracker.state.value, ("created",), job=self.job,
                             verb="start")
        self._take_snapshot()

    def _send(self, msg: protocol.Message) -> None:
        try:
            self.queue.send(msg, timeout=5.0)
        except TransportError as exc:
            raise PeerGone(f"the backup worker of job {self.job} is not answering: {exc}") from exc

    def pause(self) -> None:
        """Stop background copying; copy-before-write goes on (QEMU's ``job-pause``).

        Accepted ``created`` (takes effect at the start), ``running``; StateError naming
        the job, its state and the verb otherwise (and when it is paused already).
        """
        self.tracker.command("pause")
        self._send(protocol.Pause(job=self.job, token=self.token))

    def resume(self) -> None:
        """Resume background copying of a paused job, also one an error policy stopped
        (the failed chunk is copied again); StateError if it is not paused."""
        self.tracker.command("resume")
        self._send(protocol.Resume(job=self.job, token=self.token))

    def set_speed(self, speed: int) -> None:
        """Limit background copying to ``speed`` bytes per second (0 = unlimited).

        QEMU's ``block-job-set-speed``: accepted while the work goes on (``created``,
        ``running``, ``paused``), refused (StateError) once it has ended.
        """
        check_speed(speed)
        self.tracker.command("set-speed", speed=speed)
        self.speed = speed  # a created job's JobStart carries it too
        self._send(protocol.SetSpeed(job=self.job, speed=speed, token=self.token))

    def cancel(self) -> None:
        """Cancel the job (QEMU's ``job-cancel``); the target is discarded, the bitmap
        kept as the bitmap mode says for a cancelled job. Wait with :meth:`wait`.

        A ``created`` job concludes ``cancelled`` at once; a running or paused one when
        its worker has stopped; a ``waiting`` or ``pending`` one (its work done, not
        finalized) aborts at once. StateError once the outcome is decided
        (``aborting``, ``concluded``, ``null``).
        """
        was_created = self.tracker.state is JobState.CREATED
        self.tracker.command("cancel")
        if was_created:  # the lifecycle concluded it; the worker still waits for JobStart
            self._tell_cancel()

    def _tell_cancel(self) -> None:
        with contextlib.suppress(PeerGone):
            self._send(protocol.Cancel(job=self.job, token=self.token))

    def complete(self) -> None:
        """Finish a ``sync=none`` job now: the target keeps what copy-before-write saved.

        Not QEMU's ``job-complete``, which needs a ``ready`` job (a backup never is):
        QEMU ends a ``sync=none`` backup only by cancelling it; here this asks the
        worker to end its work well, and the job goes ``waiting → pending →
        concluded`` like any backup. UsageError for another sync mode; StateError
        (verb ``complete``) unless the job is ``running`` or ``paused``, not cancelled.
        """
        if self.sync != "none":
            raise UsageError("only a sync=none job is completed on request")
        lc = self.lifecycle
        if lc.state not in (JobState.RUNNING, JobState.PAUSED) or lc.cancelled:
            raise StateError(f"Job '{self.job}' in state '{lc.state.value}' cannot accept "
                             "command verb 'complete'", lc.state.value,
                             ("running", "paused"), job=self.job, verb="complete")
        self._send(protocol.Complete(job=self.job, token=self.token))

    def finalize(self) -> None:
        """Decide a ``pending`` job's outcome (QEMU's ``job-finalize``; only with
        ``auto_finalize=False``): publish the target, settle the bitmap. Finalizes every
        job of its transaction. StateError in any other state."""
        self.tracker.command("finalize")

    def dismiss(self) -> None:
        """Forget a ``concluded`` job (QEMU's ``job-dismiss``; only with
        ``auto_dismiss=False``): ``concluded → null``. The handle keeps its result."""
        self.tracker.command("dismiss")

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

    def wait_work(self, timeout: float | None = None) -> JobState:
        """Wait until the job's work has ended (``waiting``, ``pending``, ``aborting``,
        ``concluded`` or ``null``) and return its state: what a caller with
        ``auto_finalize=False`` waits for before :meth:`finalize`. JobError on timeout.
        """
        self._wait_until(lambda: self.tracker.state in WORK_ENDED, timeout, "end its work")
        return self.tracker.state

    def _wait_until(self, done: Callable[[], bool], timeout: float | None,
                    what: str) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.tracker.wait_for(done, 0.5 if deadline is None
                                        else min(max(deadline - time.monotonic(), 0.0),
                                                 0.5)):
            if failure := self.engine.pump.failure():
                self.engine.pump.fail_jobs(failure)
            elif deadline is not None and time.monotonic() >= deadline:
                raise JobError(f"job {self.job} did not {what} within {timeout} s "
                               f"(it is {self.tracker.state.value})")

    def wait(self, timeout: float | None = None) -> JobResult:
        """Wait for the job to conclude, verify if asked, and return its result.

        Raises JobError on timeout; a failed job is a result, not an exception. If the
        supervisor's pump thread (which turns the worker's reports into the job's state)
        is dead, the job is concluded failed instead of waited for forever. A job with
        ``auto_finalize=False`` concludes only when someone calls :meth:`finalize` or
        :meth:`cancel` (see :meth:`wait_work`); with ``auto_dismiss`` it goes on to
        ``null``, and the result is still returned (and kept: :attr:`result`).
        """
        self._wait_until(lambda: self.tracker.concluded, timeout, "conclude")
        with self._final_lock:
            if self.result is None:
                self.result = self._finalise()
        return self.result

    def _finalise(self) -> JobResult:
        t = self.tracker
        assert t.outcome is not None
        if not self.shared_worker:  # a worker of its own exits after the job
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
            verify_copy_s=self.verify_copy_s, cbw_buffer=self.cbw_buffer)
        if self.publish_error:  # the job concluded completed, but its file is not there
            result.outcome, result.error = Outcome.FAILED, self.publish_error
        if self.capture is not None:
            self.capture.join()
            if result.outcome is Outcome.COMPLETED:
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
        self.snapshot_check()

    # The snapshot in parts, so that a transaction (:mod:`shmblock.transaction`) takes the
    # snapshots of several jobs inside one freeze: before (no writer stopped), inside
    # (every writer of every device quiesced), after (thawed), abort for any exception
    # between the first and the last, and the check once the job runs.

    def snapshot_before_freeze(self) -> protocol.JobStart:
        """Store the copy-before-write policy; build the JobStart (nothing set yet)."""
        assert self.options is not None, "a job built by hand has no snapshot to take"
        opts = self.options
        snapshot.configure(self.device.device, opts.cbw_mode, opts.cbw_timeout,
                           opts.on_cbw_error)
        cbw_buffer.configure(self.device.device, opts.cbw_buffer, opts.cbw_mode)
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
        """Thawed: start digesting the capture, mark the job started, tell the worker."""
        # Digests first, JobStart after: an exception in between (Ctrl-C raises
        # wherever shmblock-run's main thread is) must not leave a job running
        # whose snapshot nobody digests.
        if self.capture is not None:
            self.capture.finish_async()
        # Started before JobStart is sent: the worker's first report (a JobError
        # for a chunk that failed at once, its JobCompleted) must find the job
        # running, not created.
        with contextlib.suppress(StateError):  # the worker may have failed already
            self.tracker.command("start")
        # A worker that never gets JobStart would leave the writers saving
        # clusters that nobody copies: undo the snapshot if it cannot be sent.
        self.queue.send(start, timeout=5.0)

    def snapshot_abort(self) -> None:
        """Take back a snapshot whose JobStart was not sent (the bitmap gets its bits
        back), and cancel the worker."""
        with self._end_lock:
            snapshot.undo(self.device.device, self.bitmap)
        with contextlib.suppress(StateError):  # concluded already (its worker died)
            self.cancel()

    def snapshot_check(self) -> None:
        """After the JobStart: a worker that ended (died) while the snapshot was taken
        may have been handled before the maps were set, and nobody would copy them."""
        dev = self.device.device
        if self.tracker.concluded:
            with self._end_lock:
                if snapshot.is_current(dev, self.seq):
                    snapshot.undo(dev, self.bitmap)

    def end(self, outcome: Outcome | None = None) -> None:
        """The job's work is over: make sure writers run free. Once per job.

        The pump calls it *before* it reports the work's end to the lifecycle, so
        whoever sees the work ended sees the device released, and a later call (from a
        hook or :meth:`wait`, however late) does nothing; it would otherwise clear the
        map of the device's next job. The map is only touched if no newer job has
        started. What the target covers is read here too: a sync=none job covers what
        it saved, and the ``saved`` map is cleared by the device's next snapshot.
        ``outcome`` is informational (the bitmap and the target are settled by
        :meth:`commit` / :meth:`abort`).
        """
        with self._end_lock:
            if self._ended:
                return
            self._ended = True
            dev = self.device.device
            if not dev.closed and int(dev.ctl[L.CTL_JOB_SEQ]) == self.seq:
                self.covered = snapshot.covered(dev, self.sync, self.covered)
                self.cbw_buffer = cbw_buffer.stats(dev)
            # The worker died without releasing the snapshot (SIGKILL): do it for it.
            snapshot.release_if_current(self.device.device, self.seq)

    # -- the lifecycle's hooks (QEMU's JobDriver .prepare/.commit/.abort/.clean) -----------

    def prepare(self) -> str | None:
        """``pending``: can the job commit? None if so, else why not (the job aborts).

        A file target's ``.part`` must still be the regular file our worker created
        (the inode recorded when it appeared) and is made durable once more; it stays
        open for :meth:`commit`, which renames it.
        """
        self.end()
        part = self.spec.part
        if part is None:
            return None  # NBD: the worker's seal flushed it; nothing to publish
        try:
            fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            return f"the finished backup {part!r} cannot be opened: {exc.strerror}"
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (
                    self.part_identity is not None
                    and (st.st_dev, st.st_ino) != self.part_identity):
                raise OSError(0, "it is not the file this job's worker created")
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            return f"the finished backup {part!r} cannot be published: {exc.strerror}"
        self._close_part()
        self._part_fd = fd
        return None

    def commit(self) -> None:
        """The job completed: publish the ``.part`` (rename, then fsync the directory),
        then settle the bitmap as completed. If the rename fails anyway, the bitmap is
        settled as for a failure and the result says failed (:attr:`publish_error`)."""
        completed = True
        part, path = self.spec.part, self.spec.file
        if part is not None and path is not None:
            try:
                self._publish(part, path)
            except OSError as exc:
                completed = False
                self.publish_error = f"cannot publish {path!r}: {exc.strerror or exc}"
                self.engine.record.discard_part(part)
            finally:
                self._close_part()
        self._settle_bitmap(completed)

    def abort(self) -> None:
        """The job failed or was cancelled (or its transaction aborted): discard the
        ``.part``, put the bitmap's bits back as its mode says."""
        self.end()
        self._close_part()
        if self.spec.part is not None:
            # Only if it is still the .part our worker created (not another job's).
            self.engine.record.discard_part(self.spec.part)
        self._settle_bitmap(False)

    def clean(self) -> None:
        """After commit or abort: the bitmap is free for other jobs."""
        if self.bitmap is not None:
            self.device.release_bitmap(self.bitmap.name, self.job)

    def _publish(self, part: str, path: str) -> None:
        fd = self._part_fd
        if fd is None:
            raise OSError(0, "it was not prepared")
        st, now = os.fstat(fd), os.lstat(part)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            raise OSError(0, f"{part!r} was replaced after it was checked")
        os.rename(part, path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a crash
        finally:
            os.close(dir_fd)

    def _close_part(self) -> None:
        if self._part_fd is not None:
            fd, self._part_fd = self._part_fd, None
            os.close(fd)

    def _settle_bitmap(self, completed: bool) -> None:
        if self.bitmap is not None:
            # The bitmap's fate, from the outcome and what the worker saved (the
            # worker is done: its saved map is final). A job that did not complete
            # counts nothing as copied, whatever its bitmap mode: a file target's
            # ``.part`` is discarded by abort, and an NBD target's pipelined writes
            # are not known to have landed. So ``always`` puts every bit back after a
            # failure, like ``on-success`` (QEMU clears what reached a target it keeps;
            # ours is gone): invariant 8, no bit of data that is not backed up is lost.
            snapshot.settle_bitmap(self.device.device, self.bitmap, completed,
                                   self.covered, copied_known=completed and self.spec.is_file)
