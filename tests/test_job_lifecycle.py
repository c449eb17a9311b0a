"""QEMU's job lifecycle in shmblock.job: verb table, finalize/dismiss, transactions,
error policies, events, and a Hypothesis model of random verb sequences.

Pure state logic: no process, queue or shared object is created here.
"""

from __future__ import annotations

import errno
import itertools
import threading
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from shmblock.errors import StateError, UsageError
from shmblock.job import (
    TRANSITIONS,
    VERB_TABLE,
    WORK_ENDED,
    ErrorAction,
    IoStatus,
    JobEvent,
    JobHooks,
    JobLifecycle,
    JobState,
    JobTracker,
    JobTxn,
    OnError,
    Outcome,
    Verb,
    decide_error,
)

C, R, P, Y, S, W, D, A, X, N = JobState

# QEMU's JobVerbTable (job.c), columns C R P Y S W D X(aborting) E(concluded) N, written
# out by hand from its rows (and ``start``, which QEMU applies internally in created).
QEMU_VERBS: dict[str, str] = {
    #            C R P Y S W D A X N
    "cancel":    "1 1 1 1 1 1 1 0 0 0",
    "pause":     "1 1 1 1 1 0 0 0 0 0",
    "resume":    "1 1 1 1 1 0 0 0 0 0",
    "set-speed": "1 1 1 1 1 0 0 0 0 0",
    "complete":  "0 0 0 1 0 0 0 0 0 0",
    "finalize":  "0 0 0 0 0 0 1 0 0 0",
    "dismiss":   "0 0 0 0 0 0 0 0 1 0",
    "start":     "1 0 0 0 0 0 0 0 0 0",
}
COLUMNS = [C, R, P, Y, S, W, D, A, X, N]


def test_verb_table_is_qemus() -> None:
    for verb, row in QEMU_VERBS.items():
        allowed = {s for s, bit in zip(COLUMNS, row.split(), strict=True) if bit == "1"}
        assert VERB_TABLE[Verb(verb)] == allowed, verb
    assert {v.value for v in VERB_TABLE} == set(QEMU_VERBS)


def test_work_ended_statuses_are_qemus_job_is_completed() -> None:
    assert frozenset({W, D, A, X, N}) == WORK_ENDED


class Recorder:
    """Hooks that record what the lifecycle called, in order, across jobs."""

    def __init__(self, log: list[str] | None = None) -> None:
        self.log = log if log is not None else []
        self.prepare_error: str | None = None
        self.prepare_raises = False
        self.cancel_ends_work = False  # an in-process job may stop inside the hook

    def hooks(self) -> JobHooks:
        def record(name: str) -> Callable[[JobLifecycle], None]:
            return lambda job: self.log.append(f"{name} {job.job}")

        def prepare(job: JobLifecycle) -> str | None:
            self.log.append(f"prepare {job.job}")
            if self.prepare_raises:
                raise OSError(errno.EIO, "bitmap store unwritable")
            return self.prepare_error

        def cancel(job: JobLifecycle) -> None:
            self.log.append(f"cancel {job.job}")
            if self.cancel_ends_work:
                job.work_ended(Outcome.CANCELLED)

        return JobHooks(on_prepare=prepare, on_commit=record("commit"),
                        on_abort=record("abort"), on_clean=record("clean"),
                        on_cancel=cancel, on_complete=record("complete"))


def statuses(job: JobLifecycle) -> list[str]:
    return [e.data["status"] for e in job.events if e.kind == "status"]


def kinds(job: JobLifecycle) -> list[str]:
    return [e.kind for e in job.events if e.kind != "status"]


def reach(state: JobState, rec: Recorder | None = None) -> JobLifecycle:
    """A job brought to ``state`` by legitimate inputs only (no poking at fields)."""
    hooks = (rec or Recorder()).hooks()
    if state in (Y, S):
        job = JobLifecycle("job1", ready_phase=True, hooks=hooks)
        job.start()
        job.mark_ready()
        if state is S:
            job.pause()
    elif state in (W, A):
        # Grouped with a job that keeps running: this one waits (or aborts) for it.
        txn = JobTxn()
        job = JobLifecycle("job1", txn=txn, hooks=hooks)
        other = JobLifecycle("other", txn=txn)
        job.start()
        other.start()
        job.work_ended(Outcome.COMPLETED if state is W else Outcome.FAILED, "target gone")
    else:
        job = JobLifecycle("job1", auto_finalize=state is not D,
                           auto_dismiss=state is not X, hooks=hooks)
        if state is not C:
            job.start()
        if state is P:
            job.pause()
        if state in (D, X, N):
            job.work_ended(Outcome.COMPLETED)
    assert job.state is state
    return job


