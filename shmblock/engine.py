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
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

import protocol
from shmblock import layout as L
from shmblock.copier import DEFAULT_CHUNK, SYNC_MODES, runs
from shmblock.device import DEFAULT_CLUSTER_SIZE, DEFAULT_MAX_WRITERS, Device, Geometry
from shmblock.errors import (
    JobError,
    PeerGone,
    ShmblockError,
    StateError,
    TransportError,
    UsageError,
    VerificationError,
)
from shmblock.guest import WORKLOADS, GuestIO, WriteData
from shmblock.job import JobEvent, JobResult, JobState, JobTracker, Outcome
from shmblock.names import NAME_RE, SUPERVISOR_PID_ENV, RunNames, RunRecord
from shmblock.paths import PART_SUFFIX, check_backup_paths
from shmblock.stats import WriterStats, merged_percentiles
from shmblock.targets import TargetSpec
from shmblock.transport import (
    BACKUP_RECEIVES,
    SUPERVISOR_RECEIVES,
    WRITER_CONTROL_RECEIVES,
    WRITER_QUEUE_BYTES,
    WRITER_QUEUE_MESSAGES,
    WRITER_REPLY_RECEIVES,
    Queue,
)
from shmblock.verify import SnapshotCapture, check_capture_memory, verify_target

log = logging.getLogger("shmblock.engine")

READY_TIMEOUT = 30.0
FREEZE_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
PUMP_INTERVAL = 0.02
#: Largest speed a message can carry (a U63 field), in bytes per second.
MAX_SPEED = 2**63 - 1
#: A worker blocked in one target call beats again after at most the target timeout;
#: it is only called stuck after twice that plus this margin (a commit is a flush and
#: a rename or two), so a hung target is reported by the worker, naming the target,
#: before the supervisor would blame the worker.
STUCK_MARGIN = 10.0


def check_speed(speed: int) -> None:
    """Refuse a speed no message can carry (UsageError), before anything is frozen."""
    if not 0 <= speed <= MAX_SPEED:
        raise UsageError(f"speed {speed} must be from 0 (unlimited) to {MAX_SPEED} bytes "
                         "per second")


@dataclass
class WriterProcess:
    """A guest-writer worker process and what the supervisor knows of it."""

    ident: int
    device: DeviceHandle
    proc: subprocess.Popen[bytes]
    control: Queue
    reply: Queue
    token: str = field(default="", repr=False)  # its secret; its Frozen must carry it
    ready: bool = False
    done: bool = False
    ok: bool = True
    error: str = ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def status(self) -> str:
        """How the writer ended: "running", "ok", "killed by signal N", "exit code N: …"."""
        code = self.proc.poll()
        if code is None:
            return "running"
        if code < 0:
            return f"killed by signal {-code}"
        if code == 0 and self.ok:
            return "ok"
        return f"exit code {code}" + (f": {self.error}" if self.error else "")


