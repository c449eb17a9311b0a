"""Moving snapshot contents from the device to the target: the backup worker's hands.

Theory of operation
===================

Three sources of snapshot contents, one rule (DESIGN.md invariant 2): whoever saves
cluster c holds its claim and finds ``needs_copy[c] == 1`` *under the claim*; saving
clears it. Nobody holds a claim while waiting for another party, so the worker never
waits for a claim either: it takes claims with ``try_claim`` and comes back later when
one is held (a writer holding it is staging that cluster itself, which takes
microseconds).

* **Background copy** walks the map in cluster order, a chunk at a time. It takes the
  chunk's claims without blocking, reads ``needs_copy`` under them, writes every run of
  still-marked clusters straight from the shared mapping with one target write, clears
  them, and drops the claims. (Skipping a stretch already all zero needs no claim: 0 is
  final for the job.)
* * **Copy requests** come from writers that hold *no* claim while they wait (request
  mode, or stage mode with the copy-before-write buffer full).
  :meth:`Copier.serve_request` treats them like a one-cluster background copy: try the
  claim, re-check ``needs_copy`` under it, save, clear, release. A request can be stale
  — its writer timed out or died, or it was left in the queue by an earlier job — and
  meanwhile a stage-mode writer may have saved the cluster and written new data: the
  re-check under the claim sees 0 and copies nothing. A request carries the job it
  belongs to; one from another job is not served at all.
* **The copy-before-write buffer** (:mod:`shmblock.cbw_buffer`) holds old contents that
  writers saved themselves. The worker drains it before any background work, every
  FULL slot at once, in cluster order: runs of consecutive clusters are gathered into one
  contiguous scratch area and written with one target write per run (a raw target: one
  ``pwrite``), then their slots are freed. ``needs_copy`` was cleared by the writer
  already, after the slot was FULL, so a worker that sees a cluster unmarked and then
  drains finds its slot. Two FULL slots for one cluster (a writer died between FULL and
  clearing the map, and another saved the cluster again) hold the same bytes — nobody
  wrote the cluster in between — and it is written once.

Ending a job (:meth:`Copier.finish`): for ``sync=none`` nothing ever unmarks every
cluster, so the copier first stops copy-before-write (clears ``needs_copy``) and waits
for writers that are staging right now (by taking every claim once) before the final
drain; otherwise a cluster staged between the last drain and the writers' release
would be dropped. For the other modes the map is all zero by then, so the final drain
collects every staged cluster. A target that answers asynchronously (NBD) is then
settled, so every write it was sent has been acknowledged.

Each cluster therefore reaches the target exactly once per job, and only with its
snapshot contents. All-zero clusters are found with a vectorised check and sent as
``write_zeroes`` (or skipped, when the target starts zeroed and the device never
allocated them). On a target that starts zeroed, clusters the device never allocated
are not even read: the background copy and copy requests take only the allocated runs
of a range from the mapping (:meth:`Copier._write_allocated`).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable

import numpy as np
import numpy.typing as npt

import protocol
from shmblock import cbw_buffer, snapshot
from shmblock import layout as L
from shmblock.claims import Claims
from shmblock.device import Device
from shmblock.errors import CopyBeforeWriteError, JobError
from shmblock.targets.base import Target

DEFAULT_CHUNK = 1 << 20
#: Longest run of buffered clusters gathered into one target write.
DRAIN_RUN_BYTES = 4 << 20
#: A long drain (a full buffer is up to 256 MiB) stops this often for
#: :attr:`Copier.between_runs`: writers that found the buffer full wait for their copy
#: requests, and must not wait for the whole drain.
DRAIN_SERVICE_BYTES = 8 << 20
#: How often the drain looks for dead writers' reservations to free.
UPKEEP_EVERY = 1.0

BoolArray = npt.NDArray[np.bool_]

#: How long :meth:`Copier.finish` waits for writers that are staging a cluster right now
#: (they hold a claim for one cluster memcpy; this only bounds a stopped writer).
FINISH_CLAIM_TIMEOUT = 10.0


class Served(enum.Enum):
    """What :meth:`Copier.serve_request` did with a copy request."""

    SAVED = "saved"  # saved now, under the claims
    ALREADY_SAVED = "already saved"  # someone saved them first: nothing copied
    STALE = "stale"  # from another job (or none): nothing copied
    BUSY = "busy"  # a claim is held (a writer is staging): serve again later

    @property
    def answered(self) -> bool:
        """True when the request gets its CopyDone now; BUSY ones are kept for later."""
        return self is not Served.BUSY


def runs(mask: BoolArray) -> list[tuple[int, int, bool]]:
    """Split a boolean array into maximal runs: [(start, stop, value), ...]."""
    n = mask.size
    if n == 0:
        return []
    edges = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    bounds = [0, *edges.tolist(), n]
    return [(bounds[i], bounds[i + 1], bool(mask[bounds[i]])) for i in range(len(bounds) - 1)]


def nonzero_clusters(data: npt.NDArray[np.uint8], cluster_size: int) -> BoolArray:
    """Which clusters of a cluster-aligned byte range hold any non-zero byte."""
    words = data.view(np.uint64).reshape(-1, cluster_size // 8)
    # max() != 0, not any(): numpy's any() on integers converts them to booleans first,
    # and measured 1.6-2x slower (bench/test_micro.py, zero-check).
    return np.asarray(words.max(axis=1) != 0, dtype=np.bool_)


class Copier:
    """Saves snapshot contents of one device to one target. Used by one process only."""

    def __init__(self, device: Device, target: Target, claims: Claims,
                 chunk_bytes: int = DEFAULT_CHUNK) -> None:
        self.device = device
        self.target = target
        self.claims = claims
        self.cs = device.cluster_size
        self.chunk = max(chunk_bytes // self.cs, 1)
        self.cursor = 0
        #: the device's CTL_JOB_SEQ of the job being copied; 0 before :meth:`begin`
        self.job_seq = 0
        self.clusters_saved = 0
        self.cbw_clusters = 0
        self.bytes_written = 0
        self._data = device.data
        self._view = device.data_view()
        self._nc = device.needs_copy
        self._saved = device.saved
        self._scratch: npt.NDArray[np.uint8] | None = None  # drain gather area
        self._next_upkeep = 0.0
        #: slots drained in this job (the buffer's ``saves``)
        self.buffer_saves = 0
        #: called every DRAIN_SERVICE_BYTES of a long drain (the job loop serves its
        #: copy requests there); may raise to end the job
        self.between_runs: Callable[[], None] | None = None

    def begin(self) -> None:
        """The job's snapshot is taken (the maps are set): remember which job it is."""
        self.job_seq = int(self.device.ctl[L.CTL_JOB_SEQ])

    # -- writing ----------------------------------------------------------------------

    def _write_range(self, c0: int, c1: int, source: npt.NDArray[np.uint8] | None = None,
                     view: memoryview | None = None) -> None:
        """Write clusters [c0, c1) to the target from the device (or from ``source``)."""
        cs = self.cs
        target = self.target
        allocated = self.device.allocated
        if source is None:
            if target.starts_zeroed and c1 - c0 > 1:
                self._write_allocated(c0, c1)
                return
            source = self._data[c0 * cs : c1 * cs]
            view = self._view[c0 * cs : c1 * cs]
        assert view is not None
        if c1 - c0 == 1:
            # One cluster (every copy-before-write save): the same decisions as the run
            # loop below without its numpy bookkeeping, which costs more than the write.
            if np.count_nonzero(source.view(np.uint64)):
                target.write(c0 * cs, view)
                self.bytes_written += cs
            elif not target.starts_zeroed or allocated[c0]:
                target.write_zeroes(c0 * cs, cs)
            self._saved[c0] = 1
            self.clusters_saved += 1
            return
        nonzero = nonzero_clusters(source, cs)
        for a, b, has_data in runs(nonzero):
            if has_data:
                target.write((c0 + a) * cs, view[a * cs : b * cs])
                self.bytes_written += (b - a) * cs
            elif not target.starts_zeroed:
                target.write_zeroes((c0 + a) * cs, (b - a) * cs)
            else:
                # Never-written clusters read as zeros on a fresh target: leave them out.
                for za, zb, alloc in runs(allocated[c0 + a : c0 + b] != 0):
                    if alloc:
                        target.write_zeroes((c0 + a + za) * cs, (zb - za) * cs)
        self._saved[c0:c1] = 1
        self.clusters_saved += c1 - c0

    def _write_allocated(self, c0: int, c1: int) -> None:
        """Write device clusters [c0, c1) to a target that starts zeroed, reading only
        the clusters the device ever allocated.

        A cluster never allocated was never written (every path that stores device
        data -- guest writes, hence restores into a device and ``fill`` -- sets
        ``allocated`` first, and the device-file scan sets it for every non-zero
        cluster), so it holds zeros and already reads as zeros on the target: it is
        left out without touching the mapping. Reading it would fault in a page per
        4 KiB for nothing, and for a device file's holes the kernel would even
        allocate zero-filled page-cache pages (measured: the background pass over a
        1 GiB device file, half holes, to raw went from 227 to 138 ms, CPU 199 to
        136 ms; medians of 7, /tmp/wtwhole-copybench.py). Under the chunk's claims
        ``allocated`` of a still-marked cluster is what it was at the snapshot: a guest
        write sets it only after saving the cluster, which clears the mark.
        """
        cs = self.cs
        for a, b, alloc in runs(self.device.allocated[c0:c1] != 0):
            lo, hi = c0 + a, c0 + b
            if alloc:
                self._write_range(lo, hi, self._data[lo * cs : hi * cs],
                                  self._view[lo * cs : hi * cs])  # marks them saved
            else:
                self._saved[lo:hi] = 1
                self.clusters_saved += hi - lo

    # -- background copy ------------------------------------------------------------------

    @property
    def background_done(self) -> bool:
        return self.cursor >= self.device.clusters

    def copy_next_chunk(self) -> int:
        """Copy the next chunk of marked clusters; returns clusters saved.

        Returns 0 without advancing when a claim in the chunk is held by a writer: the
        caller serves requests and staging, then calls again.
        """
        nc = self._nc
        n = self.device.clusters
        # Skip unmarked stretches quickly (sync=top, or clusters writers already saved).
        while self.cursor < n and not nc[self.cursor : self.cursor + self.chunk].any():
            self.cursor += self.chunk
        if self.cursor >= n:
            self.cursor = n
            return 0
        c0 = self.cursor
        c1 = min(c0 + self.chunk, n)
        if not self.claims.try_claim(c0, c1 - c0):
            return 0
        saved = 0
        try:
            marked = nc[c0:c1] != 0
            for a, b, is_marked in runs(marked):
                if is_marked:
                    self._write_range(c0 + a, c0 + b)
                    nc[c0 + a : c0 + b] = 0
                    saved += b - a
        finally:
            self.claims.release(c0, c1 - c0)
        self.cursor = c1
        return saved

    # -- copy-before-write ------------------------------------------------------------------

    def serve_request(self, cluster: int, count: int, job: int) -> Served:
        """Save clusters a writer asked for, like a background copy of them.

        ``job`` is the job number the request carries. Nobody waits for us while holding
        a claim, so a held claim means a writer is staging the cluster itself: the answer
        is BUSY and the caller asks again later, never blocks.
        """
        ctl = self.device.ctl
        if job == 0 or job != self.job_seq or int(ctl[L.CTL_JOB_SEQ]) != job:
            return Served.STALE
        c1 = min(cluster + count, self.device.clusters)
        if cluster >= c1:
            return Served.ALREADY_SAVED  # past the end: nothing there to save
        if not self.claims.try_claim(cluster, c1 - cluster):
            return Served.BUSY
        nc = self._nc
        try:
            # Read the map only now, under the claims: a stage-mode writer may have saved
            # the cluster and written new data since the request was sent.
            if c1 - cluster == 1:
                if not nc[cluster]:
                    return Served.ALREADY_SAVED
                self._write_range(cluster, c1)
                nc[cluster] = 0
                self.cbw_clusters += 1
                return Served.SAVED
            saved = 0
            for a, b, is_marked in runs(nc[cluster:c1] != 0):
                if is_marked:
                    self._write_range(cluster + a, cluster + b)
                    nc[cluster + a : cluster + b] = 0
                    saved += b - a
            self.cbw_clusters += saved
            return Served.SAVED if saved else Served.ALREADY_SAVED
        finally:
            self.claims.release(cluster, c1 - cluster)

    def drain_staging(self, service: bool = True) -> int:
        """Write every FULL buffer slot to the target, in cluster order with adjacent
        clusters coalesced into one write, and free them; returns slots drained.

        ``service``: call :attr:`between_runs` every DRAIN_SERVICE_BYTES (not in the
        final drain of :meth:`finish`, where the job's outcome is being decided).
        """
        device = self.device
        state = device.slot_state
        full = np.flatnonzero(state == L.SLOT_FULL)
        if full.size == 0:
            self._upkeep(False)
            return 0
        clusters = device.slot_cluster[full]
        order = np.argsort(clusters, kind="stable")
        slots, clusters = full[order], clusters[order]
        first = np.ones(clusters.size, dtype=np.bool_)
        first[1:] = clusters[1:] != clusters[:-1]
        uslots, uclusters = slots[first], clusters[first].astype(np.int64)
        # Run boundaries: where the next cluster is not this one + 1.
        breaks = np.flatnonzero(np.diff(uclusters) != 1) + 1
        bounds = [0, *breaks.tolist(), uclusters.size]
        staging = device.staging
        max_run = max(DRAIN_RUN_BYTES // self.cs, 1)
        service_every = max(DRAIN_SERVICE_BYTES // self.cs, 1)
        since_service = 0
        for i in range(len(bounds) - 1):
            for a in range(bounds[i], bounds[i + 1], max_run):
                b = min(a + max_run, bounds[i + 1])
                c0 = int(uclusters[a])
                if b - a == 1:
                    row = staging[int(uslots[a])]
                    self._write_range(c0, c0 + 1, source=row, view=memoryview(row))
                else:
                    flat = self._gather(uslots[a:b])
                    self._write_range(c0, c0 + b - a, source=flat, view=flat.data)
                # Freed as soon as the target has them: writers waiting for room go on.
                state[uslots[a:b]] = L.SLOT_FREE
                # Counted as they go: between_runs may end the job.
                self.cbw_clusters += b - a
                self.buffer_saves += b - a
                device.ctl[L.CTL_BUF_SAVES] = self.buffer_saves
                since_service += b - a
                if service and self.between_runs is not None \
                        and since_service >= service_every and b < uclusters.size:
                    since_service = 0
                    self.between_runs()
        state[slots[~first]] = L.SLOT_FREE  # duplicates: the same bytes, written once
        self.buffer_saves += int(full.size - uslots.size)
        device.ctl[L.CTL_BUF_SAVES] = self.buffer_saves
        self._upkeep(True)
        return int(full.size)

    def _gather(self, slots: npt.NDArray[np.intp]) -> npt.NDArray[np.uint8]:
        """Copy buffer ``slots`` one after another into the scratch area; a flat view."""
        cs = self.cs
        k = int(slots.size)
        if self._scratch is None:
            self._scratch = np.empty((max(DRAIN_RUN_BYTES // cs, 1), cs), dtype=np.uint8)
        out = self._scratch[:k]
        np.take(self.device.staging, slots, axis=0, out=out)
        return out.reshape(-1)

    def _upkeep(self, freed: bool) -> None:
        """After a drain: end a full interval at once; free dead writers' slots now and
        then."""
        now = time.monotonic()
        if (freed and self.device.ctl[L.CTL_BUF_FULL_SINCE_NS]) or now >= self._next_upkeep:
            self._next_upkeep = now + UPKEEP_EVERY
            cbw_buffer.worker_upkeep(self.device, self.claims)

    def settle(self) -> None:
        """Wait until the target has acknowledged every write sent so far.

        Called before answering copy requests: a writer that gets ``ok`` overwrites the
        cluster, so its old contents must be stored, not just sent (NBD pipelines).
        """
        self.target.settle()

    def finish(self, sync: str) -> None:
        """Make every saved cluster reach the target before the job may complete.

        Raises JobError when a cluster the snapshot covers was left unsaved (cannot
        happen when the background pass ran to its end), TargetError from the target.
        """
        background = snapshot.has_background_copy(sync)
        if not background:
            self.stop_copy_before_write()
        self.drain_staging(service=False)
        if background and self.marked_clusters():
            raise JobError(f"{self.marked_clusters()} clusters left unsaved")
        self.settle()

    def stop_copy_before_write(self, timeout: float = FINISH_CLAIM_TIMEOUT) -> None:
        """Unmark every cluster, then wait for writers staging one right now.

        A writer stages under the claim after reading ``needs_copy[c] == 1``; once the
        map is clear and every claim has been free once, no writer can still fill a slot,
        so a drain after this one sees every staged cluster.
        """
        self._nc[:] = 0
        n = self.device.clusters
        try:
            self.claims.claim(0, n, time.monotonic() + timeout)
        except CopyBeforeWriteError as exc:
            raise JobError("a guest writer kept a cluster claimed while the job ended") \
                from exc
        self.claims.release(0, n)

    def close(self) -> None:
        """Drop the views of the device mapping (so the device can be closed)."""
        self._view.release()
        del self._data, self._nc, self._saved
        self._scratch = None

    def marked_clusters(self) -> int:
        """How many clusters the snapshot still needs."""
        return int(np.count_nonzero(self._nc))


#: How a :class:`CopyRequests` book delivers an answer to the writer that asked.
Answer = Callable[[protocol.CopyRequest, protocol.CopyDone], None]


class CopyRequests:
    """The backup worker's copy requests, from arrival to answer.

    A request is *pending* until it is served; :meth:`serve` serves every pending one
    it can (a request whose claim a writer holds stays pending for the next call: that
    writer is staging the cluster itself), waits until the target has stored what was
    written (``settle``), and only then answers — a writer that gets ``ok`` overwrites
    the cluster at once. Requests that arrive before the job began stay pending too.
    When the job ends, :meth:`end_job` answers everything left.
    """

    def __init__(self, copier: Copier, answer: Answer) -> None:
        self.copier = copier
        self._answer = answer
        self.pending: list[protocol.CopyRequest] = []

    def add(self, req: protocol.CopyRequest) -> None:
        self.pending.append(req)

    def serve(self) -> None:
        """Serve and answer what can be served now.

        A TargetError propagates with every request still pending, so that
        :meth:`end_job` answers them all with the job's failure.
        """
        copier = self.copier
        if not self.pending or copier.job_seq == 0:
            return  # before the job began: the writers' job is not known yet
        done: list[tuple[protocol.CopyRequest, Served]] = []
        busy: list[protocol.CopyRequest] = []
        for req in self.pending:
            served = copier.serve_request(req.cluster, req.count, req.job)
            if served.answered:
                done.append((req, served))
            else:
                busy.append(req)
        if any(served is Served.SAVED for _, served in done):
            copier.settle()
        self.pending = busy
        for req, served in done:
            if served is Served.STALE:
                self._reply(req, False, "the request is not for the running backup job")
            else:
                self._reply(req, True, "")

    def end_job(self, ok: bool, error: str = "", target_error: bool = False,
                queued: Iterable[protocol.CopyRequest] = ()) -> None:
        """The job is over (the map is clear): answer every request still pending and
        ``queued`` (still in the inbox) — ``ok`` when nothing needs saving any more (the
        job completed or was cancelled), else the failure, so that a writer whose
        cluster was not saved fails its write under break-guest-write."""
        requests = [*self.pending, *queued]
        self.pending = []
        job = self.copier.job_seq
        for req in requests:
            if req.job != job:
                # Left over from another job: this job's outcome says nothing about it.
                self._reply(req, False, "the request is not for the running backup job")
            else:
                self._reply(req, ok, "" if ok else error, target_error and not ok)

    def _reply(self, req: protocol.CopyRequest, ok: bool, error: str,
               target_error: bool = False) -> None:
        self._answer(req, protocol.CopyDone(seq=req.seq, cluster=req.cluster, count=req.count,
                                            ok=ok, error=protocol.short_error(error),
                                            target_error=target_error))