@pytest.mark.parametrize("state", list(JobState), ids=lambda s: s.value)
def test_reach_walks_only_the_table(state: JobState) -> None:
    job = reach(state)
    path = statuses(job)
    assert path[0] == "created"
    for a, b in itertools.pairwise(path):
        assert JobState(b) in TRANSITIONS[JobState(a)], (a, b)


def expected_refusal(state: JobState, verb: Verb) -> str | None:
    """The reason after QEMU's message, '' for the table's refusal, None if accepted."""
    if state not in VERB_TABLE[verb]:
        return ""
    if verb is Verb.PAUSE and state in (P, S):
        return "it is already paused"
    if verb is Verb.RESUME and state in (C, R, Y):
        return "it is not paused"
    return None


@pytest.mark.parametrize("verb", list(Verb), ids=lambda v: v.value)
@pytest.mark.parametrize("state", list(JobState), ids=lambda s: s.value)
def test_every_verb_in_every_status(state: JobState, verb: Verb) -> None:
    rec = Recorder()
    job = reach(state, rec)
    before = list(job.events)
    why = expected_refusal(state, verb)
    args = {"speed": 1 << 20} if verb is Verb.SET_SPEED else {}
    if why is None:
        job.command(verb.value, **args)
        return
    with pytest.raises(StateError) as info:
        job.command(verb.value, **args)
    err = info.value
    message = f"Job 'job1' in state '{state.value}' cannot accept command verb '{verb.value}'"
    assert str(err) == message + (f": {why}" if why else "")
    assert (err.job, err.verb, err.state) == ("job1", verb.value, state.value)
    if not why:
        assert err.required == tuple(s.value for s in JobState if s in VERB_TABLE[verb])
        assert err.required  # every verb is accepted somewhere
    assert job.state is state
    assert job.events == before  # a refused verb changes nothing and says nothing


def test_unknown_verb_is_a_usage_error() -> None:
    job = JobLifecycle("job1")
    with pytest.raises(UsageError, match=r"unknown job verb 'frobnicate'.*cancel"):
        job.command("frobnicate")


def test_accepted_verbs_do_what_qemu_does() -> None:
    job = JobLifecycle("job1", auto_dismiss=False)
    job.pause()  # before the start: it starts paused
    assert job.state is C and job.user_paused
    job.start()
    assert statuses(job) == ["created", "running", "paused"]
    job.set_speed(123)
    assert job.speed == 123 and kinds(job) == ["speed"]
    with pytest.raises(UsageError, match="speed"):
        job.set_speed(-1)
    job.resume()
    assert job.state is R and not job.user_paused
    job.work_ended(Outcome.COMPLETED, bytes_written=7)
    assert job.state is X and job.outcome is Outcome.COMPLETED
    job.dismiss()
    assert job.state is N
    assert statuses(job) == ["created", "running", "paused", "running", "waiting",
                             "pending", "concluded", "null"]
    assert job.events[-3].kind == "completed"
    assert job.events[-3].data == {"error": "", "bytes_written": 7}


def test_a_backup_has_no_ready_phase_so_complete_is_always_refused() -> None:
    job = JobLifecycle("job1")
    job.start()
    with pytest.raises(StateError, match="has no ready phase"):
        job.mark_ready()
    with pytest.raises(StateError, match="cannot accept command verb 'complete'"):
        job.complete()
    # Its work ends by itself (or, sync=none, when the engine tells the worker to end).
    job.work_ended(Outcome.COMPLETED)
    assert job.outcome is Outcome.COMPLETED


def test_ready_phase_complete_pause_and_cancel() -> None:
    rec = Recorder()
    job = JobLifecycle("m", ready_phase=True, hooks=rec.hooks(), auto_dismiss=False)
    job.start()
    job.mark_ready()
    assert kinds(job) == ["ready"]
    job.pause()
    assert job.state is S
    with pytest.raises(StateError, match="cannot accept command verb 'complete'"):
        job.complete()
    job.resume()
    assert job.state is Y
    job.complete()
    assert rec.log == ["complete m"]
    job.work_ended(Outcome.COMPLETED)
    assert statuses(job) == ["created", "running", "ready", "standby", "ready", "waiting",
                             "pending", "concluded"]
    # Being cancelled, a ready job can no longer be completed.
    job2 = JobLifecycle("m2", ready_phase=True)
    job2.start()
    job2.mark_ready()
    job2.cancel()
    assert job2.state is Y
    with pytest.raises(StateError, match="being cancelled"):
        job2.complete()
    job2.work_ended(Outcome.COMPLETED)  # the work stopped: still a cancellation
    assert job2.outcome is Outcome.CANCELLED
    assert statuses(job2)[-3:] == ["aborting", "concluded", "null"]


