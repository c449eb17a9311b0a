"""The backup repository on the in-process MemoryStore: format, chunking, zero chunks,
dedup, incremental chains, prune, the gc protocol's races, verify and corrupt chunks."""

from __future__ import annotations

import random
import time
import uuid

import numpy as np
import numpy.typing as npt
import pytest

from shmblock.errors import TargetError, TargetIOError, TargetUnreachable, UsageError
from shmblock.lineage import new_generation
from shmblock.repo.format import (
    ChunkCorrupt,
    Manifest,
    ManifestError,
    RepoError,
    chunk_key,
    id_time,
    new_backup_id,
    parse_manifest_key,
)
from shmblock.repo.repository import GRACE, GcResult, Lock, Policy, Repository, parse_duration
from shmblock.repo.source import ManifestReader
from shmblock.repo.store import MemoryStore, StoreUnavailable
from shmblock.repo.target import RepoTarget, job_target
from shmblock.repo.url import open_store, parse_repo_url

CS = 64 << 10
CHUNK = 256 << 10  # 4 clusters a chunk: small images, many chunks
SIZE = CS * 4 * 6 + 2 * CS  # 6 whole chunks and a short last one

U8 = npt.NDArray[np.uint8]


@pytest.fixture
def url() -> str:
    return f"mem://{uuid.uuid4().hex}?chunk-size={CHUNK}"


def repo_of(url: str) -> Repository:
    parsed = parse_repo_url(url)
    return Repository(open_store(parsed), parsed.repo)


def image(seed: int, zero_chunks: tuple[int, ...] = (1,)) -> U8:
    img = np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8)
    for i in zero_chunks:
        img[i * CHUNK:(i + 1) * CHUNK] = 0
    return img


#: (repository, device, bitmap) → the bitmap's lineage generation, as the engine would keep it
LINEAGE: dict[tuple[str, str, str], str] = {}


