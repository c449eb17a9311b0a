"""A model test of the copy-before-write engine: random guest writes against backup jobs.

One process plays every part. Two :class:`GuestIO` writers write to a small device
through the real write path; a :class:`Copier` (the backup worker's hands) copies to a
real :class:`RawTarget`; a thread stands in for the worker's inbox and serves copy
requests through the worker's real :class:`CopyRequests` book, so the request path
(``cbw_mode=request``, or stage mode with the copy-before-write buffer full) runs for
real: the writer blocks on its reply queue, holding no claim, while the "worker" saves
the cluster under the claim. The worker can be stalled, which makes writes that need it
time out and exercises ``on-cbw-error``; when it wakes up it serves those requests late,
long after their writers gave up, and a request parked when a job ends may be left over
for the next job (a writer sent it after the worker drained its queue).

Interleavings. The worker's claims and target are wrapped so that a guest write can be
scheduled to run *inside* a worker operation — background copy, the late serving of
stale requests, a staging drain, the end of the job — at the n-th claim or target call
of that operation, exactly where a second process could run. The write runs there if it
would not have to wait (every cluster it must save is unclaimed, stage mode, enough
buffer slots held by the writer or free); otherwise it runs when the operation is over,
as a blocked writer would. This is how the model generates the race of issue 7 item 1 (a
stale copy request served after a stage-mode writer staged the cluster, cleared it and
wrote new data) and background copy between reading the map and taking the claim.

The model is plain numpy: the guest's writes applied to a zeroed array, and at job start
a copy of it -- the snapshot. After every step the machine checks the invariants of
DESIGN.md that this level can see:

* the device holds exactly the guest's writes (a failed write changes nothing);
* ``needs_copy`` only goes 1 -> 0 during a job (invariant 2's map rule);
* a cluster still marked ``needs_copy`` still holds its snapshot contents (nobody wrote
  it without saving it first);
* a cluster no longer marked has its snapshot contents on the target or in exactly one
  FULL slot of the copy-before-write buffer, and ``saved`` says which;
* when a job finishes (through the copier's own ``finish``, with no drain of the
  model's before it), the committed file is the snapshot, byte for byte, for every
  cluster the sync mode covers (invariant 1), and every cluster was saved exactly once.

The snapshot start needs no freeze here: in one thread no write is ever in flight when a
rule runs, which is what the supervisor's freeze guarantees the real engine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, Phase, currently_in_test_context, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

import protocol
from shmblock import layout as L
from shmblock import stats as S
from shmblock.claims import Claims
from shmblock.copier import Copier, CopyRequests
from shmblock.device import Device, Geometry
from shmblock.errors import CopyBeforeWriteError
from shmblock.guest import GuestIO
from shmblock.snapshot import release as release_writers
from shmblock.targets.base import Buffer
from shmblock.targets.raw import RawTarget
from shmblock.transport import (
    BACKUP_RECEIVES,
    WRITER_QUEUE_BYTES,
    WRITER_QUEUE_MESSAGES,
    WRITER_REPLY_RECEIVES,
    Queue,
)
from tests.helpers import CS, begin_job, create_device, destroy, run_names

CLUSTERS = 24
SIZE = CLUSTERS * CS
WRITERS = 2
BUFFER_SLOTS = 4  # few, so the buffer fills up and writers fall back to copy requests
GEO = Geometry(SIZE, cluster_size=CS, max_writers=WRITERS, buffer_slots=BUFFER_SLOTS)

#: The worker's inbox: one request is in flight at a time in this model.
QUEUE_DEPTH = 4
#: CBW timeout while the worker answers (never reached) and while it is stalled.
SERVING_TIMEOUT = 10.0
STALLED_TIMEOUT = 0.02

SYNCS = st.sampled_from(["full", "top", "none"])
MODES = st.sampled_from(L.CBW_MODES)
POLICIES = st.sampled_from(L.ON_CBW_ERROR)
CHUNKS = st.sampled_from([1, 3, 8])  # background chunk, in clusters
OPERATIONS = st.sampled_from(["background", "late requests", "drain", "finish"])
OFFSETS = st.integers(0, SIZE - 1)
LENGTHS = st.integers(1, 3 * CS + 1)  # up to four clusters, unaligned
VALUES = st.integers(0, 255)

U8Array = npt.NDArray[np.uint8]


def event(what: str) -> None:
    """Hypothesis's event(); a no-op when a scenario test drives the machine by hand."""
    if currently_in_test_context():
        hypothesis_event(what)


