"""The repository: manifests, chunks, leases, retention, garbage collection, verify.

Theory of operation — many hosts, one bucket, and a safe garbage collector
==========================================================================

Writers never overwrite each other: a chunk's key is its digest (two hosts uploading
the same chunk write the same bytes), and a manifest's key holds a unique backup id and
is written **last**, after every chunk it names was uploaded, so a listing shows a
backup only when it is complete. Nothing needs a conditional put (Ceph Pacific's radosgw
has none) and nothing needs more from a listing than read-after-write of a key just
written, which radosgw and S3 give.

Garbage collection is mark, then sweep, and the sweep excludes running backups:

* A **backup** writes a lease ``locks/backup-<id>.json`` (host, device, expiry) *then*
  lists ``locks/``; if a gc lock that has not expired is there, it deletes its lease,
  waits, and tries again (bounded: then the job fails, naming the gc's host). It
  refreshes the lease while it runs (expiry :data:`LEASE_TTL` ahead), checks before
  writing its manifest that the lease has not expired (a backup stalled past its lease
  fails instead of referencing chunks a sweep may have removed), writes the manifest,
  and deletes the lease.
* **gc mark** (no lock, runs beside backups): list every manifest, take the union of
  their chunks, list the chunks, and write ``gc/condemned.json`` with the unreferenced
  ones and the manifest keys it read.
* **gc sweep** writes its lock ``locks/gc-<random>.json`` *then* lists ``locks/``; if any
  backup lease has not expired (expiry + :data:`GRACE`, for clock skew between hosts), it
  deletes its lock and postpones (or waits, bounded). Holding the lock, it reads every
  manifest that appeared since the mark, keeps every condemned chunk one of them names,
  deletes the rest, removes the condemned list and its lock.

Why no chunk a manifest names is ever deleted: both sides *write, then list*, so a
backup and a sweep that overlap in time always see each other (each one's listing comes
after the other's write, or the other's listing comes after its own write) and one of
them backs off. A backup that ran and finished between the mark and the sweep wrote its
manifest before deleting its lease, so the sweep reads it and keeps its chunks, including
ones it de-duplicated against (from its parent's manifest or a HEAD) that the mark had
found unreferenced. A chunk uploaded after the mark is not in the condemned list at all.
A backup that died leaves a lease that expires; its chunks without a manifest are garbage
for a later gc. The cost: backups wait while a sweep deletes (the long listing of the
mark does not block them). Run one gc at a time per repository.

Tests interleave the two at the worst points through :attr:`Repository.hooks`
(``tests/test_repo.py``).

Incremental chains and bitmap lineage (:mod:`shmblock.lineage`): a manifest records
``bitmap_generation``, the generation its backup gave the bitmap it consumed when the
bitmap then holds "every write since this backup". An incremental's parent is the
device's backup that recorded the bitmap's generation at the new snapshot
(:meth:`Repository.latest` with ``generation``), never merely the newest backup of that
bitmap name: a bitmap consumed by a backup elsewhere, cleared, re-added or disabled
matches no manifest, and the target refuses (``shmblock/repo/target.py``). Pruning the
parent breaks the chain the same way, and is refused the same way.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from shmblock.errors import UsageError
from shmblock.repo.format import (
    ChunkCorrupt,
    Manifest,
    ManifestError,
    RepoError,
    chunk_key,
    digest_from_key,
    digest_of,
    parse_manifest_key,
)
from shmblock.repo.store import ObjectMissing, ObjectStore

log = logging.getLogger("shmblock.repo")

#: A running backup's lease reaches this far ahead; refreshed every LEASE_TTL / 4.
LEASE_TTL = 600.0
#: A lease or lock counts as gone only this long after its expiry (clock skew).
GRACE = 120.0
#: How long a backup waits for a running gc sweep before it fails (below the engine's
#: 30 s for a worker to get ready, so the job fails naming the sweep, not a timeout).
LOCK_WAIT = 20.0
CONDEMNED_KEY = "gc/condemned.json"

Hook = Callable[[str], object]


@dataclass
class Lock:
    """A lease of a backup or the lock of a gc sweep, as stored under ``locks/``."""

    key: str
    kind: str  # backup | gc
    host: str
    started: float
    expires: float
    device: str = ""

    def encode(self) -> bytes:
        return json.dumps({"kind": self.kind, "host": self.host, "started": self.started,
                           "expires": self.expires, "device": self.device}).encode()

    def alive(self, now: float) -> bool:
        return now <= self.expires + GRACE


@dataclass
class Problem:
    """A chunk a manifest names that is missing or corrupt."""

    backup: str
    device: str
    offset: int
    digest: str
    problem: str  # missing | corrupt

    def to_dict(self) -> dict[str, Any]:
        return {"backup": self.backup, "device": self.device, "offset": self.offset,
                "digest": self.digest, "problem": self.problem}


@dataclass
class GcResult:
    manifests: int = 0
    chunks: int = 0
    condemned: int = 0
    deleted: int = 0
    deleted_bytes: int = 0
    kept_new_refs: int = 0
    postponed: str = ""  # why the sweep did not run (backups running)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Policy:
    """Retention per device: keep the last N and everything newer than a duration."""

    keep_last: int | None = None
    keep_within: float | None = None  # seconds

    def __post_init__(self) -> None:
        if self.keep_last is None and self.keep_within is None:
            raise UsageError("prune needs a retention policy: --keep-last N and/or "
                             "--keep-within DURATION")
        if self.keep_last is not None and self.keep_last < 1:
            raise UsageError(f"--keep-last {self.keep_last} must be at least 1")
        if self.keep_within is not None and self.keep_within <= 0:
            raise UsageError("--keep-within must be a positive duration")

    def keep(self, ids_oldest_first: list[tuple[str, float]], now: float) -> set[str]:
        kept: set[str] = set()
        if self.keep_last is not None:
            kept.update(i for i, _ in ids_oldest_first[-self.keep_last:])
        if self.keep_within is not None:
            kept.update(i for i, t in ids_oldest_first if now - t <= self.keep_within)
        return kept


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w`` → seconds (UsageError otherwise)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise UsageError(f"duration {text!r} must be a number with s, m, h, d or w") from None
    if not value > 0:
        raise UsageError(f"duration {text!r} must be positive")
    return value


@dataclass
class Lease:
    """A running backup's lease: refreshed from a thread until :meth:`release`."""

    repo: Repository
    lock: Lock
    ttl: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    #: last expiry that was successfully written (the backup checks it before its manifest)
    written_expiry: float = 0.0

    def start(self) -> None:
        self.written_expiry = self.lock.expires
        self._thread = threading.Thread(target=self._refresh, name="repo-lease", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            expires = time.time() + self.ttl
            self.lock.expires = expires
            try:
                self.repo.store.put(self.lock.key, self.lock.encode())
                self.written_expiry = expires
            except Exception as exc:  # the check before the manifest decides
                log.warning("cannot refresh lease %s: %s", self.lock.key, exc)

    def check(self) -> None:
        """Raise RepoError when the lease may have run out (a sweep may have run)."""
        if time.time() >= self.written_expiry:
            raise RepoError(f"the backup's lease {self.lock.key} expired (it could not be "
                            "refreshed): a gc may have removed chunks it names, so no "
                            "manifest is written")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self.repo.store.delete(self.lock.key)
        except Exception as exc:  # it expires anyway
            log.warning("cannot delete lease %s: %s", self.lock.key, exc)


class Repository:
    """A repository on an object store (see the module docstring for the protocol)."""

    def __init__(self, store: ObjectStore, name: str = "") -> None:
        self.store = store
        self.name = name
        #: test hooks: called with the name of a point in the gc/backup protocol
        self.hooks: list[Hook] = []

    def _hook(self, point: str) -> None:
        for hook in self.hooks:
            hook(point)

    # -- manifests ---------------------------------------------------------------------

    def manifest_keys(self, device: str | None = None) -> list[tuple[str, str, str]]:
        """(device, backup id, key) of every manifest (of ``device``), oldest first."""
        prefix = "backups/" if device is None else f"backups/{device}/"
        found = []
        for info in self.store.list(prefix):
            parsed = parse_manifest_key(info.key)
            if parsed is not None:
                found.append((parsed[0], parsed[1], info.key))
        found.sort(key=lambda t: (t[1], t[0]))
        return found

    def load(self, key: str) -> Manifest:
        try:
            data = self.store.get(key)
        except ObjectMissing:
            raise RepoError(f"backup manifest {key!r} is missing from {self.name}") from None
        return Manifest.decode(data, key)

    def manifests(self, device: str | None = None) -> Iterator[Manifest]:
        for _, _, key in self.manifest_keys(device):
            yield self.load(key)

    def find(self, backup_id: str) -> Manifest:
        for _, bid, key in self.manifest_keys():
            if bid == backup_id:
                return self.load(key)
        raise RepoError(f"no backup {backup_id!r} in repository {self.name}")

    def latest(self, device: str, bitmap: str | None = None,
               generation: str | None = None) -> Manifest | None:
        """The device's newest backup (that consumed ``bitmap``, when given, and left
        it at lineage ``generation``, when given: the parent an incremental from a
        bitmap of that generation builds on; :mod:`shmblock.lineage`)."""
        for _, _, key in reversed(self.manifest_keys(device)):
            m = self.load(key)
            if (bitmap is None or m.bitmap == bitmap) and \
                    (generation is None or m.bitmap_generation == generation):
                return m
        return None

    def put_manifest(self, m: Manifest) -> None:
        self.store.put(m.key, m.encode())

    # -- chunks ------------------------------------------------------------------------

    def has_chunk(self, digest: str) -> bool:
        return self.store.head(chunk_key(digest)) is not None

    def put_chunk(self, digest: str, data: bytes | memoryview) -> None:
        self.store.put(chunk_key(digest), data)

    def get_chunk(self, digest: str, alg: str, length: int, where: str = "") -> bytes:
        """A chunk's bytes, checked against its digest and length (ChunkCorrupt)."""
        try:
            data = self.store.get(chunk_key(digest))
        except ObjectMissing:
            raise ChunkCorrupt(f"chunk {digest} {where}is missing from the repository") \
                from None
        if len(data) != length or digest_of(alg, data) != digest:
            raise ChunkCorrupt(f"chunk {digest} {where}is corrupt: its {len(data)} bytes "
                               f"do not hash to its name (expected {length} bytes)")
        return data

    # -- locks -------------------------------------------------------------------------

    def _locks(self, kind: str) -> list[Lock]:
        found = []
        for info in self.store.list(f"locks/{kind}-"):
            try:
                raw = json.loads(self.store.get(info.key))
                found.append(Lock(info.key, str(raw["kind"]), str(raw["host"]),
                                  float(raw["started"]), float(raw["expires"]),
                                  str(raw.get("device", ""))))
            except ObjectMissing:
                continue  # released meanwhile
            except (ValueError, KeyError, TypeError):
                # Unreadable: treat it as alive until it is old (never as absent).
                found.append(Lock(info.key, kind, "?", info.mtime, info.mtime + LEASE_TTL))
        return found

    def acquire_lease(self, backup_id: str, host: str, device: str, *,
                      ttl: float = LEASE_TTL, wait: float = LOCK_WAIT) -> Lease:
        """Write the backup's lease, waiting out a running gc sweep (bounded)."""
        deadline = time.monotonic() + wait
        pause = 0.2
        while True:
            now = time.time()
            lock = Lock(f"locks/backup-{backup_id}.json", "backup", host, now, now + ttl, device)
            self.store.put(lock.key, lock.encode())
            self._hook("backup:lease-written")
            sweeps = [g for g in self._locks("gc") if g.alive(time.time())]
            if not sweeps:
                lease = Lease(self, lock, ttl)
                lease.start()
                return lease
            self.store.delete(lock.key)
            if time.monotonic() >= deadline:
                g = sweeps[0]
                raise RepoError(f"repository {self.name} is locked by a gc sweep on host "
                                f"{g.host} (since {time.ctime(g.started)}, {g.key}); "
                                f"waited {wait:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 5.0)

    # -- retention and garbage collection -------------------------------------------------

    def prune(self, policy: Policy, device: str | None = None, *, dry_run: bool = False,
              now: float | None = None) -> list[tuple[str, str]]:
        """Delete the manifests the policy does not keep, per device; returns
        (device, id) of each (chunks go with the next gc)."""
        from shmblock.repo.format import id_time
        now = time.time() if now is None else now
        by_device: dict[str, list[tuple[str, str, str]]] = {}
        for dev, bid, key in self.manifest_keys(device):
            by_device.setdefault(dev, []).append((dev, bid, key))
        removed = []
        for dev, entries in sorted(by_device.items()):
            kept = policy.keep([(bid, id_time(bid)) for _, bid, _ in entries], now)
            for _, bid, key in entries:
                if bid not in kept:
                    if not dry_run:
                        self.store.delete(key)
                    removed.append((dev, bid))
        return removed

    def gc_mark(self) -> GcResult:
        """Condemn the chunks no manifest names (runs beside backups; deletes nothing)."""
        result = GcResult()
        keys, referenced = [], set()
        for _, _, key in self.manifest_keys():
            try:
                referenced |= self.load(key).referenced()
            except RepoError as exc:
                if "is missing" in str(exc):
                    continue  # pruned meanwhile
                raise  # an unreadable manifest: never guess what it references
            keys.append(key)
        result.manifests = len(keys)
        self._hook("gc:manifests-read")
        condemned = []
        for info in self.store.list("chunks/"):
            digest = digest_from_key(info.key)
            if digest is None:
                continue
            result.chunks += 1
            if digest not in referenced:
                condemned.append(digest)
        result.condemned = len(condemned)
        self.store.put(CONDEMNED_KEY, json.dumps(
            {"time": time.time(), "manifests": keys, "chunks": condemned}).encode())
        self._hook("gc:marked")
        return result

    def gc_sweep(self, result: GcResult | None = None, *, wait: float = 0.0,
                 host: str = "") -> GcResult:
        """Delete the condemned chunks still unreferenced, holding the gc lock; postpone
        (``result.postponed``) while backups hold leases (waiting up to ``wait`` s)."""
        result = GcResult() if result is None else result
        try:
            cond = json.loads(self.store.get(CONDEMNED_KEY))
            marked_keys = set(cond["manifests"])
            condemned = list(cond["chunks"])
        except ObjectMissing:
            return result
        except (ValueError, KeyError, TypeError) as exc:
            raise RepoError(f"{CONDEMNED_KEY} in {self.name} cannot be read ({exc}); "
                            "run gc again to rewrite it") from exc
        deadline = time.monotonic() + wait
        while True:
            now = time.time()
            lock = Lock(f"locks/gc-{secrets.token_hex(8)}.json", "gc", host or "?", now,
                        now + LEASE_TTL)
            self.store.put(lock.key, lock.encode())
            self._hook("gc:lock-written")
            running = [b for b in self._locks("backup") if b.alive(time.time())]
            if not running:
                break
            self.store.delete(lock.key)
            if time.monotonic() >= deadline:
                result.postponed = (f"{len(running)} backup(s) running (e.g. device "
                                    f"{running[0].device} on host {running[0].host}); "
                                    "the condemned chunks are swept by the next gc")
                return result
            time.sleep(1.0)
        try:
            referenced: set[str] = set()
            for _, _, key in self.manifest_keys():
                if key in marked_keys:
                    continue
                try:
                    referenced |= self.load(key).referenced()
                except RepoError as exc:
                    if "is missing" in str(exc):
                        continue
                    raise
            self._hook("gc:before-delete")
            for digest in condemned:
                if digest in referenced:
                    result.kept_new_refs += 1
                    continue
                info = self.store.head(chunk_key(digest))
                if info is None:
                    continue
                self.store.delete(chunk_key(digest))
                result.deleted += 1
                result.deleted_bytes += info.size
            self.store.delete(CONDEMNED_KEY)
        finally:
            self.store.delete(lock.key)
        return result

    def gc(self, *, wait: float = 0.0, host: str = "") -> GcResult:
        """Mark, then sweep (postponed while backups run: a later gc sweeps)."""
        return self.gc_sweep(self.gc_mark(), wait=wait, host=host)

    # -- verify ------------------------------------------------------------------------

    def verify(self, manifests: Iterable[Manifest],
               progress: Callable[[int, int], None] | None = None
               ) -> tuple[int, int, list[Problem]]:
        """Re-read and re-hash every chunk the manifests name (each distinct chunk once);
        returns (backups, chunks checked, problems by backup and offset)."""
        ms = list(manifests)
        uses: dict[tuple[str, str, int], list[tuple[Manifest, int]]] = {}
        for m in ms:
            for i, d in enumerate(m.chunks):
                if d is not None:
                    uses.setdefault((d, m.digest, m.chunk_length(i)), []).append((m, i))
        problems = []
        for n, ((digest, alg, length), where) in enumerate(sorted(uses.items())):
            try:
                self.get_chunk(digest, alg, length)
                bad = ""
            except ChunkCorrupt as exc:
                bad = "missing" if "missing" in str(exc) else "corrupt"
            if bad:
                problems += [Problem(m.id, m.device_id, i * m.chunk_size, digest, bad)
                             for m, i in where]
            if progress is not None:
                progress(n + 1, len(uses))
        problems.sort(key=lambda p: (p.backup, p.offset))
        return len(ms), len(uses), problems


def check_geometry(m: Manifest, size: int, cluster_size: int, chunk_size: int,
                   digest: str) -> str:
    """Why ``m`` cannot be the parent of a backup of this geometry ('' when it can)."""
    if (m.size, m.cluster_size, m.chunk_size, m.digest) != (size, cluster_size, chunk_size,
                                                              digest):
        return (f"parent backup {m.id} has size {m.size}, cluster size {m.cluster_size}, "
                f"chunk size {m.chunk_size}, digest {m.digest}; this backup has {size}, "
                f"{cluster_size}, {chunk_size}, {digest}")
    return ""


__all__ = ["CONDEMNED_KEY", "GRACE", "LEASE_TTL", "ChunkCorrupt", "GcResult", "Lease",
           "ManifestError", "Policy", "Problem", "Repository", "check_geometry",
           "parse_duration"]
