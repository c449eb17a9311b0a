"""The supervisor pump: one thread that receives the supervisor queue and watches children.

Theory of operation. Workers report to one supervisor queue, which any process of this
user can write to; the pump checks every message against what the engine asked for:

* ``Ready`` counts only for the pid of the process being waited for (:meth:`wait_ready`),
  and a backup worker's only for a number the engine handed it on its private stdin
  (:meth:`expect_ready`, :mod:`shmblock.backup_workers`): one with another number is
  rejected on arrival;
* ``Frozen`` counts only for an epoch being frozen right now and only with the writer's
  token (:mod:`shmblock.freeze` waits on them);
* ``Job*`` reports count only with the job's token (handed to its worker on stdin); the
  first report that ends a job releases its device (:meth:`BackupJob.end
  <shmblock.backup_job.BackupJob.end>`) *before* the job is concluded, so whoever sees a
  concluded job sees writers free.

Everything else is counted in the queue's ``rejected`` counter and logged. Between
messages the pump watches the backup workers: one that exits without reporting, or whose
heartbeat stops for its stuck timeout (then it is killed), fails its job.

No single message may end the loop: an exception while handling one is logged and
counted (:attr:`Pump.errors`) and the loop goes on. If the loop ends anyway, every job
still running is failed at once, and every wait that depends on the pump checks
:meth:`Pump.failure` so none hangs.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import protocol
from shmblock import layout as L
from shmblock.errors import PeerGone, TransportError
from shmblock.job import JobState, Outcome
from shmblock.transport import Queue

if TYPE_CHECKING:
    from shmblock.backup_job import BackupJob
    from shmblock.device_handle import DeviceHandle, WriterProcess

log = logging.getLogger("shmblock.engine")

PUMP_INTERVAL = 0.02
STOP_TIMEOUT = 10.0


class Pump:
    """The supervisor queue's receiver and the children's watcher (a thread)."""

    def __init__(self, sup: Queue, jobs: dict[str, BackupJob],
                 writers: list[WriterProcess]) -> None:
        self.sup = sup
        self.jobs = jobs
        self.writers = writers
        self.cond = threading.Condition()
        self.frozen: set[tuple[int, int]] = set()  # (epoch, writer) that answered
        self.freezing: dict[int, DeviceHandle] = {}  # epoch → device, freezes in progress
        self.ready: dict[tuple[str, int], int] = {}
        #: the backup Ready numbers handed to workers and not yet answered
        self.expected_ready: set[int] = set()
        self.pending_failures: dict[str, str] = {}
        # job id → the secret its worker got on stdin; Job* messages must carry it.
        self.job_tokens: dict[str, str] = {}
        #: Exceptions caught while handling one message or watching children.
        self.errors = 0
        self.error = ""  # why the thread ended, if it ended on its own
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.loop, name="shmblock-pump", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)

    def loop(self) -> None:
        """Receive the supervisor queue and watch the children until told to stop."""
        try:
            while not self._stop.is_set():
                try:
                    msg = self.sup.receive(PUMP_INTERVAL)
                except TransportError as exc:
                    if self._stop.is_set():
                        return
                    raise PeerGone(f"the supervisor queue failed: {exc}") from exc
                if msg is not None:
                    self.guarded(self.dispatch, msg)
                self.guarded(self.watch_children)
        except BaseException as exc:
            self.error = protocol.short_error(
                f"the supervisor's message pump stopped ({type(exc).__name__}: {exc})")[:300]
            log.critical("%s", self.error, exc_info=True)
            with contextlib.suppress(Exception):
                self.fail_jobs(self.error)
            with self.cond:
                self.cond.notify_all()
            # Not re-raised: the thread ends here either way, and the jobs already say why.

    def guarded(self, handler: Callable[..., None], *args: Any) -> None:
        """Run one pump step; an Exception from it is logged and counted, not fatal."""
        try:
            handler(*args)
        except Exception:
            self.errors += 1
            if self.errors <= 10 or self.errors % 1000 == 0:
                log.exception("supervisor pump: error #%d in %s (carrying on)",
                              self.errors, getattr(handler, "__name__", "a handler"))

    def failure(self) -> str:
        """Why the pump is not running ('' while it runs, or after close stopped it)."""
        if self._thread.is_alive() or self._stop.is_set():
            return ""
        return self.error or "the supervisor's message pump is not running"

    def fail_jobs(self, reason: str) -> None:
        """Fail every job whose work goes on: kill its worker, free the device.

        A job whose work has ended (``pending``, waiting for ``finalize``) needs no
        pump; it is left to its caller (or to :meth:`Engine.close`, which aborts it).
        """
        for job in list(self.jobs.values()):
            if job.tracker.lifecycle.work_over:
                continue
            if job.proc.poll() is None:
                job.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    job.proc.wait(STOP_TIMEOUT)
            job.end(Outcome.FAILED)
            job.tracker.conclude(Outcome.FAILED, reason)

    def expect_ready(self, ready: int) -> None:
        """A backup worker is about to be handed ``ready``; its Ready will name it."""
        with self.cond:
            self.expected_ready.add(ready)

    def wait_ready(self, role: str, ident: int, proc: subprocess.Popen[bytes],
                   deadline: float, give_up: Callable[[], bool] = lambda: False) -> bool:
        """Wait for the Ready of ``proc``; False if it exits, times out, the pump died
        or ``give_up()`` (a persistent worker reported the job failed instead).

        A Ready counts only when it names the pid of ``proc``: anyone can write to the
        supervisor queue, and a forged Ready would have the job started before its
        worker listens.
        """
        try:
            return self._wait_ready(role, ident, proc, deadline, give_up)
        finally:
            if role == "backup":  # a number is used once: a late Ready for it is stale
                with self.cond:
                    self.expected_ready.discard(ident)
                    self.ready.pop((role, ident), None)

    def _wait_ready(self, role: str, ident: int, proc: subprocess.Popen[bytes],
                    deadline: float, give_up: Callable[[], bool]) -> bool:
        with self.cond:
            while self.ready.get((role, ident)) != proc.pid:
                if (role, ident) in self.ready:
                    pid = self.ready.pop((role, ident))
                    self.sup.rejected += 1
                    log.warning("supervisor queue: ignored Ready for %s %d from pid %d, "
                                "not %d", role, ident, pid, proc.pid)
                    continue
                if proc.poll() is not None or time.monotonic() > deadline \
                        or self.failure() or give_up():
                    return False
                self.cond.wait(0.05)
            self.ready.pop((role, ident))
        return True

    # -- messages -------------------------------------------------------------------------

    def dispatch(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Frozen):
            self._frozen(msg)
        elif isinstance(msg, protocol.Ready):
            with self.cond:
                if msg.role == "backup" and msg.ident not in self.expected_ready:
                    self.reject(msg, f"no backup worker was handed Ready number {msg.ident}")
                    return
                self.ready[(msg.role, msg.ident)] = msg.pid
                self.cond.notify_all()
        elif isinstance(msg, protocol.WriterDone):
            known = False
            for w in self.writers:
                if w.ident == msg.writer:
                    w.done, w.ok, w.error = True, msg.ok, msg.error
                    known = True
            if not known:
                self.reject(msg, f"this run has no writer {msg.writer}")
        elif isinstance(msg, protocol.JobProgress | protocol.JobCompleted | protocol.JobFailed
                        | protocol.JobCancelled | protocol.JobError):
            self._job_report(msg)
        else:
            self.reject(msg, "not a message the supervisor receives")

    def _frozen(self, msg: protocol.Frozen) -> None:
        with self.cond:
            device = self.freezing.get(msg.epoch)
            writer = next((w for w in self.writers
                           if w.device is device and w.ident == msg.writer), None)
            # Only the writer itself knows its token: a Frozen forged by another
            # process would let the snapshot start while that writer still writes.
            if writer is not None and hmac.compare_digest(msg.token, writer.token):
                self.frozen.add((msg.epoch, msg.writer))
                self.cond.notify_all()
                return
        if device is None:
            # Late (its freeze gave up) or never asked for: counting it could let a
            # later freeze skip a writer that is still writing.
            self.reject(msg, f"epoch {msg.epoch} is not being frozen")
        else:
            self.reject(msg, f"it is not from writer {msg.writer} of {device.name} "
                             "(no such writer, or not its token)")

    def _job_report(self, msg: protocol.JobProgress | protocol.JobCompleted
                    | protocol.JobFailed | protocol.JobCancelled | protocol.JobError) -> None:
        # Any process of this user can write to the supervisor queue; only the job's
        # own worker knows its token (handed over on its stdin at spawn).
        token = self.job_tokens.get(msg.job)
        if token is None:
            self.reject(msg, f"this run has no job {msg.job!r}")
            return
        if not hmac.compare_digest(msg.token, token):
            self.reject(msg, f"it does not carry the token of job {msg.job!r}, so it "
                             "is not from that job's worker")
            return
        job = self.jobs.get(msg.job)
        if job is None:
            if isinstance(msg, protocol.JobFailed):
                # A worker can fail before create_backup has registered its job.
                self.pending_failures[msg.job] = msg.error
            return
        t = job.tracker
        # The work's end releases the device (job.end) before the lifecycle hears of it:
        # with auto-finalize the lifecycle then runs the job's hooks (publish or discard
        # the target, settle the bitmap) in this thread, before the job concludes.
        over = t.lifecycle.work_over
        if isinstance(msg, protocol.JobProgress):
            t.progress(msg.done, msg.total)
        elif isinstance(msg, protocol.JobError):
            if over or t.state is JobState.CREATED:
                self.reject(msg, f"job {msg.job!r} has no I/O that can fail now")
                return
            policy = job.options.on_target_error if job.options else "report"
            if msg.operation == "read" and job.options:
                policy = job.options.on_source_error
            t.io_error(policy, msg.errno, msg.operation, msg.error)
        elif isinstance(msg, protocol.JobCompleted):
            total = t.total or int(job.device.device.ctl[L.CTL_TOTAL_BYTES])
            t.progress(total, total)
            if not over:
                job.end(Outcome.COMPLETED)
            t.conclude(Outcome.COMPLETED, bytes_written=msg.bytes_written,
                       clusters_copied=msg.clusters_copied, cbw_clusters=msg.cbw_clusters)
        elif isinstance(msg, protocol.JobFailed):
            if t.state is JobState.CREATED:
                self.pending_failures[msg.job] = msg.error
            if not over:
                job.end(Outcome.FAILED)
            t.conclude(Outcome.FAILED, msg.error)
        else:
            if not over:
                job.end(Outcome.CANCELLED)
            t.conclude(Outcome.CANCELLED)

    def reject(self, msg: protocol.Message, why: str) -> None:
        """Count and log a well-formed message that the supervisor cannot act on.

        Like a malformed one (:class:`~shmblock.transport.Queue` counts those in the
        same counter), it is a peer's mistake: logged, counted, and otherwise ignored.
        """
        self.sup.rejected += 1
        log.warning("supervisor queue: ignored %s: %s", type(msg).__name__, why)

    # -- children -------------------------------------------------------------------------

    def watch_children(self) -> None:
        now_ns = time.monotonic_ns()
        for job in list(self.jobs.values()):
            t = job.tracker
            if t.lifecycle.work_over:
                # Its worker reported the end and exits (pending: nothing runs any more,
                # so there is no heartbeat to watch), or it was killed already.
                continue
            code = job.proc.poll()
            if code is not None:
                # Give a final message already in the queue a chance to arrive first.
                for msg in self.sup.drain():
                    self.guarded(self.dispatch, msg)
                if not t.lifecycle.work_over:
                    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                    job.end(Outcome.FAILED)
                    t.conclude(Outcome.FAILED, f"the backup worker died ({how})")
                continue
            ctl = job.device.device.ctl
            # A worker that never beat for this job (stuck before its first loop) is
            # measured from the job's start, as is one whose last beat is an older job's.
            beat = max(int(ctl[L.CTL_HEARTBEAT_NS]), int(t.running_since * 1e9))
            if t.state is not JobState.CREATED and now_ns - beat > job.stuck_timeout * 1e9:
                log.error("backup worker of %s stopped beating: killing it", job.job)
                job.proc.kill()
                job.proc.wait()
                job.end(Outcome.FAILED)
                t.conclude(Outcome.FAILED, f"the backup worker stopped responding for "
                                           f"{job.stuck_timeout:g} s and was killed")