# -- auto-finalize, auto-dismiss --------------------------------------------------------


@pytest.mark.parametrize("auto_finalize", [True, False])
@pytest.mark.parametrize("auto_dismiss", [True, False])
def test_auto_finalize_and_auto_dismiss(auto_finalize: bool, auto_dismiss: bool) -> None:
    rec = Recorder()
    job = JobLifecycle("job1", auto_finalize=auto_finalize, auto_dismiss=auto_dismiss,
                       hooks=rec.hooks())
    job.start()
    job.work_ended(Outcome.COMPLETED)
    if not auto_finalize:
        assert job.state is D
        assert job.outcome is None  # decided in pending, by finalize
        assert rec.log == []
        assert kinds(job) == ["pending"]
        job.finalize()
    assert rec.log == ["prepare job1", "commit job1", "clean job1"]
    assert job.outcome is Outcome.COMPLETED
    if not auto_dismiss:
        assert job.state is X
        job.dismiss()
    assert job.state is N
    assert statuses(job) == ["created", "running", "waiting", "pending", "concluded", "null"]
    assert "pending" in kinds(job) or auto_finalize  # announced only when it waits


@pytest.mark.parametrize("auto_finalize", [True, False])
def test_a_failure_aborts_without_waiting_for_finalize(auto_finalize: bool) -> None:
    rec = Recorder()
    job = JobLifecycle("job1", auto_finalize=auto_finalize, auto_dismiss=False,
                       hooks=rec.hooks())
    job.start()
    job.work_ended(Outcome.FAILED, "target gone")
    assert job.state is X
    assert (job.outcome, job.error) == (Outcome.FAILED, "target gone")
    assert rec.log == ["abort job1", "clean job1"]  # no prepare for a failed job
    assert statuses(job) == ["created", "running", "aborting", "concluded"]
    assert job.events[-2].kind == "failed"


@pytest.mark.parametrize("raises", [False, True])
def test_a_failing_prepare_aborts(raises: bool) -> None:
    rec = Recorder()
    rec.prepare_error = "bitmap gone"
    rec.prepare_raises = raises
    job = JobLifecycle("job1", auto_dismiss=False, hooks=rec.hooks())
    job.start()
    job.work_ended(Outcome.COMPLETED)
    assert job.outcome is Outcome.FAILED
    assert job.error == ("OSError: [Errno 5] bitmap store unwritable" if raises
                         else "bitmap gone")
    assert rec.log == ["prepare job1", "abort job1", "clean job1"]
    assert statuses(job)[-3:] == ["pending", "aborting", "concluded"]


def test_a_failing_commit_hook_still_concludes() -> None:
    def boom(job: JobLifecycle) -> None:
        raise RuntimeError("disk on fire")

    job = JobLifecycle("job1", hooks=JobHooks(on_commit=boom))
    job.start()
    job.work_ended(Outcome.COMPLETED)
    assert job.state is N
    assert job.hook_errors == ["commit: RuntimeError: disk on fire"]


def test_late_reports_are_ignored() -> None:
    job = JobLifecycle("job1", auto_dismiss=False)
    job.start()
    assert job.work_ended(Outcome.FAILED, "first")
    assert not job.work_ended(Outcome.COMPLETED)
    assert not job.work_ended(Outcome.CANCELLED)
    assert (job.outcome, job.error) == (Outcome.FAILED, "first")


def test_a_job_that_never_started_is_not_dismissed_by_itself() -> None:
    # Deliberately unlike QEMU (which drops it at once): its caller holds its result.
    job = JobLifecycle("job1", auto_dismiss=False)
    job.work_ended(Outcome.FAILED, "no worker")
    assert job.state is X and not job.started
    assert statuses(job) == ["created", "aborting", "concluded"]


