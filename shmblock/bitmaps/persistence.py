"""The persistence layer under the durable region map: a small interface and two backends.

Only the region map (the write-intent log, see :mod:`shmblock.bitmaps`) goes through this
interface: it is the one structure whose *durability order* matters (a region's byte must
be on stable storage before any write it covers can be), so a test must be able to model
the disk as exactly what was made durable.

:class:`FilePersistence`
    A real file: ``pwrite`` into the page cache, ``fdatasync`` to make it durable.
:class:`VolatileDisk`
    The test double. ``write`` lands in a "page cache"; ``sync`` copies it to the
    "disk"; :meth:`VolatileDisk.power_loss` throws away everything not synced (or, for
    an adversarial model, keeps a chosen subset of the unsynced writes, as a real page
    cache may have written some of them back on its own).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Protocol

from shmblock.errors import BitmapError


class Persistence(Protocol):
    """A byte store with an explicit durability point.

    ``read`` returns what a reader sees now (the page cache); ``write`` changes it;
    only ``sync`` promises that what was written so far survives a power loss.
    """

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def sync(self) -> None: ...

    def size(self) -> int: ...

    def close(self) -> None: ...


def _os_error(path: str, what: str, exc: OSError) -> BitmapError:
    return BitmapError(f"{path}: cannot {what}: {exc.strerror or exc}")


class FilePersistence:
    """A regular file: ``pwrite`` / ``pread`` / ``fdatasync``.

    Opened with ``O_NOFOLLOW``: a symlink planted where the region map should be is
    refused (DESIGN.md threat model).
    """

    def __init__(self, path: str, create_size: int | None = None) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        if create_size is not None:
            flags |= os.O_CREAT | os.O_EXCL
        try:
            self._fd: int | None = os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BitmapError(f"{path}: is a symlink; refusing to use it") from exc
            raise _os_error(path, "open", exc) from exc
        if create_size is not None:
            try:
                os.ftruncate(self._fd, create_size)
            except OSError as exc:
                self.close()
                raise _os_error(path, "size", exc) from exc

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise BitmapError(f"{self.path}: the region map is closed")
        return self._fd

    def read(self, offset: int, size: int) -> bytes:
        try:
            return os.pread(self.fd, size, offset)
        except OSError as exc:
            raise _os_error(self.path, "read", exc) from exc

    def write(self, offset: int, data: bytes) -> None:
        try:
            done = os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise _os_error(self.path, "write", exc) from exc
        if done != len(data):
            raise BitmapError(f"{self.path}: short write ({done} of {len(data)} bytes)")

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise _os_error(self.path, "fdatasync", exc) from exc

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class VolatileDisk:
    """Test double: a disk that holds only what was synced.

    Writes since the last sync are kept in order (``pending``), so :meth:`power_loss`
    can drop all of them (the model the issue asks for) or keep any subset a ``keep``
    predicate picks (a page cache that wrote some back early). ``syncs`` counts
    durability points. ``before_op("write" | "sync")`` runs before each operation takes
    effect: a test records the order of events across layers with it, or raises from it
    to cut the power in the middle of an operation.
    """

    def __init__(self, initial: bytes = b"",
                 before_op: Callable[[str], None] | None = None) -> None:
        self.durable = bytearray(initial)
        self.cache = bytearray(initial)
        self.pending: list[tuple[int, bytes]] = []
        self.syncs = 0
        self.before_op = before_op
        self.closed = False

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.cache[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        if self.before_op is not None:
            self.before_op("write")
        end = offset + len(data)
        if end > len(self.cache):
            self.cache.extend(bytes(end - len(self.cache)))
        self.cache[offset:end] = data
        self.pending.append((offset, bytes(data)))

    def sync(self) -> None:
        if self.before_op is not None:
            self.before_op("sync")
        self.durable = bytearray(self.cache)
        self.pending.clear()
        self.syncs += 1

    def size(self) -> int:
        return len(self.cache)

    def close(self) -> None:
        self.closed = True

    def power_loss(self, keep: Callable[[int], bool] | None = None) -> bytes:
        """The disk after a power loss: the synced bytes, plus the unsynced writes
        ``keep(i)`` picks (none by default), applied in their original order."""
        disk = bytearray(self.durable)
        for i, (offset, data) in enumerate(self.pending):
            if keep is not None and keep(i):
                end = offset + len(data)
                if end > len(disk):
                    disk.extend(bytes(end - len(disk)))
                disk[offset:end] = data
        self.durable = bytearray(disk)
        self.cache = bytearray(disk)
        self.pending.clear()
        return bytes(disk)