BoolArray = npt.NDArray[np.bool_]


class Hooks:
    """Points inside the worker's operations where a scheduled guest write may run.

    Each point names the cluster the worker is about to claim or write, so a scheduled
    write can aim at it (the races that matter are on that cluster). Only the main
    thread's operations are interleaved: the worker thread serves requests while the
    main thread is blocked in a write, and two writes of one GuestIO must not overlap.
    """

    def __init__(self) -> None:
        self.main = threading.get_ident()
        self.action: Callable[[int], None] | None = None
        self.skip = 0

    def arm(self, action: Callable[[int], None], skip: int) -> None:
        self.action, self.skip = action, skip

    def disarm(self) -> None:
        self.action = None

    def point(self, cluster: int) -> None:
        if self.action is None or threading.get_ident() != self.main:
            return
        if self.skip:
            self.skip -= 1
            return
        action, self.action = self.action, None
        action(cluster)


class HookedClaims(Claims):
    """The worker's claims; each attempt is an interleaving point."""

    def __init__(self, meta_name: str, hooks: Hooks) -> None:
        super().__init__(meta_name)
        self.hooks = hooks
        self.spread = 0  # which cluster of a multi-cluster claim to aim at

    # The buffer's lock and alive bytes (far past the clusters) are not interleaving
    # points: the worker only ever tries them, and holds them for a scan of the slots.

    def try_claim(self, cluster: int, count: int = 1) -> bool:
        if cluster < CLUSTERS:
            self.hooks.point(cluster + self.spread % count)
        return super().try_claim(cluster, count)

    def claim(self, cluster: int, count: int, deadline: float) -> None:
        if cluster < CLUSTERS:
            self.hooks.point(cluster + self.spread % count)
        super().claim(cluster, count, deadline)