# -- cancel -------------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(JobState), ids=lambda s: s.value)
def test_cancel_from_every_status(state: JobState) -> None:
    rec = Recorder()
    job = reach(state, rec)
    if state not in VERB_TABLE[Verb.CANCEL]:
        with pytest.raises(StateError, match=f"in state '{state.value}' cannot accept "
                                             "command verb 'cancel'"):
            job.cancel()
        return
    rec.log.clear()
    job.cancel()
    working = job.started and job.state not in WORK_ENDED
    if working:
        # A started job's work must stop first: the engine is asked to stop it.
        assert rec.log == ["cancel job1"]
        assert job.state in (R, Y)  # un-paused so it can run to its end
        assert not job.user_paused
        job.work_ended(Outcome.CANCELLED)
    elif state is W:
        # Grouped: the cancel aborts the group; the other job is asked to stop.
        assert job.state is W
        (other,) = (j for j in job.txn.jobs if j is not job)
        assert other.cancelled
        other.work_ended(Outcome.CANCELLED)
    assert job.state in (X, N)
    assert job.outcome is Outcome.CANCELLED
    assert "commit job1" not in rec.log
    assert "abort job1" in rec.log
    path = statuses(job)
    assert "aborting" in path
    for a, b in itertools.pairwise(path):
        assert JobState(b) in TRANSITIONS[JobState(a)], (a, b)
    assert job.events[[e.kind for e in job.events].index("cancelled")].data["error"] == ""


def test_cancel_of_a_paused_job_runs_it_to_its_end() -> None:
    job = reach(P)
    job.cancel()
    job.work_ended(Outcome.CANCELLED)
    assert statuses(job) == ["created", "running", "paused", "running", "aborting",
                             "concluded", "null"]


def test_after_a_cancel_a_failure_stays_a_failure_a_success_becomes_cancelled() -> None:
    job = reach(R)
    job.cancel()
    job.work_ended(Outcome.FAILED, "EIO while stopping")
    assert job.outcome is Outcome.FAILED  # the failure is what happened: QEMU keeps ret
    job2 = reach(R)
    job2.cancel()
    job2.work_ended(Outcome.COMPLETED)
    assert job2.outcome is Outcome.CANCELLED  # QEMU's -ECANCELED for a cancelled success


# -- transactions --------------------------------------------------------------------------


def group(n: int, *, auto_finalize: bool = True,
          log: list[str] | None = None) -> tuple[list[JobLifecycle], list[str], Recorder]:
    log = [] if log is None else log
    rec = Recorder(log)
    txn = JobTxn()
    jobs = [JobLifecycle(f"j{i}", txn=txn, hooks=rec.hooks(), auto_finalize=auto_finalize,
                         auto_dismiss=False) for i in range(n)]
    for j in jobs:
        j.start()
    return jobs, log, rec


def test_grouped_all_succeed_all_reach_pending_before_any_commits() -> None:
    jobs, log, _ = group(3)
    jobs[0].work_ended(Outcome.COMPLETED)
    jobs[2].work_ended(Outcome.COMPLETED)
    assert [j.state for j in jobs] == [W, R, W]
    assert log == []
    jobs[1].work_ended(Outcome.COMPLETED)
    assert [j.state for j in jobs] == [X, X, X]
    assert all(j.outcome is Outcome.COMPLETED for j in jobs)
    assert log == ["prepare j0", "prepare j1", "prepare j2",
                   "commit j0", "clean j0", "commit j1", "clean j1", "commit j2", "clean j2"]
    for j in jobs:
        assert statuses(j)[-3:] == ["waiting", "pending", "concluded"]


def test_grouped_one_fails_all_abort() -> None:
    jobs, log, _ = group(3)
    jobs[0].work_ended(Outcome.COMPLETED)  # already waiting when the other fails
    jobs[1].work_ended(Outcome.FAILED, "target gone")
    # The one still working is asked to stop; nobody is finalized before it has.
    assert log == ["cancel j2"]
    assert [j.state for j in jobs] == [W, A, R]
    jobs[2].work_ended(Outcome.CANCELLED)
    assert [j.outcome for j in jobs] == [Outcome.CANCELLED, Outcome.FAILED,
                                         Outcome.CANCELLED]
    assert all(j.state is X for j in jobs)
    assert not any(e.startswith(("commit", "prepare")) for e in log)
    assert sorted(e for e in log if e.startswith("abort")) == ["abort j0", "abort j1",
                                                               "abort j2"]


