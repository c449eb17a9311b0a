"""The backup-worker process: ``python -m workers.backup --meta NAME ...``.

It attaches to the device, opens the target (so an unreachable target fails the job
before any writer is frozen), says Ready, waits for JobStart (sent once the supervisor
has frozen the writers and set ``needs_copy``), then loops:

1. take every queued message: copy requests join the pending list, job control (pause,
   resume, set-speed, cancel, complete, shutdown) is applied;
2. serve the pending copy requests (:meth:`Copier.serve_request`: under the cluster's
   claim, never waiting for it — a request whose claim a writer holds stays pending for
   the next loop, because that writer is staging the cluster itself and will be done in
   microseconds); once the target has acknowledged the writes (``settle``), answer them;
   a request of another job is answered without copying anything;
3. drain the staging slots writers filled;
4. copy the next background chunk, unless paused or over the speed limit;
5. when there is nothing to do, sleep on the queue for a few milliseconds, with the
   ``CTL_WORKER_IDLE`` flag up so staging writers ring the doorbell.

Requests that arrive before JobStart stay pending until it comes.

The job ends completed (every staged cluster drained, target committed — a heartbeat
thread keeps beating through a long final flush), failed (target error, broken
snapshot, the supervisor gone) or cancelled. In every case the worker clears
``needs_copy`` so writers run free and answers every request still pending or queued:
``ok`` when nothing needs saving any more (completed, cancelled), a failure — marked as
a target error when the target failed — when the job failed, so a writer whose save did
not happen fails its write under ``break-guest-write``. The target is committed or
aborted — never left looking finished when it is not.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hmac
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

import protocol
from shmblock import layout as L
from shmblock.claims import Claims
from shmblock.copier import SYNC_MODES, Copier, CopyRequests, release_writers
from shmblock.device import Device
from shmblock.errors import JobError, ShmblockError, TargetError, TransportError
from shmblock.names import RunNames
from shmblock.targets import TargetSpec, open_target
from shmblock.targets.base import Target
from shmblock.transport import Queue
from workers.common import Terminated, parent_alive, read_job_token, start_worker

log = logging.getLogger("shmblock.backup")

IDLE_WAIT = 0.005
PROGRESS_EVERY = 0.1
START_TIMEOUT = 60.0
#: How often the heartbeat thread beats while the job loop is busy committing.
HEARTBEAT_EVERY = 0.5


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


class JobEnded(Exception):
    """Carries the final message of the job out of the loop."""

    def __init__(self, final: protocol.Message) -> None:
        super().__init__(type(final).__name__)
        self.final = final


class BackupWorker:
    """The loop of one backup job."""

    def __init__(self, args: argparse.Namespace, parent: int) -> None:
        self.args = args
        self.parent = parent
        self.job = args.job
        self.names = RunNames(args.run, args.prefix)
        self.device = Device.attach(args.meta, run_id=args.run)
        self.claims = Claims(args.meta)
        self.inbox = Queue.attach(self.names.backup_queue(args.device))
        self.sup = Queue.attach(self.names.supervisor_queue)
        self.replies: dict[int, Queue] = {}
        #: the job ended because the target failed (answers say so: target_error)
        self.target_failed = False
        self.target: Target | None = None
        self.copier: Copier | None = None
        self._requests: CopyRequests | None = None
        self.paused = False
        self.speed = args.speed
        self.next_allowed = 0.0
        self.sync = args.sync
        self.complete_requested = False
        self.token = ""  # the job's secret, from stdin: the supervisor wants it on Job*

    # -- messages ----------------------------------------------------------------------

    @property
    def requests(self) -> CopyRequests:
        assert self._requests is not None, "requests arrive after the target is open"
        return self._requests

    def reply_queue(self, writer: int) -> Queue | None:
        queue = self.replies.get(writer)
        if queue is None:
            try:
                queue = Queue.attach(self.names.writer_reply_queue(self.args.device, writer))
            except TransportError:
                return None
            self.replies[writer] = queue
        return queue

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

    def answer(self, req: protocol.CopyRequest, reply: protocol.CopyDone) -> None:
        queue = self.reply_queue(req.writer)
        if queue is not None and not queue.try_send(reply):
            log.warning("writer %d's reply queue is full; it will time out", req.writer)

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
        spec = TargetSpec(self.args.target, self.args.format, self.args.backing_file,
                          self.args.backing_format)
        self.target = open_target(spec, self.device.size, self.device.cluster_size,
                                  timeout=self.args.target_timeout)
        self.copier = Copier(self.device, self.target, self.claims, self.args.chunk)
        self._requests = CopyRequests(self.copier, self.answer)

    def wait_for_start(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not parent_alive(self.parent):
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
        raise JobEnded(protocol.JobFailed(job=self.job, error="no JobStart within 60 s"))

    def run(self) -> None:
        assert self.copier is not None and self.target is not None
        copier, ctl = self.copier, self.device.ctl
        if self.sync == "none":
            copier.cursor = self.device.clusters  # copy-before-write only
        last_progress = 0.0
        last_parent_check = time.monotonic()
        while True:
            now = time.monotonic()
            ctl[L.CTL_HEARTBEAT_NS] = time.monotonic_ns()
            self.service_inbox(0.0)
            if ctl[L.CTL_BROKEN]:
                raise JobEnded(protocol.JobFailed(
                    job=self.job,
                    error="the snapshot is broken: a guest write went ahead after "
                          "copy-before-write failed (on-cbw-error=break-snapshot)"))
            copier.drain_staging()
            ctl[L.CTL_DONE_BYTES] = copier.clusters_saved * self.device.cluster_size
            if self.sync == "none":
                ctl[L.CTL_TOTAL_BYTES] = ctl[L.CTL_DONE_BYTES]
            ctl[L.CTL_CBW_CLUSTERS] = copier.cbw_clusters
            if now - last_progress >= PROGRESS_EVERY:
                last_progress = now
                self.sup.try_send(protocol.JobProgress(
                    job=self.job, done=int(ctl[L.CTL_DONE_BYTES]),
                    total=max(int(ctl[L.CTL_TOTAL_BYTES]), int(ctl[L.CTL_DONE_BYTES])),
                    token=self.token))
            if now - last_parent_check >= 0.5:
                last_parent_check = now
                if not parent_alive(self.parent):
                    raise JobEnded(protocol.JobFailed(job=self.job,
                                                      error="the supervisor died"))
            if self.sync == "none":
                if self.complete_requested:
                    self.finish()
                self.service_inbox(IDLE_WAIT)
                continue
            if copier.background_done:
                self.finish()
            if self.paused:
                self.service_inbox(IDLE_WAIT)
                continue
            if self.speed and now < self.next_allowed:
                self.service_inbox(min(self.next_allowed - now, IDLE_WAIT * 4))
                continue
            saved = copier.copy_next_chunk()
            if saved and self.speed:
                self.next_allowed = max(self.next_allowed, now) + saved * copier.cs / self.speed
            if saved == 0 and not copier.background_done:
                # A writer holds a claim in this chunk: serve it, then retry.
                self.service_inbox(0.0001)

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
            self.target.commit()
        ctl = self.device.ctl
        ctl[L.CTL_DONE_BYTES] = copier.clusters_saved * copier.cs
        raise JobEnded(protocol.JobCompleted(
            job=self.job, bytes_written=copier.bytes_written,
            clusters_copied=copier.clusters_saved, cbw_clusters=copier.cbw_clusters))

    def release_writers(self, final: protocol.Message) -> None:
        """The job is over: writers run free; every copy request gets its answer."""
        failed = isinstance(final, protocol.JobFailed)
        job = self.copier.job_seq if self.copier is not None else 0
        release_writers(self.device, released_job=0 if failed else job)
        queued = [m for m in self.inbox.drain() if isinstance(m, protocol.CopyRequest)]
        if self._requests is None:
            return  # the target never opened, so the job never started: nobody asked
        error = f"the backup job failed: {final.error}" \
            if isinstance(final, protocol.JobFailed) else ""
        self.requests.end_job(not failed, error, target_error=self.target_failed,
                              queued=queued)

    def close(self) -> None:
        if self.target is not None:
            self.target.close()
        if self.copier is not None:
            self.copier.close()
        for q in self.replies.values():
            q.close()
        self.inbox.close()
        self.sup.close()
        self.claims.close()
        self.device.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="workers.backup")
    p.add_argument("--meta", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--format", required=True, choices=("raw", "qcow2", "nbd"))
    p.add_argument("--backing-file")
    p.add_argument("--backing-format")
    p.add_argument("--sync", default="full", choices=SYNC_MODES)
    p.add_argument("--speed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=1 << 20)
    p.add_argument("--target-timeout", type=float, default=30.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    parent = start_worker(f"shmblock: backup-worker run={args.run} job={args.job}")
    token = read_job_token()
    worker: BackupWorker | None = None
    final: protocol.Message
    try:
        worker = BackupWorker(args, parent)
        worker.token = token
        worker.open()
        worker.sup.send(protocol.Ready(role="backup", ident=0, pid=os.getpid()), timeout=5.0)
        worker.wait_for_start()
        worker.run()
        raise AssertionError("the job loop returned without an outcome")
    except JobEnded as ended:
        final = ended.final
    except Terminated:
        final = protocol.JobFailed(job=args.job, error="the backup worker was terminated")
    except TargetError as exc:
        if worker is not None:
            worker.target_failed = True
        final = protocol.JobFailed(job=args.job, error=protocol.short_error(str(exc)))
    except ShmblockError as exc:
        final = protocol.JobFailed(job=args.job, error=protocol.short_error(str(exc)))
    except Exception as exc:
        log.exception("backup worker crashed")
        final = protocol.JobFailed(job=args.job, error=protocol.short_error(
            f"backup worker crashed: {type(exc).__name__}: {exc}"))
    if worker is None:
        # Could not even attach: the supervisor sees our exit code and stderr.
        print(f"backup worker: {getattr(final, 'error', final)}", file=sys.stderr)
        return 1
    try:
        if not isinstance(final, protocol.JobCompleted) and worker.target is not None:
            worker.target.abort()
        worker.release_writers(final)
        if isinstance(final, protocol.JobCompleted | protocol.JobFailed | protocol.JobCancelled):
            final = dataclasses.replace(final, token=token)  # else the supervisor ignores it
        worker.sup.send(final, timeout=5.0)
    except ShmblockError as exc:
        print(f"backup worker: could not report the end of the job: {exc}", file=sys.stderr)
    finally:
        worker.close()
    return 0 if isinstance(final, protocol.JobCompleted) else 1


if __name__ == "__main__":
    sys.exit(main())
