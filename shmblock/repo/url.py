"""Repository URLs: which store, which prefix, and the options of a backup into it.

* ``s3://bucket/prefix`` — S3 (Ceph RADOS Gateway, MinIO, AWS) through
  :mod:`shmblock.repo.s3`; endpoint, credentials and region from the usual AWS
  environment variables and config files, or ``?endpoint=URL&addressing=path|virtual``;
* ``file:///abs/dir`` — a directory (:class:`~shmblock.repo.filestore.FileStore`);
* ``mem://name`` — a :class:`~shmblock.repo.store.MemoryStore` of this process
  (tests of the in-process loop only).

Query parameters of a backup target (all optional): ``device`` (the device id the
backup is filed under; default the device's name), ``host`` (default the host name),
``chunk-size`` (bytes, a multiple of the cluster size; default 4 MiB), ``digest``
(blake3 by default, sha256, blake2b), ``threads`` (parallel uploads, default 4),
``deadline`` (seconds
one S3 request may take with its retries and back-off, default 300), ``spool`` (directory of the
local spool file; default the system's temporary directory). The engine adds ``sync``,
``bitmap`` and ``bitmap-mode`` from the job's options.

A backup is addressed as ``<repository URL>/<backup-id>`` (the last path element is a
backup id, :data:`shmblock.repo.format.ID_RE`), the query string after it.
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
from dataclasses import dataclass, field

from shmblock.errors import UsageError
from shmblock.repo.format import ID_RE
from shmblock.repo.store import MemoryStore, ObjectStore

SCHEMES = ("s3", "file", "mem")
_memory_stores: dict[str, MemoryStore] = {}
_memory_lock = threading.Lock()


def is_repo_url(target: str) -> bool:
    return target.split(":", 1)[0].lower() in SCHEMES and "://" in target


@dataclass(frozen=True)
class RepoUrl:
    scheme: str
    location: str  # bucket/prefix, directory or memory name
    backup_id: str | None = None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def repo(self) -> str:
        """The repository's URL without the backup id and options."""
        return f"{self.scheme}://{self.location}"

    def param(self, name: str, default: str | None = None) -> str | None:
        return self.params.get(name, default)

    def with_params(self, **extra: str | None) -> str:
        params = dict(self.params)
        params.update({k.replace("_", "-"): v for k, v in extra.items() if v is not None})
        query = urllib.parse.urlencode(sorted(params.items()))
        tail = f"/{self.backup_id}" if self.backup_id else ""
        return f"{self.repo}{tail}" + (f"?{query}" if query else "")


KNOWN_PARAMS = {"device", "host", "chunk-size", "digest", "threads", "spool", "endpoint",
                "addressing", "region", "deadline", "sync", "bitmap", "bitmap-mode",
                "bitmap-generation", "bitmap-next"}


def parse_repo_url(url: str) -> RepoUrl:
    """Split a repository (or backup) URL; UsageError naming what is wrong."""
    if not is_repo_url(url):
        raise UsageError(f"{url!r} is not a repository URL (s3://bucket/prefix, "
                         "file:///dir or mem://name)")
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    rest, _, query = rest.partition("?")
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise UsageError(f"bad options in repository URL {url!r}: {exc}") from exc
    params = dict(pairs)
    unknown = set(params) - KNOWN_PARAMS
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(sorted(unknown))} in {url!r} "
                         f"(known: {', '.join(sorted(KNOWN_PARAMS))})")
    rest = rest.rstrip("/")
    backup_id = None
    head, _, last = rest.rpartition("/")
    if head and ID_RE.match(last):
        rest, backup_id = head, last
    if scheme == "file":
        if not rest.startswith("/"):
            raise UsageError(f"file repository {url!r} needs an absolute path (file:///dir)")
    elif not rest or rest.startswith("/"):
        raise UsageError(f"repository URL {url!r} has no bucket or name")
    return RepoUrl(scheme, rest, backup_id, params)


def default_host() -> str:
    host = socket.gethostname().split(".")[0] or "localhost"
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in host)[:64]


def open_store(url: RepoUrl, timeout: float = 30.0) -> ObjectStore:
    """The object store a repository URL names (raises StoreError / UsageError)."""
    if url.scheme == "file":
        from shmblock.repo.filestore import FileStore
        return FileStore(url.location)
    if url.scheme == "mem":
        with _memory_lock:
            return _memory_stores.setdefault(url.location, MemoryStore())
    import importlib
    # shmblock.repo.s3 (boto3) is imported only for an s3:// repository.
    s3 = importlib.import_module("shmblock.repo.s3")
    opts: dict[str, object] = {}
    if url.param("endpoint"):
        opts["endpoint_url"] = url.param("endpoint")
    if url.param("addressing"):
        opts["addressing_style"] = url.param("addressing")
    if url.param("region"):
        opts["region"] = url.param("region")
    deadline = url.param("deadline")
    if deadline is not None:
        try:
            opts["deadline"] = float(deadline)
        except ValueError:
            raise UsageError(f"repository option deadline={deadline!r} must be seconds") \
                from None
        if not 0 < opts["deadline"] <= 86400:  # type: ignore[operator]
            raise UsageError(f"repository option deadline={deadline!r} must be 0-86400 s")
    store: ObjectStore = s3.open_store(f"s3://{url.location}", timeout=timeout, **opts)
    return store