class HookedTarget(RawTarget):
    """A raw target; each write is an interleaving point before the data is read."""

    def __init__(self, path: str, size: int, cluster_size: int, hooks: Hooks) -> None:
        super().__init__(path, size, cluster_size)
        self.hooks = hooks

    def write(self, offset: int, data: Buffer) -> None:
        self.hooks.point(offset // self.cluster_size)
        super().write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.hooks.point(offset // self.cluster_size)
        super().write_zeroes(offset, length)


class Worker:
    """The backup worker's inbox, served by a thread through the real CopyRequests.

    While a writer waits for its CopyDone the main thread is blocked inside
    ``GuestIO.write``, so the thread never runs alongside the other rules. When stalled it
    keeps requests without answering (a stuck worker); when it wakes up it serves them
    late, as the real worker serves requests that waited in its queue.
    """

    def __init__(self, inbox: Queue, replies: list[Queue]) -> None:
        self.inbox = inbox
        self.replies = replies
        # Held while the copier is in use; re-entrant, since a write scheduled inside a
        # worker operation waits for the thread to take its requests.
        self.lock = threading.RLock()
        self.requests: CopyRequests | None = None
        self.stalled = False
        self.parked: list[protocol.CopyRequest] = []
        #: (writer, seq) of requests whose writer gave up: answered without waiting
        self.late: set[tuple[int, int]] = set()
        self.received = 0
        self.served = 0
        self.stale_answers = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-backup-worker",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                msg = self.inbox.receive(0.005)
                with self.lock:
                    if isinstance(msg, protocol.CopyRequest):
                        self.received += 1
                        if self.stalled or self.requests is None:
                            self.parked.append(msg)
                        else:
                            self.requests.add(msg)
                    if self.requests is not None and not self.stalled:
                        self.requests.serve()
        except BaseException as exc:  # reported by the machine's invariant
            self.errors.append(exc)

    def answer(self, req: protocol.CopyRequest, reply: protocol.CopyDone) -> None:
        """Deliver an answer (CopyRequests calls this)."""
        if self.requests is not None and req.job != self.requests.copier.job_seq:
            # Left over from an earlier job: answered without being served.
            assert not reply.ok, f"a request of job {req.job} was served in a later job"
            self.stale_answers += 1
        self.served += 1
        queue = self.replies[req.writer]
        if (req.writer, req.seq) in self.late:
            queue.try_send(reply)  # nobody waits for it; a full queue drops it
        else:
            queue.send(reply, timeout=5.0)

    def wake(self) -> None:
        """Serve what waited in the queue while stalled; called with ``lock`` held."""
        parked, self.parked = self.parked, []
        self.late.update((r.writer, r.seq) for r in parked)
        self.stalled = False
        if self.requests is None:
            self.parked = parked  # no job: they wait in the queue for the next one
            return
        for req in parked:
            self.requests.add(req)
        self.requests.serve()

    def wait_received(self, count: int) -> None:
        """Wait until the thread has taken ``count`` requests in all from the inbox.

        A writer that gave up on a stalled worker returns before the thread has parked
        its request; without this, the request would be parked or served at a moment
        that depends on thread scheduling, and the model would not be deterministic.
        """
        deadline = time.monotonic() + 10.0
        while True:
            with self.lock:
                if self.received >= count:
                    assert self.received == count
                    return
            assert time.monotonic() < deadline, "the worker thread did not take a request"
            time.sleep(0.0005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class Job:
    sync: str
    policy: str
    snapshot: U8Array
    covered: BoolArray
    target: HookedTarget
    claims: HookedClaims
    copier: Copier
    prev_needs_copy: U8Array
    served_before: int
    broken: bool = False


@dataclass(frozen=True)
class Shared:
    """Plain copies of the device's shared state, to assert on.

    Assertions never name a view of the mapping: a failing assert keeps its operands
    alive in the traceback, and a live view would make the device's close() fail.
    """

    data: U8Array
    needs_copy: U8Array
    allocated: U8Array
    saved: U8Array
    slot_state: npt.NDArray[np.uint16]
    slot_cluster: npt.NDArray[np.uint64]
    staging: U8Array
    broken: bool
    job_active: bool

    @classmethod
    def of(cls, dev: Device) -> Shared:
        return cls(dev.data.copy(), dev.needs_copy.copy(), dev.allocated.copy(),
                   dev.saved.copy(), dev.slot_state.copy(), dev.slot_cluster.copy(),
                   dev.staging.copy(), bool(dev.ctl[L.CTL_BROKEN]),
                   bool(dev.ctl[L.CTL_JOB_ACTIVE]))


def clusters_of(offset: int, length: int) -> range:
    return range(offset // CS, (offset + length - 1) // CS + 1)


class CopyBeforeWriteMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.names = run_names()
        self.tmp = tempfile.mkdtemp(prefix="shmblock-stateful-")
        self.queues: list[Queue] = []
        self.guests: list[GuestIO] = []
        self.device: Device | None = None
        self.worker: Worker | None = None
        self.job: Job | None = None
        self.jobs = 0
        self.hooks = Hooks()
        self.probe: Claims | None = None
        try:
            self.device = create_device(self.names, GEO)
            self.probe = Claims(self.device.meta_name)
            inbox = Queue.create(self.names.backup_queue("dev0"), BACKUP_RECEIVES,
                                 QUEUE_DEPTH)
            self.queues.append(inbox)
            replies = []
            for w in range(WRITERS):
                # shaped like the engine's: a few small slots (shmblock.transport)
                q = Queue.create(self.names.writer_reply_queue("dev0", w),
                                 WRITER_REPLY_RECEIVES, WRITER_QUEUE_MESSAGES,
                                 WRITER_QUEUE_BYTES)
                self.queues.append(q)
                replies.append(q)
                self.guests.append(GuestIO(self.device, w, self.names.backup_queue("dev0"),
                                           reply_queue=q))
            self.worker = Worker(inbox, replies)
        except BaseException:
            self.teardown()
            raise
        self.model = np.zeros(SIZE, dtype=np.uint8)
        self.written = np.zeros(CLUSTERS, dtype=np.bool_)

    @property
    def dev(self) -> Device:
        assert self.device is not None
        return self.device

    @property
    def w(self) -> Worker:
        assert self.worker is not None
        return self.worker

    # -- setup ------------------------------------------------------------------------------

    @initialize(data=st.lists(st.tuples(st.integers(0, CLUSTERS - 1), st.integers(1, 255)),
                              max_size=6))
    def prefill(self, data: list[tuple[int, int]]) -> None:
        """Some clusters hold data (before the first job, or just after it started)."""
        for c, value in data:
            self._write(0, c * CS, CS, value)

    # -- jobs ---------------------------------------------------------------------------------

    @initialize(start=st.booleans(), sync=SYNCS, mode=MODES, policy=POLICIES, chunk=CHUNKS)
    def first_job(self, start: bool, sync: str, mode: str, policy: str, chunk: int) -> None:
        """Most runs start with a job, so that most steps happen while one runs."""
        if start:
            self.start_job(sync, mode, policy, chunk)

    @rule(sync=SYNCS, mode=MODES, policy=POLICIES, chunk=CHUNKS)
    def start_job(self, sync: str, mode: str, policy: str, chunk: int) -> None:
        if self.job is not None:
            return  # one job at a time per device
        dev = self.dev
        self.jobs += 1
        path = os.path.join(self.tmp, f"backup{self.jobs}.raw")
        target = HookedTarget(path, SIZE, CS, self.hooks)
        claims = HookedClaims(dev.meta_name, self.hooks)
        with self.w.lock:
            copier = Copier(dev, target, claims, chunk_bytes=chunk * CS)
            timeout = STALLED_TIMEOUT if self.w.stalled else SERVING_TIMEOUT
            # The supervisor's freeze: no write is in flight in this one-threaded model.
            begin_job(dev, sync, cbw_mode=mode, on_cbw_error=policy, cbw_timeout=timeout)
            copier.begin()  # what the worker does on JobStart
            if sync == "none":
                copier.cursor = dev.clusters  # copy-before-write only, as workers.backup
            self.job = Job(sync, policy, snapshot=dev.data.copy(),
                           covered=dev.needs_copy != 0, target=target, claims=claims,
                           copier=copier, prev_needs_copy=dev.needs_copy.copy(),
                           served_before=self.w.served)
            self.w.requests = CopyRequests(copier, self.w.answer)
        if sync == "top":
            assert np.array_equal(self.job.covered, self.written)
        else:
            assert self.job.covered.all()

    @rule(mode=st.sampled_from(L.CBW_MODES))
    def set_cbw_mode(self, mode: str) -> None:
        """Writers read the mode on every save, so it may change under them."""
        if self.job is None:
            return
        self.dev.ctl[L.CTL_CBW_MODE] = L.CBW_MODES.index(mode)

    @rule()
    def background_step(self) -> None:
        if self.job is None or self.job.sync == "none":
            return
        copier = self.job.copier
        with self.w.lock:
            before = copier.cursor
            saved = copier.copy_next_chunk()
        # Nobody holds a claim between rules, so every call makes progress.
        assert saved > 0 or copier.background_done
        assert copier.cursor > before or copier.background_done

    @rule()
    def drain(self) -> None:
        if self.job is None:
            return
        full = int(np.count_nonzero(self.dev.slot_state == L.SLOT_FULL))
        with self.w.lock:
            drained = self.job.copier.drain_staging()
        assert drained == full
        # Drained slots are free; slots a writer reserved and has not filled stay held.
        assert not (Shared.of(self.dev).slot_state == L.SLOT_FULL).any()

    @rule(cancel=st.integers(0, 3), leave_requests=st.booleans())
    def end(self, cancel: int, leave_requests: bool) -> None:
        """The job completes (three times in four) or is cancelled. Requests a stalled
        worker holds may be left in the queue for the next job."""
        if cancel == 0:
            self.cancel(leave_requests)
        else:
            self.finish(leave_requests)

    def finish(self, leave_requests: bool = False) -> None:
        """What workers.backup does to complete a job, then check the result.

        No drain here before the copier's own finish(): the final drain is its job.
        """
        job = self.job
        if job is None:
            return
        dev = self.dev
        with self.w.lock:
            copier = job.copier
            for _ in range(CLUSTERS + 2):
                if copier.background_done:
                    break
                copier.copy_next_chunk()
            assert copier.background_done
            copier.finish(job.sync)
            shared = Shared.of(dev)
            assert not (shared.slot_state == L.SLOT_FULL).any(), "finish() left saved clusters"
            if shared.broken:
                # The snapshot is broken: the worker fails the job.
                assert job.broken
                job.target.abort()
                self._end_job(ok=False, leave_requests=leave_requests)
                return
            if job.sync != "none":
                assert not shared.needs_copy.any(), "clusters left unsaved after the last pass"
            job.target.commit()
            path = job.target.path
            saved = shared.saved != 0
            clusters_saved = copier.clusters_saved
            copier_cbw = copier.cbw_clusters
            requests_served = self.w.served - job.served_before
            self._end_job(ok=True, leave_requests=leave_requests)
        with open(path, "rb") as f:
            image = np.frombuffer(f.read(), dtype=np.uint8)
        os.unlink(path)
        assert image.size == SIZE
        snap = job.snapshot
        if job.sync == "none":
            # Covered: exactly what copy-before-write saved; the rest stays a hole.
            for c in range(CLUSTERS):
                got = image[c * CS : (c + 1) * CS]
                if saved[c]:
                    assert np.array_equal(got, snap[c * CS : (c + 1) * CS]), c
                else:
                    assert not got.any(), c
        else:
            # Point in time (invariant 1): the whole file is the snapshot. Clusters that
            # sync=top does not cover were never written, so zero on both sides.
            bad = [c for c in range(CLUSTERS)
                   if not np.array_equal(image[c * CS : (c + 1) * CS],
                                         snap[c * CS : (c + 1) * CS])]
            assert not bad, f"clusters {bad} of the backup differ from the snapshot"
            assert np.array_equal(saved, job.covered)
        # Every covered cluster reached the target exactly once.
        assert clusters_saved == int(np.count_nonzero(saved))
        event(f"finished sync={job.sync}, compared the backup")
        if copier_cbw:
            event("finished a job with copy-before-write saves")
        if requests_served:
            event("finished a job with served copy requests")

    def cancel(self, leave_requests: bool = False) -> None:
        job = self.job
        if job is None:
            return
        with self.w.lock:
            job.target.abort()
            self._end_job(ok=True, leave_requests=leave_requests)
        assert not os.path.exists(job.target.path)
        assert not os.path.exists(job.target.part_path)

    def _end_job(self, ok: bool, leave_requests: bool) -> None:
        """workers.backup's release_writers and close; called with the worker lock held."""
        job = self.job
        assert job is not None
        release_writers(self.dev, released_job=job.copier.job_seq if ok else 0)
        requests = self.w.requests
        assert requests is not None
        # Whoever still waits gets a definite answer; a request parked in the queue of a
        # stalled worker may instead stay there for the next job (sent after the drain).
        queued: list[protocol.CopyRequest] = []
        if leave_requests and self.w.parked:
            event("requests left over for the next job")
        else:
            queued, self.w.parked = self.w.parked, []
            self.w.late.update((r.writer, r.seq) for r in queued)
        requests.end_job(ok, "the backup job failed", queued=queued)
        self.w.requests = None
        job.copier.close()
        job.claims.close()
        job.target.close()
        self.job = None

    # -- the worker's health ----------------------------------------------------------------

    @rule()
    def toggle_worker(self) -> None:
        """The worker gets stuck (writes that need it time out), or wakes up again and
        serves the requests that waited in its queue, long after their writers gave up."""
        with self.w.lock:
            if not self.w.stalled:
                self.w.stalled = True
                self.dev.ctl[L.CTL_CBW_TIMEOUT_US] = int(STALLED_TIMEOUT * 1e6)
                return
            if self.w.parked:
                event("late requests served")
            self.w.wake()
            self.dev.ctl[L.CTL_CBW_TIMEOUT_US] = int(SERVING_TIMEOUT * 1e6)

    # -- interleavings ----------------------------------------------------------------------------

    @rule(operation=OPERATIONS, skip=st.integers(0, 2), spread=st.integers(0, 7),
          aim=st.booleans(), writer=st.integers(0, WRITERS - 1), offset=OFFSETS,
          length=LENGTHS, value=VALUES)
    def write_during(self, operation: str, skip: int, spread: int, aim: bool, writer: int,
                     offset: int, length: int, value: int) -> None:
        """A guest write runs inside a worker operation, at its (skip+1)-th claim or
        target call -- or after it, if it would have had to wait there. Aimed, it
        writes the cluster the worker is about to claim or write."""
        job = self.job
        if job is None:
            self._write(writer, offset, length, value)
            return
        ran = False

        def write_now(cluster: int) -> None:
            nonlocal ran, offset
            if aim:
                offset = min(cluster * CS + offset % CS, SIZE - 1)
            if self._would_run_without_waiting(writer, offset, length):
                ran = True
                event(f"write interleaved with {operation}")
                self._write(writer, offset, length, value)

        with self.w.lock:
            job.claims.spread = spread
            self.hooks.arm(write_now, skip)
            try:
                if operation == "finish":
                    self.finish()
                elif operation == "background":
                    if job.sync != "none":
                        job.copier.copy_next_chunk()
                elif operation == "drain":
                    job.copier.drain_staging()
                elif self.w.stalled:  # late requests
                    if self.w.parked:
                        event("stale requests served inside an interleaving")
                    self.w.wake()
                    self.dev.ctl[L.CTL_CBW_TIMEOUT_US] = int(SERVING_TIMEOUT * 1e6)
            finally:
                self.hooks.disarm()
                job.claims.spread = 0
        if not ran:
            self._write(writer, offset, length, value)

    def _would_run_without_waiting(self, writer: int, offset: int, length: int) -> bool:
        """Would this write finish now, without a claim someone holds or the worker?"""
        dev = self.dev
        ctl = dev.ctl
        length = min(length, SIZE - offset)
        marked = [c for c in clusters_of(offset, length) if dev.needs_copy[c]]
        if not marked or (ctl[L.CTL_BROKEN] and int(ctl[L.CTL_ON_CBW_ERROR]) == 1):
            return True
        if int(ctl[L.CTL_CBW_MODE]) != 0:
            return False
        # The writer's own reservations first, then a batch from the free slots (under
        # the buffer's lock, which nobody holds between rules).
        state = dev.slot_state
        held = int(np.count_nonzero(state == L.SLOT_HELD + writer))
        free = int(np.count_nonzero(state[: int(ctl[L.CTL_BUF_LIMIT])] == L.SLOT_FREE))
        if held + free < len(marked):
            return False
        assert self.probe is not None
        for c in marked:
            if not self.probe.try_claim(c):
                return False
            self.probe.release(c)
        return True

    # -- the guest ------------------------------------------------------------------------------

    @rule(writer=st.integers(0, WRITERS - 1), offset=OFFSETS, length=LENGTHS, value=VALUES)
    def guest_write(self, writer: int, offset: int, length: int, value: int) -> None:
        self._write(writer, offset, length, value)

    @rule(writes=st.lists(st.tuples(st.integers(0, WRITERS - 1), OFFSETS, LENGTHS, VALUES),
                          min_size=2, max_size=6))
    def guest_burst(self, writes: list[tuple[int, int, int, int]]) -> None:
        """Several writes in a row: the buffer fills up and writers fall back to copy
        requests."""
        for write in writes:
            self._write(*write)

    def _write(self, writer: int, offset: int, length: int, value: int) -> None:
        length = min(length, SIZE - offset)
        dev = self.dev
        job = self.job
        was_broken = bool(dev.ctl[L.CTL_BROKEN])
        served = self.w.served
        try:
            self.guests[writer].write(offset, bytes([value]) * length)
        except CopyBeforeWriteError:
            self._sync_worker(writer)
            # Only a stuck worker can fail a write here, and only under this policy.
            assert job is not None and self.w.stalled
            assert job.policy == "break-guest-write"
            event("write failed (break-guest-write)")
            unchanged = np.array_equal(Shared.of(dev).data, self.model)
            assert unchanged, "a failed write changed the device"
            return
        self._sync_worker(writer)
        if self.w.served > served:
            event("write waited for a served copy request")
        self.model[offset : offset + length] = value
        self.written[list(clusters_of(offset, length))] = True
        if dev.ctl[L.CTL_BROKEN] and not was_broken:
            assert job is not None and self.w.stalled
            assert job.policy == "break-snapshot"
            job.broken = True
            event("write broke the snapshot")

    def _sync_worker(self, writer: int) -> None:
        """Let the worker thread take every request the writers have sent so far."""
        self.guests[writer].flush_stats()
        self.w.wait_received(int(self.dev.stats[:, S.W_CBW_REQUESTS].sum()))

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def worker_healthy(self) -> None:
        if self.worker is not None and self.worker.errors:
            raise self.worker.errors[0]

    @invariant()
    def device_holds_the_guest_writes(self) -> None:
        shared = Shared.of(self.dev)
        assert np.array_equal(shared.data, self.model), "the device lost or invented a write"
        assert np.array_equal(shared.allocated != 0, self.written)

    @invariant()
    def outside_a_job_nothing_is_marked(self) -> None:
        if self.job is None:
            shared = Shared.of(self.dev)
            assert not shared.needs_copy.any()
            assert (shared.slot_state == L.SLOT_FREE).all()
            assert not shared.job_active

    @invariant()
    def snapshot_contents_are_safe(self) -> None:
        job = self.job
        if job is None:
            return
        shared = Shared.of(self.dev)
        nc = shared.needs_copy
        # needs_copy only goes 1 -> 0 during a job.
        assert not ((job.prev_needs_copy == 0) & (nc != 0)).any(), "needs_copy went 0 -> 1"
        assert not ((nc != 0) & ~job.covered).any()
        job.prev_needs_copy = nc
        assert shared.job_active
        assert shared.broken == job.broken
        if job.broken:
            return  # a guest write went ahead without a save: nothing more to promise
        snap = job.snapshot
        target = np.frombuffer(job.target.read(0, SIZE), dtype=np.uint8)
        full = np.flatnonzero(shared.slot_state == L.SLOT_FULL).tolist()
        staged = {int(shared.slot_cluster[s]): s for s in full}
        assert len(staged) == len(full), "a cluster is staged twice"
        for c in range(CLUSTERS):
            lo, hi = c * CS, (c + 1) * CS
            if nc[c]:
                # Still marked: nobody has written it since the snapshot.
                assert np.array_equal(shared.data[lo:hi], snap[lo:hi]), c
                assert c not in staged and not shared.saved[c]
            elif c in staged:
                assert np.array_equal(shared.staging[staged[c]], snap[lo:hi]), c
                assert not shared.saved[c], c  # saved once: by the drain, not before
            elif job.covered[c]:
                assert shared.saved[c], f"cluster {c} was unmarked but never saved"
            if shared.saved[c]:
                assert np.array_equal(target[lo:hi], snap[lo:hi]), c

    # -- cleanup ----------------------------------------------------------------------------

    def teardown(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.job is not None:
            self.job.copier.close()
            self.job.claims.close()
            self.job.target.abort()
            self.job = None
        for g in self.guests:
            g.close()
        if self.probe is not None:
            self.probe.close()
        for q in self.queues:
            q.close()
            q.unlink()
        if self.device is not None:
            destroy(self.device)
        shutil.rmtree(self.tmp, ignore_errors=True)


CopyBeforeWriteMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    database=None,
    # No explain phase: it reruns a failure for minutes and says little about a machine.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)
test_copy_before_write = CopyBeforeWriteMachine.TestCase


# -- the interleavings that matter, spelled out ------------------------------------------------
#
# The machine above can generate each of these; here they run step by step, so that a
# mutant of the code they guard (see the test's docstring) fails every time, not only
# when Hypothesis happens to find the steps.


def check(m: CopyBeforeWriteMachine) -> None:
    m.worker_healthy()
    m.device_holds_the_guest_writes()
    m.outside_a_job_nothing_is_marked()
    m.snapshot_contents_are_safe()


def run_steps(steps: Callable[[CopyBeforeWriteMachine], None]) -> CopyBeforeWriteMachine:
    m = CopyBeforeWriteMachine()
    try:
        steps(m)
    finally:
        m.teardown()
    return m


@pytest.mark.parametrize("old", [0, 3], ids=["zeros", "data"])
def test_stale_request_served_after_a_stage_mode_writer_wrote(old: int) -> None:
    """Issue 7 item 1. A request-mode write times out (the worker is stuck) and leaves
    its request queued; a stage-mode writer then stages cluster 2 (all zeros, or data,
    in the snapshot), clears it and writes new data -- inside the worker's serving of
    the stale request. Serving without the claim (or reading needs_copy before taking
    it) copies the new data: on a raw target the staged zeros never repair it."""

    def steps(m: CopyBeforeWriteMachine) -> None:
        m.prefill([(2, old)])  # allocated, so its zeros are recorded explicitly
        m.start_job(sync="full", mode="request", policy="break-guest-write", chunk=1)
        m.toggle_worker()  # stuck
        m.guest_write(writer=0, offset=2 * CS, length=10, value=7)  # times out
        check(m)
        assert m.w.parked, "the request should wait in the worker's queue"
        m.set_cbw_mode("stage")
        m.write_during("late requests", skip=0, spread=0, aim=True, writer=1, offset=5,
                       length=10, value=9)
        check(m)
        assert m.w.served >= 1
        m.end(cancel=1, leave_requests=False)  # complete, compare with the snapshot
        check(m)

    run_steps(steps)


def test_request_left_over_from_an_earlier_job_is_not_served() -> None:
    """A request still queued when its job ended is answered without copying in the
    next job (it carries the old job's number)."""

    def steps(m: CopyBeforeWriteMachine) -> None:
        m.start_job(sync="full", mode="request", policy="break-guest-write", chunk=8)
        m.toggle_worker()
        m.guest_write(writer=0, offset=CS, length=10, value=7)  # times out
        m.end(cancel=0, leave_requests=True)  # cancelled; the request stays queued
        check(m)
        m.start_job(sync="full", mode="stage", policy="break-guest-write", chunk=8)
        m.toggle_worker()  # wakes up: serves the left-over request
        check(m)
        assert m.w.stale_answers == 1
        m.end(cancel=1, leave_requests=False)
        check(m)

    run_steps(steps)


def test_background_copy_reads_the_map_only_under_its_claims() -> None:
    """A stage-mode writer saves cluster 1 and writes it just before the background copy
    takes the claims of chunk [0, 3): the copy must not write cluster 1 again (a mutant
    that reads needs_copy before claiming writes the new data)."""

    def steps(m: CopyBeforeWriteMachine) -> None:
        m.prefill([(0, 1), (1, 2), (2, 3)])
        m.start_job(sync="full", mode="stage", policy="break-guest-write", chunk=3)
        m.write_during("background", skip=0, spread=1, aim=True, writer=0, offset=0,
                       length=10, value=5)
        check(m)
        m.end(cancel=1, leave_requests=False)
        check(m)

    run_steps(steps)


@pytest.mark.parametrize("sync", ["full", "top", "none"])
def test_finish_drains_what_writers_staged(sync: str) -> None:
    """A cluster staged after the worker's last drain reaches the target (a mutant of
    Copier.finish without its final drain loses it)."""

    def steps(m: CopyBeforeWriteMachine) -> None:
        m.prefill([(4, 4)])
        m.start_job(sync=sync, mode="stage", policy="break-guest-write", chunk=8)
        m.guest_write(writer=1, offset=4 * CS, length=CS, value=6)  # stages cluster 4
        check(m)
        m.end(cancel=1, leave_requests=False)
        check(m)

    run_steps(steps)