def backup(url: str, img: U8, *, sync: str = "full", bitmap: str | None = "b",
           dirty: list[int] | None = None, device: str = "dev", host: str = "h1",
           seed: int = 0, seal: bool = True) -> RepoTarget:
    """Write the clusters (all, or ``dirty``) in a random order, as CBW saves arrive."""
    key = (url.split("?", maxsplit=1)[0], device, bitmap or "")
    gen, minted = LINEAGE.get(key, new_generation()), new_generation()
    target = job_target(f"{url}&device={device}&host={host}", sync=sync, bitmap=bitmap,
                        bitmap_mode="on-success" if bitmap else None, device_name="x",
                        device_file=None, bitmap_generation=gen if bitmap else None,
                        bitmap_next=minted if bitmap else None)
    t = RepoTarget(target, SIZE, CS)
    clusters = list(range(SIZE // CS)) if dirty is None else list(dirty)
    random.Random(seed).shuffle(clusters)
    for c in clusters:
        data = img[c * CS:(c + 1) * CS]
        if data.any():
            t.write(c * CS, data.tobytes())
        else:
            t.write_zeroes(c * CS, CS)
    if seal:
        t.seal()
        t.close()
        if bitmap:
            LINEAGE[key] = minted
    return t


def restored(url: str, backup_id: str) -> bytes:
    repo = repo_of(url)
    return ManifestReader(repo, repo.find(backup_id)).read(0, SIZE)


# -- format ------------------------------------------------------------------------------


def test_manifest_round_trip_and_checks() -> None:
    bid = new_backup_id("host-a")
    assert abs(id_time(bid) - time.time()) < 5
    m = Manifest(id=bid, device_id="d", host="host-a", created=1.0, size=3 * CS,
                 cluster_size=CS, chunk_size=2 * CS, digest="sha256",
                 chunks=["ab" * 32, None])
    assert Manifest.decode(m.encode()) == m
    assert parse_manifest_key(m.key) == ("d", bid)
    with pytest.raises(ManifestError, match="chunks for"):
        Manifest.decode(m.encode().replace(b',null]', b']'))
    with pytest.raises(ManifestError, match="version"):
        Manifest(**{**m.__dict__, "version": 3})
    with pytest.raises(ManifestError, match="multiples"):
        Manifest(**{**m.__dict__, "chunk_size": CS + 512})
    with pytest.raises(ManifestError, match="cannot be read"):
        Manifest.decode(b"{not json")


def test_urls() -> None:
    u = parse_repo_url("s3://bucket/some/prefix/20261130T150000.000001Z-h-0123abcd?device=x")
    assert (u.repo, u.backup_id, u.param("device")) == ("s3://bucket/some/prefix",
                                                         "20261130T150000.000001Z-h-0123abcd",
                                                         "x")
    assert parse_repo_url("s3://bucket/p").backup_id is None
    with pytest.raises(UsageError, match="unknown option"):
        parse_repo_url("s3://bucket/p?bogus=1")
    with pytest.raises(UsageError, match="absolute"):
        parse_repo_url("file://relative/dir")
    with pytest.raises(UsageError, match="sync=none"):
        job_target("mem://x", sync="none", bitmap=None, bitmap_mode=None, device_name="d",
                   device_file=None)


def test_parse_duration_and_policy() -> None:
    assert parse_duration("90m") == 5400 and parse_duration("2d") == 172800
    with pytest.raises(UsageError):
        parse_duration("soon")
    with pytest.raises(UsageError, match="retention policy"):
        Policy()


# -- chunking, zero chunks, dedup ---------------------------------------------------------


def test_full_backup_restores_and_stores_zero_chunks_as_nothing(url: str) -> None:
    img = image(1, zero_chunks=(1, 3))
    t = backup(url, img)
    m = t.manifest
    assert len(m.chunks) == 7 and m.chunks[1] is None and m.chunks[3] is None
    assert m.chunk_length(6) == 2 * CS
    repo = repo_of(url)
    stored = [o.key for o in repo.store.list("chunks/")]
    assert sorted(stored) == sorted(chunk_key(d) for d in m.referenced())
    assert t.stats["uploaded_chunks"] == 5 and t.stats["zero_chunks"] == 2
    assert restored(url, m.id) == img.tobytes()
    assert not list(repo.store.list("locks/"))


def test_dedup_across_backups_devices_and_hosts(url: str) -> None:
    img = image(2)
    first = backup(url, img, device="a", host="h1")
    assert first.stats["uploaded_chunks"] == 6
    second = backup(url, img, device="b", host="h2", seed=1)
    assert second.stats["uploaded_chunks"] == 0 and second.stats["dedup_chunks"] == 6
    assert restored(url, second.manifest.id) == img.tobytes()


def test_chunk_size_must_be_a_multiple_of_the_cluster_size() -> None:
    target = job_target(f"mem://{uuid.uuid4().hex}?chunk-size={CS + 4096}", sync="full",
                        bitmap=None, bitmap_mode=None, device_name="d", device_file=None)
    with pytest.raises(TargetError, match="multiple of the cluster size"):
        RepoTarget(target, SIZE, CS)


# -- incremental forever -------------------------------------------------------------------


def test_incremental_reads_only_dirty_and_takes_clean_clusters_from_the_parent(url: str) -> None:
    img1 = image(3)
    full = backup(url, img1).manifest
    img2 = img1.copy()
    dirty = [0, 4, 5, 6, 7, 25]  # part of chunk 0, all of chunk 1 (was zero), part of 6
    rng = np.random.default_rng(9)
    for c in dirty:
        img2[c * CS:(c + 1) * CS] = rng.integers(0, 256, CS, dtype=np.uint8)
    t = backup(url, img2, sync="incremental", dirty=dirty)
    inc = t.manifest
    assert inc.parent == full.id and inc.sync == "incremental"
    assert t.stats["received_bytes"] == len(dirty) * CS
    assert inc.chunks[2:6] == full.chunks[2:6]  # untouched: the parent's, nothing uploaded
    assert t.stats["uploaded_chunks"] == 3
    assert restored(url, inc.id) == img2.tobytes()
    assert restored(url, full.id) == img1.tobytes()  # every backup restores on its own
    # A chain: the next incremental's parent is the newest backup of that bitmap.
    img3 = img2.copy()
    img3[2 * CS:3 * CS] = 0
    third = backup(url, img3, sync="incremental", dirty=[2]).manifest
    assert third.parent == inc.id
    assert restored(url, third.id) == img3.tobytes()


def test_incremental_without_a_parent_of_its_bitmap_is_refused(url: str) -> None:
    backup(url, image(4), bitmap="other")
    with pytest.raises(TargetUnreachable, match="take a full backup with --bitmap b first"):
        backup(url, image(4), sync="incremental", dirty=[0])


def test_incremental_onto_another_geometry_is_refused(url: str) -> None:
    backup(url, image(4))
    other = url.replace(f"chunk-size={CHUNK}", f"chunk-size={2 * CHUNK}")
    with pytest.raises(TargetUnreachable, match="chunk size"):
        backup(other, image(4), sync="incremental", dirty=[0])


# -- failures ---------------------------------------------------------------------------------


class FailingStore(MemoryStore):
    """Chunk uploads fail after ``ok`` of them (a store gone mid-backup)."""

    def __init__(self, inner: MemoryStore, ok: int) -> None:
        super().__init__()
        self._objects = inner._objects  # share the contents
        self.ok = ok

    def put(self, key: str, data: bytes | memoryview) -> None:
        if key.startswith("chunks/"):
            if self.ok <= 0:
                raise StoreUnavailable(f"cannot put {key}: connection refused")
            self.ok -= 1
        super().put(key, data)


def test_failed_uploads_fail_the_job_without_a_manifest_and_the_next_dedups(url: str) -> None:
    repo = repo_of(url)
    failing = Repository(FailingStore(repo.store, ok=2), "mem")  # type: ignore[arg-type]
    target = job_target(f"{url}&device=dev&host=h1", sync="full", bitmap="b",
                        bitmap_mode="on-success", device_name="x", device_file=None)
    t = RepoTarget(target, SIZE, CS, store=failing)
    img = image(5)
    with pytest.raises(TargetIOError, match="connection refused"):
        for c in range(SIZE // CS):
            t.write(c * CS, img[c * CS:(c + 1) * CS].tobytes())
            t.settle()
        t.seal()
    t.abort()
    t.close()
    assert list(repo.manifest_keys()) == []
    assert not list(repo.store.list("locks/"))  # the lease went with the job
    nxt = backup(url, img)
    assert nxt.stats["dedup_chunks"] == 2 and nxt.stats["uploaded_chunks"] == 4
    assert restored(url, nxt.manifest.id) == img.tobytes()


def test_verify_names_corrupt_and_missing_chunks_and_restore_refuses(url: str) -> None:
    img = image(6)
    m = backup(url, img).manifest
    other = backup(url, img, device="other").manifest
    repo = repo_of(url)
    assert repo.verify(repo.manifests())[2] == []
    bad, gone = m.chunks[2], m.chunks[4]
    assert bad is not None and gone is not None
    data = bytearray(repo.store.get(chunk_key(bad)))
    data[100] ^= 1
    repo.store.put(chunk_key(bad), bytes(data))
    repo.store.delete(chunk_key(gone))
    backups, chunks, problems = repo.verify(repo.manifests())
    assert (backups, chunks) == (2, 6)
    got = {(p.backup, p.offset, p.problem) for p in problems}
    assert got == {(b, 2 * CHUNK, "corrupt") for b in (m.id, other.id)} | \
        {(b, 4 * CHUNK, "missing") for b in (m.id, other.id)}
    reader = ManifestReader(repo, m)
    assert reader.read(0, CHUNK) == img[:CHUNK].tobytes()
    with pytest.raises(ChunkCorrupt, match=f"at offset {2 * CHUNK} of backup {m.id}"):
        reader.read(2 * CHUNK, 10)


# -- prune -----------------------------------------------------------------------------------


def test_prune_keeps_last_and_within_per_device(url: str) -> None:
    repo = repo_of(url)
    now = time.time()
    ids = {}
    for dev in ("a", "b"):
        for age_days in (10, 5, 2, 1):
            bid = new_backup_id("h", now - age_days * 86400)
            m = Manifest(id=bid, device_id=dev, host="h", created=0, size=CS,
                         cluster_size=CS, chunk_size=CS, digest="sha256", chunks=[None])
            repo.put_manifest(m)
            ids[(dev, age_days)] = bid
    removed = repo.prune(Policy(keep_last=1, keep_within=3 * 86400), dry_run=True, now=now)
    assert sorted(removed) == sorted((d, ids[(d, a)]) for d in "ab" for a in (10, 5))
    assert len(repo.manifest_keys()) == 8  # dry run
    repo.prune(Policy(keep_last=3), device="a", now=now)
    assert [b for d, b, _ in repo.manifest_keys("a")] == [ids[("a", a)] for a in (5, 2, 1)]
    assert len(repo.manifest_keys("b")) == 4


# -- garbage collection and its races ------------------------------------------------------


def _orphan_chunk(url: str) -> tuple[Repository, U8]:
    """A repository whose only backup was pruned: all its chunks are unreferenced."""
    img = image(7)
    backup(url, img, device="old")
    repo = repo_of(url)
    repo.prune(Policy(keep_within=1), device="old", now=time.time() + 3600)
    assert repo.manifest_keys("old") == []
    return repo, img


def test_gc_deletes_unreferenced_chunks_only(url: str) -> None:
    img = image(8)
    kept = backup(url, img).manifest
    repo, _ = _orphan_chunk(url)
    before = len(list(repo.store.list("chunks/")))
    result = repo.gc()
    assert result.deleted == 6 and not result.postponed
    assert len(list(repo.store.list("chunks/"))) == before - 6
    assert repo.verify([kept])[2] == []
    assert repo.store.head("gc/condemned.json") is None and not list(repo.store.list("locks/"))


def test_race_backup_dedups_against_a_condemned_chunk_while_gc_sweeps(url: str) -> None:
    """The worst point: the backup has de-duplicated (HEAD found the orphan chunks) and
    not yet written its manifest when a whole gc (mark and sweep) runs."""
    repo, img = _orphan_chunk(url)
    results = []
    target = job_target(f"{url}&device=new&host=h2", sync="full", bitmap=None,
                        bitmap_mode=None, device_name="x", device_file=None)
    t = RepoTarget(target, SIZE, CS, store=repo)
    repo.hooks.append(lambda point: results.append(repo.gc()) if point ==
                      "backup:before-manifest" else None)
    for c in range(SIZE // CS):
        t.write(c * CS, img[c * CS:(c + 1) * CS].tobytes())
    t.seal()
    t.close()
    assert t.stats["dedup_chunks"] == 6 and t.stats["uploaded_chunks"] == 0
    assert results[0].condemned == 6 and "backup(s) running" in results[0].postponed
    assert results[0].deleted == 0
    repo.hooks.clear()
    assert repo.gc().deleted == 0  # now referenced by the new manifest
    assert repo.verify(repo.manifests())[2] == []
    assert restored(url, t.manifest.id) == img.tobytes()


def test_race_is_lost_without_the_lease_check(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same interleaving with the sweep blind to leases loses chunks: the test above
    can fail."""
    repo, img = _orphan_chunk(url)
    real = Repository._locks
    monkeypatch.setattr(Repository, "_locks", lambda self, kind: [] if kind == "backup"
                        else real(self, kind))
    target = job_target(f"{url}&device=new&host=h2", sync="full", bitmap=None,
                        bitmap_mode=None, device_name="x", device_file=None)
    t = RepoTarget(target, SIZE, CS, store=repo)
    repo.hooks.append(lambda point: repo.gc() if point == "backup:before-manifest" else None)
    for c in range(SIZE // CS):
        t.write(c * CS, img[c * CS:(c + 1) * CS].tobytes())
    t.seal()
    t.close()
    repo.hooks.clear()
    assert {p.problem for p in repo.verify(repo.manifests())[2]} == {"missing"}


def test_race_backup_between_mark_and_sweep_keeps_its_chunks(url: str) -> None:
    """A backup that starts after the mark, de-duplicates against condemned chunks and
    finishes before the sweep: the sweep reads its manifest and keeps them."""
    repo, img = _orphan_chunk(url)
    assert repo.gc_mark().condemned == 6
    m = backup(url, img, device="new").manifest
    result = repo.gc_sweep()
    assert result.deleted == 0 and result.kept_new_refs == 6
    assert restored(url, m.id) == img.tobytes()


def test_a_backup_waits_for_a_running_sweep_then_fails_clearly(url: str) -> None:
    repo, _ = _orphan_chunk(url)
    repo.gc_mark()
    errors = []

    def start_backup(point: str) -> None:
        if point == "gc:before-delete":
            try:
                repo.acquire_lease("20261130T150000.000001Z-h9-00000000", "h9", "d", wait=0.3)
            except RepoError as exc:
                errors.append(str(exc))
    repo.hooks.append(start_backup)
    assert repo.gc_sweep(host="gchost").deleted == 6
    assert len(errors) == 1 and "locked by a gc sweep on host gchost" in errors[0]
    assert not list(repo.store.list("locks/"))  # the refused lease was taken back


def test_lease_written_while_a_sweep_lists_postpones_it(url: str) -> None:
    """Both sides write, then list: a lease written right after the sweep's lock is
    seen by the sweep, or the lock by the backup; here the backup's hook runs the sweep
    between its lease and its listing."""
    repo, _ = _orphan_chunk(url)
    repo.gc_mark()
    outcome: list[GcResult] = []
    repo.hooks.append(lambda point: outcome.append(repo.gc_sweep()) if point ==
                      "backup:lease-written" and not outcome else None)
    lease = repo.acquire_lease("20261130T150000.000001Z-h9-00000000", "h9", "d", wait=5)
    lease.release()
    assert outcome[0].postponed and outcome[0].deleted == 0


def test_an_expired_lease_does_not_block_gc_and_a_stale_backup_writes_no_manifest(
        url: str) -> None:
    repo, _ = _orphan_chunk(url)
    old = time.time() - 3 * GRACE
    repo.store.put("locks/backup-dead.json",
                   Lock("locks/backup-dead.json", "backup", "h", old, old).encode())
    assert repo.gc().deleted == 6
    target = job_target(f"{url}&device=new&host=h2", sync="full", bitmap=None,
                        bitmap_mode=None, device_name="x", device_file=None)
    t = RepoTarget(target, SIZE, CS, store=repo)
    assert t._lease is not None
    t._lease.written_expiry = time.time() - 1  # its refreshes failed for too long
    for c in range(SIZE // CS):
        t.write_zeroes(c * CS, CS)
    with pytest.raises(TargetIOError, match=r"lease .* expired"):
        t.seal()
    t.close()
    assert repo.manifest_keys() == []



def test_the_spool_holds_only_chunks_not_yet_stored(url: str) -> None:
    """A full backup in cluster order: each chunk's spool space is punched out once it
    is stored, so the spool never holds much more than the chunks in flight."""
    img = image(10, zero_chunks=())
    t = backup(url, img, seed=0, seal=False)  # random order: a worst case for partials
    t.seal()
    t.close()
    assert t.stats["spool_peak_bytes"] <= SIZE
    ordered = job_target(f"{url}&device=o&host=h1", sync="full", bitmap=None,
                         bitmap_mode=None, device_name="x", device_file=None)
    t = RepoTarget(ordered, SIZE, CS)
    for c in range(SIZE // CS):
        t.write(c * CS, img[c * CS:(c + 1) * CS].tobytes())
        for f in list(t._futures):
            f.result()  # uploads keep up: the spool holds about one chunk
    t.seal()
    t.close()
    assert t.stats["spool_peak_bytes"] <= CHUNK
    assert t._spooled == 0
