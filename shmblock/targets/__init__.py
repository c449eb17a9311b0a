"""Backup targets behind one small interface (:class:`~shmblock.targets.base.Target`).

:func:`open_target` picks the implementation from the format and the target string, and
:func:`open_reader` an independent reader of a finished backup; this is the one place
that dispatches on a target's format (and :class:`TargetSpec` the one that names its
``.part`` file):

* ``nbd://host[:port]/export`` and ``nbd+unix:///export?socket=PATH`` → NBD client
  (the NBD URI standard, doc/uri.md of the NBD project);
* ``s3://bucket/prefix``, ``file:///dir`` → a backup repository
  (:mod:`shmblock.repo.target`: content-addressed chunks plus a manifest);
* anything else is a file path (an existing one must be a regular file): ``qcow2``
  when the format says so (or the name ends in ``.qcow2`` and no format is given),
  else ``raw``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from shmblock.errors import UsageError
from shmblock.paths import PART_SUFFIX, check_output
from shmblock.targets.base import Target

FORMATS = ("raw", "qcow2", "nbd", "repo")


def is_nbd_uri(target: str) -> bool:
    """True for the URI schemes of the NBD URI standard.

    Schemes are case-insensitive (RFC 3986 section 3.1): ``NBD://host/x`` is a URI, not
    a file named ``NBD:`` in a directory ``host``.
    """
    return target.split(":", 1)[0].lower() in {"nbd", "nbds", "nbd+unix", "nbds+unix"}


def part_file(path: str) -> str:
    """The partial file an output ``path`` is written to until it is published."""
    return path + PART_SUFFIX


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """Where a backup goes and in which format; cheap to build and to validate early."""

    target: str
    format: str
    backing_file: str | None = None
    backing_format: str | None = None

    @property
    def is_file(self) -> bool:
        """A file target (raw, qcow2), written to :attr:`part` and renamed on commit."""
        return self.format not in ("nbd", "repo")

    @property
    def file(self) -> str | None:
        """The target's file (None for NBD: a server's export, written in place)."""
        return self.target if self.is_file else None

    @property
    def part(self) -> str | None:
        """The partial file a file target is written to until it commits (None for NBD)."""
        return part_file(self.target) if self.is_file else None

    @classmethod
    def parse(
        cls,
        target: str,
        fmt: str | None = None,
        backing_file: str | None = None,
        backing_format: str | None = None,
    ) -> TargetSpec:
        """Validate a target string and format; raises UsageError naming the problem."""
        if not target:
            raise UsageError("the backup target is empty")
        from shmblock.repo.url import is_repo_url

        if is_repo_url(target) or fmt == "repo":
            return cls._parse_repo(target, fmt, backing_file)
        nbd = is_nbd_uri(target)
        if fmt is None:
            fmt = "nbd" if nbd else ("qcow2" if target.endswith(".qcow2") else "raw")
        if fmt not in FORMATS:
            raise UsageError(
                f"unknown target format {fmt!r} (expected one of {', '.join(FORMATS)})")
        if nbd and fmt != "nbd":
            # An NBD server decides how it stores the bytes; we only ever speak raw to it.
            fmt = "nbd"
        if fmt == "nbd" and not nbd:
            raise UsageError(f"format nbd needs an nbd:// or nbd+unix:// URI, not {target!r}")
        if nbd:
            from shmblock.targets.nbd_uri import parse_nbd_uri

            parse_nbd_uri(target)  # raises NbdUriError (a UsageError) naming the problem
        if backing_file is not None and fmt != "qcow2":
            raise UsageError("only a qcow2 target can name a backing file")
        if not nbd:
            # Before anything runs: a missing directory, or a symlink, FIFO, device node
            # or directory at the target (shmblock.paths; check_backup_paths does more).
            check_output("target", target)
        return cls(target, fmt, backing_file, backing_format)

    @classmethod
    def _parse_repo(cls, target: str, fmt: str | None, backing_file: str | None) -> TargetSpec:
        from shmblock.repo.url import parse_repo_url

        if fmt not in (None, "repo"):
            raise UsageError(f"{target!r} is a repository URL; its format can only be repo")
        if backing_file is not None:
            raise UsageError("a repository target has no backing file (an incremental "
                             "finds its parent backup in the repository)")
        parse_repo_url(target)  # UsageError naming the problem
        return cls(target, "repo")


def open_target(spec: TargetSpec, size: int, cluster_size: int, timeout: float = 30.0) -> Target:
    """Open (create or connect to) the target for a device of ``size`` bytes."""
    if spec.format == "raw":
        from shmblock.targets.raw import RawTarget

        return RawTarget(spec.target, size, cluster_size)
    if spec.format == "qcow2":
        from shmblock.targets.qcow2 import Qcow2Target

        return Qcow2Target(
            spec.target,
            size,
            cluster_size,
            backing_file=spec.backing_file,
            backing_format=spec.backing_format,
        )
    if spec.format == "repo":
        from shmblock.repo.target import RepoTarget

        return RepoTarget(spec.target, size, cluster_size, timeout=timeout)
    from shmblock.targets.nbd import NbdTarget

    return NbdTarget(spec.target, size, cluster_size, timeout=timeout)


class Reader(Protocol):
    """Reads a finished backup through its own format (for verification)."""

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class RawFileReader:
    """A raw image file, read with pread."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        os.close(self._fd)


def open_reader(spec: TargetSpec, size: int, cluster_size: int, timeout: float = 30.0) -> Reader:
    """An independent reader of a finished backup (not the target that wrote it)."""
    if spec.format == "raw":
        return RawFileReader(spec.target)
    if spec.format == "qcow2":
        from shmblock.targets.qcow2_format import Qcow2Reader

        return Qcow2Reader(spec.target)
    if spec.format == "repo":
        from shmblock.repo.source import open_backup

        return open_backup(spec.target, timeout=timeout)
    from shmblock.targets.nbd import NbdTarget

    return NbdTarget(spec.target, size, cluster_size, timeout=timeout)


__all__ = ["FORMATS", "RawFileReader", "Reader", "Target", "TargetSpec", "is_nbd_uri",
           "open_reader", "open_target", "part_file"]
