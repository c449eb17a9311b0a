"""Reading a backup out of the repository (restore, ``--verify``): every chunk is
checked against its digest before a byte of it is used (:class:`ChunkCorrupt`)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shmblock.errors import UsageError
from shmblock.repo.format import Manifest, RepoError
from shmblock.repo.repository import Repository
from shmblock.repo.url import open_store, parse_repo_url


class ManifestReader:
    """The guest bytes of one backup; ``fill`` any range (chunks cached one at a time)."""

    def __init__(self, repo: Repository, manifest: Manifest) -> None:
        self.repo = repo
        self.manifest = manifest
        self.size = manifest.size
        self._cached: tuple[int, bytes] | None = None

    def _chunk(self, i: int) -> bytes | None:
        m = self.manifest
        digest = m.chunks[i]
        if digest is None:
            return None
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
        data = self.repo.get_chunk(digest, m.digest, m.chunk_length(i),
                                   f"at offset {i * m.chunk_size} of backup {m.id} ")
        self._cached = (i, data)
        return data

    def fill(self, offset: int, out: memoryview) -> None:
        m = self.manifest
        end = offset + len(out)
        if offset < 0 or end > m.size:
            raise RepoError(f"read of {len(out)} bytes at {offset} is outside backup {m.id}")
        pos = offset
        while pos < end:
            i = pos // m.chunk_size
            lo = pos - i * m.chunk_size
            n = min(end - pos, m.chunk_length(i) - lo)
            data = self._chunk(i)
            dst = out[pos - offset:pos - offset + n]
            if data is None:
                dst[:] = bytes(n)
            else:
                dst[:] = data[lo:lo + n]
            pos += n

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.fill(offset, memoryview(out))
        return bytes(out)

    def allocated(self, grain: int) -> npt.NDArray[np.bool_]:
        """Grains of ``grain`` bytes some stored chunk covers (zero chunks: none)."""
        m = self.manifest
        n = -(-m.size // grain)
        found = np.zeros(n, dtype=np.bool_)
        for i, d in enumerate(m.chunks):
            if d is not None:
                lo = i * m.chunk_size
                found[lo // grain: -(-(lo + m.chunk_length(i)) // grain)] = True
        return found

    def close(self) -> None:
        self.repo.store.close()


def open_backup(url: str, backup_id: str | None = None, timeout: float = 30.0
                ) -> ManifestReader:
    """A reader of the backup ``url`` names (``<repo>/<backup-id>`` or ``backup_id``)."""
    parsed = parse_repo_url(url)
    bid = backup_id or parsed.backup_id
    if bid is None:
        raise UsageError(f"{url!r} names a repository, not a backup: add /<backup-id> "
                         "(see `shmblock-run backups list`) or --backup ID")
    repo = Repository(open_store(parsed, timeout), parsed.repo)
    try:
        return ManifestReader(repo, repo.find(bid))
    except BaseException:
        repo.store.close()
        raise