def test_grouped_abort_when_the_others_stop_inside_the_cancel_hook() -> None:
    jobs, log, rec = group(3)
    rec.cancel_ends_work = True
    jobs[1].work_ended(Outcome.FAILED, "target gone")
    assert [j.state for j in jobs] == [X, X, X]
    assert [j.outcome for j in jobs] == [Outcome.CANCELLED, Outcome.FAILED,
                                         Outcome.CANCELLED]
    assert sum(e.startswith("abort") for e in log) == 3  # each aborted once


def test_grouped_manual_finalize_waits_for_one_finalize_of_any_job() -> None:
    jobs, log, _ = group(2, auto_finalize=False)
    jobs[0].work_ended(Outcome.COMPLETED)
    assert jobs[0].state is W  # not pending until the whole group is done
    with pytest.raises(StateError, match="in state 'waiting' cannot accept command verb "
                                         "'finalize'"):
        jobs[0].finalize()
    jobs[1].work_ended(Outcome.COMPLETED)
    assert [j.state for j in jobs] == [D, D]
    assert log == []
    jobs[1].finalize()  # finalizes the group
    assert [j.state for j in jobs] == [X, X]
    assert log[:2] == ["prepare j0", "prepare j1"]


def test_grouped_one_manual_job_holds_the_whole_group_in_pending() -> None:
    txn = JobTxn()
    auto = JobLifecycle("auto", txn=txn, auto_dismiss=False)
    manual = JobLifecycle("manual", txn=txn, auto_finalize=False, auto_dismiss=False)
    for j in (auto, manual):
        j.start()
        j.work_ended(Outcome.COMPLETED)
    assert (auto.state, manual.state) == (D, D)
    assert "pending" in kinds(manual) and "pending" not in kinds(auto)
    auto.finalize()
    assert (auto.outcome, manual.outcome) == (Outcome.COMPLETED, Outcome.COMPLETED)


def test_grouped_cancel_in_pending_aborts_everyone() -> None:
    jobs, log, _ = group(2, auto_finalize=False)
    for j in jobs:
        j.work_ended(Outcome.COMPLETED)
    jobs[0].cancel()
    assert [j.outcome for j in jobs] == [Outcome.CANCELLED, Outcome.CANCELLED]
    assert [e.split()[0] for e in log] == ["abort", "clean", "abort", "clean"]


def test_grouped_prepare_failure_aborts_everyone() -> None:
    jobs, log, rec = group(2)
    rec.prepare_error = "no room for the bitmap"
    jobs[0].work_ended(Outcome.COMPLETED)
    jobs[1].work_ended(Outcome.COMPLETED)
    assert [j.outcome for j in jobs] == [Outcome.FAILED, Outcome.CANCELLED]
    assert jobs[0].error == "no room for the bitmap"
    assert log[0] == "prepare j0"  # stops at the first failure
    assert "prepare j1" not in log and not any(e.startswith("commit") for e in log)


def test_grouped_failure_cancels_a_job_that_never_started() -> None:
    txn = JobTxn()
    started = JobLifecycle("a", txn=txn, auto_dismiss=False)
    idle = JobLifecycle("b", txn=txn, auto_dismiss=False)
    started.start()
    started.work_ended(Outcome.FAILED, "boom")
    assert (started.outcome, idle.outcome) == (Outcome.FAILED, Outcome.CANCELLED)
    assert statuses(idle) == ["created", "aborting", "concluded"]


def test_individual_jobs_do_not_affect_each_other() -> None:
    a = JobLifecycle("a", auto_dismiss=False)
    b = JobLifecycle("b", auto_dismiss=False)
    a.start()
    b.start()
    a.work_ended(Outcome.FAILED, "boom")
    assert b.state is R and not b.cancelled
    b.work_ended(Outcome.COMPLETED)
    assert b.outcome is Outcome.COMPLETED


def test_a_job_joins_a_transaction_only_when_created() -> None:
    job = reach(R)
    with pytest.raises(StateError, match="cannot join a transaction"):
        job.txn._add(job)


def test_dismissed_jobs_leave_their_transaction() -> None:
    jobs, _, _ = group(2)
    for j in jobs:
        j.work_ended(Outcome.COMPLETED)
    jobs[0].dismiss()
    assert jobs[0].txn.jobs == [jobs[1]]


# -- error policies -----------------------------------------------------------------------

E_IO, E_NOSPC = errno.EIO, errno.ENOSPC


