"""Exclusive per-cluster claims that the kernel drops when their holder dies.

A claim on clusters ``[c, c+n)`` is an open-file-description (OFD) write lock on bytes
``[c, c+n)`` of the device's metadata segment (fcntl(2), ``F_OFD_SETLK``). Byte-range
locks need not lie inside the file, so one lock byte per cluster costs nothing. OFD locks
belong to the open file, not to the process, so two :class:`Claims` objects in one
process (two threads, or a guest handle beside another) exclude each other too; and the
kernel releases them when the file is closed, including when the holder is killed —
which is what DESIGN.md invariant 2 asks for.

Acquiring never blocks in the kernel (a stuck holder must not hang us): :meth:`try_claim`
is one non-blocking fcntl; :meth:`claim` retries it with a short back-off until a
deadline and then raises :class:`~shmblock.errors.CopyBeforeWriteError`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

import posix_ipc

from shmblock.errors import CopyBeforeWriteError, DeviceError

# struct flock on Linux (x86-64, aarch64): short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid, padded to 32 bytes. l_pid must be 0 for OFD locks.
_FLOCK = struct.Struct("@hhqqi4x")
_SETLK = fcntl.F_OFD_SETLK


class Claims:
    """One open file description of the metadata segment, for taking cluster claims."""

    def __init__(self, meta_name: str) -> None:
        try:
            shm = posix_ipc.SharedMemory(meta_name)
        except posix_ipc.ExistentialError as exc:
            raise DeviceError(f"no device {meta_name!r} to take claims on") from exc
        self._fd: int | None = os.dup(shm.fd)
        shm.close_fd()

    def _fcntl(self, kind: int, cluster: int, count: int) -> bool:
        if self._fd is None:
            raise DeviceError("claims handle is closed")
        arg = _FLOCK.pack(kind, os.SEEK_SET, cluster, count, 0)
        try:
            fcntl.fcntl(self._fd, _SETLK, arg)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def try_claim(self, cluster: int, count: int = 1) -> bool:
        """Claim ``[cluster, cluster+count)`` if nobody holds any of it; never blocks."""
        return self._fcntl(fcntl.F_WRLCK, cluster, count)

    def claim(self, cluster: int, count: int, deadline: float) -> None:
        """Claim, retrying until ``deadline`` (time.monotonic()); raises on timeout."""
        if self._fcntl(fcntl.F_WRLCK, cluster, count):
            return
        pause = 20e-6
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise CopyBeforeWriteError(
                    f"cluster {cluster} stayed claimed by another process past the "
                    "copy-before-write timeout"
                )
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 1e-3)
            if self._fcntl(fcntl.F_WRLCK, cluster, count):
                return

    def release(self, cluster: int, count: int = 1) -> None:
        """Drop the claim on ``[cluster, cluster+count)``."""
        self._fcntl(fcntl.F_UNLCK, cluster, count)

    def close(self) -> None:
        """Close the file; the kernel drops every claim still held. Idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
