"""Jobs as the supervisor sees them: QEMU's job lifecycle, events, error policies, results.

Theory of operation
===================

A job's status follows QEMU's job model (``qapi/job.json``: ``JobStatus``, ``JobVerb``;
``job.c``: the transition and verb tables), so an operator who drives QEMU jobs finds
the same states, verbs and errors here. :class:`JobLifecycle` is that model as a pure,
sans-IO state machine: inputs are command verbs (``pause``, ``cancel``, ``finalize``…)
and reports about the work (:meth:`JobLifecycle.work_ended`, :meth:`~JobLifecycle.io_error`,
:meth:`~JobLifecycle.mark_ready`); outputs are events and calls to the job's
:class:`JobHooks`. It never touches a process, queue or file. :class:`JobTracker` wraps
one lifecycle with a lock and a condition variable for the supervisor's threads.

Statuses (QEMU's ``undefined`` is the moment before ``created`` and is not modelled)::

    created    the job exists; its worker opens the target; no snapshot yet
    running    copying (background copy and copy-before-write)
    paused     background copying stopped by ``pause`` or by an error policy
    ready      (jobs with a ready phase only) in sync, waiting for ``complete``
    standby    a ready job that is paused
    waiting    the work ended well; other jobs of its transaction are still running
    pending    the work of every job of the transaction ended well; the outcome and
               the bitmap's fate are decided here (``finalize`` or auto-finalize)
    aborting   the job failed or was cancelled; its changes are being rolled back
    concluded  outcome decided; the job keeps its result until ``dismiss``
    null       dismissed; the job is gone

The transition table (:data:`TRANSITIONS`; QEMU's ``JobSTT``)::

    created   → running, aborting, null
    running   → paused, ready, waiting, aborting
    paused    → running
    ready     → standby, waiting, aborting
    standby   → ready
    waiting   → pending, aborting
    pending   → aborting, concluded
    aborting  → aborting, concluded
    concluded → null
    null      → (nothing: a dismissed job is gone)

The verb table (:data:`VERB_TABLE`; QEMU's ``JobVerbTable``): the statuses that accept
each verb. A verb refused in a status raises :class:`~shmblock.errors.StateError` with
QEMU's wording, ``Job 'job1' in state 'concluded' cannot accept command verb 'pause'``,
the statuses that would accept it in ``required``, and ``job``/``verb`` set::

    cancel     created running paused ready standby waiting pending
    pause      created running paused ready standby
    resume     created running paused ready standby
    set-speed  created running paused ready standby
    complete   ready
    finalize   pending
    dismiss    concluded
    start      created    (internal: the engine, when the snapshot is taken)

On top of the table, as in QEMU: ``pause`` is refused when the job is already paused by
the user (or by an error policy), ``resume`` when it is not; ``complete`` is refused
while the job is being cancelled. A ``pause`` of a ``created`` job takes effect when it
starts (``created → running → paused``). A ``pause`` takes effect in the status at once;
the backup worker stops copying at its next chunk boundary (QEMU likewise reports
``paused`` at the job's next pause point).

The end of a job (``job_completed`` and friends in QEMU's ``job.c``)::

    running ──work ended well──▶ waiting ──all jobs of the txn waiting──▶ pending
    created, running ──failed or cancelled──▶ aborting
    pending ──finalize (or auto-finalize): prepare ok──▶ commit, clean ──▶ concluded
    pending ──prepare failed, or cancel──▶ aborting ──abort, clean──▶ concluded
    concluded ──dismiss (or auto-dismiss)──▶ null

* **Transactions** (:class:`JobTxn`): every job belongs to one; a job created alone
  gets a transaction of its own (``completion-mode=individual``). In a grouped
  transaction no job leaves ``waiting`` until every job's work has ended well; then all
  go to ``pending`` together. If any job of the group needs a manual ``finalize``
  (``auto_finalize=False``), the group waits in ``pending`` until one ``finalize`` of
  any of its jobs, which finalizes the whole group: every job's ``prepare`` first, and
  only if all succeed, every job's ``commit``. One failure — a job's work failing, a
  ``prepare`` failing, a ``cancel`` of any job — aborts the whole group: the jobs still
  working are cancelled (:attr:`JobHooks.on_cancel` asks the engine to stop them), and
  once every job's work has ended, each job's ``abort`` and ``clean`` run and all
  conclude ``cancelled`` (the job that failed: ``failed``).
* **Hooks** (:class:`JobHooks`, QEMU's ``JobDriver`` ``.prepare/.commit/.abort/.clean``
  plus ``.cancel/.complete``): the engine plugs in there what a job's outcome means —
  the bitmap kept, reset or merged back, the target published or discarded.
* **Outcome**: decided in ``pending``/``aborting``, not when the work ends: a job whose
  work ended well can still fail in ``prepare`` or be aborted by its group.
  :attr:`JobLifecycle.outcome` is ``None`` until then. A cancel always aborts (QEMU's
  force-cancel; a "soft" cancel that completes a ready mirror has no user here).
* **Events**: every status change emits ``status`` ``{"id", "status"}`` (QEMU's
  ``JOB_STATUS_CHANGE``); the end emits ``completed``/``failed``/``cancelled``
  ``{"error", **final}`` (``BLOCK_JOB_COMPLETED``/``BLOCK_JOB_CANCELLED``); ``pending``
  when a job waits for a manual ``finalize`` (``BLOCK_JOB_PENDING``); ``ready``
  (``BLOCK_JOB_READY``); ``error`` ``{"id", "action", "operation", "errno", "error"}``
  (``BLOCK_JOB_ERROR``); ``speed`` for ``set-speed``. The tracker adds the engine's own
  kinds (``created``, ``running``, ``paused``, ``resumed``, ``progress``, ``verified``…).
* **Auto-finalize / auto-dismiss** default to ``True`` in :class:`JobLifecycle`, as in
  QEMU (the QMP layer uses those). :class:`JobTracker` defaults ``auto_dismiss`` to
  ``False`` and hides ``status`` events unless asked, because the engine and its callers
  read ``concluded`` and an unchanged event stream. One deliberate difference from QEMU:
  a job that never started is not dismissed on its own (QEMU drops it at once); its
  caller holds a handle whose result must say why it ended.
* **Ready**: backup jobs have no ready phase, as in QEMU (a backup's work ends by
  itself; even ``sync=none`` never reports ``ready``), so ``complete`` is refused for
  them in every status. (QEMU's ``sync=none`` backup runs until cancelled, as image
  fleecing uses it.) shmblock's ``BackupJob.complete()`` of a ``sync=none`` job is not
  the ``complete`` verb: it tells the worker to end its work, which then ends well like
  any backup (``running → waiting → pending → concluded``). ``ready_phase=True``
  is there for jobs that have one (a mirror-like job).

Error policies (``on-source-error`` / ``on-target-error``, QEMU's ``BlockdevOnError``)
are decided by the pure function :func:`decide_error`; see its docstring.

What the engine uses (``shmblock/backup_job.py``): every ``BackupJob`` drives a
:class:`JobTracker` through QEMU's verbs (:meth:`JobTracker.command`), with its
``prepare``/``commit``/``abort``/``clean`` methods as :class:`JobHooks`, the job's
``auto_finalize``/``auto_dismiss``, ``status`` events, and :meth:`JobTracker.io_error`
for the worker's ``JobError``. The legacy calls (``apply`` with :data:`VERBS`,
``transition``) remain for tests that drive a tracker by hand. Transactions
(:class:`JobTxn`) are plugged in by ``shmblock/transaction.py``.
"""

