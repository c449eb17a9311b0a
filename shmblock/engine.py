"""The Python API: an :class:`Engine` owns one run — devices, queues, worker processes.

A program uses it like this::

    with Engine() as engine:
        dev = engine.create_device(size=parse_size("256M"))
        dev.write(0, b"hello".ljust(4096, b"\\0"))        # a guest write, through CBW
        engine.start_writers(dev, count=2, workload="random", duration=5)
        job = engine.backup(dev, "backup.qcow2", verify=True)
        result = job.wait()
        print(result.outcome, result.throughput)

The engine is the supervisor of DESIGN.md: the only creator and unlinker of shared
objects (exclusive create, unlink in ``close`` and on every failure path, names written
to the run registry before they exist), the starter and watcher of worker processes
(``python -m workers.guest`` / ``workers.backup``, handed names, never handles), and the
coordinator of snapshot start. A pump thread receives everything workers send to the
supervisor queue and watches the child processes: a backup worker that dies or stops
beating concludes its job as failed and frees the writers (invariant 6).

This module is the façade; each concept has its own room:

* :mod:`shmblock.run` — the run's names, registry record, queues and spawned processes;
* :mod:`shmblock.backup_workers` — the backup-worker processes, one per job or one per
  device (``prestart_backup_worker``), and how a job is handed to one;
* :mod:`shmblock.pump` — the supervisor queue's receiver and the children's watcher;
* :mod:`shmblock.freeze` — quiescing the writers for a snapshot instant;
* :mod:`shmblock.snapshot` — what a sync mode covers, the maps at the instant and at
  the end;
* :mod:`shmblock.options` — a backup's validated options and the worker's argv;
* :mod:`shmblock.device_handle`, :mod:`shmblock.backup_job` — the handles it returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

import protocol
from shmblock import cbw_buffer
from shmblock import layout as L
from shmblock import transaction as transactions
from shmblock.backup_job import STOP_TIMEOUT, STUCK_MARGIN, BackupJob
from shmblock.backup_workers import DeviceWorker, new_ready_number
from shmblock.device import DEFAULT_CLUSTER_SIZE, DEFAULT_MAX_WRITERS, Device, Geometry
from shmblock.device_handle import DeviceHandle, WriterProcess
from shmblock.errors import JobError, PeerGone, ShmblockError, StateError, UsageError
from shmblock.freeze import FREEZE_TIMEOUT, freeze
from shmblock.guest import WORKLOADS
from shmblock.job import JobEvent, JobTracker, JobTxn, Outcome
from shmblock.names import NAME_RE, RunNames, RunRecord
from shmblock.options import DEFAULT_CHUNK, MAX_SPEED, BackupOptions, check_job_id, check_speed
from shmblock.paths import check_backup_paths
from shmblock.pump import PUMP_INTERVAL, Pump
from shmblock.run import Run
from shmblock.stats import WriterStats, merged_percentiles
from shmblock.targets import TargetSpec, part_file
from shmblock.transport import (
    SUPERVISOR_RECEIVES,
    WRITER_CONTROL_RECEIVES,
    WRITER_REPLY_RECEIVES,
)
from shmblock.verify import SnapshotCapture, check_capture_memory

__all__ = [
    "FREEZE_TIMEOUT",
    "MAX_SPEED",
    "PUMP_INTERVAL",
    "READY_TIMEOUT",
    "STOP_TIMEOUT",
    "STUCK_MARGIN",
    "BackupJob",
    "BackupOptions",
    "DeviceHandle",
    "Engine",
    "WriterProcess",
    "check_speed",
]

READY_TIMEOUT = 30.0

log = logging.getLogger("shmblock.engine")


class Engine:
    """One run of shmblock: devices, writers, backup jobs; cleans up everything it made."""

    def __init__(self, run_id: str | None = None,
                 on_event: Callable[[str, JobEvent], None] | None = None, *,
                 prestart_backup_worker: bool = False) -> None:
        """``prestart_backup_worker``: start each device's backup worker with the device
        and keep it for the device's jobs (:mod:`shmblock.backup_workers`), so a job's
        snapshot follows its request within milliseconds; else a worker per job."""
        self.run = Run(run_id)
        self.prestart_backup_worker = prestart_backup_worker
        #: device name → its backup worker (per-device mode only)
        self.backup_workers: dict[str, DeviceWorker] = {}
        self.devices: dict[str, DeviceHandle] = {}
        self.writers: list[WriterProcess] = []
        self.jobs: dict[str, BackupJob] = {}
        self._next_writer: dict[str, int] = {}
        self._epoch = itertools.count(1)
        self._job_ids = itertools.count(1)
        self._on_event = on_event
        self._closed = False
        #: Seconds without a heartbeat before a backup worker is killed as stuck; None:
        #: per job, twice its target timeout plus STUCK_MARGIN.
        self.stuck_timeout: float | None = None
        try:
            self.sup = self.run.create_queue(self.names.supervisor_queue, SUPERVISOR_RECEIVES)
        except BaseException:
            self.run.record.remove()
            raise
        self.pump = Pump(self.sup, self.jobs, self.writers)
        self.pump.start()

    @property
    def names(self) -> RunNames:
        return self.run.names

    @property
    def record(self) -> RunRecord:
        return self.run.record

    @property
    def pump_errors(self) -> int:
        """Exceptions the pump caught while handling one message or watching children."""
        return self.pump.errors

    # -- devices ----------------------------------------------------------------------

    def create_device(self, size: int, cluster_size: int = DEFAULT_CLUSTER_SIZE,
                      name: str = "dev0", backing_file: str | None = None,
                      max_writers: int = DEFAULT_MAX_WRITERS, prefault: bool = True
                      ) -> DeviceHandle:
        """Create a device of ``size`` bytes in shared memory (or mapping ``backing_file``)."""
        self._require_open()
        if not NAME_RE.match(name):
            raise UsageError(f"device name {name!r} must be 1-32 of [A-Za-z0-9_.-]")
        if name in self.devices:
            raise UsageError(f"this run already has a device named {name!r}")
        # One writer index more than asked: the engine's own guest I/O uses the last one.
        geometry = Geometry(size, cluster_size, max_writers + 1)
        meta, data = self.names.meta(name), self.names.data(name)
        self.run.record_segments([meta] if backing_file else [meta, data])
        device = Device.create(meta, data, geometry, self.names.run_id, backing_file, prefault,
                               scan=False)
        handle = DeviceHandle(self, name, device, io_writer=max_writers)
        self.devices[name] = handle
        self._next_writer[name] = 0
        if self.prestart_backup_worker:
            # Not waited for: it imports, attaches and maps the device while the caller
            # goes on (start_backup_worker waits, if wanted); the first job's line
            # waits in its stdin until it is ready.
            self._new_worker(handle)
        if backing_file:
            # After the spawn, so the worker's start-up and this read of the file run
            # side by side; both are done before the device is used.
            device.scan_allocated()
        return handle

    def remove_device(self, device: DeviceHandle, timeout: float = STOP_TIMEOUT) -> None:
        """Forget ``device``: its backup worker ends, its segments are unlinked.

        UsageError while guest writers of it run or a job of it has not concluded.
        """
        self._require_open()
        if self.devices.get(device.name) is not device:
            raise UsageError(f"device {device.name!r} is not a device of this engine")
        if any(w.device is device and w.alive for w in self.writers):
            raise UsageError(f"device {device.name!r} is busy: guest writers are running")
        if any(j.device is device and not j.tracker.concluded for j in self.jobs.values()):
            raise UsageError(f"device {device.name!r} is busy: a backup job of it runs")
        worker = self.backup_workers.pop(device.name, None)
        if worker is not None:
            worker.close_stdin()
            worker.close(timeout)
        del self.devices[device.name]
        with contextlib.suppress(ShmblockError):
            device.close()
        device.device.unlink()
        with contextlib.suppress(ShmblockError):
            device.device.close()

    # -- backup workers ---------------------------------------------------------------------

    def _new_worker(self, device: DeviceHandle) -> DeviceWorker:
        device.backup_queue()  # created (once) before the worker attaches to it
        worker = DeviceWorker(self.run, device.device.meta_name, device.name,
                              persistent=self.prestart_backup_worker)
        if self.prestart_backup_worker:
            self.backup_workers[device.name] = worker
        return worker

    def _worker_for(self, device: DeviceHandle) -> tuple[DeviceWorker, str]:
        """The worker for the device's next job, and why it is new if it replaces a dead
        one ('' otherwise)."""
        old = self.backup_workers.get(device.name)
        if old is not None and old.alive:
            return old, ""
        why = "" if old is None else \
            f"the device's backup worker had died ({old.exit_reason()}) after {old.jobs} jobs"
        if old is not None:
            old.close_stdin()  # the dead one's pipe
        if why:
            log.warning("device %s: %s; starting a new one", device.name, why)
        return self._new_worker(device), why

    def start_backup_worker(self, device: DeviceHandle, timeout: float = READY_TIMEOUT
                            ) -> None:
        """Make sure ``device``'s backup worker runs and is attached (per-device mode).

        Pays the worker's start-up (interpreter, imports, mapping the device) now, not
        at the first job. JobError if it does not start; UsageError without
        ``prestart_backup_worker``.
        """
        self._require_open()
        if not self.prestart_backup_worker:
            raise UsageError("start_backup_worker needs Engine(prestart_backup_worker=True)")
        worker, _ = self._worker_for(device)
        ready = new_ready_number()
        self.pump.expect_ready(ready)
        if not worker.ping(ready) or not self.pump.wait_ready(
                "backup", ready, worker.proc, time.monotonic() + timeout):
            reason = worker.exit_reason()
            worker.kill()
            raise JobError(f"the backup worker of device {device.name} did not start "
                           f"({reason})")

    # -- writers ----------------------------------------------------------------------

    def start_writers(self, device: DeviceHandle, count: int, workload: str = "random",
                      block_size: int = 4096, duration: float = 0.0, rate: float = 0.0,
                      seed: int = 0, ops: int = 0) -> list[WriterProcess]:
        """Start ``count`` guest-writer processes; returns once each is attached."""
        self._require_open()
        if workload not in WORKLOADS:
            raise UsageError(f"unknown workload {workload!r} (expected one of "
                             f"{', '.join(WORKLOADS)})")
        if block_size <= 0 or device.size % block_size or block_size > device.size:
            raise UsageError(f"block size {block_size} must divide the device size")
        if seed < 0:
            # numpy refuses negative seeds: every writer would crash on start.
            raise UsageError(f"seed {seed} must not be negative")
        first = self._next_writer[device.name]
        if first + count > device.device.geometry.max_writers - 1:
            raise UsageError(f"at most {device.device.geometry.max_writers - 1} writers "
                             "per device")
        started = []
        for ident in range(first, first + count):
            control = self.run.create_queue(self.names.writer_control_queue(device.name, ident),
                                         WRITER_CONTROL_RECEIVES, small=True)
            reply = self.run.create_queue(self.names.writer_reply_queue(device.name, ident),
                                       WRITER_REPLY_RECEIVES, small=True)
            token = secrets.token_hex(16)
            proc = self.run.spawn("workers.guest", [
                "--meta", device.device.meta_name, "--device", device.name, "--id", str(ident),
                "--workload", workload, "--block-size", str(block_size),
                "--seed", str(seed * 1000 + ident), "--rate", str(rate),
                "--duration", str(duration), "--ops", str(ops)], secret=token)
            writer = WriterProcess(ident, device, proc, control, reply, token)
            self.writers.append(writer)
            started.append(writer)
        self._next_writer[device.name] = first + count
        deadline = time.monotonic() + READY_TIMEOUT
        for w in started:
            if not self.pump.wait_ready("writer", w.ident, w.proc, deadline):
                raise PeerGone(f"guest writer {w.ident} did not start (exit code "
                               f"{w.proc.poll()})")
            w.ready = True
        return started

    def writers_running(self) -> bool:
        """Whether any writer process of this run is still alive."""
        return any(w.alive for w in self.writers)

    def wait_writers(self, timeout: float | None = None) -> bool:
        """Wait until every writer process has exited; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for w in self.writers:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                w.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop_writers(self, timeout: float = STOP_TIMEOUT) -> None:
        """Ask every writer to stop, then make sure (SIGTERM, SIGKILL) they have."""
        for w in self.writers:
            if w.alive:
                with contextlib.suppress(ShmblockError):
                    w.control.send(protocol.Shutdown(reason="stop", token=w.token),
                                   timeout=0.5)
        for h in self.devices.values():
            h.device.ctl[L.CTL_EPOCH] = next(self._epoch)
        if not self.wait_writers(timeout / 2):
            for w in self.writers:
                if w.alive:
                    w.proc.terminate()
            if not self.wait_writers(timeout / 2):
                for w in self.writers:
                    if w.alive:
                        w.proc.kill()
                self.wait_writers(5.0)

    def writer_stats(self, device: DeviceHandle | None = None) -> list[WriterStats]:
        """Counters of every writer process (from shared memory; dead ones included)."""
        out = []
        for w in self.writers:
            if device is None or w.device is device:
                out.append(WriterStats.from_row(w.ident, w.device.device.stats[w.ident]))
        return out

    def latency_percentiles(self, device: DeviceHandle) -> tuple[float, float, float]:
        """p50, p99, p99.9 of guest write latency over every writer of ``device``, in µs."""
        rows = [w.device.device.stats[w.ident] for w in self.writers if w.device is device]
        return merged_percentiles(rows)

    # -- snapshot start -------------------------------------------------------------------

    def freeze(self, devices: list[DeviceHandle]) -> contextlib.AbstractContextManager[float]:
        """Quiesce every writer of ``devices`` (:func:`shmblock.freeze.freeze`)."""
        return freeze(self.pump, self.writers, devices, self._epoch)

    # -- backups --------------------------------------------------------------------------

    def backup(self, device: DeviceHandle, target: str | BackupOptions, *,
               format: str | None = None, sync: str = "full", speed: int = 0,
               cbw_mode: str = "stage", cbw_timeout: float = 5.0,
               on_cbw_error: str = "break-guest-write", backing_file: str | None = None,
               backing_format: str | None = None, verify: bool = False,
               reference_image: str | None = None, chunk: int = DEFAULT_CHUNK,
               target_timeout: float = 30.0, job_id: str | None = None,
               bitmap: str | None = None, bitmap_mode: str | None = None,
               auto_finalize: bool = True, auto_dismiss: bool = False,
               on_source_error: str = "report", on_target_error: str = "report",
               on_event: Callable[[JobEvent], None] | None = None) -> BackupJob:
        """Create a backup job and take its snapshot now; returns once it is running.

        Same arguments as :meth:`create_backup`. Raises UsageError for bad arguments and
        JobError when the job cannot start; the device is untouched then.
        """
        job = self.create_backup(
            device, target, format=format, sync=sync, speed=speed, cbw_mode=cbw_mode,
            cbw_timeout=cbw_timeout, on_cbw_error=on_cbw_error, backing_file=backing_file,
            backing_format=backing_format, verify=verify, reference_image=reference_image,
            chunk=chunk, target_timeout=target_timeout, job_id=job_id, bitmap=bitmap,
            bitmap_mode=bitmap_mode, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss,
            on_source_error=on_source_error, on_target_error=on_target_error,
            on_event=on_event)
        job.start()
        return job

    def create_backup(self, device: DeviceHandle, target: str | BackupOptions, *,
                      format: str | None = None, sync: str = "full", speed: int = 0,
                      cbw_mode: str = "stage", cbw_timeout: float = 5.0,
                      on_cbw_error: str = "break-guest-write",
                      backing_file: str | None = None, backing_format: str | None = None,
                      verify: bool = False, reference_image: str | None = None,
                      chunk: int = DEFAULT_CHUNK, target_timeout: float = 30.0,
                      job_id: str | None = None, bitmap: str | None = None,
                      bitmap_mode: str | None = None,
                      auto_finalize: bool = True, auto_dismiss: bool = False,
                      on_source_error: str = "report", on_target_error: str = "report",
                      on_event: Callable[[JobEvent], None] | None = None,
                      group: tuple[JobTxn, threading.Condition] | None = None) -> BackupJob:
        """Prepare a backup job: start its worker, open the target; no snapshot yet.

        ``target`` is a target string (the keyword arguments are the options, validated
        into a :class:`~shmblock.options.BackupOptions`) or a ready BackupOptions (the
        keyword arguments other than ``on_event`` are then ignored). The job stays
        ``created`` until :meth:`BackupJob.start` takes the snapshot, so the slow parts
        (process start, target connection, verification buffers) happen before the
        instant that matters. ``bitmap``/``bitmap_mode``: the dirty bitmap the job
        copies (``sync`` incremental or bitmap) or resets (full, top) and what it holds
        afterwards (:mod:`shmblock.snapshot`); unknown (UsageError) or used by another
        job (BitmapBusy) is refused here. ``group`` is for :mod:`shmblock.transaction`:
        the ``JobTxn`` and lock shared by the jobs of a grouped transaction. Raises
        UsageError for bad arguments and JobError when the target cannot be opened or
        the worker does not start.
        """
        self._require_open()
        opts = target if isinstance(target, BackupOptions) else BackupOptions(
            TargetSpec.parse(target, format, backing_file, backing_format), sync=sync,
            speed=speed, chunk=chunk, cbw_mode=cbw_mode, cbw_timeout=cbw_timeout,
            on_cbw_error=on_cbw_error, verify=verify, reference_image=reference_image,
            target_timeout=target_timeout, job_id=job_id, bitmap=bitmap,
            bitmap_mode=bitmap_mode, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss,
            on_source_error=on_source_error, on_target_error=on_target_error)
        return self._prepare(device, opts, on_event, group)

    def _prepare(self, device: DeviceHandle, opts: BackupOptions,
                 on_event: Callable[[JobEvent], None] | None,
                 group: tuple[JobTxn, threading.Condition] | None = None) -> BackupJob:
        if opts.bitmap is not None:  # unknown or busy: refused before anything starts
            device.check_bitmap(opts.bitmap)
        cbw_buffer.limit_slots(device.device, opts.cbw_buffer)  # more than the device has
        if any(not j.tracker.concluded for j in self.jobs.values() if j.device is device):
            raise JobError(f"device {device.name} already has a backup job")
        lineage: tuple[str, str, str | None] = ("", "", None)
        if opts.spec.format == "repo":
            # A repository backup: the worker's target URL carries the job's sync mode,
            # bitmap and its lineage, device id and a fresh backup id (shmblock.repo.target).
            from shmblock.repo.target import job_target
            if opts.bitmap is not None:
                lineage = device.bitmap_lineage(opts.bitmap, opts.bitmap_mode)
            target = job_target(opts.spec.target, sync=opts.sync, bitmap=opts.bitmap,
                                bitmap_mode=opts.bitmap_mode, device_name=device.name,
                                device_file=device.device.backing_file,
                                bitmap_generation=lineage[0] or None,
                                bitmap_next=lineage[2])
            opts = dataclasses.replace(opts, spec=dataclasses.replace(opts.spec, target=target))
        spec = opts.spec
        # Before anything starts: no output may be a device's file, another output or a
        # running job's file (shmblock.paths).
        busy = []
        for j in self.jobs.values():
            if not j.tracker.concluded and j.spec.file is not None:
                busy.append((f"job {j.job}'s target", j.spec.file))
            if not j.tracker.concluded and j.capture and j.capture.reference_image:
                busy.append((f"job {j.job}'s reference image", j.capture.reference_image))
        check_backup_paths(
            spec.file, opts.reference_image, busy=busy,
            inputs=[(f"the file of device {h.name}", h.device.backing_file)
                    for h in self.devices.values() if h.device.backing_file])
        if opts.wants_capture:  # refused before a worker starts, not OOM-killed later
            check_capture_memory(device.device.size)
        job_id = opts.job_id or f"job{next(self._job_ids)}"
        check_job_id(job_id)
        if job_id in self.jobs:
            raise UsageError(f"job id {job_id!r} must be new and 1-32 of [A-Za-z0-9_.-]")
        if on_event is None and self._on_event is not None:
            engine_hook = self._on_event
            on_event = lambda event: engine_hook(job_id, event)  # noqa: E731
        # QEMU's lifecycle with a status event for every change; auto-dismiss as asked
        # (off by default: see shmblock.backup_job).
        # ``group``: a grouped transaction's JobTxn and the lock its jobs share
        # (shmblock.transaction); the job then completes with the group.
        tracker = JobTracker(job_id, on_event, auto_finalize=opts.auto_finalize,
                             auto_dismiss=opts.auto_dismiss, status_events=True,
                             txn=group[0] if group else None,
                             lock=group[1] if group else None)
        token = secrets.token_hex(16)
        self.pump.job_tokens[job_id] = token  # before the spawn: the worker may fail at once
        queue = device.backup_queue()
        parts = [p for p in (spec.part, opts.reference_image and
                             part_file(opts.reference_image)) if p]
        for part in parts:  # recorded before they exist, for `cleanup`
            self.record.add_part(part)
        bitmap_use = None if opts.bitmap is None else \
            device.use_bitmap(opts.bitmap, opts.bitmap_mode or "", job_id,
                              expect=lineage[0], minted=lineage[1])
        # The job goes to the device's worker on its private stdin, with a fresh number
        # for its Ready (shmblock.backup_workers); a worker found dead is replaced.
        ready = new_ready_number()
        self.pump.expect_ready(ready)
        argv = opts.worker(device.device.meta_name, device.name, job_id).to_argv()
        try:
            worker, restarted = self._worker_for(device)
            if not worker.assign(argv, token, ready):
                # It died between jobs, just now: the broken pipe says so.
                restarted = f"the device's backup worker had died ({worker.exit_reason()})"
                worker.close_stdin()
                worker = self._new_worker(device)
                if not worker.assign(argv, token, ready):
                    raise JobError(f"backup of {device.name} to {spec.target} could not "
                                   f"start: its backup worker {worker.exit_reason()}")
        except BaseException:
            if bitmap_use is not None:
                device.release_bitmap(bitmap_use.name, job_id)
            raise
        proc = worker.proc
        job = BackupJob(self, job_id, device, spec, opts.sync, proc, queue, tracker,
                        options=opts, speed=opts.speed, bitmap=bitmap_use,
                        stuck_timeout=self.stuck_timeout if self.stuck_timeout is not None
                        else 2 * opts.target_timeout + STUCK_MARGIN, token=token,
                        shared_worker=worker.persistent)
        self.jobs[job_id] = job
        if restarted:
            tracker.note("worker-restarted", reason=restarted)
        if not self.pump.wait_ready(
                "backup", ready, proc, time.monotonic() + READY_TIMEOUT,
                give_up=lambda: tracker.concluded or job_id in self.pump.pending_failures):
            reason = self.pump.pending_failures.pop(job_id, "") or self.pump.failure()
            if not reason:
                reason = f"the backup worker exited with code {proc.poll()}" \
                    if proc.poll() is not None else "the backup worker did not start in time"
            if worker.persistent and worker.alive and not tracker.concluded:
                # Alive but silent: the next job gets a fresh process, not this queue.
                worker.kill()
            tracker.conclude(Outcome.FAILED, reason)
            job.wait(STOP_TIMEOUT)
            raise JobError(f"backup of {device.name} to {spec.target} could not start: {reason}")
        if spec.part is not None:  # the worker has created its .part: remember which inode
            with contextlib.suppress(OSError):
                st = os.lstat(spec.part)
                self.record.part_created(spec.part, (st.st_dev, st.st_ino))
                job.part_identity = (st.st_dev, st.st_ino)  # what commit may publish
        if opts.wants_capture:
            job.capture = SnapshotCapture(device.device, opts.reference_image,
                                          on_part_created=self.record.part_created)
        return job

    # -- transactions -----------------------------------------------------------------------

    def transaction(self, actions: Sequence[transactions.Action],
                    completion_mode: str = "individual") -> transactions.Transaction:
        """Run ``actions`` (backups, bitmap actions) at one instant across their devices.

        QEMU's ``transaction``: every action is validated and every worker started
        before one freeze of every writer of every device involved; then each job's
        maps and each bitmap action, in order; one thaw. All or nothing: an invalid
        action (UsageError, BitmapBusy) or a worker that cannot start (JobError) leaves
        nothing started and nothing changed. ``completion_mode`` ``grouped``: a job that
        fails or is cancelled cancels the others, and every bitmap is left as it was
        before. Returns the :class:`~shmblock.transaction.Transaction` (its ``jobs``
        copy in parallel; ``wait()`` returns their results). See
        :mod:`shmblock.transaction`.
        """
        txn = self.create_transaction(actions, completion_mode)
        txn.start()
        return txn

    def create_transaction(self, actions: Sequence[transactions.Action],
                           completion_mode: str = "individual") -> transactions.Transaction:
        """Validate ``actions`` and start their workers; the instant is taken by
        :meth:`Transaction.start <shmblock.transaction.Transaction.start>` (as
        :meth:`create_backup` and :meth:`BackupJob.start` split a backup)."""
        self._require_open()
        return transactions.prepare(self, actions, completion_mode)

    # -- lifecycle --------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._closed:
            raise StateError("the engine is closed", "closed", ("open",))
        if failure := self.pump.failure():
            raise PeerGone(f"this engine cannot run anything any more: {failure}")

    def close(self) -> None:
        """Stop every process and remove every shared object of the run. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for job in self.jobs.values():
                if not job.tracker.concluded:
                    # Running, or pending a finalize nobody will give now: both abort.
                    with contextlib.suppress(StateError):  # aborting, or just concluded
                        job.cancel()
            for job in self.jobs.values():
                with contextlib.suppress(JobError):
                    job.wait(STOP_TIMEOUT)
                if not job.shared_worker and job.proc.poll() is None:
                    job.proc.kill()
                    job.proc.wait()
            for worker in self.backup_workers.values():
                worker.close_stdin()  # EOF: it leaves between jobs, while we go on
            self.stop_writers()
        finally:
            for worker in self.backup_workers.values():
                worker.close()  # waits for it (SIGKILL after WORKER_EXIT_TIMEOUT)
            self.pump.stop()
            for h in self.devices.values():
                with contextlib.suppress(ShmblockError):
                    h.close()
            self.run.close_queues()
            for h in self.devices.values():
                h.device.unlink()
                with contextlib.suppress(ShmblockError):
                    h.device.close()
            self.run.forget()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
