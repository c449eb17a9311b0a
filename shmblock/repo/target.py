"""The repository as a backup target: ``s3://bucket/prefix`` (also ``file:///dir``).

Runs inside the backup worker. Clusters arrive in any order (copy-before-write saves
interleave with the background pass): each goes to a local **spool** — a sparse,
unlinked temporary file the size of the device, so memory stays bounded whatever the
device's size — and a per-chunk count. A chunk is handed to a bounded pool of upload
threads as soon as every one of its clusters is in; the thread reads it back from the
spool, finds it all-zero (stored as nothing) or hashes it, and uploads it unless the
repository has it already (the parent's manifest names it, or a HEAD finds it). ``write``
never waits for an upload, so the worker keeps serving copy-before-write meanwhile;
memory is one or two chunk buffers per thread. An upload that fails fails the job at the
next ``settle`` (the worker's check before it answers a writer) or at ``seal``.

At ``seal``: chunks no cluster of which arrived are the parent's (an incremental: its
manifest names them) or zeros (``top``: unallocated clusters); a chunk only partly
covered is completed from the parent's chunk (incremental: its clean clusters were not
read from the device) or with zeros. Then the manifest — complete, every chunk named —
is written, last, and the lease released (:mod:`shmblock.repo.repository`). ``abort``
writes no manifest. The worker needs no special case: every covered cluster arrives as
a write or a ``write_zeroes`` because the target does not claim to start zeroed.

Incremental chains (bitmap lineage, :mod:`shmblock.lineage`): a
``sync=incremental``/``bitmap`` backup's parent is the device's backup in the repository
whose manifest recorded the bitmap's lineage generation at this snapshot
(``bitmap_generation``): the backup since whose instant the bitmap holds every write.
The engine passes that generation in the URL (``bitmap-generation``) and checks at the
instant that the bitmap still has it. Without such a parent the job refuses to start,
saying why — the bitmap was consumed by a backup elsewhere, cleared, re-added or
disabled since the newest backup that consumed it — and to take a ``full`` backup with
``--bitmap`` first. The manifest records ``bitmap-next``, the generation the job gives
the bitmap at its instant, when the engine says the bitmap will mean "since this backup"
(it records writes and the bitmap mode resets it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import os
import tempfile
import threading
import time

import numpy as np

from shmblock.errors import TargetError, TargetIOError, TargetUnreachable, UsageError
from shmblock.repo.format import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DIGEST,
    DIGESTS,
    Manifest,
    RepoError,
    check_name,
    digest_of,
    new_backup_id,
)
from shmblock.repo.repository import Lease, Repository, check_geometry
from shmblock.repo.store import StoreError
from shmblock.repo.url import default_host, open_store, parse_repo_url
from shmblock.targets.base import Buffer, Target

log = logging.getLogger("shmblock.repo")

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free a stored chunk's spool space (fallocate(2) PUNCH_HOLE); False if unsupported."""
    result: int = _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE,
                                  offset, length)
    return result == 0

DEFAULT_THREADS = 4
BITMAP_SYNCS = ("incremental", "bitmap")


def job_target(target: str, *, sync: str, bitmap: str | None, bitmap_mode: str | None,
               device_name: str, device_file: str | None,
               bitmap_generation: str | None = None, bitmap_next: str | None = None) -> str:
    """The target URL the worker gets: the job's options and a fresh backup id added.

    The device id defaults to the device file's name (stable across runs) or the
    device's name; the host id to the host name. ``bitmap_generation``: the bitmap's
    lineage generation now (its parent must have recorded it); ``bitmap_next``: the one
    this backup records (None: it records none). Only the engine sets these two.
    """
    url = parse_repo_url(target)
    if url.backup_id:
        raise UsageError(f"{target!r} names a backup; a backup goes to the repository URL")
    if sync == "none":
        raise UsageError("sync=none cannot go to a repository (it holds complete backups; "
                         "use full, top, incremental or bitmap)")
    device = url.param("device")
    if device is None:
        base = os.path.basename(device_file) if device_file else device_name
        device = "".join(c if c.isalnum() or c in "_.-" else "_" for c in base)[:128]
    check_name("device id", device)
    host = check_name("host id", url.param("host") or default_host())
    backup_id = new_backup_id(host)
    # Lineage comes from the engine only: a user's own would fake a parent.
    params = {k: v for k, v in url.params.items()
              if k not in ("bitmap-generation", "bitmap-next")}
    return type(url)(url.scheme, url.location, backup_id, params).with_params(
        device=device, host=host, sync=sync, bitmap=bitmap, bitmap_mode=bitmap_mode,
        bitmap_generation=bitmap_generation, bitmap_next=bitmap_next)