from __future__ import annotations

import enum
import errno as errno_mod
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from shmblock.errors import StateError, UsageError

if TYPE_CHECKING:
    from shmblock.cbw_buffer import BufferStats

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    """A job's status, QEMU's ``JobStatus`` (created, running, paused, concluded came first)."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"

    def check(self, new: JobState, verb: str) -> None:
        """Raise StateError unless ``self → new`` is in the transition table."""
        if new not in TRANSITIONS[self]:
            allowed = tuple(s.value for s, targets in TRANSITIONS.items() if new in targets)
            raise StateError(f"cannot {verb} a job that is {self.value}", self.value, allowed)


#: QEMU's name for it.
JobStatus = JobState

_C, _R, _P, _Y, _S, _W, _D, _X, _E, _N = JobState

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    _C: frozenset({_R, _X, _N}),
    _R: frozenset({_P, _Y, _W, _X}),
    _P: frozenset({_R}),
    _Y: frozenset({_S, _W, _X}),
    _S: frozenset({_Y}),
    _W: frozenset({_D, _X}),
    _D: frozenset({_X, _E}),
    _X: frozenset({_X, _E}),  # QEMU allows aborting → aborting (a second failure)
    _E: frozenset({_N}),
    _N: frozenset(),
}

#: The statuses in which a job's work has ended (QEMU's ``job_is_completed``).
WORK_ENDED: frozenset[JobState] = frozenset({_W, _D, _X, _E, _N})


class Verb(enum.Enum):
    """QEMU's ``JobVerb``, and ``start``, which only the engine applies."""

    START = "start"
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"


