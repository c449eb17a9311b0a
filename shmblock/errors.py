"""The exception tree of shmblock.

Every error the engine raises on purpose derives from :class:`ShmblockError`, so a
program can catch the whole family with one clause::

    ShmblockError
     ├── UsageError                 bad argument or option (CLI exit code 2)
     ├── DeviceError                creating, attaching or sizing a device
     │    ├── NoSpaceError          /dev/shm (or the backing file system) too small
     │    └── AttachError           a name that is missing, stale or not ours
     ├── TransportError             a message queue misbehaved
     │    ├── QueueTimeout          a send or receive did not finish in time
     │    └── QueueClosed           this end was closed by us (we closed it)
     ├── PeerGone                   the process on the other side died (something broke it)
     ├── TargetError                a backup target failed
     │    ├── TargetUnreachable     connect / open failed (refused, no such export, ENOENT)
     │    ├── TargetTooSmall        target smaller than the device
     │    ├── TargetReadOnly        the target refuses writes
     │    └── TargetIOError         a write, flush or read-back failed (EIO, ENOSPC, EOF)
     ├── CopyBeforeWriteError       a guest write could not save the old contents in time
     ├── JobError                   a backup job failed, was cancelled, or misused
     │    ├── StateError            a job method called in a state that does not allow it
     │    └── JobCancelled          waiting on a job that was cancelled
     ├── VerificationError          the backup does not match the snapshot
     └── BitmapError                a dirty bitmap or its store cannot be used
          ├── BitmapInconsistent    the bitmap cannot be trusted (the reason says why)
          └── BitmapBusy            in use by a job, or the store is open by a live run

Low-level errors (``OSError``, ``posix_ipc.Error``) are wrapped into the most specific of
these with ``raise ... from exc`` so the cause stays visible in tracebacks.
"""

from __future__ import annotations


class ShmblockError(Exception):
    """Root of every error shmblock raises on purpose."""


class UsageError(ShmblockError, ValueError):
    """A bad argument: a size that does not parse, an unknown option value."""


class DeviceError(ShmblockError):
    """Creating, attaching or sizing a shared-memory device failed."""


class NoSpaceError(DeviceError):
    """Not enough room in /dev/shm (or on the file system of a file-backed device)."""


class AttachError(DeviceError):
    """A name that does not exist, was left by another run, or has a bad header."""


class TransportError(ShmblockError):
    """A message queue operation failed."""


class QueueTimeout(TransportError, TimeoutError):
    """A queue send or receive did not complete before its deadline."""


class QueueClosed(TransportError):
    """The queue was closed by this process; it cannot be used any more."""


class PeerGone(ShmblockError):
    """The process on the other end died or stopped answering (something broke it)."""


class TargetError(ShmblockError):
    """A backup target failed."""


class TargetUnreachable(TargetError):
    """The target could not be opened or connected to."""


class TargetTooSmall(TargetError):
    """The target is smaller than the device it should hold."""


class TargetReadOnly(TargetError):
    """The target refuses writes."""


class TargetIOError(TargetError):
    """A write, flush or read-back on the target failed."""


class CopyBeforeWriteError(ShmblockError):
    """A guest write could not have the old contents of a cluster saved in time.

    Raised to the guest under the ``break-guest-write`` policy; the device is unchanged
    by the failed write.
    """


class JobError(ShmblockError):
    """A backup job failed or was used wrongly."""


class StateError(JobError):
    """A job method was called in a state that does not allow it."""

    def __init__(self, message: str, state: str, required: tuple[str, ...], *,
                 job: str = "", verb: str = "") -> None:
        super().__init__(message)
        self.state = state
        self.required = required
        self.job = job  # set by the job lifecycle (shmblock.job): which job refused
        self.verb = verb  # ... and which command verb


class JobCancelled(JobError):
    """The job was cancelled before it completed."""


class VerificationError(ShmblockError):
    """The backup target does not hold the snapshot."""


class BitmapError(ShmblockError):
    """A dirty bitmap, or the persistent store that holds it, cannot be used."""


class BitmapInconsistent(BitmapError):
    """The bitmap cannot be trusted (``reason`` says why); remove it or take a full backup."""

    def __init__(self, message: str, name: str, reason: str) -> None:
        super().__init__(message)
        self.name = name
        self.reason = reason


class BitmapBusy(BitmapError):
    """The bitmap is in use by a job, or its store is open by another live run."""


class Terminated(Exception):
    """A worker process was asked to stop (SIGTERM, or its supervisor died).

    Not a :class:`ShmblockError`: nothing went wrong with the engine. Raised by the
    worker processes' signal handler (``workers.common``) wherever they are, so the engine
    code they run (:mod:`shmblock.backup_loop`) lets it through every catch-all.
    """
