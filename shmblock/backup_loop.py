"""The backup job loop: what a backup worker does, runnable in any process.

:class:`BackupLoop` is the worker side of one job. ``workers.backup`` runs it in its own
process around real queues; a test can run it in-process with a target and a fake inbox
(anything with ``receive``/``drain``/``rejected``). Theory of operation:

The loop opens the target (so an unreachable target fails the job before any writer is
frozen), says Ready, waits for JobStart (sent once the supervisor has frozen the writers
and set the maps, :mod:`shmblock.snapshot`; it carries the sync mode and the speed),
then loops:

1. take every queued message: copy requests join the pending list, job control (pause,
   resume, set-speed, cancel, complete) is applied — only with the job's token;
2. serve the pending copy requests (:meth:`CopyRequests.serve`: under the cluster's
   claim, never waiting for it — a request whose claim a writer holds stays pending for
   the next loop, because that writer is staging the cluster itself and will be done in
   microseconds); once the target has acknowledged the writes (``settle``), answer them;
   a request of another job is answered without copying anything;
3. drain the staging slots writers filled;
4. copy the next background chunk, unless paused or over the speed limit (with no
   speed limit and no request pending, a short burst of them: :meth:`BackupLoop.burst`);
5. when there is nothing to do, sleep on the inbox for a few milliseconds, with the
   ``CTL_WORKER_IDLE`` flag up so staging writers ring the doorbell.

Requests that arrive before JobStart stay pending until it comes.

The job ends completed (every staged cluster drained, target committed — a heartbeat
thread keeps beating through a long final flush), failed (target error, broken
snapshot, the supervisor gone) or cancelled. In every case :meth:`BackupLoop.conclude`
releases the snapshot (:func:`shmblock.snapshot.release`) so writers run free and
answers every request still pending or queued: ``ok`` when nothing needs saving any more
(completed, cancelled), a failure — marked as a target error when the target failed —
when the job failed, so a writer whose save did not happen fails its write under
``break-guest-write``. The target is committed or aborted — never left looking finished
when it is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import numpy.typing as npt

import protocol
from shmblock import layout as L
from shmblock import snapshot
from shmblock.claims import Claims
from shmblock.copier import Answer, Copier, CopyRequests
from shmblock.device import Device
from shmblock.errors import JobError, ShmblockError, TargetError, Terminated
from shmblock.job import decide_error, parse_on_error
from shmblock.targets.base import Target

log = logging.getLogger("shmblock.backup")

IDLE_WAIT = 0.005
#: With no copy request pending and no speed limit, one step copies further chunks
#: for up to this long (at most BURST_CHUNKS of them) before it looks at its queue and
#: the buffer again. Each look costs about 40-50 us (a message-queue receive, the scan
#: of the buffer's slot states), a 1 MiB chunk 150-300 us, so an idle job spent a good
#: part of its time looking; a request that arrives meanwhile waits at most this long.
BURST_SECONDS = 0.001
BURST_CHUNKS = 8
PROGRESS_EVERY = 0.1
START_TIMEOUT = 60.0
#: How often the heartbeat thread beats while the job loop is busy committing.
HEARTBEAT_EVERY = 0.5
#: How long ``on-target-error=ignore`` waits before copying a failed chunk again.
RETRY_EVERY = 0.1
#: How often the loop checks that its supervisor is still alive.
PARENT_CHECK_EVERY = 0.5


class Inbox(Protocol):
    """The job's inbox (the device's backup queue, or a test's fake)."""

    rejected: int

    def receive(self, timeout: float) -> protocol.Message | None: ...

    def drain(self) -> list[protocol.Message]: ...


class Outbox(Protocol):
    """Where the job reports to (the supervisor queue, or a test's fake)."""

    def try_send(self, msg: protocol.Message) -> bool: ...

    def send(self, msg: protocol.Message, timeout: float) -> None: ...