_LIVE = frozenset({_C, _R, _P, _Y, _S})

#: verb → the statuses that accept it (QEMU's ``JobVerbTable``).
VERB_TABLE: dict[Verb, frozenset[JobState]] = {
    Verb.START: frozenset({_C}),
    Verb.CANCEL: _LIVE | {_W, _D},
    Verb.PAUSE: _LIVE,
    Verb.RESUME: _LIVE,
    Verb.SET_SPEED: _LIVE,
    Verb.COMPLETE: frozenset({_Y}),
    Verb.FINALIZE: frozenset({_D}),
    Verb.DISMISS: frozenset({_E}),
}


#: The engine's current control verbs (before it adopts :class:`JobLifecycle`):
#: verb → (the states it may be applied in, the state it leads to). The worker protocol
#: pauses only a running job, so ``pause`` needs ``running`` here, not the wider
#: :data:`VERB_TABLE`; ``created → running`` belongs to ``start`` alone.
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

    kind: str  # "status", "created", "running", "paused", "resumed", "progress", "speed",
    # "ready", "pending", "error", "completed", "failed", "cancelled", "verified"
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
    #: the copy-before-write buffer's use (contract C1); None if the job never started
    cbw_buffer: BufferStats | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.COMPLETED and self.verified is not False

    @property
    def throughput(self) -> float:
        """Bytes of the snapshot per second of job time."""
        return self.bytes_total / self.duration_s if self.duration_s > 0 else 0.0


# -- error policies ----------------------------------------------------------------------


class OnError(enum.Enum):
    """``on-source-error`` / ``on-target-error`` (QEMU's ``BlockdevOnError``).

    QEMU's ``auto`` (inherit the device's policy) has no meaning here: a shmblock device
    has no policy of its own to inherit.
    """

    REPORT = "report"
    IGNORE = "ignore"
    STOP = "stop"
    ENOSPC = "enospc"


class ErrorAction(enum.Enum):
    """What happens to the job (QEMU's ``BlockErrorAction``)."""

    REPORT = "report"
    IGNORE = "ignore"
    STOP = "stop"


class IoStatus(enum.Enum):
    """A job's I/O status (QEMU's ``BlockDeviceIoStatus``), reset by ``resume``."""

    OK = "ok"
    FAILED = "failed"
    NOSPACE = "nospace"


#: QEMU's ``IoOperationType``: a source error is a read, a target error a write.
OPERATIONS = ("read", "write")


@dataclass(frozen=True, slots=True)
class ErrorDecision:
    """The fate of a job after one failed chunk; see :func:`decide_error`."""

    action: ErrorAction
    io_status: IoStatus  # what the job's io-status becomes (OK unless stopped)

    @property
    def fail_job(self) -> bool:
        return self.action is ErrorAction.REPORT

    @property
    def pause_job(self) -> bool:
        return self.action is ErrorAction.STOP

    @property
    def retry_chunk(self) -> bool:
        """Copy the failed chunk again: at once (ignore), or on ``resume`` (stop)."""
        return self.action is not ErrorAction.REPORT


def parse_on_error(policy: OnError | str) -> OnError:
    """The policy named ``policy``; UsageError naming the choices otherwise."""
    if isinstance(policy, OnError):
        return policy
    try:
        return OnError(policy)
    except ValueError:
        raise UsageError(f"unknown error policy {policy!r} (expected one of "
                         f"{', '.join(p.value for p in OnError)})") from None


def decide_error(policy: OnError | str, error: int) -> ErrorDecision:
    """What a job does when copying a chunk fails with errno ``error`` under ``policy``.

    As QEMU's ``block_job_error_action`` and its backup loop:

    * ``report``: the job fails with the error (``fail_job``).
    * ``ignore``: an ``error`` event is emitted and the job carries on. A backup cannot
      leave a hole in a point-in-time copy, so "carrying on" means copying the same
      chunk again (QEMU's backup job does the same); the worker should space its
      retries (its speed limit or a short sleep) so a permanent error does not spin.
    * ``stop``: an ``error`` event, the job is paused (as if by the user, so ``resume``
      continues it) with io-status ``failed`` — ``nospace`` for ENOSPC — and the failed
      chunk is copied again on ``resume``. Copy-before-write goes on while paused.
    * ``enospc``: ``stop`` for ENOSPC (the operator can make room and resume), ``report``
      for any other error.

    ``error`` is a positive errno (``errno.EIO``); a negative one is taken as its
    absolute value (QEMU's ``-ret`` convention). Raises UsageError for an unknown policy.
    """
    policy = parse_on_error(policy)
    error = abs(error)
    if policy is OnError.ENOSPC:
        action = ErrorAction.STOP if error == errno_mod.ENOSPC else ErrorAction.REPORT
    else:
        action = ErrorAction(policy.value)
    status = IoStatus.OK
    if action is ErrorAction.STOP:
        status = IoStatus.NOSPACE if error == errno_mod.ENOSPC else IoStatus.FAILED
    return ErrorDecision(action, status)


