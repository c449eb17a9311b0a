"""Transactions: one snapshot instant across several devices (QEMU's ``transaction``).

Theory of operation (QEMU's ``qapi/transaction.json``: prepare every action, then commit
all or abort all). :meth:`Engine.transaction <shmblock.engine.Engine.transaction>` runs
a list of actions — backups (:class:`Backup`) and dirty-bitmap actions
(:class:`BitmapAdd`, :class:`BitmapClear`, :class:`BitmapMerge`, :class:`BitmapRemove`,
:class:`BitmapEnable`, :class:`BitmapDisable`) — in three phases:

1. **Validate** (nothing started, nothing changed): every backup's options; no device
   named twice by backups (a device has one job at a time), no two outputs colliding;
   the bitmap actions replayed in order on each device's list of names (a bitmap must
   exist, or not yet for ``add``; a bitmap a job uses is busy; a backup may not use a
   bitmap another action of the same transaction changes). Any error raises before
   anything starts.
2. **Prepare**: every backup's worker is started and its target opened
   (:meth:`Engine.create_backup <shmblock.engine.Engine.create_backup>`, the slow
   parts). If one cannot start, the workers already started are cancelled and waited
   for (their ``.part`` files removed); the device maps and bitmaps were never touched.
3. **The instant**: one freeze of every writer of every device involved
   (:func:`shmblock.freeze.freeze` takes a list), then, in the order given, each
   backup's maps set (:meth:`BackupJob.snapshot_in_freeze
   <shmblock.backup_job.BackupJob.snapshot_in_freeze>`) and each bitmap action applied;
   one thaw. An exception inside the freeze rolls every action back before the thaw
   (the bitmaps are exactly as before: no writer ran since). After the thaw each job
   gets its JobStart and the jobs copy in parallel, one worker process per device.

Completion mode (``ActionCompletionMode``): ``individual`` (the default) lets each job
end on its own, with its bitmap settled by its own outcome. ``grouped``: the first job
that fails or is cancelled cancels the others, and every job's bitmap is settled as if
its job had failed — on-success and never bitmaps get their bits at the instant back, on
top of the writes made during the jobs, so they are exactly as before the transaction;
``always`` bitmaps keep QEMU's meaning (cleared where the job's target got the cluster).
Only when every job completed are the bitmaps settled as a success. The grouping is the
job lifecycle's (:class:`shmblock.job.JobTxn`): the jobs of a grouped transaction share
one ``JobTxn`` (and one lock), so no job reaches ``pending`` until every job's work has
ended well — no target is published, no bitmap settled before — and the first failure
or cancel aborts the whole group: the jobs still working are told to cancel, and once
every job's work has ended each runs its abort hook (``.part`` discarded, bitmap bits
put back by its mode). With ``auto_finalize=False`` one ``finalize`` finalizes the group.

As QEMU does (``action_check_completion_mode`` in ``blockdev.c``), bitmap actions are
refused in a grouped transaction: no bitmap action can be undone exactly once writers
have run, so "every bitmap as it was" could not be kept.

The bitmap actions set the device's maps directly (name, row, the recording bit of
``CTL_BITMAP_MASK``), inside the freeze; when :class:`DeviceHandle
<shmblock.device_handle.DeviceHandle>` grows its in-freeze bitmap verbs (and their
persistence), :func:`_apply_bitmap` should call those instead.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

import protocol
from shmblock import layout as L
from shmblock.backup_job import STOP_TIMEOUT, BackupJob
from shmblock.errors import JobError, ShmblockError, StateError, UsageError
from shmblock.job import JobEvent, JobResult, JobState, JobTxn, Outcome
from shmblock.lineage import new_generation
from shmblock.names import NAME_RE
from shmblock.options import DEFAULT_CHUNK, BackupOptions
from shmblock.paths import check_distinct, with_parts
from shmblock.targets import TargetSpec

if TYPE_CHECKING:
    from shmblock.device_handle import DeviceHandle
    from shmblock.engine import Engine

#: QEMU's ActionCompletionMode.
COMPLETION_MODES = ("individual", "grouped")


# -- actions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Backup:
    """A backup of ``device`` to ``target`` (QEMU's ``blockdev-backup`` action).

    The fields are :meth:`Engine.create_backup
    <shmblock.engine.Engine.create_backup>`'s; a ready :class:`BackupOptions` as
    ``target`` replaces them.
    """

    device: DeviceHandle
    target: str | BackupOptions
    format: str | None = None
    sync: str = "full"
    speed: int = 0
    bitmap: str | None = None
    bitmap_mode: str | None = None
    verify: bool = False
    reference_image: str | None = None
    backing_file: str | None = None
    backing_format: str | None = None
    cbw_mode: str = "stage"
    cbw_timeout: float = 5.0
    chunk: int = DEFAULT_CHUNK
    target_timeout: float = 30.0
    job_id: str | None = None
    on_event: Callable[[JobEvent], None] | None = None

    def options(self) -> BackupOptions:
        """The validated options (UsageError names what is wrong)."""
        if isinstance(self.target, BackupOptions):
            return self.target
        return BackupOptions(
            TargetSpec.parse(self.target, self.format, self.backing_file,
                             self.backing_format),
            sync=self.sync, speed=self.speed, chunk=self.chunk, cbw_mode=self.cbw_mode,
            cbw_timeout=self.cbw_timeout, verify=self.verify,
            reference_image=self.reference_image, target_timeout=self.target_timeout,
            job_id=self.job_id, bitmap=self.bitmap, bitmap_mode=self.bitmap_mode)


@dataclass(frozen=True)
class BitmapAdd:
    """Add dirty bitmap ``name`` to ``device``: it records every write after the instant."""

    device: DeviceHandle
    name: str


@dataclass(frozen=True)
class BitmapClear:
    """Clear dirty bitmap ``name`` at the instant."""

    device: DeviceHandle
    name: str


@dataclass(frozen=True)
class BitmapMerge:
    """Set in bitmap ``target`` every bit set in one of ``sources`` (same device)."""

    device: DeviceHandle
    target: str
    sources: tuple[str, ...]


@dataclass(frozen=True)
class BitmapRemove:
    """Stop recording into bitmap ``name`` and forget it."""

    device: DeviceHandle
    name: str


@dataclass(frozen=True)
class BitmapEnable:
    """Start recording guest writes into bitmap ``name`` again, from the instant."""

    device: DeviceHandle
    name: str


@dataclass(frozen=True)
class BitmapDisable:
    """Stop recording guest writes into bitmap ``name`` from the instant (its bits stay)."""

    device: DeviceHandle
    name: str


BitmapAction = BitmapAdd | BitmapClear | BitmapMerge | BitmapRemove | BitmapEnable | \
    BitmapDisable
Action = Backup | BitmapAction

_KIND = {Backup: "backup", BitmapAdd: "bitmap-add", BitmapClear: "bitmap-clear",
         BitmapMerge: "bitmap-merge", BitmapRemove: "bitmap-remove",
         BitmapEnable: "bitmap-enable", BitmapDisable: "bitmap-disable"}


def describe(index: int, action: Action) -> str:
    """``action 2 (bitmap-clear on dev1)``: how errors name an action."""
    return f"action {index} ({_KIND[type(action)]} on {action.device.name})"


# -- the transaction ---------------------------------------------------------------------


@dataclass
class Transaction:
    """The jobs of one transaction, and for a grouped one, the group's fate."""

    completion_mode: str
    engine: Engine | None = None
    actions: list[Action] = field(default_factory=list)
    jobs: list[BackupJob] = field(default_factory=list)
    started: bool = False

    @property
    def grouped(self) -> bool:
        return self.completion_mode == "grouped"

    def start(self) -> None:
        """Phase 3: the instant (one freeze of every device involved). Once.

        Raises JobError when a job ended before the instant or the instant cannot be
        taken (every action rolled back, the jobs stopped), PeerGone when a writer does
        not freeze.
        """
        if self.started or self.engine is None:
            raise StateError("a transaction is started once, after it is prepared",
                             "started" if self.started else "unprepared", ("prepared",))
        self.started = True
        _take_instant(self.engine, self.actions, self)

    def wait(self, timeout: float | None = None) -> list[JobResult]:
        """Wait for every job (:meth:`BackupJob.wait`); their results, in action order."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return [job.wait(None if deadline is None else max(deadline - time.monotonic(), 0.0))
                for job in self.jobs]

    def cancel(self) -> None:
        """Cancel every job (a grouped transaction cancels them all anyway)."""
        for job in self.jobs:
            job.cancel()

    @property
    def succeeded(self) -> bool:
        """Every job concluded completed (a grouped transaction: its bitmaps synced)."""
        return all(j.tracker.outcome is Outcome.COMPLETED for j in self.jobs)

    @property
    def failed(self) -> tuple[str, Outcome] | None:
        """The job that failed (else the first cancelled), and how; None if none did.

        In a grouped transaction the others of a failed group conclude cancelled."""
        for wanted in (Outcome.FAILED, Outcome.CANCELLED):
            for job in self.jobs:
                if job.tracker.outcome is wanted:
                    return job.job, wanted
        return None


def prepare(engine: Engine, actions: Sequence[Action], completion_mode: str) -> Transaction:
    """Phases 1 and 2: validate every action, start every worker; no instant yet.

    Raises UsageError (a bad action, naming it) or BitmapBusy before anything starts,
    JobError when a worker cannot start (the others are stopped: nothing started,
    nothing changed). :meth:`Transaction.start` takes the instant.
    """
    if completion_mode not in COMPLETION_MODES:
        raise UsageError(f"unknown completion mode {completion_mode!r} (expected one of "
                         f"{', '.join(COMPLETION_MODES)})")
    if not actions:
        raise UsageError("a transaction needs at least one action")
    options = _validate(engine, actions, completion_mode)
    txn = Transaction(completion_mode, engine=engine, actions=list(actions))
    backups = [(a, options[i]) for i, a in enumerate(actions) if isinstance(a, Backup)]
    # Grouped: one JobTxn, one lock for every job's lifecycle (shmblock.job).
    group = (JobTxn(), threading.Condition()) if txn.grouped else None
    try:
        for action, opts in backups:
            txn.jobs.append(engine.create_backup(action.device, opts, on_event=action.on_event,
                                                 group=group))
    except BaseException:
        _stop_created(txn.jobs)
        raise
    return txn


def _validate(engine: Engine, actions: Sequence[Action],
              completion_mode: str) -> dict[int, BackupOptions]:
    """Phase 1: every error raised here, before anything starts or changes."""
    options: dict[int, BackupOptions] = {}
    names = {name: set(h.bitmaps()) for name, h in engine.devices.items()}
    changed: dict[tuple[str, str], int] = {}  # (device, bitmap) → first action changing it
    outputs: list[tuple[str, str]] = []
    seen_devices: dict[str, int] = {}
    for i, action in enumerate(actions):
        if type(action) not in _KIND:
            raise UsageError(f"action {i} is a {type(action).__name__}, not a transaction "
                             f"action ({', '.join(k.__name__ for k in _KIND)})")
        name = getattr(action.device, "name", None)
        if not isinstance(name, str) or engine.devices.get(name) is not action.device:
            raise UsageError(f"action {i} ({_KIND[type(action)]}): its device is not one "
                             "of this engine's")
        what = describe(i, action)
        dev = action.device.name
        if not isinstance(action, Backup):
            if completion_mode != "individual":
                # QEMU's message (blockdev.c, action_check_completion_mode).
                raise UsageError(f"{what}: a bitmap action does not support "
                                 f"completion-mode = {completion_mode}")
            _replay_bitmap(what, action, names[dev], changed, i)
            continue
        try:
            opts = action.options()
        except UsageError as exc:
            raise UsageError(f"{what}: {exc}") from exc
        if dev in seen_devices:
            raise UsageError(f"{what}: device {dev} already has a backup in this "
                             f"transaction (action {seen_devices[dev]})")
        seen_devices[dev] = i
        if opts.bitmap is not None:
            if opts.bitmap not in names[dev] or (dev, opts.bitmap) in changed:
                j = changed.get((dev, opts.bitmap))
                why = f"action {j} of this transaction changes it" if j is not None \
                    else "no such bitmap at the transaction's start"
                raise UsageError(f"{what}: bitmap {opts.bitmap!r} of device {dev} cannot "
                                 f"be used: {why}")
            try:
                action.device.check_bitmap(opts.bitmap)
            except ShmblockError as exc:
                raise type(exc)(f"{what}: {exc}") from exc
        if opts.spec.file is not None:
            outputs += [(f"{what}'s {role}", path)
                        for role, path in with_parts("target", opts.spec.file)]
        if opts.reference_image:
            outputs += [(f"{what}'s {role}", path)
                        for role, path in with_parts("reference image",
                                                     opts.reference_image)]
        options[i] = opts
    # Outputs of different actions must not collide (each job's own are checked again,
    # with the running jobs and the devices' files, by create_backup).
    check_distinct(outputs)
    return options


def _replay_bitmap(what: str, action: BitmapAction, names: set[str],
                   changed: dict[tuple[str, str], int], index: int) -> None:
    """Check one bitmap action against the device's names as the earlier actions left
    them, and apply it to ``names``."""
    handle = action.device
    dev = handle.name

    def existing(name: str) -> None:
        if name not in names:
            raise UsageError(f"{what}: device {dev} has no bitmap named {name!r}")
        try:
            handle.check_bitmap_free(name)
        except ShmblockError as exc:
            raise type(exc)(f"{what}: {exc}") from exc

    if isinstance(action, BitmapAdd):
        if not NAME_RE.match(action.name):
            raise UsageError(f"{what}: bitmap name {action.name!r} must be 1-32 of "
                             "[A-Za-z0-9_.-]")
        if action.name in names:
            raise UsageError(f"{what}: device {dev} already has a bitmap named "
                             f"{action.name!r}")
        if len(names) >= L.MAX_BITMAPS:
            raise UsageError(f"{what}: device {dev} already has {L.MAX_BITMAPS} bitmaps")
        names.add(action.name)
        touched = [action.name]
    elif isinstance(action, BitmapMerge):
        if not action.sources:
            raise UsageError(f"{what}: a merge needs at least one source bitmap")
        for name in (action.target, *action.sources):
            existing(name)
        touched = [action.target]
    else:
        existing(action.name)
        if isinstance(action, BitmapRemove):
            names.discard(action.name)
        touched = [action.name]
    for name in touched:
        changed.setdefault((dev, name), index)


def _stop_created(jobs: list[BackupJob]) -> None:
    """Cancel jobs that were prepared but never started; wait for them (their ``end``
    removes the ``.part`` files and frees their bitmaps, untouched)."""
    for job in jobs:
        job.cancel()
    for job in jobs:
        with contextlib.suppress(ShmblockError):
            job.wait(STOP_TIMEOUT)
        if not job.shared_worker and job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()


def _take_instant(engine: Engine, actions: Sequence[Action], txn: Transaction) -> None:
    """Phase 3: one freeze of every device involved; maps and bitmaps; one thaw."""
    devices: list[DeviceHandle] = []
    for action in actions:
        if action.device not in devices:
            devices.append(action.device)
    jobs = iter(txn.jobs)
    steps: list[tuple[Action, BackupJob | None]] = [
        (a, next(jobs) if isinstance(a, Backup) else None) for a in actions]
    starts: list[protocol.JobStart] = []
    try:
        for job in txn.jobs:
            if job.tracker.state is not JobState.CREATED:
                raise JobError(f"job {job.job} ended before the transaction's instant: "
                               f"{job.tracker.error or job.tracker.state.value}")
            starts.append(job.snapshot_before_freeze())
    except BaseException:
        _stop_created(txn.jobs)
        raise
    undo: list[Callable[[], None]] = []
    sent = 0
    try:
        t0 = time.monotonic()
        with engine.freeze(devices):
            try:
                for action, step_job in steps:
                    if step_job is not None:
                        step_job.snapshot_in_freeze(t0)
                    else:
                        assert not isinstance(action, Backup)
                        undo.append(_apply_bitmap(action))
            except BaseException:
                # Still frozen: no writer has run since, so every undo is exact.
                for step in reversed(undo):
                    step()
                raise
        for job, start in zip(txn.jobs, starts, strict=True):
            job.snapshot_after_freeze(start)
            sent += 1
    except BaseException:
        # Jobs whose JobStart went out run and are cancelled like any job; the others
        # never will: their snapshots are taken back (bitmaps get their bits back).
        for job in txn.jobs[sent:]:
            job.snapshot_abort()
        for job in txn.jobs[:sent]:
            with contextlib.suppress(ShmblockError):  # it may have concluded already
                job.cancel()
        for job in txn.jobs:
            with contextlib.suppress(ShmblockError):
                job.wait(STOP_TIMEOUT)
        raise
    for job in txn.jobs:
        job.snapshot_check()


_PERSISTENT_KIND: dict[type, str] = {
    BitmapAdd: "add", BitmapClear: "clear", BitmapRemove: "remove",
    BitmapEnable: "enable", BitmapDisable: "disable"}


def _apply_bitmap(action: BitmapAction) -> Callable[[], None]:
    """Apply a bitmap action while its device is frozen; returns its exact undo (valid
    only while the device stays frozen)."""
    handle = action.device
    device = handle.device
    ctl = device.ctl
    if handle.bitmap_store is not None:
        # A file-backed device's bitmaps live in its persistent store (DeviceHandle).
        if isinstance(action, BitmapMerge):
            return handle.apply_persistent_action("merge", action.target, action.sources)
        return handle.apply_persistent_action(_PERSISTENT_KIND[type(action)], action.name)
    # Lineage (shmblock.lineage): add, clear, disable and remove end a generation; each
    # undo puts the old one back with the bits.
    gens = handle.generations
    gens_before = dict(gens)
    if isinstance(action, BitmapAdd | BitmapClear | BitmapDisable):
        gens[action.name] = new_generation()
    elif isinstance(action, BitmapRemove):
        gens.pop(action.name, None)

    def undo_lineage() -> None:
        gens.clear()
        gens.update(gens_before)
    if isinstance(action, BitmapAdd):
        used = set(device.bitmap_names().values())
        index = next(i for i in range(L.MAX_BITMAPS) if i not in used)
        device.dirty[index] = 0
        device.set_bitmap_name(index, action.name)
        ctl[L.CTL_BITMAP_MASK] = int(ctl[L.CTL_BITMAP_MASK]) | (1 << index)

        def undo_add() -> None:
            ctl[L.CTL_BITMAP_MASK] = int(ctl[L.CTL_BITMAP_MASK]) & ~(1 << index)
            device.set_bitmap_name(index, "")
            undo_lineage()
        return undo_add
    if isinstance(action, BitmapMerge):
        names = device.bitmap_names()
        row = device.dirty[names[action.target]]
        before = row.copy()
        for source in action.sources:
            np.maximum(row, device.dirty[names[source]] != 0, out=row, casting="unsafe")

        def undo_merge() -> None:
            row[:] = before
        return undo_merge
    index = device.bitmap_names()[action.name]
    if isinstance(action, BitmapEnable | BitmapDisable):
        # The recording switch is the bitmap's bit of CTL_BITMAP_MASK, read by every
        # guest write (Device, "dirty"); its bits are not touched.
        mask_was = int(ctl[L.CTL_BITMAP_MASK])
        bit = 1 << index
        ctl[L.CTL_BITMAP_MASK] = mask_was | bit if isinstance(action, BitmapEnable) \
            else mask_was & ~bit

        def undo_switch() -> None:
            ctl[L.CTL_BITMAP_MASK] = mask_was
            undo_lineage()
        return undo_switch
    row = device.dirty[index]
    before = row.copy()
    if isinstance(action, BitmapClear):
        row[:] = 0

        def undo_clear() -> None:
            row[:] = before
            undo_lineage()
        return undo_clear
    mask_before = int(ctl[L.CTL_BITMAP_MASK])
    ctl[L.CTL_BITMAP_MASK] = mask_before & ~(1 << index)
    device.set_bitmap_name(index, "")
    name = action.name

    def undo_remove() -> None:
        device.set_bitmap_name(index, name)
        row[:] = before
        ctl[L.CTL_BITMAP_MASK] = mask_before
        undo_lineage()
    return undo_remove
