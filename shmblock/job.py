"""Backup jobs as the supervisor sees them: states, transitions, events, results.

Theory of operation. A job's state changes only through :meth:`JobState.check` against
the transition table below, under the job's lock; every change is an event. The names
follow QEMU's job states where they mean the same thing (``created``, ``running``,
``paused``, ``concluded``), and the outcome of a concluded job is one of ``completed``,
``failed``, ``cancelled``::

    created ──start──▶ running ◀──resume── paused
       │                 │  └────pause────▶  │
       │                 ▼                   ▼
       └──fail──▶    concluded (completed | failed | cancelled)

``created`` covers the time the worker opens the target and the snapshot is taken;
``running`` starts when the writers thaw. The table says which changes can happen at
all; :data:`VERBS` says which state each control verb needs, because one change can
belong to one verb only (``created → running`` is ``start``; ``resume`` of a job that
never started would leave a job that no snapshot ever covers). The backup worker reports the outcome
(JobCompleted / JobFailed / JobCancelled); the supervisor concludes a job as failed
itself when the worker dies or stops answering.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shmblock.errors import StateError


class JobState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    CONCLUDED = "concluded"

    def check(self, new: JobState, verb: str) -> None:
        """Raise StateError unless ``self → new`` is in the transition table."""
        if new not in TRANSITIONS[self]:
            allowed = tuple(s.value for s, targets in TRANSITIONS.items() if new in targets)
            raise StateError(f"cannot {verb} a job that is {self.value}", self.value, allowed)


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.CREATED: frozenset({JobState.RUNNING, JobState.CONCLUDED}),
    JobState.RUNNING: frozenset({JobState.PAUSED, JobState.CONCLUDED}),
    JobState.PAUSED: frozenset({JobState.RUNNING, JobState.CONCLUDED}),
    JobState.CONCLUDED: frozenset(),
}


#: verb → (the states it may be applied in, the state it leads to).
VERBS: dict[str, tuple[frozenset[JobState], JobState]] = {
    "start": (frozenset({JobState.CREATED}), JobState.RUNNING),
    "pause": (frozenset({JobState.RUNNING}), JobState.PAUSED),
    "resume": (frozenset({JobState.PAUSED}), JobState.RUNNING),
}


class Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class JobEvent:
    """Something that happened to a job, with the monotonic time it was seen."""

    kind: str  # "created", "running", "paused", "resumed", "progress", "speed",
    # "completed", "failed", "cancelled", "verified"
    time: float
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobResult:
    """What a concluded job did."""

    job: str
    outcome: Outcome
    error: str = ""
    target: str = ""
    format: str = ""
    sync: str = ""
    bytes_total: int = 0
    bytes_written: int = 0
    clusters_copied: int = 0
    cbw_clusters: int = 0
    duration_s: float = 0.0
    freeze_s: float = 0.0  # writers frozen, without the verification copy
    verify_copy_s: float = 0.0  # the verification copy, also taken while frozen
    verified: bool | None = None
    verify_error: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.COMPLETED and self.verified is not False

    @property
    def throughput(self) -> float:
        """Bytes of the snapshot per second of job time."""
        return self.bytes_total / self.duration_s if self.duration_s > 0 else 0.0


class JobTracker:
    """State, progress and events of one job; thread-safe (the pump thread feeds it)."""

    def __init__(self, job: str, on_event: Callable[[JobEvent], None] | None = None) -> None:
        self.job = job
        self.state = JobState.CREATED
        self.outcome: Outcome | None = None
        self.error = ""
        self.done = 0
        self.total = 0
        self.events: list[JobEvent] = []
        self.final: dict[str, int] = {}
        self.started = time.monotonic()
        self.running_since = 0.0
        self.ended = 0.0
        self._lock = threading.Condition()
        self._on_event = on_event
        self._emit("created")

    def _emit(self, kind: str, **data: Any) -> None:
        event = JobEvent(kind, time.monotonic(), data)
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    def note(self, kind: str, **data: Any) -> None:
        """Record an event that changes no state (``speed``, ``verified``)."""
        with self._lock:
            self._emit(kind, **data)

    def apply(self, verb: str, event: str, **data: Any) -> None:
        """Apply control verb ``verb`` (see :data:`VERBS`); StateError in a wrong state."""
        allowed, new = VERBS[verb]
        with self._lock:
            if self.state not in allowed:
                raise StateError(f"cannot {verb} a job that is {self.state.value}",
                                 self.state.value, tuple(sorted(s.value for s in allowed)))
            self.transition(new, verb, event, **data)

    def transition(self, new: JobState, verb: str, event: str, **data: Any) -> None:
        with self._lock:
            self.state.check(new, verb)
            self.state = new
            if new is JobState.RUNNING and not self.running_since:
                self.running_since = time.monotonic()
            self._emit(event, **data)
            self._lock.notify_all()

    def progress(self, done: int, total: int) -> None:
        with self._lock:
            self.done, self.total = done, total
            self._emit("progress", done=done, total=total)

    def conclude(self, outcome: Outcome, error: str = "", **final: int) -> bool:
        """Conclude once; later reports (a worker's late message) are ignored."""
        with self._lock:
            if self.state is JobState.CONCLUDED:
                return False
            self.state = JobState.CONCLUDED
            self.outcome = outcome
            self.error = error
            self.final = final
            self.ended = time.monotonic()
            self._emit(outcome.value, error=error, **final)
            self._lock.notify_all()
            return True

    def wait(self, timeout: float | None) -> bool:
        """Wait until concluded; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self.state is JobState.CONCLUDED, timeout)

    @property
    def concluded(self) -> bool:
        return self.state is JobState.CONCLUDED