# -- the lifecycle -----------------------------------------------------------------------


def _no_op(job: JobLifecycle) -> None:
    pass


def _prepare_ok(job: JobLifecycle) -> str | None:
    return None


@dataclass
class JobHooks:
    """What a job's end means, plugged in by the engine (QEMU's ``JobDriver``).

    Called by the lifecycle, in its caller's thread (under :class:`JobTracker`'s lock):

    * ``on_prepare``: in ``pending``, before any job of the transaction commits; return
      an error message (or raise) to abort the whole transaction, ``None`` to go on;
    * ``on_commit``: the job completed (e.g. drop the bitmap's copied bits, publish the
      target); ``on_abort``: it failed or was cancelled (e.g. merge the bitmap back,
      discard the target); ``on_clean``: after either;
    * ``on_cancel``: a cancel was accepted while the job's work still goes on (a user's
      ``cancel``, or its transaction aborting): stop the worker, which then reports
      :meth:`JobLifecycle.work_ended` with ``Outcome.CANCELLED``;
    * ``on_complete``: ``complete`` was accepted (jobs with a ready phase): end the work.

    ``on_commit``, ``on_abort`` and ``on_clean`` must not fail; if one raises anyway,
    the error is logged and kept in :attr:`JobLifecycle.hook_errors` and the job still
    concludes (a job stuck between statuses helps nobody).
    """

    on_prepare: Callable[[JobLifecycle], str | None] = _prepare_ok
    on_commit: Callable[[JobLifecycle], None] = _no_op
    on_abort: Callable[[JobLifecycle], None] = _no_op
    on_clean: Callable[[JobLifecycle], None] = _no_op
    on_cancel: Callable[[JobLifecycle], None] = _no_op
    on_complete: Callable[[JobLifecycle], None] = _no_op


class JobTxn:
    """A group of jobs that complete together (``completion-mode=grouped``).

    Pure bookkeeping: the logic lives in :class:`JobLifecycle`, which reads and updates
    its transaction. Add jobs while they are ``created`` (pass ``txn=`` to the lifecycle).
    """

    def __init__(self) -> None:
        self.jobs: list[JobLifecycle] = []
        self.aborting = False

    def _add(self, job: JobLifecycle) -> None:
        if job.state is not JobState.CREATED:
            raise StateError(f"Job '{job.job}' in state '{job.state.value}' cannot join a "
                             "transaction", job.state.value, ("created",), job=job.job)
        self.jobs.append(job)

    @property
    def needs_finalize(self) -> bool:
        """Whether any job of the group waits for a manual ``finalize``."""
        return any(not j.auto_finalize for j in self.jobs)