class DeviceHandle:
    """A device owned by an engine; guest reads and writes go through copy-before-write."""

    def __init__(self, engine: Engine, name: str, device: Device, io_writer: int) -> None:
        self.engine = engine
        self.name = name
        self.device = device
        self.gate = threading.Lock()  # held by guest writes of this process and by freezes
        self._io_writer = io_writer
        self._io: GuestIO | None = None
        self._reply: Queue | None = None
        self._backup_queue: Queue | None = None

    @property
    def size(self) -> int:
        return self.device.size

    @property
    def cluster_size(self) -> int:
        return self.device.cluster_size

    def backup_queue(self) -> Queue:
        """The queue of this device's backup worker (created on first use, kept)."""
        if self._backup_queue is None:
            self._backup_queue = self.engine._create_queue(
                self.engine.names.backup_queue(self.name), BACKUP_RECEIVES)
        return self._backup_queue

    def _guest(self) -> GuestIO:
        if self._io is None:
            self._reply = self.engine._create_queue(
                self.engine.names.writer_reply_queue(self.name, self._io_writer),
                WRITER_REPLY_RECEIVES, small=True)
            self._io = GuestIO(self.device, self._io_writer,
                               self.engine.names.backup_queue(self.name),
                               reply_queue=self._reply, gate=self.gate)
        return self._io

    def write(self, offset: int, data: WriteData) -> None:
        """A guest write from this process (copy-before-write applies)."""
        self._guest().write(offset, data)

    def read(self, offset: int, length: int) -> bytes:
        """A guest read from this process."""
        return self._guest().read(offset, length)

    def fill(self, fraction: float, seed: int = 0) -> int:
        """Write random data to ``fraction`` of the clusters (chosen at random), as a guest.

        For benchmarks and demos that need a device with data and holes. Returns the
        number of clusters written.
        """
        if not 0 <= fraction <= 1:
            raise UsageError(f"fill fraction {fraction} must be between 0 and 1")
        rng = np.random.default_rng(seed)
        n = self.device.clusters
        chosen = np.sort(rng.choice(n, size=round(n * fraction), replace=False))
        cs = self.cluster_size
        pool = rng.integers(0, 256, 8 << 20, dtype=np.uint8)
        # Write maximal runs of chosen clusters, up to 4 MiB at a time.
        step = max((4 << 20) // cs, 1)
        for a, b, picked in runs(np.isin(np.arange(n), chosen)):
            if not picked:
                continue
            for c in range(a, b, step):
                e = min(c + step, b)
                start = int(rng.integers(0, pool.size - (e - c) * cs + 1))
                self.write(c * cs, pool[start : start + (e - c) * cs])
        return int(chosen.size)

    # -- dirty bitmaps ------------------------------------------------------------------

    def add_bitmap(self, name: str) -> None:
        """Define a persistent dirty bitmap that records every guest write from now on.

        The map is cleared and enabled while the writers are frozen, so no write is
        half-recorded.
        """
        if not NAME_RE.match(name):
            raise UsageError(f"bitmap name {name!r} must be 1-32 of [A-Za-z0-9_.-]")
        names = self.device.bitmap_names()
        if name in names:
            raise UsageError(f"device {self.name} already has a bitmap named {name!r}")
        free = [i for i in range(L.MAX_BITMAPS) if i not in names.values()]
        if not free:
            raise UsageError(f"device {self.name} already has {L.MAX_BITMAPS} bitmaps")
        index = free[0]
        with self.engine.freeze([self]):
            self.device.dirty[index] = 0
            self.device.set_bitmap_name(index, name)
            ctl = self.device.ctl
            ctl[L.CTL_BITMAP_MASK] = int(ctl[L.CTL_BITMAP_MASK]) | (1 << index)

    def remove_bitmap(self, name: str) -> None:
        """Stop recording into bitmap ``name`` and forget it."""
        index = self._bitmap_index(name)
        with self.engine.freeze([self]):
            ctl = self.device.ctl
            ctl[L.CTL_BITMAP_MASK] = int(ctl[L.CTL_BITMAP_MASK]) & ~(1 << index)
            self.device.set_bitmap_name(index, "")

    def bitmaps(self) -> list[str]:
        """Names of the device's dirty bitmaps."""
        return sorted(self.device.bitmap_names())

    def bitmap(self, name: str) -> npt.NDArray[np.bool_]:
        """A copy of bitmap ``name``: True for every cluster written since it was added."""
        return np.asarray(self.device.dirty[self._bitmap_index(name)] != 0, dtype=np.bool_)

    def _bitmap_index(self, name: str) -> int:
        try:
            return self.device.bitmap_names()[name]
        except KeyError:
            raise UsageError(f"device {self.name} has no bitmap named {name!r}") from None

    def close(self) -> None:
        if self._io is not None:
            self._io.close()
            self._io = None


@dataclass
class BackupJob:
    """Handle on a running backup job."""

    engine: Engine
    job: str
    device: DeviceHandle
    spec: TargetSpec
    sync: str
    proc: subprocess.Popen[bytes]
    queue: Queue
    tracker: JobTracker
    capture: SnapshotCapture | None = None
    freeze_s: float = 0.0  # writers frozen, without the verification copy
    verify_copy_s: float = 0.0  # the verification copy, taken inside the freeze
    speed: int = 0
    stuck_timeout: float = 30.0 + STUCK_MARGIN
    result: JobResult | None = None
    covered: npt.NDArray[np.bool_] | None = None
    cbw_mode: str = "stage"
    cbw_timeout: float = 5.0
    on_cbw_error: str = "break-guest-write"
    seq: int = 0  # the device's CTL_JOB_SEQ of this job's snapshot (0: never started)
    token: str = field(default="", repr=False)  # the secret shared with its worker
    _final_lock: threading.Lock = field(default_factory=threading.Lock)
    _end_lock: threading.Lock = field(default_factory=threading.Lock)
    _ended: bool = False

    # -- control --------------------------------------------------------------------

    def start(self) -> None:
        """Take the snapshot now (writers frozen for the instant) and start copying."""
        if self.tracker.state is not JobState.CREATED:
            raise StateError(f"cannot start a job that is {self.tracker.state.value}",
                             self.tracker.state.value, ("created",))
        self.engine._take_snapshot(self)

    def _send(self, msg: protocol.Message) -> None:
        try:
            self.queue.send(msg, timeout=5.0)
        except TransportError as exc:
            raise PeerGone(f"the backup worker of job {self.job} is not answering: {exc}") from exc

    def pause(self) -> None:
        """Stop background copying; copy-before-write goes on. Only a running job."""
        self.tracker.apply("pause", "paused")
        self._send(protocol.Pause(job=self.job, token=self.token))

    def resume(self) -> None:
        """Resume background copying of a paused job (StateError in any other state)."""
        self.tracker.apply("resume", "resumed")
        self._send(protocol.Resume(job=self.job, token=self.token))

    def set_speed(self, speed: int) -> None:
        """Limit background copying to ``speed`` bytes per second (0 = unlimited)."""
        check_speed(speed)
        if self.tracker.concluded:
            raise StateError("cannot set the speed of a concluded job", "concluded",
                             ("created", "running", "paused"))
        self.speed = speed  # a created job's JobStart carries it too
        self._send(protocol.SetSpeed(job=self.job, speed=speed, token=self.token))
        self.tracker.note("speed", speed=speed)

    def cancel(self) -> None:
        """Ask the job to stop; the target is discarded. Wait with :meth:`wait`."""
        if not self.tracker.concluded:
            with contextlib.suppress(PeerGone):
                self._send(protocol.Cancel(job=self.job, token=self.token))

    def complete(self) -> None:
        """Finish a ``sync=none`` job now (the target keeps what was saved)."""
        if self.sync != "none":
            raise UsageError("only a sync=none job is completed on request")
        self._send(protocol.Complete(job=self.job, token=self.token))

    # -- observation ----------------------------------------------------------------

    @property
    def state(self) -> JobState:
        return self.tracker.state

    @property
    def progress(self) -> tuple[int, int]:
        """(bytes done, bytes to do), read live from shared memory."""
        ctl = self.device.device.ctl
        if self.tracker.concluded:
            return self.tracker.done, self.tracker.total
        return int(ctl[L.CTL_DONE_BYTES]), int(ctl[L.CTL_TOTAL_BYTES])

    @property
    def events(self) -> list[JobEvent]:
        return list(self.tracker.events)

    def wait(self, timeout: float | None = None) -> JobResult:
        """Wait for the job to conclude, verify if asked, and return its result.

        Raises JobError on timeout; a failed job is a result, not an exception. If the
        supervisor's pump thread (which turns the worker's reports into the job's state)
        is dead, the job is concluded failed instead of waited for forever.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.tracker.wait(0.5 if deadline is None
                                    else min(max(deadline - time.monotonic(), 0.0), 0.5)):
            if self.engine._pump_failure():
                self.engine._fail_jobs(self.engine._pump_failure())
            elif deadline is not None and time.monotonic() >= deadline:
                raise JobError(f"job {self.job} did not conclude within {timeout} s")
        with self._final_lock:
            if self.result is None:
                self.result = self._finalise()
        return self.result

    def _finalise(self) -> JobResult:
        t = self.tracker
        assert t.outcome is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.engine._end_job(self, t.outcome)
        start = t.running_since or t.started
        result = JobResult(
            job=self.job, outcome=t.outcome, error=t.error, target=self.spec.target,
            format=self.spec.format, sync=self.sync, bytes_total=t.total,
            bytes_written=t.final.get("bytes_written", 0),
            clusters_copied=t.final.get("clusters_copied", 0),
            cbw_clusters=t.final.get("cbw_clusters", 0),
            duration_s=max(t.ended - start, 0.0), freeze_s=self.freeze_s,
            verify_copy_s=self.verify_copy_s)
        if self.sync == "none":
            # What a CBW-only job covers is what it saved.
            self.covered = self.device.device.saved != 0
        if self.capture is not None:
            self.capture.join()
            if t.outcome is Outcome.COMPLETED:
                try:
                    verify_target(self.spec, self.capture, self.covered)
                    result.verified = True
                except VerificationError as exc:
                    result.verified = False
                    result.verify_error = str(exc)
                t.note("verified", ok=result.verified, error=result.verify_error)
            elif self.capture.error:
                result.verify_error = self.capture.error
        return result


class Engine:
    """One run of shmblock: devices, writers, backup jobs; cleans up everything it made."""

    def __init__(self, run_id: str | None = None,
                 on_event: Callable[[str, JobEvent], None] | None = None) -> None:
        self.names = RunNames.new(run_id)
        self.record = RunRecord(self.names.run_id, self.names.prefix, os.getpid())
        self.record.save()
        self.devices: dict[str, DeviceHandle] = {}
        self.writers: list[WriterProcess] = []
        self.jobs: dict[str, BackupJob] = {}
        self._queues: list[Queue] = []
        self._next_writer: dict[str, int] = {}
        self._epoch = itertools.count(1)
        self._job_ids = itertools.count(1)
        self._frozen: set[tuple[int, int]] = set()  # (epoch, writer) that answered
        self._freezing: dict[int, DeviceHandle] = {}  # epoch → device, freezes in progress
        self._ready: dict[tuple[str, int], int] = {}
        self._pending_failures: dict[str, str] = {}
        # job id → the secret its worker got on stdin; Job* messages must carry it.
        self._job_tokens: dict[str, str] = {}
        self._cond = threading.Condition()
        self._on_event = on_event
        self._closed = False
        #: Seconds without a heartbeat before a backup worker is killed as stuck; None:
        #: per job, twice its target timeout plus STUCK_MARGIN.
        self.stuck_timeout: float | None = None
        #: Exceptions the pump caught while handling one message or watching children.
        self.pump_errors = 0
        self._pump_error = ""  # why the pump thread ended, if it ended on its own
        try:
            self.sup = self._create_queue(self.names.supervisor_queue, SUPERVISOR_RECEIVES)
        except BaseException:
            self.record.remove()
            raise
        self._pump_stop = threading.Event()
        self._pump = threading.Thread(target=self._pump_loop, name="shmblock-pump", daemon=True)
        self._pump.start()

    # -- shared objects -------------------------------------------------------------

    def _create_queue(self, name: str, kinds: tuple[type[protocol.Message], ...],
                      small: bool = False) -> Queue:
        """Create (and record) a queue; ``small``: a writer's own, see shmblock.transport."""
        self.record.queues.append(name)
        self.record.save()
        queue = Queue.create(name, kinds, WRITER_QUEUE_MESSAGES, WRITER_QUEUE_BYTES) \
            if small else Queue.create(name, kinds)
        self._queues.append(queue)
        return queue

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
        self.record.segments += [meta] if backing_file else [meta, data]
        self.record.save()
        device = Device.create(meta, data, geometry, self.names.run_id, backing_file, prefault)
        handle = DeviceHandle(self, name, device, io_writer=max_writers)
        self.devices[name] = handle
        self._next_writer[name] = 0
        return handle

    # -- processes ----------------------------------------------------------------------

    def _spawn(self, module: str, args: list[str], secret: str | None = None
               ) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        # Workers must import our packages from wherever this process did, and never from
        # the caller's working directory (untrusted: a planted workers/guest.py or
        # numpy.py would run as the user). `python -P` (3.11) keeps the working directory
        # off sys.path; relative PYTHONPATH entries (and empty ones, which mean the
        # working directory) would put it back, so only absolute ones are passed on.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if os.path.isabs(p)]
        env["PYTHONPATH"] = os.pathsep.join([root, *inherited])
        # So a worker can tell that we died before it got going (workers.common).
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        argv = [sys.executable, "-P", "-m", module, "--run", self.names.run_id,
                "--prefix", self.names.prefix, *args]
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL if secret is None else subprocess.PIPE,
            start_new_session=False)
        if proc.stdin is not None:
            # The worker's token goes through a pipe: argv is readable by every user in
            # /proc, the environment by every process of ours for the worker's whole
            # life; the pipe is empty once the worker has read it. A write of a few
            # bytes to a fresh pipe never blocks; a child that already died is its own
            # error (it never says Ready).
            with contextlib.suppress(OSError):
                proc.stdin.write(f"{secret}\n".encode())
            with contextlib.suppress(OSError):
                proc.stdin.close()
        # Pid, start time and command line: what `cleanup` checks before it kills.
        self.record.add_child(proc.pid, argv)
        return proc

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
            control = self._create_queue(self.names.writer_control_queue(device.name, ident),
                                         WRITER_CONTROL_RECEIVES, small=True)
            reply = self._create_queue(self.names.writer_reply_queue(device.name, ident),
                                       WRITER_REPLY_RECEIVES, small=True)
            token = secrets.token_hex(16)
            proc = self._spawn("workers.guest", [
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
            if not self._wait_ready("writer", w.ident, w.proc, deadline):
                raise PeerGone(f"guest writer {w.ident} did not start (exit code "
                               f"{w.proc.poll()})")
            w.ready = True
        return started

    def _wait_ready(self, role: str, ident: int, proc: subprocess.Popen[bytes],
                    deadline: float) -> bool:
        """Wait for the Ready of ``proc``; False if it exits, times out or the pump died.

        A Ready counts only when it names the pid of ``proc``: anyone can write to the
        supervisor queue, and a forged Ready would have the job started before its
        worker listens.
        """
        with self._cond:
            while self._ready.get((role, ident)) != proc.pid:
                if (role, ident) in self._ready:
                    pid = self._ready.pop((role, ident))
                    self.sup.rejected += 1
                    log.warning("supervisor queue: ignored Ready for %s %d from pid %d, "
                                "not %d", role, ident, pid, proc.pid)
                    continue
                if proc.poll() is not None or time.monotonic() > deadline \
                        or self._pump_failure():
                    return False
                self._cond.wait(0.05)
            self._ready.pop((role, ident))
        return True

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

    @contextlib.contextmanager
    def freeze(self, devices: list[DeviceHandle]) -> Iterator[float]:
        """Quiesce every writer of ``devices``: no write is in flight inside the block.

        Yields the monotonic time the last writer froze. Raises PeerGone when a live
        writer does not answer within FREEZE_TIMEOUT (everyone is thawed again).

        Each device gets its own epoch: writer numbers are per device and a Frozen names
        only (epoch, writer), so with one epoch writer 0 of one device would answer for
        writer 0 of the other. Only a Frozen for an epoch being frozen counts (see
        :meth:`_dispatch`), so one sent ahead of time cannot answer for a writer either.
        """
        epochs = {h: next(self._epoch) for h in devices}
        with self._cond:
            self._freezing.update({epoch: h for h, epoch in epochs.items()})
        gates = [h.gate for h in devices]
        for g in gates:
            g.acquire()
        asked: list[WriterProcess] = []
        try:
            for w in self.writers:
                if w.device in epochs and w.alive:
                    w.control.send(protocol.Freeze(epoch=epochs[w.device], token=w.token),
                                   timeout=1.0)
                    asked.append(w)
            # Bump the hint only after the messages are queued (see workers.guest).
            for h, epoch in epochs.items():
                h.device.ctl[L.CTL_EPOCH] = epoch
            deadline = time.monotonic() + FREEZE_TIMEOUT
            with self._cond:
                while True:
                    waiting = [w for w in asked
                               if (epochs[w.device], w.ident) not in self._frozen and w.alive]
                    if not waiting:
                        break
                    if time.monotonic() > deadline:
                        raise PeerGone(f"guest writer {waiting[0].ident} did not freeze "
                                       f"within {FREEZE_TIMEOUT:.0f} s")
                    if failure := self._pump_failure():
                        # Nobody would ever record the Frozen answers.
                        raise PeerGone(f"cannot freeze the writers: {failure}")
                    self._cond.wait(0.001)
            yield time.monotonic()
        finally:
            for w in asked:
                with contextlib.suppress(ShmblockError):
                    w.control.send(protocol.Thaw(epoch=epochs[w.device], token=w.token),
                                   timeout=1.0)
            with self._cond:
                for epoch in epochs.values():
                    self._freezing.pop(epoch, None)
                self._frozen = {k for k in self._frozen if k[0] not in epochs.values()}
            for g in gates:
                g.release()

    # -- backups --------------------------------------------------------------------------

    def backup(self, device: DeviceHandle, target: str, **options: Any) -> BackupJob:
        """Create a backup job and take its snapshot now; returns once it is running.

        Same options as :meth:`create_backup`. Raises UsageError for bad arguments and
        JobError when the job cannot start; the device is untouched then.
        """
        job = self.create_backup(device, target, **options)
        job.start()
        return job

    def create_backup(self, device: DeviceHandle, target: str, *, format: str | None = None,
                      sync: str = "full", speed: int = 0, cbw_mode: str = "stage",
                      cbw_timeout: float = 5.0, on_cbw_error: str = "break-guest-write",
                      backing_file: str | None = None, backing_format: str | None = None,
                      verify: bool = False, reference_image: str | None = None,
                      chunk: int = DEFAULT_CHUNK, target_timeout: float = 30.0,
                      job_id: str | None = None,
                      on_event: Callable[[JobEvent], None] | None = None) -> BackupJob:
        """Prepare a backup job: start its worker, open the target; no snapshot yet.

        The job stays ``created`` until :meth:`BackupJob.start` takes the snapshot, so
        the slow parts (process start, target connection, verification buffers) happen
        before the instant that matters. Raises UsageError for bad arguments and
        JobError when the target cannot be opened or the worker does not start.
        """
        self._require_open()
        if sync not in SYNC_MODES:
            raise UsageError(
                f"unknown sync mode {sync!r} (expected one of {', '.join(SYNC_MODES)})")
        if sync == "incremental":
            raise UsageError("sync=incremental needs dirty bitmaps, which this version "
                             "does not manage yet")
        if cbw_mode not in L.CBW_MODES:
            raise UsageError(f"unknown cbw mode {cbw_mode!r} (expected stage or request)")
        if on_cbw_error not in L.ON_CBW_ERROR:
            raise UsageError(f"unknown on-cbw-error {on_cbw_error!r} (expected "
                             f"{' or '.join(L.ON_CBW_ERROR)})")
        if cbw_timeout <= 0:
            raise UsageError("the copy-before-write timeout must be positive")
        check_speed(speed)
        if not 0 < target_timeout <= 1e9:  # also refuses NaN
            raise UsageError(f"target timeout {target_timeout!r} must be positive, in seconds")
        if any(not j.tracker.concluded for j in self.jobs.values() if j.device is device):
            raise JobError(f"device {device.name} already has a backup job")
        spec = TargetSpec.parse(target, format, backing_file, backing_format)
        # Before anything starts: no output may be a device's file, another output or a
        # running job's file (shmblock.paths).
        busy = []
        for j in self.jobs.values():
            if not j.tracker.concluded and j.spec.format != "nbd":
                busy.append((f"job {j.job}'s target", j.spec.target))
            if not j.tracker.concluded and j.capture and j.capture.reference_image:
                busy.append((f"job {j.job}'s reference image", j.capture.reference_image))
        check_backup_paths(
            None if spec.format == "nbd" else spec.target, reference_image, busy=busy,
            inputs=[(f"the file of device {h.name}", h.device.backing_file)
                    for h in self.devices.values() if h.device.backing_file])
        if verify or reference_image:  # refused before a worker starts, not OOM-killed later
            check_capture_memory(device.device.size)
        job_id = job_id or f"job{next(self._job_ids)}"
        if not NAME_RE.match(job_id) or job_id in self.jobs:
            raise UsageError(f"job id {job_id!r} must be new and 1-32 of [A-Za-z0-9_.-]")
        if on_event is None and self._on_event is not None:
            engine_hook = self._on_event
            on_event = lambda event: engine_hook(job_id, event)  # noqa: E731
        tracker = JobTracker(job_id, on_event)
        token = secrets.token_hex(16)
        self._job_tokens[job_id] = token  # before the spawn: the worker may fail at once
        queue = device.backup_queue()
        parts = [p + PART_SUFFIX for p in (None if spec.format == "nbd" else spec.target,
                                           reference_image) if p]
        for part in parts:  # recorded before they exist, for `cleanup`
            self.record.add_part(part)
        args = ["--meta", device.device.meta_name, "--device", device.name, "--job", job_id,
                "--target", spec.target, "--format", spec.format, "--sync", sync,
                "--speed", str(speed), "--chunk", str(chunk),
                "--target-timeout", str(target_timeout)]
        if backing_file:
            args += ["--backing-file", backing_file]
        if backing_format:
            args += ["--backing-format", backing_format]
        proc = self._spawn("workers.backup", args, secret=token)
        job = BackupJob(self, job_id, device, spec, sync, proc, queue, tracker, speed=speed,
                        cbw_mode=cbw_mode, cbw_timeout=cbw_timeout, on_cbw_error=on_cbw_error,
                        stuck_timeout=self.stuck_timeout if self.stuck_timeout is not None
                        else 2 * target_timeout + STUCK_MARGIN, token=token)
        self.jobs[job_id] = job
        if not self._wait_ready("backup", 0, proc, time.monotonic() + READY_TIMEOUT):
            reason = self._pending_failures.pop(job_id, "") or self._pump_failure()
            if not reason:
                reason = f"the backup worker exited with code {proc.poll()}" \
                    if proc.poll() is not None else "the backup worker did not start in time"
            tracker.conclude(Outcome.FAILED, reason)
            job.wait(STOP_TIMEOUT)
            raise JobError(f"backup of {device.name} to {spec.target} could not start: {reason}")
        if spec.format != "nbd":  # the worker has created its .part: remember which inode
            with contextlib.suppress(OSError):
                st = os.lstat(parts[0])
                self.record.part_created(parts[0], (st.st_dev, st.st_ino))
        if verify or reference_image:
            job.capture = SnapshotCapture(device.device, reference_image,
                                          on_part_created=self.record.part_created)
        return job

    def _take_snapshot(self, job: BackupJob) -> None:
        """Freeze the writers, initialise the maps for the sync mode, thaw, start copying."""
        dev = job.device.device
        ctl = dev.ctl
        ctl[L.CTL_CBW_MODE] = L.CBW_MODES.index(job.cbw_mode)
        ctl[L.CTL_CBW_TIMEOUT_US] = int(job.cbw_timeout * 1e6)
        ctl[L.CTL_ON_CBW_ERROR] = L.ON_CBW_ERROR.index(job.on_cbw_error)
        ctl[L.CTL_BROKEN] = 0
        ctl[L.CTL_DONE_BYTES] = 0
        capture = job.capture
        # Built before the freeze: a message that cannot be built (a bad speed) must
        # fail before the snapshot, not leave a snapshot that no worker copies.
        start = protocol.JobStart(job=job.job, sync=job.sync, speed=job.speed, token=job.token)
        try:
            t0 = time.monotonic()
            copy_s = 0.0
            with self.freeze([job.device]):
                dev.slot_state[:] = L.SLOT_FREE
                dev.saved[:] = 0
                if job.sync == "top":
                    np.copyto(dev.needs_copy, dev.allocated)
                else:
                    dev.needs_copy[:] = 1
                ctl[L.CTL_TOTAL_BYTES] = 0 if job.sync == "none" else \
                    int(np.count_nonzero(dev.needs_copy)) * dev.cluster_size
                if capture is not None:
                    c0 = time.monotonic()
                    capture.capture()
                    copy_s = time.monotonic() - c0
                if job.sync in ("full", "top"):
                    job.covered = dev.needs_copy != 0
                ctl[L.CTL_JOB_SEQ] += 1
                job.seq = int(ctl[L.CTL_JOB_SEQ])
                ctl[L.CTL_JOB_ACTIVE] = 1
                # What the writers feel, reported apart from the verification copy
                # (which grows with the device and is only there when asked for).
                job.verify_copy_s = copy_s
                job.freeze_s = time.monotonic() - t0 - copy_s
            # Digests first, JobStart after: an exception in between (Ctrl-C raises
            # wherever shmblock-run's main thread is) must not leave a job running
            # whose snapshot nobody digests.
            if capture is not None:
                capture.finish_async()
            # A worker that never gets JobStart would leave the writers saving
            # clusters that nobody copies: undo the snapshot if it cannot be sent.
            job.queue.send(start, timeout=5.0)
        except BaseException:
            dev.needs_copy[:] = 0
            dev.slot_state[:] = L.SLOT_FREE
            ctl[L.CTL_JOB_ACTIVE] = 0
            job.cancel()
            raise
        with contextlib.suppress(StateError):  # the worker may have failed already
            job.tracker.apply("start", "running")
        if job.tracker.concluded:
            # The worker ended (died) while the snapshot was taken; its end may have
            # been handled before the maps were set, and nobody would copy them now.
            with job._end_lock:
                if ctl[L.CTL_JOB_ACTIVE] and int(ctl[L.CTL_JOB_SEQ]) == job.seq:
                    dev.needs_copy[:] = 0
                    dev.slot_state[:] = L.SLOT_FREE
                    ctl[L.CTL_JOB_ACTIVE] = 0

    def _end_job(self, job: BackupJob, outcome: Outcome) -> None:
        """Make sure a job that ends with ``outcome`` leaves writers free and no partial file.

        Runs once per job: the pump calls it *before* it concludes the job, so whoever
        sees a concluded job sees the device released, and a later call (from
        :meth:`BackupJob.wait`, however late) does nothing. It would otherwise clear the
        map of the device's next job, or delete that job's partial file when it writes
        to the same target. The map is only touched if no newer job has started.
        """
        with job._end_lock:
            if job._ended:
                return
            job._ended = True
            dev = job.device.device
            if not dev.closed and dev.ctl[L.CTL_JOB_ACTIVE] and \
                    int(dev.ctl[L.CTL_JOB_SEQ]) == job.seq:
                # The worker died without clearing the map (SIGKILL): do it for it.
                # Writers still waiting for it go ahead: no save of theirs failed.
                dev.ctl[L.CTL_JOB_RELEASED] = job.seq
                dev.needs_copy[:] = 0
                dev.slot_state[:] = L.SLOT_FREE
                dev.ctl[L.CTL_JOB_ACTIVE] = 0
            if job.spec.format in ("raw", "qcow2") and outcome is not Outcome.COMPLETED:
                # Only if it is still the .part our worker created (not another job's).
                self.record.discard_part(job.spec.target + PART_SUFFIX)

    # -- the pump ---------------------------------------------------------------------------

    def _pump_loop(self) -> None:
        """Receive the supervisor queue and watch the children until told to stop.

        No single message may end this loop: an exception while handling one is logged
        and counted (:attr:`pump_errors`) and the loop goes on. If the loop ends anyway
        (the queue vanished, or something no handler catches), every job still running
        is failed at once: nobody else would ever conclude it, and every wait would
        hang. Waits also check :meth:`_pump_failure` themselves.
        """
        try:
            while not self._pump_stop.is_set():
                try:
                    msg = self.sup.receive(PUMP_INTERVAL)
                except TransportError as exc:
                    if self._pump_stop.is_set():
                        return
                    raise PeerGone(f"the supervisor queue failed: {exc}") from exc
                if msg is not None:
                    self._guarded(self._dispatch, msg)
                self._guarded(self._watch_children)
        except BaseException as exc:
            self._pump_error = protocol.short_error(
                f"the supervisor's message pump stopped ({type(exc).__name__}: {exc})")[:300]
            log.critical("%s", self._pump_error, exc_info=True)
            with contextlib.suppress(Exception):
                self._fail_jobs(self._pump_error)
            with self._cond:
                self._cond.notify_all()
            # Not re-raised: the thread ends here either way, and the jobs already say why.

    def _guarded(self, handler: Callable[..., None], *args: Any) -> None:
        """Run one pump step; an Exception from it is logged and counted, not fatal."""
        try:
            handler(*args)
        except Exception:
            self.pump_errors += 1
            if self.pump_errors <= 10 or self.pump_errors % 1000 == 0:
                log.exception("supervisor pump: error #%d in %s (carrying on)",
                              self.pump_errors, getattr(handler, "__name__", "a handler"))

    def _pump_failure(self) -> str:
        """Why the pump is not running ('' while it runs, or after close stopped it)."""
        if self._pump.is_alive() or self._pump_stop.is_set():
            return ""
        return self._pump_error or "the supervisor's message pump is not running"

    def _fail_jobs(self, reason: str) -> None:
        """Fail every job not concluded yet: kill its worker, free the device."""
        for job in list(self.jobs.values()):
            if job.tracker.concluded:
                continue
            if job.proc.poll() is None:
                job.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    job.proc.wait(STOP_TIMEOUT)
            self._end_job(job, Outcome.FAILED)
            job.tracker.conclude(Outcome.FAILED, reason)

    def _dispatch(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Frozen):
            with self._cond:
                device = self._freezing.get(msg.epoch)
                writer = next((w for w in self.writers
                               if w.device is device and w.ident == msg.writer), None)
                # Only the writer itself knows its token: a Frozen forged by another
                # process would let the snapshot start while that writer still writes.
                if writer is not None and hmac.compare_digest(msg.token, writer.token):
                    self._frozen.add((msg.epoch, msg.writer))
                    self._cond.notify_all()
                    return
            if device is None:
                # Late (its freeze gave up) or never asked for: counting it could let a
                # later freeze skip a writer that is still writing.
                self._reject(msg, f"epoch {msg.epoch} is not being frozen")
            else:
                self._reject(msg, f"it is not from writer {msg.writer} of {device.name} "
                                  "(no such writer, or not its token)")
        elif isinstance(msg, protocol.Ready):
            with self._cond:
                self._ready[(msg.role, msg.ident)] = msg.pid
                self._cond.notify_all()
        elif isinstance(msg, protocol.WriterDone):
            known = False
            for w in self.writers:
                if w.ident == msg.writer:
                    w.done, w.ok, w.error = True, msg.ok, msg.error
                    known = True
            if not known:
                self._reject(msg, f"this run has no writer {msg.writer}")
        elif isinstance(msg, protocol.JobProgress | protocol.JobCompleted | protocol.JobFailed
                        | protocol.JobCancelled):
            # Any process of this user can write to the supervisor queue; only the job's
            # own worker knows its token (handed over on its stdin at spawn).
            token = self._job_tokens.get(msg.job)
            if token is None:
                self._reject(msg, f"this run has no job {msg.job!r}")
                return
            if not hmac.compare_digest(msg.token, token):
                self._reject(msg, f"it does not carry the token of job {msg.job!r}, so it "
                                  "is not from that job's worker")
                return
            job = self.jobs.get(msg.job)
            if job is None:
                if isinstance(msg, protocol.JobFailed):
                    # A worker can fail before create_backup has registered its job.
                    self._pending_failures[msg.job] = msg.error
                return
            t = job.tracker
            if isinstance(msg, protocol.JobProgress):
                t.progress(msg.done, msg.total)
            elif isinstance(msg, protocol.JobCompleted):
                t.progress(t.total or int(job.device.device.ctl[L.CTL_TOTAL_BYTES]),
                           t.total or int(job.device.device.ctl[L.CTL_TOTAL_BYTES]))
                if not t.concluded:
                    self._end_job(job, Outcome.COMPLETED)
                t.conclude(Outcome.COMPLETED, bytes_written=msg.bytes_written,
                           clusters_copied=msg.clusters_copied, cbw_clusters=msg.cbw_clusters)
            elif isinstance(msg, protocol.JobFailed):
                if t.state is JobState.CREATED:
                    self._pending_failures[msg.job] = msg.error
                if not t.concluded:
                    self._end_job(job, Outcome.FAILED)
                t.conclude(Outcome.FAILED, msg.error)
            else:
                if not t.concluded:
                    self._end_job(job, Outcome.CANCELLED)
                t.conclude(Outcome.CANCELLED)
        else:
            self._reject(msg, "not a message the supervisor receives")

    def _reject(self, msg: protocol.Message, why: str) -> None:
        """Count and log a well-formed message that the supervisor cannot act on.

        Like a malformed one (:class:`~shmblock.transport.Queue` counts those in the
        same counter), it is a peer's mistake: logged, counted, and otherwise ignored.
        """
        self.sup.rejected += 1
        log.warning("supervisor queue: ignored %s: %s", type(msg).__name__, why)

    def _watch_children(self) -> None:
        now_ns = time.monotonic_ns()
        for job in list(self.jobs.values()):
            t = job.tracker
            if t.concluded:
                continue
            code = job.proc.poll()
            if code is not None:
                # Give a final message already in the queue a chance to arrive first.
                for msg in self.sup.drain():
                    self._guarded(self._dispatch, msg)
                if not t.concluded:
                    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                    self._end_job(job, Outcome.FAILED)
                    t.conclude(Outcome.FAILED, f"the backup worker died ({how})")
                continue
            ctl = job.device.device.ctl
            # A worker that never beat for this job (stuck before its first loop) is
            # measured from the job's start, as is one whose last beat is an older job's.
            beat = max(int(ctl[L.CTL_HEARTBEAT_NS]), int(t.running_since * 1e9))
            if t.state is not JobState.CREATED and now_ns - beat > job.stuck_timeout * 1e9:
                log.error("backup worker of %s stopped beating: killing it", job.job)
                job.proc.kill()
                job.proc.wait()
                self._end_job(job, Outcome.FAILED)
                t.conclude(Outcome.FAILED, f"the backup worker stopped responding for "
                                           f"{job.stuck_timeout:g} s and was killed")

    # -- lifecycle --------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._closed:
            raise StateError("the engine is closed", "closed", ("open",))
        if failure := self._pump_failure():
            raise PeerGone(f"this engine cannot run anything any more: {failure}")

    def close(self) -> None:
        """Stop every process and remove every shared object of the run. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for job in self.jobs.values():
                if not job.tracker.concluded:
                    job.cancel()
            for job in self.jobs.values():
                with contextlib.suppress(JobError):
                    job.wait(STOP_TIMEOUT)
                if job.proc.poll() is None:
                    job.proc.kill()
                    job.proc.wait()
            self.stop_writers()
        finally:
            self._pump_stop.set()
            if self._pump.is_alive() and self._pump is not threading.current_thread():
                self._pump.join(2.0)
            for h in self.devices.values():
                with contextlib.suppress(ShmblockError):
                    h.close()
            for q in self._queues:
                q.close()
                q.unlink()
            for h in self.devices.values():
                h.device.unlink()
                with contextlib.suppress(ShmblockError):
                    h.device.close()
            self.record.discard_parts()
            self.record.remove()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