def _int_param(value: str | None, default: int, what: str) -> int:
    if value is None:
        return default
    from shmblock.units import parse_size
    try:
        return int(parse_size(value))
    except (ValueError, UsageError) as exc:
        raise UsageError(f"repository option {what}={value!r}: {exc}") from exc


class RepoTarget(Target):
    """One backup into a repository (see the module docstring)."""

    kind = "repo"
    starts_zeroed = False  # every covered cluster arrives: a chunk knows when it is whole
    punches_zeroes = True

    def __init__(self, target: str, size: int, cluster_size: int, timeout: float = 30.0,
                 *, store: Repository | None = None) -> None:
        super().__init__(size, cluster_size)
        url = parse_repo_url(target)
        if url.backup_id is None:
            raise TargetError(f"{target!r}: a repository target needs its backup id "
                              "(the engine adds one: shmblock.repo.target.job_target)")
        self.url = url
        self.backup_id = url.backup_id
        self.device_id = check_name("device id", url.param("device") or "device")
        self.host = check_name("host id", url.param("host") or default_host())
        self.sync = url.param("sync", "full") or "full"
        self.bitmap = url.param("bitmap")
        self.bitmap_mode = url.param("bitmap-mode")
        self.bitmap_generation = url.param("bitmap-generation")  # the bitmap's, now
        self.bitmap_next = url.param("bitmap-next")  # what this backup records
        self.digest = url.param("digest", DEFAULT_DIGEST) or DEFAULT_DIGEST
        if self.digest not in DIGESTS:
            raise UsageError(f"digest {self.digest!r} (expected one of {', '.join(DIGESTS)})")
        self.chunk_size = _int_param(url.param("chunk-size"), DEFAULT_CHUNK_SIZE, "chunk-size")
        if self.chunk_size <= 0 or self.chunk_size % cluster_size:
            raise TargetError(f"chunk size {self.chunk_size} must be a positive multiple "
                              f"of the cluster size {cluster_size}")
        threads = _int_param(url.param("threads"), DEFAULT_THREADS, "threads")
        if not 1 <= threads <= 64:
            raise UsageError(f"threads={threads} must be 1-64")
        self.nchunks = -(-size // self.chunk_size)
        self.per_chunk = self.chunk_size // cluster_size
        self.clusters = size // cluster_size
        self._lease: Lease | None = None
        self._spool_fd = -1
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._futures: list[concurrent.futures.Future[None]] = []
        self._sealed = False
        self._ended = False
        self.stats = {"chunks": self.nchunks, "uploaded_chunks": 0, "uploaded_bytes": 0,
                      "dedup_chunks": 0, "zero_chunks": 0, "parent_chunks": 0,
                      "received_bytes": 0, "spool_peak_bytes": 0}
        self._spooled = 0  # bytes in the spool now (written, not yet punched out)
        try:
            self.repo = store or Repository(open_store(url, timeout), url.repo)
            self.parent = self._find_parent()
            self._parent_refs = self.parent.referenced() if self.parent else set()
            self._known: set[str] = set()
            self.digests: list[str | None] = [None] * self.nchunks
            self.received = np.zeros(self.clusters, dtype=np.bool_)
            self.counts = np.zeros(self.nchunks, dtype=np.int64)
            self.submitted = np.zeros(self.nchunks, dtype=np.bool_)
            self._chunk_bytes = np.zeros(self.nchunks, dtype=np.int64)  # spooled, per chunk
            spool_dir = url.param("spool") or tempfile.gettempdir()
            self._spool_fd = os.open(spool_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC,
                                     0o600)
            os.ftruncate(self._spool_fd, size)
            self._lease = self.repo.acquire_lease(self.backup_id, self.host, self.device_id)
            self._pool = concurrent.futures.ThreadPoolExecutor(
                threads, thread_name_prefix="repo-upload")
        except StoreError as exc:
            self.close()
            raise TargetUnreachable(f"repository {url.repo}: {exc}") from exc
        except OSError as exc:
            self.close()
            raise TargetUnreachable(f"cannot create the spool file in "
                                    f"{url.param('spool') or tempfile.gettempdir()!r}: "
                                    f"{exc.strerror}") from exc
        except (RepoError, UsageError) as exc:
            self.close()
            raise TargetUnreachable(str(exc)) from exc
        except BaseException:
            self.close()
            raise

    def _find_parent(self) -> Manifest | None:
        if self.sync in BITMAP_SYNCS:
            if self.bitmap is None:
                raise UsageError(f"sync={self.sync} into a repository needs a bitmap")
            newest = self.repo.latest(self.device_id, bitmap=self.bitmap)
            if newest is None:
                raise RepoError(
                    f"no parent for an incremental backup of device {self.device_id!r}: "
                    f"repository {self.url.repo} has no backup of it that consumed bitmap "
                    f"{self.bitmap!r}; take a full backup with --bitmap {self.bitmap} first")
            # Lineage (shmblock.lineage): the parent is the backup since whose instant
            # the bitmap holds every write — the one that recorded its generation.
            gen = self.bitmap_generation
            parent = None if gen is None else \
                self.repo.latest(self.device_id, bitmap=self.bitmap, generation=gen)
            if parent is None:
                raise RepoError(self._no_lineage(newest))
            why = check_geometry(parent, self.size, self.cluster_size, self.chunk_size,
                                 self.digest)
            if why:
                raise RepoError(f"cannot back up incrementally onto {why}")
            return parent
        # A full or top backup needs no parent; the newest one of the same geometry
        # still saves HEADs for the chunks it names.
        latest = self.repo.latest(self.device_id)
        if latest is not None and not check_geometry(latest, self.size, self.cluster_size,
                                                     self.chunk_size, self.digest):
            return latest
        return None

    def _no_lineage(self, newest: Manifest) -> str:
        """Why no backup is a parent for the bitmap's generation, and what to do."""
        b = self.bitmap
        if newest.version < 2:
            why = (f"backup {newest.id} was made before bitmap lineage was recorded, so "
                   "nothing proves which writes the bitmap holds since it")
        elif newest.bitmap_generation is None:
            why = (f"backup {newest.id} (the newest that consumed it) did not reset it "
                   f"(bitmap-mode {newest.bitmap_mode or '?'} or the bitmap was disabled)")
        else:
            why = (f"bitmap {b!r} was cleared, consumed by another backup (another target), "
                   f"removed and re-added, or disabled since backup {newest.id}, the newest "
                   "that consumed it (or the backup it holds the writes since was pruned), "
                   "so no backup here is the one since which it holds every write")
        return (f"cannot back up device {self.device_id!r} incrementally from bitmap "
                f"{b!r} into {self.url.repo}: {why} (bitmap generation "
                f"{self.bitmap_generation or 'unknown'}); take a full backup with "
                f"--bitmap {b}")

    # -- writes ------------------------------------------------------------------------

    def _arrived(self, offset: int, length: int) -> None:
        c0, c1 = offset // self.cluster_size, (offset + length) // self.cluster_size
        with self._lock:
            new = ~self.received[c0:c1]
            self.received[c0:c1] = True
            idx = np.arange(c0, c1)[new] // self.per_chunk
            if idx.size:
                np.add.at(self.counts, idx, 1)
            ready = []
            for chunk in np.unique(idx):
                i = int(chunk)
                full = -(-min(self.chunk_size, self.size - i * self.chunk_size)
                         // self.cluster_size)
                if self.counts[i] == full and not self.submitted[i]:
                    self.submitted[i] = True
                    ready.append(i)
        for i in ready:
            self._submit(i)

    def _submit(self, i: int) -> None:
        assert self._pool is not None
        self._futures.append(self._pool.submit(self._store_chunk, i))

    def _check(self) -> None:
        if self._error is not None:
            raise TargetIOError(f"upload to repository {self.url.repo} failed: "
                                f"{self._error}") from self._error

    def write(self, offset: int, data: Buffer) -> None:
        self._check_range(offset, len(data))
        self._check()
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._spool_fd, view[done:], offset + done)
        self.stats["received_bytes"] += len(view)
        with self._lock:
            end = offset + len(view)
            for i in range(offset // self.chunk_size, -(-end // self.chunk_size)):
                lo, hi = i * self.chunk_size, (i + 1) * self.chunk_size
                self._chunk_bytes[i] += min(hi, end) - max(lo, offset)
            self._spooled += len(view)
            self.stats["spool_peak_bytes"] = max(self.stats["spool_peak_bytes"], self._spooled)
        self._arrived(offset, len(view))

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        self._check()
        # The spool is a fresh sparse file and each cluster arrives once: already zeros.
        self._arrived(offset, length)

    def settle(self) -> None:
        self._check()

    # -- chunks ------------------------------------------------------------------------

    def _store_chunk(self, i: int) -> None:
        if self._error is not None:
            return
        try:
            self._store_chunk_unchecked(i)
            # Stored: its spool space goes, so the spool holds only chunks in flight
            # and chunks still waiting for clusters, not the whole backup.
            lo = i * self.chunk_size
            if punch_hole(self._spool_fd, lo, min(self.chunk_size, self.size - lo)):
                with self._lock:
                    self._spooled -= int(self._chunk_bytes[i])
                    self._chunk_bytes[i] = 0
        except BaseException as exc:
            with self._lock:
                if self._error is None:
                    self._error = exc

    def _store_chunk_unchecked(self, i: int) -> None:
        lo = i * self.chunk_size
        length = min(self.chunk_size, self.size - lo)
        data = bytearray(os.pread(self._spool_fd, length, lo))
        if len(data) != length:
            raise TargetIOError(f"spool file returned {len(data)} of {length} bytes")
        c0 = lo // self.cluster_size
        got = self.received[c0:c0 + length // self.cluster_size]
        if not got.all() and self.sync in BITMAP_SYNCS:
            # Clean clusters of a partly dirty chunk: the parent's (never read from the
            # device; DESIGN's "an incremental reads only what changed").
            assert self.parent is not None
            old = self.parent.chunks[i]
            if old is not None:
                parent_data = self.repo.get_chunk(old, self.parent.digest, length,
                                                  f"of parent backup {self.parent.id} ")
                cs = self.cluster_size
                for c in np.flatnonzero(~got):
                    data[c * cs:(c + 1) * cs] = parent_data[c * cs:(c + 1) * cs]
        words = np.frombuffer(data, dtype=np.uint8)
        if not words.any():
            self.digests[i] = None
            with self._lock:
                self.stats["zero_chunks"] += 1
            return
        digest = digest_of(self.digest, data)
        self.digests[i] = digest
        with self._lock:
            known = digest in self._parent_refs or digest in self._known
        if not known and not self.repo.has_chunk(digest):
            self.repo.put_chunk(digest, memoryview(data))
            with self._lock:
                self.stats["uploaded_chunks"] += 1
                self.stats["uploaded_bytes"] += length
        else:
            with self._lock:
                self.stats["dedup_chunks"] += 1
        with self._lock:
            self._known.add(digest)

    # -- the end -----------------------------------------------------------------------

    def commit(self) -> None:
        """Finish every chunk, then write the manifest (last) and release the lease."""
        if self._sealed:
            return
        self._check()
        assert self._pool is not None
        for i in range(self.nchunks):
            if self.submitted[i]:
                continue
            self.submitted[i] = True
            if self.counts[i] == 0:
                if self.sync in BITMAP_SYNCS:
                    assert self.parent is not None
                    self.digests[i] = self.parent.chunks[i]  # clean: the parent's
                    self.stats["parent_chunks"] += 1
                else:
                    self.digests[i] = None  # top: never allocated, zeros
                    self.stats["zero_chunks"] += 1
            else:
                self._submit(i)
        for f in self._futures:
            f.result()
        self._check()
        assert self._lease is not None
        self.repo._hook("backup:before-manifest")
        try:
            self._lease.check()
            manifest = Manifest(
                id=self.backup_id, device_id=self.device_id, host=self.host,
                created=time.time(), size=self.size, cluster_size=self.cluster_size,
                chunk_size=self.chunk_size, digest=self.digest, chunks=self.digests,
                sync=self.sync, bitmap=self.bitmap, bitmap_mode=self.bitmap_mode,
                parent=self.parent.id if self.parent and self.sync in BITMAP_SYNCS else None,
                stats=dict(self.stats),
                bitmap_generation=self.bitmap_next if self.bitmap else None)
            self.repo.put_manifest(manifest)
        except (StoreError, RepoError) as exc:
            raise TargetIOError(f"cannot write the manifest of backup {self.backup_id} to "
                                f"{self.url.repo}: {exc}") from exc
        self.manifest = manifest
        self._sealed = True
        self._end()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._lease is not None:
            self._lease.release()

    def abort(self) -> None:
        """No manifest: the chunks uploaded so far stay (the next backup de-duplicates
        against them; a gc removes them if none does)."""
        with self._lock:
            if self._error is None:
                self._error = TargetError("the backup was aborted")
        self._end()

    def close(self) -> None:
        if not self._sealed:
            with contextlib.suppress(Exception):
                self.abort()
        if self._spool_fd >= 0:
            os.close(self._spool_fd)
            self._spool_fd = -1
        repo = getattr(self, "repo", None)
        if repo is not None:
            with contextlib.suppress(Exception):
                repo.store.close()

    def read(self, offset: int, length: int) -> bytes:
        from shmblock.repo.source import ManifestReader
        reader = ManifestReader(self.repo, self.manifest)
        out = bytearray(length)
        reader.fill(offset, memoryview(out))
        return bytes(out)

    def describe(self) -> str:
        return f"{self.url.repo}/{self.backup_id}"