class JobLifecycle:
    """One job's status machine (see the module docstring); pure, not thread-safe.

    ``emit`` receives every event (default: kept in :attr:`events`); ``clock`` stamps
    them (inject one for tests). Inputs are the verb methods (:meth:`start`,
    :meth:`pause`, :meth:`resume`, :meth:`cancel`, :meth:`set_speed`, :meth:`complete`,
    :meth:`finalize`, :meth:`dismiss`, or :meth:`command` by name) and the work's
    reports (:meth:`work_ended`, :meth:`io_error`, :meth:`mark_ready`).
    """

    def __init__(self, job: str, *, auto_finalize: bool = True, auto_dismiss: bool = True,
                 ready_phase: bool = False, hooks: JobHooks | None = None,
                 txn: JobTxn | None = None, emit: Callable[[JobEvent], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.job = job
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.ready_phase = ready_phase
        self.hooks = hooks if hooks is not None else JobHooks()
        self.state = JobState.CREATED
        self.started = False
        self.user_paused = False  # paused by ``pause`` or an error policy (QEMU's flag)
        self.cancelled = False
        self.outcome: Outcome | None = None  # decided in pending / aborting
        self.error = ""
        self.final: dict[str, int] = {}
        self.io_status = IoStatus.OK
        self.speed = 0
        self.hook_errors: list[str] = []
        self.events: list[JobEvent] = []
        # What the work returned: None while it goes on or if it ended well.
        self._ret: Outcome | None = None
        self._emit_to = emit if emit is not None else self.events.append
        self._clock = clock
        self.txn = txn if txn is not None else JobTxn()
        self.txn._add(self)
        self._emit("status", id=job, status=self.state.value)  # QEMU: undefined → created

    # -- plumbing -------------------------------------------------------------------------

    def _emit(self, kind: str, **data: Any) -> None:
        self._emit_to(JobEvent(kind, self._clock(), data))

    def _to(self, new: JobState) -> None:
        """Change status (a change outside the table is our bug: StateError)."""
        if new is self.state:
            return  # QEMU emits nothing for a status kept
        if new not in TRANSITIONS[self.state]:
            raise StateError(f"Job '{self.job}' cannot go from '{self.state.value}' to "
                             f"'{new.value}'", self.state.value,
                             tuple(s.value for s in JobState if new in TRANSITIONS[s]),
                             job=self.job)
        self.state = new
        self._emit("status", id=self.job, status=new.value)

    def _refuse(self, verb: Verb, why: str = "",
                required: frozenset[JobState] | None = None) -> StateError:
        ok = VERB_TABLE[verb] if required is None else required
        message = (f"Job '{self.job}' in state '{self.state.value}' cannot accept command "
                   f"verb '{verb.value}'" + (f": {why}" if why else ""))
        return StateError(message, self.state.value,
                          tuple(s.value for s in JobState if s in ok),
                          job=self.job, verb=verb.value)

    def require(self, verb: Verb | str) -> Verb:
        """The verb, if this status accepts it (:data:`VERB_TABLE`); StateError if not."""
        try:
            verb = Verb(verb)
        except ValueError:
            raise UsageError(f"unknown job verb {verb!r} (expected one of "
                             f"{', '.join(v.value for v in Verb)})") from None
        if self.state not in VERB_TABLE[verb]:
            raise self._refuse(verb)
        return verb

    def _call(self, name: str, hook: Callable[[JobLifecycle], None]) -> None:
        try:
            hook(self)
        except Exception as exc:  # see JobHooks: the job must still conclude
            log.exception("job %s: the %s hook failed", self.job, name)
            self.hook_errors.append(f"{name}: {type(exc).__name__}: {exc}")

    @property
    def work_over(self) -> bool:
        """Whether the job's work has ended (QEMU's ``job_is_completed``)."""
        return self.state in WORK_ENDED

    # -- verbs ----------------------------------------------------------------------------

    def command(self, verb: Verb | str, **args: Any) -> None:
        """Apply ``verb`` by name (``set-speed`` takes ``speed=``); StateError if refused."""
        v = self.require(verb)  # UsageError for an unknown verb, StateError if refused
        methods: dict[Verb, Callable[..., None]] = {
            Verb.START: self.start, Verb.CANCEL: self.cancel, Verb.PAUSE: self.pause,
            Verb.RESUME: self.resume, Verb.SET_SPEED: self.set_speed,
            Verb.COMPLETE: self.complete, Verb.FINALIZE: self.finalize,
            Verb.DISMISS: self.dismiss}
        methods[v](**args)

    def start(self) -> None:
        """The snapshot is taken: ``created → running`` (→ ``paused`` if paused before)."""
        self.require(Verb.START)
        self.started = True
        self._to(JobState.RUNNING)
        if self.user_paused:
            self._to(JobState.PAUSED)

    def pause(self) -> None:
        self.require(Verb.PAUSE)
        if self.user_paused:
            raise self._refuse(Verb.PAUSE, "it is already paused",
                               frozenset({_C, _R, _Y}))
        self.user_paused = True
        if self.state is JobState.RUNNING:
            self._to(JobState.PAUSED)
        elif self.state is JobState.READY:
            self._to(JobState.STANDBY)

    def resume(self) -> None:
        self.require(Verb.RESUME)
        if not self.user_paused:
            raise self._refuse(Verb.RESUME, "it is not paused", frozenset({_P, _S}))
        self._unpause()
        self.io_status = IoStatus.OK  # QEMU resets the io-status on a user resume

    def _unpause(self) -> None:
        self.user_paused = False
        if self.state is JobState.PAUSED:
            self._to(JobState.RUNNING)
        elif self.state is JobState.STANDBY:
            self._to(JobState.READY)

    def set_speed(self, speed: int) -> None:
        """Limit background copying to ``speed`` bytes per second (0: unlimited)."""
        self.require(Verb.SET_SPEED)
        if isinstance(speed, bool) or not isinstance(speed, int) or speed < 0:
            raise UsageError(f"speed {speed!r} must be a whole number of bytes per second "
                             "(0: unlimited)")
        self.speed = speed
        self._emit("speed", speed=speed)

    def complete(self) -> None:
        """End the work of a ``ready`` job (jobs with a ready phase only)."""
        self.require(Verb.COMPLETE)
        if self.cancelled:
            raise self._refuse(Verb.COMPLETE, "it is being cancelled", frozenset())
        self._call("complete", self.hooks.on_complete)

    def cancel(self) -> None:
        """Cancel: abort now if the work has not started or has ended, else ask it to stop.

        A started job whose work goes on stays in its status (un-paused: QEMU lets a
        paused job run to its end so it can stop) until :meth:`work_ended` reports the
        stop; ``on_cancel`` asks the engine for it.
        """
        self.require(Verb.CANCEL)
        self._cancel_async()
        if not self.started:
            self._ret = Outcome.CANCELLED
            self._completed()
        elif self.work_over:
            self._txn_abort()
        else:
            self._call("cancel", self.hooks.on_cancel)

    def _cancel_async(self) -> None:
        self.cancelled = True
        if self.user_paused:
            self._unpause()

    def finalize(self) -> None:
        """Finalize a ``pending`` job, and with it every job of its transaction."""
        self.require(Verb.FINALIZE)
        self._do_finalize()

    def dismiss(self) -> None:
        """Forget a ``concluded`` job: ``concluded → null``."""
        self.require(Verb.DISMISS)
        self._dismiss()

    # -- reports about the work -------------------------------------------------------------

    def mark_ready(self) -> None:
        """The work is in sync and waits for ``complete`` (jobs with a ready phase)."""
        if not self.ready_phase:
            raise StateError(f"Job '{self.job}' has no ready phase", self.state.value, (),
                             job=self.job)
        if self.state is not JobState.RUNNING:
            raise StateError(f"Job '{self.job}' in state '{self.state.value}' cannot become "
                             "ready", self.state.value, ("running",), job=self.job)
        self._to(JobState.READY)
        self._emit("ready", id=self.job)

    def work_ended(self, outcome: Outcome, error: str = "", **final: int) -> bool:
        """The job's work has ended with ``outcome``; False if it had ended already.

        ``COMPLETED`` leads to ``waiting`` (and on, see the module docstring); ``FAILED``
        and ``CANCELLED`` to ``aborting``. A job cancelled earlier ends ``cancelled``
        whatever the work says (QEMU's ``-ECANCELED``). A paused job is un-paused first
        (its work can only end running); a job that never started ends without starting
        unless it completed (a worker may report its end before the supervisor has
        marked it started).
        """
        if self.work_over:
            return False
        self.final = dict(final)
        if outcome is not Outcome.COMPLETED:
            self._ret = outcome
            self.error = error
        if outcome is Outcome.CANCELLED:
            self.cancelled = True
        if self.user_paused:
            self._unpause()
        if not self.started and outcome is Outcome.COMPLETED:
            self.started = True
            self._to(JobState.RUNNING)
        self._completed()
        return True

    def io_error(self, policy: OnError | str, error: int, operation: str,
                 message: str = "") -> ErrorDecision:
        """A chunk failed with errno ``error``: apply ``policy`` (see :func:`decide_error`).

        ``operation`` is ``read`` (source, ``on-source-error``) or ``write`` (target,
        ``on-target-error``). Emits ``error``; ``stop`` pauses the job, ``report`` ends
        its work as failed (the worker has stopped copying). Returns the decision.
        """
        if operation not in OPERATIONS:
            raise UsageError(f"operation {operation!r} must be read or write")
        if not self.started or self.work_over:
            raise StateError(f"Job '{self.job}' in state '{self.state.value}' has no I/O "
                             "that can fail", self.state.value,
                             ("running", "paused", "ready", "standby"), job=self.job)
        decision = decide_error(policy, error)
        text = message or f"{operation} error: {os.strerror(abs(error))}"
        self._emit("error", id=self.job, action=decision.action.value, operation=operation,
                   errno=abs(error), error=text)
        if decision.pause_job:
            if not self.user_paused:
                self.user_paused = True
                if self.state is JobState.RUNNING:
                    self._to(JobState.PAUSED)
                elif self.state is JobState.READY:
                    self._to(JobState.STANDBY)
            if self.io_status is IoStatus.OK:  # QEMU keeps the first error's status
                self.io_status = decision.io_status
        elif decision.fail_job:
            self.work_ended(Outcome.FAILED, text)
        return decision

    # -- the end (QEMU's job_completed, job_do_finalize, job_completed_txn_abort) -----------

    def _update_rc(self) -> None:
        if self._ret is None and self.cancelled:
            self._ret = Outcome.CANCELLED
        if self._ret is not None:
            self._to(JobState.ABORTING)

    def _completed(self) -> None:
        self._update_rc()
        if self._ret is not None:
            self._txn_abort()
        else:
            self._txn_success()

    def _txn_success(self) -> None:
        txn = self.txn
        self._to(JobState.WAITING)
        if txn.aborting or not all(j.work_over for j in txn.jobs):
            return
        for j in list(txn.jobs):
            j._to(JobState.PENDING)
            if not j.auto_finalize:
                j._emit("pending", id=j.job)
        if not txn.needs_finalize:
            self._do_finalize()

    def _do_finalize(self) -> None:
        jobs = list(self.txn.jobs)
        for j in jobs:
            if j._ret is None:
                try:
                    why = j.hooks.on_prepare(j)
                except Exception as exc:
                    why = f"{type(exc).__name__}: {exc}"
                if why:
                    j._ret, j.error = Outcome.FAILED, why
                    j._update_rc()
                    j._txn_abort()
                    return
        for j in jobs:
            j._finalize_single()

    def _finalize_single(self) -> None:
        self._update_rc()
        if self._ret is None:
            self.outcome = Outcome.COMPLETED
            self._call("commit", self.hooks.on_commit)
        else:
            self.outcome = self._ret
            self._call("abort", self.hooks.on_abort)
        self._call("clean", self.hooks.on_clean)
        self._emit(self.outcome.value, error=self.error, **self.final)
        self._to(JobState.CONCLUDED)
        if self.auto_dismiss:
            self._dismiss()

    def _txn_abort(self) -> None:
        """Abort the whole transaction; finalize it (abort) once every job's work ended."""
        txn = self.txn
        if not txn.aborting:
            txn.aborting = True
            others = [o for o in txn.jobs if o is not self and o.state not in (_E, _N)]
            # Every job is marked cancelled before any cancel hook runs: a hook may end
            # its job's work at once, which finalizes the group from inside the hook,
            # and a job not yet marked would then commit (found by the Hypothesis model).
            for other in others:
                other._cancel_async()
                if not other.started:
                    other._ret = Outcome.CANCELLED
                    other._to(JobState.ABORTING)
            for other in others:
                if other.started and not other.work_over:
                    other._call("cancel", other.hooks.on_cancel)
        if all(j.work_over for j in txn.jobs):
            for j in list(txn.jobs):
                if j.state not in (_E, _N):
                    j._finalize_single()

    def _dismiss(self) -> None:
        self._to(JobState.NULL)
        if self in self.txn.jobs:
            self.txn.jobs.remove(self)


# -- the supervisor's view ----------------------------------------------------------------


class JobTracker:
    """State, progress and events of one job; thread-safe (the pump thread feeds it).

    Wraps a :class:`JobLifecycle` (:attr:`lifecycle`). For the engine's existing callers
    the defaults keep what they saw before: ``auto_dismiss=False`` (a job ends
    ``concluded`` and stays there), and ``status`` events left out of :attr:`events`
    (``status_events=False``). The QMP layer will pass QEMU's defaults
    (``auto_dismiss=True, status_events=True``). Trackers whose jobs share a
    :class:`JobTxn` must share ``lock`` too (one ``threading.Condition()``).
    """

    def __init__(self, job: str, on_event: Callable[[JobEvent], None] | None = None, *,
                 auto_finalize: bool = True, auto_dismiss: bool = False,
                 status_events: bool = False, ready_phase: bool = False,
                 hooks: JobHooks | None = None, txn: JobTxn | None = None,
                 lock: threading.Condition | None = None) -> None:
        self.job = job
        self.done = 0
        self.total = 0
        self.events: list[JobEvent] = []
        self.started = time.monotonic()
        self.running_since = 0.0
        self.ended = 0.0
        # An RLock inside (hooks may call back). The trackers of one transaction must
        # share one: a job's end moves the other jobs of its group too.
        self._lock = lock if lock is not None else threading.Condition()
        self._on_event = on_event
        self._status_events = status_events
        self._starting = False  # inside transition() or command(): a recorded start
        self.lifecycle = JobLifecycle(job, auto_finalize=auto_finalize,
                                      auto_dismiss=auto_dismiss, ready_phase=ready_phase,
                                      hooks=hooks, txn=txn, emit=self._sink)
        self._emit("created")

    # -- events ---------------------------------------------------------------------------

    def _sink(self, event: JobEvent) -> None:
        if event.kind == "status":
            status = event.data["status"]
            # The first recorded start counts: a work that ended before the engine
            # recorded the start (a race with a quick worker) leaves it 0, as before.
            if status == "running" and not self.running_since and self._starting:
                self.running_since = event.time
            elif status == "concluded":
                self.ended = event.time
            if not self._status_events:
                return
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    def _emit(self, kind: str, **data: Any) -> None:
        self._sink(JobEvent(kind, time.monotonic(), data))

    def note(self, kind: str, **data: Any) -> None:
        """Record an event that changes no state (``speed``, ``verified``)."""
        with self._lock:
            self._emit(kind, **data)

    # -- the lifecycle's fields, as the engine reads them ---------------------------------

    @property
    def state(self) -> JobState:
        return self.lifecycle.state

    @state.setter
    def state(self, value: JobState) -> None:  # tests set up a status directly
        self.lifecycle.state = value

    @property
    def outcome(self) -> Outcome | None:
        return self.lifecycle.outcome

    @property
    def error(self) -> str:
        return self.lifecycle.error

    @property
    def final(self) -> dict[str, int]:
        return self.lifecycle.final

    @property
    def concluded(self) -> bool:
        """Whether the job has concluded (or, dismissed, is gone)."""
        return self.lifecycle.state in (JobState.CONCLUDED, JobState.NULL)

    # -- the engine's calls (legacy) --------------------------------------------------------

    def apply(self, verb: str, event: str, **data: Any) -> None:
        """Apply control verb ``verb`` (see :data:`VERBS`); StateError in a wrong state."""
        allowed, new = VERBS[verb]
        with self._lock:
            if self.state not in allowed:
                raise StateError(f"cannot {verb} a job that is {self.state.value}",
                                 self.state.value, tuple(sorted(s.value for s in allowed)))
            self.transition(new, verb, event, **data)

    def transition(self, new: JobState, verb: str, event: str, **data: Any) -> None:
        """Move to ``new`` if the table allows it, and emit ``event``."""
        with self._lock:
            lc = self.lifecycle
            lc.state.check(new, verb)
            if new is JobState.RUNNING:
                lc.started = True
            if new in (JobState.PAUSED, JobState.STANDBY):
                lc.user_paused = True
            elif lc.state in (JobState.PAUSED, JobState.STANDBY):
                lc.user_paused = False
            self._starting = True
            try:
                lc._to(new)
            finally:
                self._starting = False
            self._emit(event, **data)
            self._lock.notify_all()

    def progress(self, done: int, total: int) -> None:
        with self._lock:
            self.done, self.total = done, total
            # QEMU's names too (query-jobs: current-progress/total-progress; block
            # jobs: offset/len), so its users find them.
            self._emit("progress", done=done, total=total, offset=done, length=total)

    def conclude(self, outcome: Outcome, error: str = "", **final: int) -> bool:
        """The work ended with ``outcome``; once (a worker's late report is ignored).

        Goes the lifecycle's way (``running → waiting → pending → concluded`` or
        ``→ aborting → concluded``); with the tracker's defaults the job is
        ``concluded`` when this returns.
        """
        with self._lock:
            ended = self.lifecycle.work_ended(outcome, error, **final)
            self._lock.notify_all()
            return ended

    def wait(self, timeout: float | None) -> bool:
        """Wait until concluded; False on timeout."""
        return self.wait_for(lambda: self.concluded, timeout)

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``predicate()`` (checked under the lock at every change); False on
        timeout."""
        with self._lock:
            return self._lock.wait_for(predicate, timeout)

    # -- QEMU's verbs and work reports (for the engine to adopt) ----------------------------

    #: The engine's event kinds that the QEMU verbs keep emitting.
    _VERB_EVENTS: ClassVar[dict[Verb, str]] = {
        Verb.START: "running", Verb.PAUSE: "paused", Verb.RESUME: "resumed"}

    def command(self, verb: Verb | str, **args: Any) -> None:
        """Apply a QEMU verb (:data:`VERB_TABLE`); StateError naming job, status, verb."""
        with self._lock:
            self._starting = True
            try:
                self.lifecycle.command(verb, **args)
            finally:
                self._starting = False
            kind = self._VERB_EVENTS.get(Verb(verb))
            if kind is not None:
                self._emit(kind)
            self._lock.notify_all()

    def io_error(self, policy: OnError | str, error: int, operation: str,
                 message: str = "") -> ErrorDecision:
        with self._lock:
            decision = self.lifecycle.io_error(policy, error, operation, message)
            self._lock.notify_all()
            return decision

    def mark_ready(self) -> None:
        with self._lock:
            self.lifecycle.mark_ready()
