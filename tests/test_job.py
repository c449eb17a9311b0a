"""The job state machine: the transition table, conclude-once, waiting, results."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, cast

import pytest

import protocol
from shmblock.engine import MAX_SPEED, BackupJob
from shmblock.errors import JobError, ShmblockError, StateError, UsageError
from shmblock.job import (
    TRANSITIONS,
    VERBS,
    JobEvent,
    JobResult,
    JobState,
    JobTracker,
    Outcome,
)

C, R, P, X = JobState.CREATED, JobState.RUNNING, JobState.PAUSED, JobState.CONCLUDED
Y, S, W, D, A, N = (JobState.READY, JobState.STANDBY, JobState.WAITING, JobState.PENDING,
                    JobState.ABORTING, JobState.NULL)

# QEMU's JobSTT (job.c), written out by hand from its rows so that a change to the table
# in shmblock/job.py has to be made twice, on purpose.
ALLOWED: set[tuple[JobState, JobState]] = {
    (C, R), (C, A), (C, N),
    (R, P), (R, Y), (R, W), (R, A),
    (P, R),
    (Y, S), (Y, W), (Y, A),
    (S, Y),
    (W, D), (W, A),
    (D, A), (D, X),
    (A, A), (A, X),
    (X, N),
}


def by_name(pair: tuple[JobState, JobState]) -> tuple[str, str]:
    return pair[0].value, pair[1].value


def test_table_is_exactly_the_documented_one() -> None:
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == ALLOWED
    assert set(TRANSITIONS) == set(JobState)


ALLOWED_LIST = sorted(ALLOWED, key=by_name)


@pytest.mark.parametrize(("old", "new"), ALLOWED_LIST)
def test_allowed_transitions(old: JobState, new: JobState) -> None:
    old.check(new, "do")  # no exception


DISALLOWED = sorted(set(itertools.product(JobState, JobState)) - ALLOWED, key=by_name)


@pytest.mark.parametrize(("old", "new"), DISALLOWED)
def test_disallowed_transitions(old: JobState, new: JobState) -> None:
    with pytest.raises(StateError) as info:
        old.check(new, "frobnicate")
    err = info.value
    assert err.state == old.value
    # ``required``: the states from which ``new`` could have been reached.
    assert set(err.required) == {a.value for a, b in ALLOWED if b is new}
    assert "frobnicate" in str(err)
    assert old.value in str(err)
    assert isinstance(err, JobError)
    assert isinstance(err, ShmblockError)


def test_pause_a_created_job_names_running_as_required() -> None:
    with pytest.raises(StateError) as info:
        C.check(P, "pause")
    assert info.value.state == "created"
    assert info.value.required == ("running",)
    assert str(info.value) == "cannot pause a job that is created"


def test_only_dismissal_leaves_concluded_and_nothing_leaves_null() -> None:
    for new in JobState:
        if new is N:
            X.check(new, "dismiss")
            continue
        with pytest.raises(StateError):
            X.check(new, "touch")
        with pytest.raises(StateError):
            N.check(new, "touch")


def kinds(tracker: JobTracker) -> list[str]:
    return [e.kind for e in tracker.events]


def test_tracker_lifecycle_and_events() -> None:
    seen: list[JobEvent] = []
    t = JobTracker("job1", on_event=seen.append)
    assert t.state is C
    assert not t.concluded
    t.transition(R, "start", "running")
    assert t.running_since > 0
    first_running = t.running_since
    t.transition(P, "pause", "paused")
    t.transition(R, "resume", "resumed")
    assert t.running_since == first_running  # the first start counts
    t.progress(10, 100)
    assert (t.done, t.total) == (10, 100)
    assert t.conclude(Outcome.COMPLETED, clusters_copied=4)
    assert t.concluded
    assert t.outcome is Outcome.COMPLETED
    assert t.final == {"clusters_copied": 4}
    assert t.ended >= t.started
    assert kinds(t) == ["created", "running", "paused", "resumed", "progress", "completed"]
    assert seen == t.events
    times = [e.time for e in t.events]
    assert times == sorted(times)
    assert t.events[-1].data == {"error": "", "clusters_copied": 4}


def test_tracker_rejects_bad_transitions_and_keeps_state() -> None:
    t = JobTracker("job1")
    with pytest.raises(StateError) as info:
        t.transition(P, "pause", "paused")
    assert info.value.state == "created"
    assert t.state is C
    assert kinds(t) == ["created"]


def test_conclude_once() -> None:
    t = JobTracker("job1")
    t.transition(R, "start", "running")
    assert t.conclude(Outcome.FAILED, "target gone")
    # A late report from the worker changes nothing.
    assert not t.conclude(Outcome.COMPLETED)
    assert not t.conclude(Outcome.CANCELLED, "late")
    assert t.outcome is Outcome.FAILED
    assert t.error == "target gone"
    assert kinds(t) == ["created", "running", "failed"]
    with pytest.raises(StateError):
        t.transition(R, "resume", "resumed")


def test_conclude_straight_from_created() -> None:
    t = JobTracker("job1")
    assert t.conclude(Outcome.FAILED, "no worker")
    assert t.running_since == 0.0
    assert t.state is X


def test_conclude_once_under_races() -> None:
    t = JobTracker("job1")
    t.transition(R, "start", "running")
    wins: list[Outcome] = []
    barrier = threading.Barrier(8)

    def report(outcome: Outcome) -> None:
        barrier.wait()
        if t.conclude(outcome):
            wins.append(outcome)

    threads = [threading.Thread(target=report, args=(o,))
               for o in itertools.islice(itertools.cycle(Outcome), 8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(wins) == 1
    assert t.outcome is wins[0]
    assert sum(e.kind in ("completed", "failed", "cancelled") for e in t.events) == 1


def test_wait_times_out() -> None:
    t = JobTracker("job1")
    t0 = time.monotonic()
    assert t.wait(0.05) is False
    elapsed = time.monotonic() - t0
    assert 0.04 <= elapsed < 2.0
    assert t.wait(0) is False


def test_wait_returns_when_concluded_elsewhere() -> None:
    t = JobTracker("job1")
    t.transition(R, "start", "running")
    timer = threading.Timer(0.05, t.conclude, args=(Outcome.CANCELLED,))
    timer.start()
    try:
        t0 = time.monotonic()
        assert t.wait(10.0) is True
        assert time.monotonic() - t0 < 5.0
    finally:
        timer.join()
    assert t.outcome is Outcome.CANCELLED
    assert t.wait(0) is True  # already concluded: no wait at all


def test_job_result_ok_and_throughput() -> None:
    r = JobResult("job1", Outcome.COMPLETED, bytes_total=1000, duration_s=2.0)
    assert r.ok
    assert r.throughput == 500.0
    assert not JobResult("job1", Outcome.COMPLETED, verified=False).ok
    assert JobResult("job1", Outcome.COMPLETED, verified=True).ok
    assert not JobResult("job1", Outcome.FAILED).ok
    assert not JobResult("job1", Outcome.CANCELLED).ok
    assert JobResult("job1", Outcome.COMPLETED, bytes_total=5).throughput == 0.0


# -- control verbs --------------------------------------------------------------------


def test_each_verb_needs_its_own_state() -> None:
    """created → running is allowed by the table, but only ``start`` may take it."""
    assert {"start": (frozenset({C}), R), "pause": (frozenset({R}), P),
                     "resume": (frozenset({P}), R)} == VERBS
    for verb, (allowed, new) in VERBS.items():
        assert all(new in TRANSITIONS[s] for s in allowed), verb


@pytest.mark.parametrize("verb", sorted(VERBS))
@pytest.mark.parametrize("state", list(JobState), ids=lambda s: s.value)
def test_apply_checks_the_verb(verb: str, state: JobState) -> None:
    t = JobTracker("job1")
    t.state = state
    allowed, new = VERBS[verb]
    if state in allowed:
        t.apply(verb, verb + "d")
        assert t.state is new
        return
    with pytest.raises(StateError) as info:
        t.apply(verb, verb + "d")
    assert info.value.state == state.value
    assert info.value.required == tuple(sorted(s.value for s in allowed))
    assert verb in str(info.value) and state.value in str(info.value)
    assert t.state is state
    assert kinds(t) == ["created"]


class NullQueue:
    """A backup queue that only records what the job sends (no worker, no I/O)."""

    def __init__(self) -> None:
        self.sent: list[protocol.Message] = []

    def send(self, msg: protocol.Message, timeout: float) -> None:
        self.sent.append(msg)


def null_job() -> tuple[BackupJob, NullQueue]:
    queue = NullQueue()
    none = cast(Any, None)
    job = BackupJob(none, "job1", none, none, "full", none, cast(Any, queue),
                    JobTracker("job1"))
    return job, queue


def test_resume_of_a_job_that_never_started_is_refused() -> None:
    job, queue = null_job()
    with pytest.raises(StateError) as info:
        job.resume()
    # QEMU's verb table and wording (BackupJob drives the JobLifecycle now).
    assert (info.value.state, info.value.required) == ("created", ("paused", "standby"))
    assert str(info.value) == ("Job 'job1' in state 'created' cannot accept command verb "
                               "'resume': it is not paused")
    assert job.state is C
    assert queue.sent == []
    job.tracker.apply("start", "running")
    with pytest.raises(StateError, match="in state 'running' cannot accept command verb "
                                         "'resume'"):
        job.resume()
    job.pause()
    job.resume()
    assert queue.sent == [protocol.Pause(job="job1"), protocol.Resume(job="job1")]


def test_set_speed_emits_a_speed_event() -> None:
    job, queue = null_job()
    job.tracker.apply("start", "running")
    job.set_speed(1 << 20)
    assert queue.sent == [protocol.SetSpeed(job="job1", speed=1 << 20)]
    event = job.events[-1]
    assert (event.kind, event.data) == ("speed", {"speed": 1 << 20})
    assert job.speed == 1 << 20


@pytest.mark.parametrize("speed", [-1, MAX_SPEED + 1, 99999999 << 40])
def test_a_speed_no_message_can_carry_is_a_usage_error(speed: int) -> None:
    job, queue = null_job()
    with pytest.raises(UsageError, match="speed"):
        job.set_speed(speed)
    assert queue.sent == []
    assert kinds(job.tracker) == ["created"]
