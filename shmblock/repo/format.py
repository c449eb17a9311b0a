"""The repository's object layout and manifest format (version 2).

Keys, under the repository's prefix::

    chunks/<2 hex>/<digest hex>                 one chunk's bytes, content addressed
    backups/<device-id>/<backup-id>.manifest    one backup (JSON), written LAST
    locks/backup-<backup-id>.json               a running backup's lease
    locks/gc-<random>.json                      a gc sweep's exclusive lock
    gc/condemned.json                           chunks a gc mark found unreferenced

A backup id is ``<UTC time>-<host>-<8 hex>`` (``20261130T150000.123456Z-hostA-1a2b3c4d``):
unique without any conditional put (Ceph Pacific's radosgw has none), and sorting by id
sorts by creation time. A manifest lists every chunk of the device (a digest, or None for
an all-zero chunk, which is stored as nothing), so every backup restores on its own.

Version 2 added ``bitmap_generation``: the lineage generation (:mod:`shmblock.lineage`)
the backup gave the bitmap it consumed, when the bitmap then holds "every write since
this backup" (else None). An incremental's parent must have the bitmap's generation at
the snapshot. Version 1 manifests are read as having none: they restore, but no
incremental builds on them (a version-1 reader refuses version 2 by its number).
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import blake3

from shmblock.errors import ShmblockError, UsageError

FORMAT_VERSION = 2
#: Versions this shmblock reads (1: before bitmap lineage, no ``bitmap_generation``).
READ_VERSIONS = (1, 2)
GENERATION_RE = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_CHUNK_SIZE = 4 << 20
#: Digest algorithms a manifest may name (a field, so it can change per backup).
DIGESTS = ("blake3", "sha256", "blake2b")
#: blake3: 3-4x SHA-256's per-core throughput on 4 MiB chunks here (README, "The S3
#: client and the chunk digest, measured"); a manifest names its algorithm, so
#: repositories written with another one stay readable.
DEFAULT_DIGEST = "blake3"

ID_RE = re.compile(r"^(\d{8}T\d{6}\.\d{6}Z)-([A-Za-z0-9_.-]{1,64})-([0-9a-f]{8})$")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
HEX_RE = re.compile(r"^[0-9a-f]{16,128}$")


class RepoError(ShmblockError):
    """The repository is inconsistent or refuses the operation (the message says why)."""


class ManifestError(RepoError):
    """A manifest cannot be read (not JSON, wrong version, inconsistent fields)."""


class ChunkCorrupt(RepoError):
    """A chunk's bytes do not hash to its name (or it is missing)."""


def digest_of(alg: str, data: bytes | bytearray | memoryview) -> str:
    if alg == "blake3":
        # One thread per chunk: uploads already hash several chunks in parallel.
        return blake3.blake3(data, max_threads=1).hexdigest()
    if alg == "sha256":
        return hashlib.sha256(data).hexdigest()
    if alg == "blake2b":
        return hashlib.blake2b(data, digest_size=32).hexdigest()
    raise RepoError(f"unknown digest algorithm {alg!r} (known: {', '.join(DIGESTS)})")


def chunk_key(digest: str) -> str:
    return f"chunks/{digest[:2]}/{digest}"


