"""An :class:`~shmblock.repo.store.ObjectStore` on a local directory (``file:///dir``).

For a repository on a local or network file system, and for tests that run real worker
processes without an S3 endpoint (restic's "local" backend is the same idea). Puts are
atomic (a private temporary name, fsync, rename); keys map to paths below the root, and
a key that would leave the root is refused.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

from shmblock.repo.store import ObjectInfo, ObjectMissing, StoreError

_TMP = ".tmp-"


class FileStore:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        if not os.path.isdir(self.root):
            raise StoreError(f"repository directory {self.root!r} does not exist")

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") or p.startswith(_TMP)
                                                 for p in parts):
            raise StoreError(f"bad object key {key!r}")
        return os.path.join(self.root, *parts)

    def put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), _TMP + secrets.token_hex(8))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StoreError(f"cannot put {key!r} in {self.root!r}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ObjectMissing(f"no object {key!r} in {self.root!r}") from None
        except OSError as exc:
            raise StoreError(f"cannot get {key!r} from {self.root!r}: {exc}") from exc

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot stat {key!r} in {self.root!r}: {exc}") from exc
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        found: list[ObjectInfo] = []
        for dirpath, dirs, files in os.walk(self.root):
            dirs.sort()
            rel = os.path.relpath(dirpath, self.root)
            base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            if not (base.startswith(prefix) or prefix.startswith(base)):
                dirs[:] = []
                continue
            for name in files:
                key = base + name
                if name.startswith(_TMP) or not key.startswith(prefix):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(os.path.join(dirpath, name))
                    found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        found.sort(key=lambda o: o.key)
        yield from found

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def close(self) -> None:
        pass