@pytest.mark.parametrize(("policy", "err", "action", "io_status"), [
    ("report", E_IO, ErrorAction.REPORT, IoStatus.OK),
    ("report", E_NOSPC, ErrorAction.REPORT, IoStatus.OK),
    ("ignore", E_IO, ErrorAction.IGNORE, IoStatus.OK),
    ("ignore", E_NOSPC, ErrorAction.IGNORE, IoStatus.OK),
    ("stop", E_IO, ErrorAction.STOP, IoStatus.FAILED),
    ("stop", E_NOSPC, ErrorAction.STOP, IoStatus.NOSPACE),
    ("enospc", E_IO, ErrorAction.REPORT, IoStatus.OK),
    ("enospc", E_NOSPC, ErrorAction.STOP, IoStatus.NOSPACE),
    (OnError.ENOSPC, -E_NOSPC, ErrorAction.STOP, IoStatus.NOSPACE),  # QEMU's -ret
])
def test_decide_error(policy: OnError | str, err: int, action: ErrorAction,
                      io_status: IoStatus) -> None:
    d = decide_error(policy, err)
    assert (d.action, d.io_status) == (action, io_status)
    assert d.fail_job == (action is ErrorAction.REPORT)
    assert d.pause_job == (action is ErrorAction.STOP)
    assert d.retry_chunk == (action is not ErrorAction.REPORT)


def test_unknown_error_policy_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"unknown error policy 'retry'.*report, ignore, "
                                         r"stop, enospc"):
        decide_error("retry", E_IO)


def error_events(job: JobLifecycle) -> list[JobEvent]:
    return [e for e in job.events if e.kind == "error"]


def test_stop_pauses_with_io_status_and_resume_retries() -> None:
    job = reach(R)
    d = job.io_error("stop", E_IO, "write")
    assert d.pause_job and d.retry_chunk
    assert job.state is P and job.user_paused
    assert job.io_status is IoStatus.FAILED
    (ev,) = error_events(job)
    assert ev.data == {"id": "job1", "action": "stop", "operation": "write",
                       "errno": E_IO, "error": "write error: Input/output error"}
    # A second error while stopped keeps the first io-status (QEMU does too).
    job.io_error("stop", E_NOSPC, "write")
    assert job.io_status is IoStatus.FAILED and job.state is P
    job.resume()
    assert (job.state, job.io_status) == (R, IoStatus.OK)  # resume resets it
    job.work_ended(Outcome.COMPLETED)
    assert job.outcome is Outcome.COMPLETED


def test_enospc_stops_for_a_full_disk_and_fails_for_anything_else() -> None:
    job = reach(R)
    job.io_error("enospc", E_NOSPC, "write")
    assert (job.state, job.io_status) == (P, IoStatus.NOSPACE)
    job.resume()
    job.io_error("enospc", E_IO, "read", "source read failed at 64K")
    assert job.state is N and job.outcome is Outcome.FAILED
    assert job.error == "source read failed at 64K"
    assert [e.data["action"] for e in error_events(job)] == ["stop", "report"]


def test_ignore_carries_on_and_stop_in_ready_means_standby() -> None:
    job = reach(R)
    d = job.io_error("ignore", E_IO, "read")
    assert job.state is R and d.retry_chunk and not d.pause_job
    assert job.io_status is IoStatus.OK
    ready = reach(Y)
    ready.io_error("stop", E_IO, "write")
    assert ready.state is S
    ready.resume()
    assert ready.state is Y


def test_io_error_needs_a_job_whose_work_goes_on() -> None:
    for state in (C, W, D, A, X, N):
        with pytest.raises(StateError, match="has no I/O that can fail"):
            reach(state).io_error("stop", E_IO, "write")
    with pytest.raises(UsageError, match="read or write"):
        reach(R).io_error("stop", E_IO, "flush")


# -- the tracker: the engine's view ----------------------------------------------------------


def test_tracker_hides_status_events_by_default_and_shows_them_when_asked() -> None:
    quiet = JobTracker("job1")
    quiet.transition(R, "start", "running")
    quiet.conclude(Outcome.COMPLETED)
    assert [e.kind for e in quiet.events] == ["created", "running", "completed"]
    assert quiet.state is X  # the tracker's default: not dismissed
    seen: list[JobEvent] = []
    loud = JobTracker("job1", on_event=seen.append, status_events=True, auto_dismiss=True)
    loud.command("start")
    loud.conclude(Outcome.COMPLETED)
    assert [(e.kind, e.data.get("status")) for e in loud.events] == [
        ("status", "created"), ("created", None), ("status", "running"), ("running", None),
        ("status", "waiting"), ("status", "pending"), ("completed", None),
        ("status", "concluded"), ("status", "null")]
    assert seen == loud.events
    assert loud.concluded and loud.wait(0)  # gone (null) counts as concluded
    assert loud.ended >= loud.running_since > 0


