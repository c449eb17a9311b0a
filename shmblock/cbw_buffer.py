"""The copy-before-write buffer: one bounded area of saved clusters, shared by every
writer of a device and drained by the backup worker.

Theory of operation
===================

The buffer is ``buffer_slots`` clusters of the device's metadata segment (sized when
the device is created, :func:`shmblock.device.default_buffer_slots`); a job may use the
first ``CTL_BUF_LIMIT`` of them (:func:`configure`, ``--cbw-buffer``). Each slot has a
state word (``slot_state``, uint16) and the number of the cluster it holds
(``slot_cluster``). numpy has no compare-and-swap, so every state change has exactly
one party allowed to make it:

=================  ==========================================  ========================
change             who                                         when
=================  ==========================================  ========================
FREE → HELD+w      writer w, **under the buffer lock**         reserving a batch
HELD+w → FULL      writer w                                    after storing the data
                                                               and ``slot_cluster``
FULL → FREE        the backup worker                           after the target has it
HELD+w → FREE      writer w (closing), or anyone under the     w no longer holds its
                   lock once w is dead                         *alive* lock
everything → FREE  the supervisor (``snapshot.take``)          while writers are frozen
=================  ==========================================  ========================

The *buffer lock* and each writer's *alive lock* are OFD byte-range locks on bytes far
beyond the cluster claims (:mod:`shmblock.claims`), so the kernel drops them when their
holder dies. A writer holds its alive lock from its first save to :meth:`Producer.close`;
a process that finds another writer's alive lock free knows that writer is gone, and
its HELD slots (reserved, never published) can be freed. Slots a dead writer published
(FULL) are drained like any other. A writer that died between copying into a slot and
publishing it never cleared ``needs_copy`` for that cluster either (the clear comes
after the FULL store), so the cluster is still covered: another writer or the
background copy saves it from the device, which that writer never got to change.

Writers reserve slots in batches (at most 1/32 of the job's buffer each) and keep them
privately, so the lock is taken once per batch, not once per save. A save (under the
cluster's claim, with ``needs_copy[c] == 1`` read under it) is then: copy the cluster
into a held slot, store ``slot_cluster``, store FULL, and only then clear
``needs_copy[c]``. x86-64 keeps stores in program order and loads in program order
(TSO, :func:`shmblock.device.check_memory_ordering`): a worker that loads FULL loads the
slot's cluster number and data after it, and sees them; a worker that sees
``needs_copy[c] == 0`` and then drains finds the FULL slot. The worker reads a slot's
data before it stores FREE, and a writer stores into a slot only after loading FREE
(under the lock), so a slot is never reused while it is drained. Reservations belong to
one job: ``snapshot.take`` frees every slot while writers are frozen, and a writer
drops its private list when it sees ``CTL_JOB_SEQ`` change.

Back-pressure is graded. Each reservation counts the slots not FREE (under the lock),
which gives the writer the buffer's occupancy *u*. Below half full a save costs one
cluster copy and nothing else; above, each save owes a delay of
:func:`backpressure_delay` (*u*) — growing with the square of the occupancy past one half
up to :data:`BP_MAX_DELAY` at full, about what a save by the request path costs — so
writers slow down smoothly and the worker catches up before the cliff. The debt is paid
in sleeps of at least :data:`BP_MIN_SLEEP` (a shorter sleep is not a shorter sleep on
Linux), after the claim is released. When no slot is free the save goes the
request/worker path (never fails for want of space) and counts as a *fallback*.

Occupancy statistics (:class:`BufferStats`) come from control words updated under the
buffer lock (peak, time full, fallbacks) and by the worker alone (saves drained).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from shmblock import layout as L
from shmblock.claims import Claims
from shmblock.device import Device
from shmblock.errors import UsageError
from shmblock.units import format_size

#: The buffer lock's byte and the first writer's alive byte in the claims' byte space
#: (cluster claims use bytes [0, clusters); off_t is 64 bits).
LOCK_BYTE = 1 << 60
ALIVE_BASE = LOCK_BYTE + 16
#: A writer reserves at most this many slots at once, and at most 1/BATCH_FRACTION of
#: the job's buffer (so idle writers cannot sit on much of it).
MAX_BATCH = 16
BATCH_FRACTION = 32
#: Back-pressure: no delay up to BP_START occupancy; BP_MAX_DELAY at full.
BP_START = 0.5
BP_MAX_DELAY = 200e-6
BP_MIN_SLEEP = 100e-6
#: How long a writer waits for the buffer lock (held for a scan of the state words).
LOCK_TIMEOUT = 1.0


def backpressure_delay(occupancy: float) -> float:
    """Seconds a save owes when the buffer is ``occupancy`` (0..1) full."""
    if occupancy <= BP_START:
        return 0.0
    x = min((occupancy - BP_START) / (1.0 - BP_START), 1.0)
    return BP_MAX_DELAY * x * x


def batch_size(limit: int) -> int:
    """How many slots a writer reserves at once from a buffer of ``limit`` slots."""
    return max(1, min(MAX_BATCH, limit // BATCH_FRACTION))


@dataclass(frozen=True, slots=True)
class BufferStats:
    """A job's use of the copy-before-write buffer (contract C1)."""

    capacity_bytes: int
    peak_bytes: int
    full_seconds: float
    saves: int  # clusters saved through the buffer (drained by the worker)
    fallbacks: int  # saves that went the request path because the buffer was full

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def limit_slots(device: Device, nbytes: int | None) -> int:
    """Slots a job asking for ``nbytes`` of buffer uses (None: all of the device's).

    A size that is not a whole number of clusters is rounded up. UsageError when the
    device's buffer is smaller than asked.
    """
    cap = device.geometry.slots
    cs = device.cluster_size
    if nbytes is None:
        return cap
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise UsageError(f"cbw-buffer must be a size in bytes (0 or more), got {nbytes!r}")
    slots = -(-nbytes // cs)
    if slots > cap:
        raise UsageError(
            f"cbw-buffer {format_size(nbytes)} is more than device's copy-before-write "
            f"buffer ({format_size(cap * cs)}, {cap} clusters, sized when the device was "
            "created): ask for less, or 0 for the request path only")
    return slots


def configure(device: Device, nbytes: int | None, cbw_mode: str = "stage") -> None:
    """Set the next job's buffer size and reset its statistics (before the freeze)."""
    limit = limit_slots(device, nbytes) if cbw_mode == "stage" else 0
    ctl = device.ctl
    for word in (L.CTL_BUF_PEAK, L.CTL_BUF_FULL_NS, L.CTL_BUF_FULL_SINCE_NS,
                 L.CTL_BUF_FALLBACKS, L.CTL_BUF_SAVES):
        ctl[word] = 0
    ctl[L.CTL_BUF_LIMIT] = limit


def stats(device: Device) -> BufferStats:
    """The buffer statistics of the device's current (or last) job."""
    ctl = device.ctl
    cs = device.cluster_size
    full_ns = int(ctl[L.CTL_BUF_FULL_NS])
    since = int(ctl[L.CTL_BUF_FULL_SINCE_NS])
    if since:
        full_ns += max(time.monotonic_ns() - since, 0)
    return BufferStats(capacity_bytes=int(ctl[L.CTL_BUF_LIMIT]) * cs,
                       peak_bytes=int(ctl[L.CTL_BUF_PEAK]) * cs,
                       full_seconds=full_ns / 1e9, saves=int(ctl[L.CTL_BUF_SAVES]),
                       fallbacks=int(ctl[L.CTL_BUF_FALLBACKS]))


def _end_full_interval(device: Device) -> None:
    """Under the lock: the buffer has room again; add the time it was full."""
    ctl = device.ctl
    since = int(ctl[L.CTL_BUF_FULL_SINCE_NS])
    if since:
        ctl[L.CTL_BUF_FULL_NS] += max(time.monotonic_ns() - since, 0)
        ctl[L.CTL_BUF_FULL_SINCE_NS] = 0


def _reclaim_dead(device: Device, claims: Claims, own: int = -1) -> int:
    """Under the lock: free the HELD slots of writers that are gone; returns slots freed.

    ``own`` is the caller's writer index (its own alive lock is on the caller's file
    description, where a test would succeed and a release would drop it).
    """
    state = device.slot_state
    # One load of the states: indexing ``state`` by a mask computed from it would read
    # it twice, and a slot published in between (HELD+w -> FULL) would yield the mark
    # FULL, whose "writer" -1 has no alive lock -- every FULL slot would be freed
    # undrained.
    seen = state.copy()
    holders = [m for m in np.unique(seen[seen >= L.SLOT_HELD]).tolist() if m >= L.SLOT_HELD]
    freed = 0
    for mark in holders:
        w = int(mark) - L.SLOT_HELD
        if w == own or not claims.try_claim(ALIVE_BASE + w):
            continue  # alive (or ourselves)
        try:
            mine = state == mark
            freed += int(np.count_nonzero(mine))
            state[mine] = L.SLOT_FREE
        finally:
            claims.release(ALIVE_BASE + w)
    return freed


def worker_upkeep(device: Device, claims: Claims) -> None:
    """The backup worker, after freeing slots: close a full interval, free dead
    writers' reservations. Never waits: skipped when the lock is busy."""
    if not claims.try_claim(LOCK_BYTE):
        return
    try:
        _end_full_interval(device)
        _reclaim_dead(device, claims)
    finally:
        claims.release(LOCK_BYTE)


class Producer:
    """One writer's side of the buffer: reserve, fill, publish; pace by occupancy.

    Used by one thread at a time (the writer's). ``sleep`` is a seam for tests.
    """

    def __init__(self, device: Device, writer: int, claims: Claims,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.device = device
        self.writer = writer
        self._claims = claims
        self._sleep = sleep
        self._ctl = device.ctl
        self._state = device.slot_state
        self._cluster = device.slot_cluster
        self._staging = device.staging
        self._cs = device.cluster_size
        self._mark = L.SLOT_HELD + writer
        self._held: list[int] = []
        self._job = -1
        self._alive = False
        #: occupancy (0..1) the last reservation found; drives the back-pressure
        self.occupancy = 0.0
        #: back-pressure owed and not yet slept, and slept in all (seconds)
        self.debt = 0.0
        self.slept = 0.0

    def _ensure_alive(self, deadline: float) -> bool:
        """Hold this writer's alive lock; free slots an earlier holder of the index left."""
        if self._alive:
            return True
        if not self._claims.try_claim(ALIVE_BASE + self.writer):
            return False  # another live handle has this writer index: use requests
        self._alive = True
        self._claims.claim(LOCK_BYTE, 1, deadline)
        try:
            state = self._state
            state[state == self._mark] = L.SLOT_FREE
        finally:
            self._claims.release(LOCK_BYTE)
        return True

    def reserve(self, deadline: float) -> int | None:
        """A slot this writer holds for this job, or None when the buffer is full.

        Raises CopyBeforeWriteError when the lock stays busy past ``deadline``.
        """
        job = int(self._ctl[L.CTL_JOB_SEQ])
        if job != self._job:
            self._held = []  # snapshot.take freed every slot while we were frozen
            self._job = job
        if not self._held and not self._refill(deadline):
            return None
        return self._held.pop()

    def _refill(self, deadline: float) -> bool:
        ctl = self._ctl
        limit = int(ctl[L.CTL_BUF_LIMIT])
        if limit == 0 or not self._ensure_alive(deadline):
            return False
        claims = self._claims
        claims.claim(LOCK_BYTE, 1, min(deadline, time.monotonic() + LOCK_TIMEOUT))
        try:
            state = self._state[:limit]
            free = np.flatnonzero(state == L.SLOT_FREE)
            if free.size == 0 and _reclaim_dead(self.device, claims, own=self.writer):
                free = np.flatnonzero(state == L.SLOT_FREE)
            if free.size == 0:
                ctl[L.CTL_BUF_FALLBACKS] += 1
                if not ctl[L.CTL_BUF_FULL_SINCE_NS]:
                    ctl[L.CTL_BUF_FULL_SINCE_NS] = time.monotonic_ns()
                self.occupancy = 1.0
                return False
            take = free[: batch_size(limit)]
            state[take] = self._mark
            held = limit - free.size + take.size
            ctl[L.CTL_BUF_PEAK] = max(ctl[L.CTL_BUF_PEAK], held)
            _end_full_interval(self.device)
        finally:
            claims.release(LOCK_BYTE)
        self.occupancy = held / limit
        self._held = take[::-1].tolist()
        return True

    def save(self, cluster: int, deadline: float) -> bool:
        """Copy ``cluster``'s contents into the buffer and publish it.

        Only under the cluster's claim with ``needs_copy[cluster] == 1`` read under it;
        the caller clears ``needs_copy`` after this returns True. False: no room, the
        caller takes the request path.
        """
        slot = self.reserve(deadline)
        if slot is None:
            return False
        cs = self._cs
        # Order matters (module docstring): data and cluster number, then FULL.
        self._staging[slot] = self.device.data[cluster * cs : (cluster + 1) * cs]
        self._cluster[slot] = cluster
        self._state[slot] = L.SLOT_FULL
        self.debt += backpressure_delay(self.occupancy)
        return True

    def pace(self) -> None:
        """Pay the back-pressure owed (call with no claim held)."""
        if self.debt >= BP_MIN_SLEEP:
            t0 = time.perf_counter()
            self._sleep(self.debt)
            slept = time.perf_counter() - t0
            # An oversleep is credit: the average cost per save stays the graded one.
            self.debt -= slept
            self.slept += slept

    def close(self) -> None:
        """Give back the slots held and not used; drop the alive lock."""
        if self._held and self._job == int(self._ctl[L.CTL_JOB_SEQ]):
            state = self._state
            for s in self._held:
                if state[s] == self._mark:
                    state[s] = L.SLOT_FREE
        self._held = []
        if self._alive:
            self._alive = False
            self._claims.release(ALIVE_BASE + self.writer)
        del self._ctl, self._state, self._cluster, self._staging


__all__ = ["BufferStats", "Producer", "backpressure_delay", "configure", "limit_slots",
           "stats", "worker_upkeep"]