def digest_from_key(key: str) -> str | None:
    """The digest a chunk key names, None for anything else under chunks/."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "chunks" and HEX_RE.match(parts[2]) \
            and parts[1] == parts[2][:2]:
        return parts[2]
    return None


def check_name(what: str, value: str) -> str:
    if not NAME_RE.match(value):
        raise UsageError(f"{what} {value!r} must be 1-128 of [A-Za-z0-9_.-]")
    return value


def new_backup_id(host: str, now: float | None = None) -> str:
    t = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"
    return f"{stamp}-{check_name('host id', host)}-{secrets.token_hex(4)}"


def id_time(backup_id: str) -> float:
    """Creation time (epoch seconds) encoded in a backup id."""
    m = ID_RE.match(backup_id)
    if m is None:
        raise UsageError(f"{backup_id!r} is not a backup id (<time>-<host>-<8 hex>)")
    stamp = m.group(1)
    base = time.strptime(stamp[:15], "%Y%m%dT%H%M%S")
    return calendar.timegm(base) + int(stamp[16:22]) / 1e6


def manifest_key(device_id: str, backup_id: str) -> str:
    return f"backups/{device_id}/{backup_id}.manifest"


def parse_manifest_key(key: str) -> tuple[str, str] | None:
    """(device id, backup id) of a manifest key, None for anything else."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "backups" or not parts[2].endswith(".manifest"):
        return None
    backup_id = parts[2][: -len(".manifest")]
    if not NAME_RE.match(parts[1]) or not ID_RE.match(backup_id):
        return None
    return parts[1], backup_id


@dataclass
class Manifest:
    """One backup: the device's geometry and every chunk's digest (None: all zeros)."""

    id: str
    device_id: str
    host: str
    created: float
    size: int
    cluster_size: int
    chunk_size: int
    digest: str
    chunks: list[str | None]
    sync: str = "full"
    bitmap: str | None = None
    bitmap_mode: str | None = None
    parent: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    #: the bitmap's lineage generation after this backup (see the module docstring)
    bitmap_generation: str | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        def bad(msg: str) -> ManifestError:
            return ManifestError(f"manifest {self.id!r}: {msg}")
        if self.version not in READ_VERSIONS:
            raise bad(f"format version {self.version} (this shmblock reads "
                      f"{', '.join(map(str, READ_VERSIONS))})")
        if self.bitmap_generation is not None and (
                self.version < 2 or self.bitmap is None
                or not isinstance(self.bitmap_generation, str)
                or not GENERATION_RE.match(self.bitmap_generation)):
            raise bad(f"bitmap generation {self.bitmap_generation!r} needs format "
                      "version 2, a bitmap and 32 lower-case hex digits")
        if self.cluster_size <= 0 or self.chunk_size <= 0 or self.size <= 0:
            raise bad("sizes must be positive")
        if self.chunk_size % self.cluster_size or self.size % self.cluster_size:
            raise bad(f"chunk size {self.chunk_size} and device size {self.size} must be "
                      f"multiples of the cluster size {self.cluster_size}")
        if len(self.chunks) != -(-self.size // self.chunk_size):
            raise bad(f"{len(self.chunks)} chunks for {self.size} bytes in chunks of "
                      f"{self.chunk_size}")
        if self.digest not in DIGESTS:
            raise bad(f"unknown digest algorithm {self.digest!r}")
        for d in self.chunks:
            if d is not None and not (isinstance(d, str) and HEX_RE.match(d)):
                raise bad(f"chunk digest {d!r} is not lower-case hex")

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    @property
    def key(self) -> str:
        return manifest_key(self.device_id, self.id)

    def referenced(self) -> set[str]:
        return {d for d in self.chunks if d is not None}

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, where: str = "") -> Manifest:
        try:
            raw: Any = json.loads(data)
            if not isinstance(raw, dict):
                raise ValueError("not an object")
            names = {f for f in cls.__dataclass_fields__}
            unknown = set(raw) - names
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            return cls(**raw)
        except ManifestError:
            raise
        except (ValueError, TypeError) as exc:
            raise ManifestError(f"manifest {where or '?'} cannot be read: {exc}") from exc

    def summary(self) -> dict[str, Any]:
        """What `backups list --json` shows for it (no chunk list)."""
        zero = sum(1 for d in self.chunks if d is None)
        return {"id": self.id, "device": self.device_id, "host": self.host,
                "created": self.created, "size": self.size, "sync": self.sync,
                "bitmap": self.bitmap, "bitmap_generation": self.bitmap_generation,
                "parent": self.parent, "chunks": len(self.chunks),
                "zero_chunks": zero, "chunk_size": self.chunk_size, "digest": self.digest,
                "stats": self.stats}
