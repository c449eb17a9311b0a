"""A backup job's options: one validated, frozen object, and the worker's argv contract.

:class:`BackupOptions` is built once (by :meth:`Engine.create_backup
<shmblock.engine.Engine.create_backup>` or by the CLI, which builds it before anything
runs so that a bad option is exit code 2) and checked on construction: every problem is
a :class:`~shmblock.errors.UsageError` naming the option.

What travels to the backup worker travels once:

* its command line (:class:`WorkerOptions`, :meth:`~WorkerOptions.to_argv` /
  :meth:`~WorkerOptions.from_argv`, defined here and nowhere else): what it needs before
  the snapshot — the device, the job's id, the target, the chunk size, the target's
  timeout;
* ``JobStart`` (protocol): the sync mode and the speed, which the worker needs only
  from the snapshot on, and the speed may change before it (``BackupJob.set_speed``);
* the copy-before-write policy is not sent at all: writers read it from the device's
  control words (:func:`shmblock.snapshot.configure`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from shmblock import layout as L
from shmblock.errors import UsageError
from shmblock.job import OnError, parse_on_error
from shmblock.names import NAME_RE, RunNames
from shmblock.snapshot import BITMAP_MODES, BITMAP_SYNCS, SYNC_MODES
from shmblock.targets import FORMATS, TargetSpec

#: Largest speed a message can carry (a U63 field), in bytes per second.
MAX_SPEED = 2**63 - 1
#: Background copy chunk (bytes) unless told otherwise.
DEFAULT_CHUNK = 1 << 20


def check_speed(speed: int) -> None:
    """Refuse a speed no message can carry (UsageError), before anything is frozen."""
    if not 0 <= speed <= MAX_SPEED:
        raise UsageError(f"speed {speed} must be from 0 (unlimited) to {MAX_SPEED} bytes "
                         "per second")


def check_job_id(job_id: str) -> None:
    """A job id names queues' users and log lines: the run's name alphabet only."""
    if not NAME_RE.match(job_id):
        raise UsageError(f"job id {job_id!r} must be new and 1-32 of [A-Za-z0-9_.-]")


@dataclass(frozen=True, slots=True)
class BackupOptions:
    """Everything a backup job is asked to do; validated on construction (UsageError).

    ``job_id`` None: the engine numbers the job. ``spec`` comes from
    :meth:`TargetSpec.parse`, which checks the target string, format and backing file.
    """

    spec: TargetSpec
    sync: str = "full"
    speed: int = 0
    chunk: int = DEFAULT_CHUNK
    cbw_mode: str = "stage"
    cbw_timeout: float = 5.0
    on_cbw_error: str = "break-guest-write"
    verify: bool = False
    reference_image: str | None = None
    target_timeout: float = 30.0
    job_id: str | None = None
    bitmap: str | None = None
    bitmap_mode: str | None = None
    #: QEMU's job options (qapi/job.json); see :mod:`shmblock.backup_job` for the choice
    #: of defaults (auto-dismiss off: the handle is the caller's, and keeps its result).
    auto_finalize: bool = True
    auto_dismiss: bool = False
    #: QEMU's ``BlockdevOnError`` for background copying: report, ignore, stop, enospc.
    on_source_error: str = "report"
    on_target_error: str = "report"
    #: bytes of the device's copy-before-write buffer this job may use (None: all of it,
    #: 0: the request path only); more than the device has is refused when the job is
    #: created (shmblock.cbw_buffer)
    cbw_buffer: int | None = None

    def __post_init__(self) -> None:
        if self.sync not in SYNC_MODES:
            raise UsageError(
                f"unknown sync mode {self.sync!r} (expected one of {', '.join(SYNC_MODES)})")
        self._check_bitmap()
        if self.cbw_mode not in L.CBW_MODES:
            raise UsageError(f"unknown cbw mode {self.cbw_mode!r} (expected stage or request)")
        if self.on_cbw_error not in L.ON_CBW_ERROR:
            raise UsageError(f"unknown on-cbw-error {self.on_cbw_error!r} (expected "
                             f"{' or '.join(L.ON_CBW_ERROR)})")
        if not self.cbw_timeout > 0:  # also refuses NaN
            raise UsageError("the copy-before-write timeout must be positive")
        check_speed(self.speed)
        if not 0 < self.target_timeout <= 1e9:  # also refuses NaN
            raise UsageError(
                f"target timeout {self.target_timeout!r} must be positive, in seconds")
        if self.chunk <= 0:
            raise UsageError(f"background copy chunk {self.chunk} must be positive")
        if self.cbw_buffer is not None and (
                isinstance(self.cbw_buffer, bool) or not isinstance(self.cbw_buffer, int)
                or self.cbw_buffer < 0):
            raise UsageError(f"cbw-buffer {self.cbw_buffer!r:.40} must be a size in bytes, 0 "
                             "(request path only) or more")
        if self.job_id is not None:
            check_job_id(self.job_id)
        for name in ("auto_finalize", "auto_dismiss"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name.replace('_', '-')} must be true or false, got "
                                 f"{getattr(self, name)!r:.40}")
        for name in ("on_source_error", "on_target_error"):
            try:
                policy = parse_on_error(getattr(self, name))
            except UsageError as exc:
                raise UsageError(f"{name.replace('_', '-')}: {exc}") from None
            object.__setattr__(self, name, policy.value)  # an OnError given: its name
        if self.on_target_error != "report" and not self.spec.is_file:
            # An NBD target acknowledges writes late (pipelined): the write that failed
            # may belong to a chunk already marked copied, which no retry would find.
            raise UsageError(f"on-target-error={self.on_target_error} needs a file target "
                             "(raw or qcow2); an NBD target only supports report")

    def _check_bitmap(self) -> None:
        """QEMU's rules (qapi/block-core.json, BackupCommon): a bitmap for incremental
        and bitmap, allowed with full and top; a mode exactly when there is a bitmap,
        on-success for incremental (its default)."""
        sync, bitmap, mode = self.sync, self.bitmap, self.bitmap_mode
        if mode is not None and mode not in BITMAP_MODES:
            raise UsageError(f"unknown bitmap mode {mode!r} (expected one of "
                             f"{', '.join(BITMAP_MODES)})")
        if bitmap is None:
            if sync in BITMAP_SYNCS:
                raise UsageError(f"sync={sync} needs a bitmap (the dirty bitmap whose "
                                 "clusters it copies)")
            if mode is not None:
                raise UsageError(f"bitmap mode {mode} given without a bitmap")
            return
        if not NAME_RE.match(bitmap):
            raise UsageError(f"bitmap name {bitmap!r} must be 1-32 of [A-Za-z0-9_.-]")
        if sync == "none":
            raise UsageError("sync=none cannot use a bitmap (it copies nothing by itself)")
        if sync == "incremental":
            if mode not in (None, "on-success"):
                raise UsageError(f"sync=incremental is sync=bitmap with bitmap mode "
                                 f"on-success; use sync=bitmap for bitmap mode {mode}")
            object.__setattr__(self, "bitmap_mode", "on-success")  # QEMU's default
        elif mode is None:
            raise UsageError(f"sync={sync} with bitmap {bitmap!r} needs a bitmap mode "
                             f"({', '.join(BITMAP_MODES)})")

    @property
    def wants_capture(self) -> bool:
        """Whether the snapshot is captured (digests, a reference image) at the instant."""
        return self.verify or self.reference_image is not None

    def worker(self, meta: str, device: str, job_id: str) -> WorkerOptions:
        """What the backup worker of this job is started with."""
        return WorkerOptions(meta, device, job_id, self.spec, self.chunk, self.target_timeout,
                             self.on_source_error, self.on_target_error)


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """A backup worker's command line (after the ``--run``/``--prefix`` every worker gets).

    The supervisor writes it with :meth:`to_argv`, the worker reads it with
    :meth:`from_argv`: the contract is this class.
    """

    meta: str
    device: str
    job: str
    spec: TargetSpec
    chunk: int = DEFAULT_CHUNK
    target_timeout: float = 30.0
    on_source_error: str = "report"
    on_target_error: str = "report"

    def to_argv(self) -> list[str]:
        args = ["--meta", self.meta, "--device", self.device, "--job", self.job,
                "--target", self.spec.target, "--format", self.spec.format,
                "--chunk", str(self.chunk), "--target-timeout", repr(self.target_timeout),
                "--on-source-error", self.on_source_error,
                "--on-target-error", self.on_target_error]
        if self.spec.backing_file:
            args += ["--backing-file", self.spec.backing_file]
        if self.spec.backing_format:
            args += ["--backing-format", self.spec.backing_format]
        return args

    @classmethod
    def from_argv(cls, argv: list[str]) -> tuple[RunNames, WorkerOptions]:
        """Parse a worker's argv (argparse: exit code 2 and one line on a bad one).

        The target was validated by the supervisor (:meth:`TargetSpec.parse`, which also
        looks at the file system); here it is only taken apart.
        """
        p = argparse.ArgumentParser(prog="workers.backup")
        p.add_argument("--run", required=True)
        p.add_argument("--prefix", required=True)
        p.add_argument("--meta", required=True)
        p.add_argument("--device", required=True)
        p.add_argument("--job", required=True)
        p.add_argument("--target", required=True)
        p.add_argument("--format", required=True, choices=FORMATS)
        p.add_argument("--backing-file")
        p.add_argument("--backing-format")
        p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
        p.add_argument("--target-timeout", type=float, default=30.0)
        policies = [policy.value for policy in OnError]
        p.add_argument("--on-source-error", default="report", choices=policies)
        p.add_argument("--on-target-error", default="report", choices=policies)
        a = p.parse_args(argv)
        spec = TargetSpec(a.target, a.format, a.backing_file, a.backing_format)
        return RunNames(a.run, a.prefix), cls(a.meta, a.device, a.job, spec, a.chunk,
                                              a.target_timeout, a.on_source_error,
                                              a.on_target_error)