@contextlib.contextmanager
def heartbeat(ctl: npt.NDArray[np.uint64], every: float = HEARTBEAT_EVERY) -> Iterator[None]:
    """Keep ``CTL_HEARTBEAT_NS`` fresh from a thread while the block runs.

    The final commit (an fsync of a large file, an NBD flush) can take longer than the
    supervisor's stuck timeout while the worker is perfectly healthy; the target's own
    timeout bounds it.
    """
    stop = threading.Event()

    def beat() -> None:
        while True:
            ctl[L.CTL_HEARTBEAT_NS] = time.monotonic_ns()
            if stop.wait(every):
                return

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def errno_of(exc: BaseException) -> int:
    """The errno behind a target error (its cause's), EIO when it names none."""
    seen: BaseException | None = exc
    for _ in range(8):  # a short chain; never loop on a cycle
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno:
            return int(seen.errno)
        seen = seen.__cause__ or seen.__context__
    return errno.EIO


class JobEnded(Exception):
    """Carries the final message of the job out of the loop."""

    def __init__(self, final: protocol.Message) -> None:
        super().__init__(type(final).__name__)
        self.final = final


class BackupLoop:
    """The worker side of one backup job.

    ``open_target`` opens (creates, connects to) the target; ``answer`` delivers a
    CopyDone to the writer that asked; ``parent_alive`` says whether the supervisor is
    still there (a worker whose supervisor died fails its job).
    """

    def __init__(self, device: Device, claims: Claims, inbox: Inbox, outbox: Outbox,
                 answer: Answer, open_target: Callable[[], Target], job: str, token: str,
                 chunk: int, parent_alive: Callable[[], bool] = lambda: True, *,
                 publish: bool = True, on_target_error: str = "report",
                 on_source_error: str = "report") -> None:
        self.device = device
        self.claims = claims
        self.inbox = inbox
        self.outbox = outbox
        self._answer = answer
        self._open_target = open_target
        self.job = job
        self.token = token  # the job's secret: the supervisor wants it on Job* messages
        self.chunk = chunk
        self.parent_alive = parent_alive
        #: commit (publish) the target at the end; False: only seal it and leave the
        #: ``.part`` for the supervisor, which publishes it when the job is finalized
        self.publish = publish
        self.on_target_error = parse_on_error(on_target_error)
        self.on_source_error = parse_on_error(on_source_error)
        #: a background chunk failed under ``stop``/``ignore``: copy it again when
        #: allowed (``ignore``: after RETRY_EVERY; ``stop``: after Resume)
        self.retry_at = 0.0
        self.io_errors = 0
        #: the job ended because the target failed (answers say so: target_error)
        self.target_failed = False
        self.target: Target | None = None
        self.copier: Copier | None = None
        self._requests: CopyRequests | None = None
        self.paused = False
        self.speed = 0
        self.next_allowed = 0.0
        self.sync = "full"  # from JobStart
        self.complete_requested = False
        self._last_progress = 0.0
        self._last_parent_check = time.monotonic()

    # -- messages ----------------------------------------------------------------------

    @property
    def requests(self) -> CopyRequests:
        assert self._requests is not None, "requests arrive after the target is open"
        return self._requests

    def handle(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.CopyRequest):
            self.requests.add(msg)  # served after the batch of messages
        elif isinstance(msg, protocol.Staged):
            pass  # the drain that follows every batch of messages picks it up
        elif isinstance(msg, protocol.Shutdown):
            # The supervisor ends a job with Cancel, which carries the job's token; a
            # Shutdown here can only come from someone else.
            log.warning("ignoring Shutdown on the backup queue (a job ends with Cancel)")
        elif getattr(msg, "job", self.job) != self.job:
            log.warning("ignoring %s for another job", type(msg).__name__)
        elif not hmac.compare_digest(getattr(msg, "token", ""), self.token):
            # Anyone of this user can write to this queue; only the supervisor knows
            # the job's token, so only it can pause, cancel or complete the job.
            self.inbox.rejected += 1
            log.warning("ignoring %s without this job's token on the backup queue",
                        type(msg).__name__)
        elif isinstance(msg, protocol.Pause):
            self.paused = True
        elif isinstance(msg, protocol.Resume):
            self.paused = False
        elif isinstance(msg, protocol.SetSpeed):
            self.speed = msg.speed
            self.next_allowed = time.monotonic()
        elif isinstance(msg, protocol.Cancel):
            raise JobEnded(protocol.JobCancelled(job=self.job))
        elif isinstance(msg, protocol.Complete):
            self.complete_requested = True
        else:
            log.warning("unexpected %s on the backup queue", type(msg).__name__)

    def service_inbox(self, wait: float) -> None:
        ctl = self.device.ctl
        if self.requests.pending:
            wait = min(wait, 0.0002)  # a writer is staging a requested cluster: nearly done
        if wait > 0:
            ctl[L.CTL_WORKER_IDLE] = 1
        try:
            msg = self.inbox.receive(wait)
        finally:
            ctl[L.CTL_WORKER_IDLE] = 0
        while msg is not None:
            try:
                self.handle(msg)
            except (JobEnded, TargetError, Terminated):
                raise  # the job's end, a target failure that fails it, or SIGTERM
            except Exception:
                # One message must never kill the job: log it, count it, go on.
                self.inbox.rejected += 1
                log.exception("error handling %s (carrying on)", type(msg).__name__)
            msg = self.inbox.receive(0.0)
        self.requests.serve()

    # -- the job ------------------------------------------------------------------------

    def open(self) -> None:
        self.target = self._open_target()
        self.copier = Copier(self.device, self.target, self.claims, self.chunk)
        self._requests = CopyRequests(self.copier, self._answer)
        # A long drain of the copy-before-write buffer serves requests on the way.
        self.copier.between_runs = lambda: self.service_inbox(0.0)

    def wait_for_start(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.parent_alive():
                raise JobEnded(protocol.JobFailed(job=self.job, error="the supervisor died"))
            msg = self.inbox.receive(0.2)
            # The device's queue outlives jobs: a JobStart left by an earlier job whose
            # worker died before reading it must not start this one before its snapshot.
            if isinstance(msg, protocol.JobStart) and msg.job == self.job \
                    and hmac.compare_digest(msg.token, self.token):
                self.sync = msg.sync
                self.speed = msg.speed
                assert self.copier is not None
                self.copier.begin()  # the supervisor set CTL_JOB_SEQ before JobStart
                return
            if msg is not None:
                self.handle(msg)
        raise JobEnded(protocol.JobFailed(job=self.job,
                                          error=f"no JobStart within {timeout:g} s"))

    def step(self, now: float) -> None:
        """One turn of the loop: messages, staging, progress; then copy or sleep."""
        assert self.copier is not None
        copier, ctl = self.copier, self.device.ctl
        ctl[L.CTL_HEARTBEAT_NS] = time.monotonic_ns()
        self.service_inbox(0.0)
        if ctl[L.CTL_BROKEN]:
            raise JobEnded(protocol.JobFailed(
                job=self.job,
                error="the snapshot is broken: a guest write went ahead after "
                      "copy-before-write failed (on-cbw-error=break-snapshot)"))
        copier.drain_staging()
        ctl[L.CTL_DONE_BYTES] = copier.clusters_saved * self.device.cluster_size
        background = snapshot.has_background_copy(self.sync)
        if not background:
            ctl[L.CTL_TOTAL_BYTES] = ctl[L.CTL_DONE_BYTES]
        ctl[L.CTL_CBW_CLUSTERS] = copier.cbw_clusters
        self.report(now)
        if not background:
            if self.complete_requested:
                self.finish()
            self.service_inbox(IDLE_WAIT)
            return
        if copier.background_done:
            self.finish()
        if self.paused:
            self.service_inbox(IDLE_WAIT)
            return
        if self.speed and now < self.next_allowed:
            self.service_inbox(min(self.next_allowed - now, IDLE_WAIT * 4))
            return
        if now < self.retry_at:  # on-target-error=ignore: space the retries
            self.service_inbox(min(self.retry_at - now, IDLE_WAIT * 4))
            return
        try:
            saved = copier.copy_next_chunk()
            if saved and not self.speed and not self.requests.pending:
                saved += self.burst()
        except TargetError as exc:
            if not self.chunk_failed(exc, now):
                raise  # report: the job fails (re-raised here, not from a helper's frame,
                # so no reference cycle keeps the copier's numpy views alive)
            return
        if saved and self.speed:
            self.next_allowed = max(self.next_allowed, now) + saved * copier.cs / self.speed
        if saved == 0 and not copier.background_done:
            # A writer holds a claim in this chunk: serve it, then retry.
            self.service_inbox(0.0001)

    def burst(self) -> int:
        """More background chunks in this step while nothing else waits (see
        BURST_SECONDS); stops at a held claim, like the step. Returns clusters saved.

        Larger chunks are no substitute: the zero check and the ``pwrite`` of a chunk
        each read it, and 1 MiB stays in the CPU's cache between the two (8 MiB chunks
        made the background pass over a 1 GiB device file 4-5x slower here).
        """
        assert self.copier is not None
        copier = self.copier
        saved = 0
        deadline = time.monotonic() + BURST_SECONDS
        for _ in range(BURST_CHUNKS - 1):
            if copier.background_done or time.monotonic() >= deadline:
                break
            got = copier.copy_next_chunk()
            if not got:
                break
            saved += got
        return saved

    def chunk_failed(self, exc: TargetError, now: float) -> bool:
        """A background chunk failed to reach the target: apply ``on-target-error``.

        False for ``report``: the caller re-raises, the job fails. ``stop`` (and
        ``enospc`` for ENOSPC) pauses the loop as a Pause would, and ``ignore`` waits
        :data:`RETRY_EVERY`;
        either way the chunk is copied again later (the copier clears a cluster's mark
        and moves its cursor only after the write succeeded). The supervisor hears of
        it through ``JobError`` (QEMU's ``BLOCK_JOB_ERROR``), sent with a timeout, not
        dropped: for ``stop`` its job status must become ``paused``. The source is
        shared memory, which cannot fail a read, so ``on-source-error`` is accepted
        and never applies.
        """
        error = errno_of(exc)
        decision = decide_error(self.on_target_error, error)
        if decision.fail_job:
            return False
        self.io_errors += 1
        self.outbox.send(protocol.JobError(
            job=self.job, operation="write", action=decision.action.value, errno=error,
            error=protocol.short_error(str(exc)), token=self.token), timeout=5.0)
        if decision.pause_job:
            self.paused = True  # until the supervisor's Resume
        else:
            self.retry_at = now + RETRY_EVERY
        return True

    def run(self) -> None:
        """Loop until the job ends (raises JobEnded, TargetError, ShmblockError)."""
        assert self.copier is not None and self.target is not None
        if not snapshot.has_background_copy(self.sync):
            self.copier.cursor = self.device.clusters  # copy-before-write only
        self._last_parent_check = time.monotonic()
        while True:
            self.step(time.monotonic())

    def report(self, now: float) -> None:
        """Progress to the supervisor every PROGRESS_EVERY; fail if it died."""
        ctl = self.device.ctl
        if now - self._last_progress >= PROGRESS_EVERY:
            self._last_progress = now
            self.outbox.try_send(protocol.JobProgress(
                job=self.job, done=int(ctl[L.CTL_DONE_BYTES]),
                total=max(int(ctl[L.CTL_TOTAL_BYTES]), int(ctl[L.CTL_DONE_BYTES])),
                token=self.token))
        if now - self._last_parent_check >= PARENT_CHECK_EVERY:
            self._last_parent_check = now
            if not self.parent_alive():
                raise JobEnded(protocol.JobFailed(job=self.job, error="the supervisor died"))

    def finish(self) -> None:
        assert self.copier is not None and self.target is not None
        copier = self.copier
        # Waiting for stagers, the last drain, the target's flush and fsync can take
        # longer than the supervisor's stuck timeout on a healthy worker: keep beating.
        with heartbeat(self.device.ctl):
            try:
                copier.finish(self.sync)
            except JobError as exc:
                raise JobEnded(protocol.JobFailed(
                    job=self.job, error=protocol.short_error(str(exc)))) from exc
            if self.device.ctl[L.CTL_BROKEN]:
                raise JobEnded(protocol.JobFailed(job=self.job,
                                                  error="the snapshot is broken"))
            if self.publish:
                self.target.commit()
            else:
                self.target.seal()
        ctl = self.device.ctl
        ctl[L.CTL_DONE_BYTES] = copier.clusters_saved * copier.cs
        raise JobEnded(protocol.JobCompleted(
            job=self.job, bytes_written=copier.bytes_written,
            clusters_copied=copier.clusters_saved, cbw_clusters=copier.cbw_clusters))

    def execute(self, ready: Callable[[], None] = lambda: None) -> protocol.Message:
        """Open the target, say ``ready``, wait for JobStart and run the job to its end.

        Returns the job's final message (JobCompleted, JobFailed, JobCancelled); every
        exception becomes a JobFailed naming it. Call :meth:`conclude` with it.
        """
        try:
            self.open()
            ready()
            self.wait_for_start()
            self.run()
            raise AssertionError("the job loop returned without an outcome")
        except JobEnded as ended:
            return ended.final
        except Terminated:
            return protocol.JobFailed(job=self.job, error="the backup worker was terminated")
        except TargetError as exc:
            self.target_failed = True
            return protocol.JobFailed(job=self.job, error=protocol.short_error(str(exc)))
        except ShmblockError as exc:
            return protocol.JobFailed(job=self.job, error=protocol.short_error(str(exc)))
        except Exception as exc:
            log.exception("backup worker crashed")
            return protocol.JobFailed(job=self.job, error=protocol.short_error(
                f"backup worker crashed: {type(exc).__name__}: {exc}"))

    def release_writers(self, final: protocol.Message) -> None:
        """The job is over: writers run free; every copy request gets its answer."""
        failed = isinstance(final, protocol.JobFailed)
        job = self.copier.job_seq if self.copier is not None else 0
        snapshot.release(self.device, released_job=0 if failed else job)
        queued = [m for m in self.inbox.drain() if isinstance(m, protocol.CopyRequest)]
        if self._requests is None:
            return  # the target never opened, so the job never started: nobody asked
        error = f"the backup job failed: {final.error}" \
            if isinstance(final, protocol.JobFailed) else ""
        self.requests.end_job(not failed, error, target_error=self.target_failed,
                              queued=queued)

    def conclude(self, final: protocol.Message) -> None:
        """End the job with ``final``: target committed or aborted, writers released,
        the supervisor told (with the job's token, else it ignores the report).

        Raises ShmblockError when the report cannot be sent.
        """
        if not isinstance(final, protocol.JobCompleted) and self.target is not None:
            self.target.abort()
        self.release_writers(final)
        if isinstance(final, protocol.JobCompleted | protocol.JobFailed | protocol.JobCancelled):
            final = dataclasses.replace(final, token=self.token)
        self.outbox.send(final, timeout=5.0)

    def ready_message(self) -> protocol.Ready:
        """What the worker process says once the target is open."""
        return protocol.Ready(role="backup", ident=0, pid=os.getpid())

    def close(self) -> None:
        """Close the target and the copier (the loop's own; not the device or queues)."""
        if self.target is not None:
            self.target.close()
        if self.copier is not None:
            self.copier.close()