def test_tracker_conclude_from_paused_goes_through_running() -> None:
    t = JobTracker("job1", status_events=True)
    t.apply("start", "running")
    t.apply("pause", "paused")
    assert t.conclude(Outcome.CANCELLED)
    assert [e.data["status"] for e in t.events if e.kind == "status"] == [
        "created", "running", "paused", "running", "aborting", "concluded"]
    assert t.outcome is Outcome.CANCELLED


def test_tracker_conclude_before_the_start_was_recorded() -> None:
    # The worker may report its end before the supervisor marks the job started.
    t = JobTracker("job1")
    assert t.conclude(Outcome.COMPLETED, bytes_written=1)
    assert t.state is X and t.outcome is Outcome.COMPLETED
    assert t.running_since == 0.0  # no start was recorded: the engine times from creation
    with pytest.raises(StateError):
        t.apply("start", "running")


def test_tracker_command_refuses_with_qemus_message() -> None:
    t = JobTracker("job7")
    t.conclude(Outcome.FAILED, "x")
    with pytest.raises(StateError) as info:
        t.command("pause")
    assert str(info.value) == "Job 'job7' in state 'concluded' cannot accept command verb " \
                              "'pause'"
    assert info.value.required == ("created", "running", "paused", "ready", "standby")


def test_tracker_manual_finalize_keeps_wait_waiting() -> None:
    t = JobTracker("job1", auto_finalize=False)
    t.command("start")
    t.command("pause")
    t.command("resume")
    assert [e.kind for e in t.events] == ["created", "running", "paused", "resumed"]
    t.conclude(Outcome.COMPLETED)
    assert t.state is D and not t.wait(0.01)
    t.command("finalize")
    assert t.wait(0) and t.outcome is Outcome.COMPLETED
    t.command("dismiss")
    assert t.state is N


def test_tracker_io_error_and_mark_ready() -> None:
    t = JobTracker("job1", ready_phase=True)
    t.command("start")
    t.io_error("stop", E_IO, "read")
    assert t.state is P
    t.command("resume")
    t.mark_ready()
    assert t.state is Y
    assert [e.kind for e in t.events] == ["created", "running", "error", "resumed", "ready"]


# -- a model of random verb sequences ----------------------------------------------------


