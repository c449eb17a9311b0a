"""Raw image target: a sparse file holding the device byte for byte.

The backup is written to ``<path>.part`` in the same directory and renamed onto ``path``
only by :meth:`RawTarget.commit`, after an ``fsync``; rename within one directory is
atomic (rename(2)), so ``path`` is either absent, a previous file, or a finished backup —
never a half-written one. The ``.part`` is created exclusively, never through a symlink,
mode 0600 (:func:`shmblock.targets.base.create_part`), and an existing ``path`` that is
not a regular file is refused. A failed job removes the partial file; a process killed
mid-job leaves ``<path>.part``, which ``shmblock-run cleanup`` removes (until then a new
job to the same target is refused: it cannot tell that file from a running job's).

Zero clusters stay holes: the file is created empty and extended with ``ftruncate``, so
any range never written reads back as zeros without using disk space.
"""

from __future__ import annotations

import os

from shmblock.errors import TargetIOError
from shmblock.targets.base import (
    PART_SUFFIX,
    Buffer,
    Target,
    check_file_target,
    create_part,
    discard_part,
    publish_part,
)


class RawTarget(Target):
    """A sparse raw file, published by rename on commit."""

    kind = "raw"
    starts_zeroed = True
    punches_zeroes = True

    def __init__(self, path: str, size: int, cluster_size: int) -> None:
        super().__init__(size, cluster_size)
        self.path = os.path.abspath(path)
        self.part_path = self.path + PART_SUFFIX
        check_file_target(self.kind, path)
        self._fd: int | None = create_part(self.part_path, self.kind)
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            self._discard()
            raise TargetIOError(
                f"cannot size raw target {self.part_path!r}: {exc.strerror}") from exc
        self._committed = False

    def _require_fd(self) -> int:
        if self._fd is None:
            raise TargetIOError(f"raw target {self.path!r} is closed")
        return self._fd

    def write(self, offset: int, data: Buffer) -> None:
        fd = self._require_fd()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        try:
            while view:
                # pwrite may write less than asked (signals, huge sizes): loop on the rest.
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise TargetIOError(
                f"write to raw target {self.part_path!r} at offset {offset} failed: "
                f"{exc.strerror}"
            ) from exc

    def write_zeroes(self, offset: int, length: int) -> None:
        self._require_fd()
        self._check_range(offset, length)
        # The file was created empty and sized with ftruncate, and every cluster is saved
        # exactly once per job, so a cluster not written is still a hole: nothing to do.

    def seal(self) -> None:
        try:
            os.fsync(self._require_fd())
        except OSError as exc:
            raise TargetIOError(
                f"cannot flush raw target {self.part_path!r}: {exc.strerror}") from exc

    def commit(self) -> None:
        publish_part(self._require_fd(), self.part_path, self.path, self.kind)
        self._committed = True

    def read(self, offset: int, length: int) -> bytes:
        fd = self._require_fd()
        self._check_range(offset, length)
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise TargetIOError(
                f"read-back of raw target {self.path!r} failed: {exc.strerror}") from exc

    def abort(self) -> None:
        if not self._committed:
            self._discard()

    def _discard(self) -> None:
        self.close()
        discard_part(self.part_path)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def describe(self) -> str:
        return self.path
