"""The object-store interface the backup repository is written against.

One small interface, several backends (the zarr habit, STYLE.md): :class:`ObjectStore`
is what the repository needs from S3 and nothing more — whole-object put, get, head,
list by prefix and delete. :class:`MemoryStore` is the in-process model used by unit
tests and by the repository's state-machine tests; the S3 backend (``shmblock.repo.s3``)
is the real one, tested against a real Ceph RADOS Gateway.

Errors: every backend raises only the classes below (wrapping its own with
``raise ... from exc``), so the repository maps each to one clear message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from shmblock.errors import ShmblockError


class StoreError(ShmblockError):
    """The object store failed (the message names the operation, bucket and key)."""


class ObjectMissing(StoreError, KeyError):
    """No object under this key."""


class StoreUnavailable(StoreError):
    """Cannot reach the store, or it kept failing after bounded retries (timeouts, 5xx)."""


class StoreAccessDenied(StoreError):
    """The credentials were refused (wrong key, expired, no permission)."""


class NoSuchBucket(StoreError):
    """The bucket does not exist."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    #: Last-modified time as seconds since the epoch (the store's clock).
    mtime: float


class ObjectStore(Protocol):
    """Whole objects under string keys (no leading slash; the store adds its prefix)."""

    def put(self, key: str, data: bytes | memoryview) -> None:
        """Store ``data`` under ``key`` atomically: readers see all of it or nothing."""

    def get(self, key: str) -> bytes:
        """The object's bytes; :class:`ObjectMissing` when there is none."""

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size and time, or None when there is none."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""

    def delete(self, key: str) -> None:
        """Remove the object; removing a missing key is not an error."""

    def close(self) -> None:
        """Release connections."""


class MemoryStore:
    """An in-process :class:`ObjectStore` (unit tests, models); thread-safe."""

    def __init__(self) -> None:
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes | memoryview) -> None:
        with self._lock:
            self._objects[key] = (bytes(data), time.time())

    def get(self, key: str) -> bytes:
        with self._lock:
            try:
                return self._objects[key][0]
            except KeyError:
                raise ObjectMissing(f"no object {key!r}") from None

    def head(self, key: str) -> ObjectInfo | None:
        with self._lock:
            if key not in self._objects:
                return None
            data, mtime = self._objects[key]
            return ObjectInfo(key, len(data), mtime)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._lock:
            items = sorted((k, len(d), t) for k, (d, t) in self._objects.items()
                           if k.startswith(prefix))
        for key, size, mtime in items:
            yield ObjectInfo(key, size, mtime)

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)

    def close(self) -> None:
        pass