class LifecycleMachine(RuleBasedStateMachine):
    """Random verbs and work reports on one to three jobs, grouped or not, whose work
    stops later or at once (inside ``on_cancel``) when cancelled.

    Checks: a refused verb is exactly one the tables refuse; every status change is in
    the table; a group commits all or nothing and never finalizes before all are done;
    and in the end, cancel/finalize/dismiss always bring every job to null.
    """

    @initialize(n=st.integers(1, 3), grouped=st.booleans(), data=st.data())
    def setup(self, n: int, grouped: bool, data: st.DataObject) -> None:
        self.log: list[str] = []
        self.rec = Recorder(self.log)
        self.rec.cancel_ends_work = data.draw(st.booleans())
        txn = JobTxn() if grouped else None
        self.grouped = grouped
        self.jobs = [
            JobLifecycle(f"j{i}", txn=txn, hooks=self.rec.hooks(),
                         auto_finalize=data.draw(st.booleans()),
                         auto_dismiss=data.draw(st.booleans()),
                         ready_phase=data.draw(st.booleans()))
            for i in range(n)]

    def working(self) -> list[JobLifecycle]:
        return [j for j in self.jobs if j.started and j.state not in WORK_ENDED]

    @rule(i=st.integers(0, 2), verb=st.sampled_from(list(Verb)))
    def verb(self, i: int, verb: Verb) -> None:
        job = self.jobs[i % len(self.jobs)]
        state = job.state
        refusal = expected_refusal(state, verb)
        if verb is Verb.PAUSE and state is C and job.user_paused:
            refusal = "it is already paused"
        if verb is Verb.RESUME and state is C and job.user_paused:
            refusal = None
        if verb is Verb.COMPLETE and state is Y and job.cancelled:
            refusal = "it is being cancelled"
        try:
            job.command(verb, **({"speed": 10} if verb is Verb.SET_SPEED else {}))
        except StateError as exc:
            assert refusal is not None, (state, verb, exc)
            assert exc.state == state.value and exc.verb == verb.value
            assert str(exc).startswith(f"Job '{job.job}' in state '{state.value}' cannot "
                                       f"accept command verb '{verb.value}'")
        else:
            assert refusal is None, (state, verb)

    @precondition(lambda self: bool(self.working()))
    @rule(i=st.integers(0, 2), outcome=st.sampled_from(list(Outcome)))
    def work_ends(self, i: int, outcome: Outcome) -> None:
        working = self.working()
        assert working[i % len(working)].work_ended(outcome, "" if outcome is
                                                    Outcome.COMPLETED else "boom")

    @precondition(lambda self: bool(self.working()))
    @rule(i=st.integers(0, 2), policy=st.sampled_from(list(OnError)),
          err=st.sampled_from([E_IO, E_NOSPC]))
    def io_error(self, i: int, policy: OnError, err: int) -> None:
        working = self.working()
        working[i % len(working)].io_error(policy, err, "write")

    @precondition(lambda self: any(j.state is R and j.ready_phase for j in self.jobs))
    @rule()
    def ready(self) -> None:
        next(j for j in self.jobs if j.state is R and j.ready_phase).mark_ready()

    @invariant()
    def only_table_transitions(self) -> None:
        for job in getattr(self, "jobs", []):
            path = [JobState(s) for s in statuses(job)]
            assert path[-1] is job.state
            for a, b in itertools.pairwise(path):
                assert b in TRANSITIONS[a], (job.job, a, b)
            assert (job.outcome is not None) == (job.state in (X, N))

    @invariant()
    def groups_are_all_or_nothing(self) -> None:
        if not getattr(self, "grouped", False):
            return
        commits = any(e.startswith("commit") for e in self.log)
        aborts = any(e.startswith("abort") for e in self.log)
        assert not (commits and aborts), self.log
        if any(j.state is D for j in self.jobs):
            assert all(j.state in WORK_ENDED for j in self.jobs)

    def teardown(self) -> None:
        jobs = getattr(self, "jobs", [])
        for _ in range(10):  # each round moves every job on; a few rounds always do
            for job in jobs:
                if job.state in VERB_TABLE[Verb.CANCEL]:
                    job.cancel()
                if job.started and job.state not in WORK_ENDED:
                    job.work_ended(Outcome.CANCELLED)
                if job.state is D:
                    job.finalize()
                if job.state is X:
                    job.dismiss()
        assert [j.state for j in jobs] == [N] * len(jobs)


TestLifecycleMachine = LifecycleMachine.TestCase
TestLifecycleMachine.settings = settings(max_examples=300, stateful_step_count=30,
                                         deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


def test_trackers_of_one_transaction_share_a_lock_and_wake_each_other() -> None:
    lock = threading.Condition()
    txn = JobTxn()
    a = JobTracker("a", txn=txn, lock=lock)
    b = JobTracker("b", txn=txn, lock=lock)
    a.command("start")
    b.command("start")
    a.conclude(Outcome.COMPLETED)
    assert not a.wait(0.01)  # waiting for b
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(a.wait(10.0)))
    waiter.start()
    b.conclude(Outcome.FAILED, "boom")
    waiter.join(10.0)
    assert woke == [True]
    assert (a.outcome, b.outcome) == (Outcome.CANCELLED, Outcome.FAILED)


def test_a_cancel_hook_that_ends_work_at_once_does_not_let_a_waiting_job_commit() -> None:
    """Found by the model: j2 waits (work done), j0 runs, j1 is cancelled before it
    started. The group aborts; j0's cancel hook ends its work at once, which finalizes
    the group from inside the hook — j2 must already be marked cancelled by then."""
    log: list[str] = []
    rec = Recorder(log)
    rec.cancel_ends_work = True
    txn = JobTxn()
    jobs = [JobLifecycle(f"j{i}", txn=txn, hooks=rec.hooks()) for i in range(3)]
    jobs[2].start()
    jobs[2].work_ended(Outcome.COMPLETED)
    jobs[0].start()
    jobs[1].cancel()
    assert [j.outcome for j in jobs] == [Outcome.CANCELLED] * 3
    assert not any(e.startswith("commit") for e in log), log
