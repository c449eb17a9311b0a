"""Bitmap lineage (``shmblock/lineage.py``): a repository incremental builds only on the
backup since whose instant its bitmap holds every write.

Real engines and worker processes backing up into a ``file://`` repository. Every way
to break a chain — the bitmap consumed by a backup to a file, cleared, removed and
re-added, disabled and enabled again, changed between a job's preparation and its
instant — is refused with a clear error; a valid chain restores equal to the device at
each instant; a job that fails or is cancelled, under each bitmap mode, leaves the
bitmap's generation as it was so the chain goes on; the generation survives a restart
of a file-backed device, a run that dies mid-backup, and the upgrade of a store written
before lineage.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from shmblock.bitmaps import PersistentBitmapFile
from shmblock.bitmaps import ondisk as D
from shmblock.device_handle import DeviceHandle
from shmblock.engine import Engine
from shmblock.errors import BitmapError, JobError
from shmblock.job import Outcome
from shmblock.repo.format import Manifest
from shmblock.repo.repository import Repository
from shmblock.repo.source import ManifestReader
from shmblock.repo.url import open_store, parse_repo_url
from tests.procs import MiB, wait_until

CLUSTER = 64 * 1024
SIZE = 4 * MiB
N = SIZE // CLUSTER
SLOW = 4 * CLUSTER  # bytes per second: slow enough to cancel mid-job
REFUSED = r"take a full backup with --bitmap b"


@pytest.fixture
def url(tmp_path: Path) -> str:
    root = tmp_path / "repo"
    root.mkdir()
    return f"file://{root}?device=d&chunk-size=256K"


@pytest.fixture(params=["shm", "file"])
def device(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Engine,
                                                                          DeviceHandle]]:
    """A device in shared memory or backed by a file (persistent bitmaps), with bitmap
    ``b`` and some data."""
    backing = None
    if request.param == "file":
        backing = str(tmp_path / "disk.raw")
        with open(backing, "wb") as f:
            f.truncate(SIZE)
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER, backing_file=backing)
        dev.add_bitmap("b")
        write(dev, range(0, N, 3), seed=1)
        yield engine, dev


def write(dev: DeviceHandle, clusters: Iterator[int] | range | list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c in clusters:
        dev.write(c * CLUSTER, rng.integers(1, 256, CLUSTER, dtype=np.uint8))


def repo_of(url: str) -> Repository:
    parsed = parse_repo_url(url)
    return Repository(open_store(parsed), parsed.repo)


def newest(url: str) -> Manifest:
    m = repo_of(url).latest("d")
    assert m is not None
    return m


def restored(url: str, m: Manifest) -> bytes:
    return ManifestReader(repo_of(url), m).read(0, SIZE)


def backup(engine: Engine, dev: DeviceHandle, target: str, sync: str = "incremental",
           mode: str | None = None) -> Manifest | None:
    """A completed backup; its manifest when ``target`` is the repository."""
    reference = bytes(dev.device.data)
    if mode is None and sync != "incremental":
        mode = "on-success"
    job = engine.backup(dev, target, sync=sync, bitmap="b", bitmap_mode=mode)
    result = job.wait(120.0)
    assert result.outcome is Outcome.COMPLETED, result.error
    if not target.startswith("file://"):
        return None
    m = newest(target)
    assert restored(target, m) == reference, "the backup differs from its instant"
    return m


def generation(dev: DeviceHandle) -> str:
    (info,) = [i for i in dev.bitmap_info() if i.name == "b"]
    return info.generation


# -- a valid chain -------------------------------------------------------------------------


def test_a_valid_chain_builds_on_the_backup_that_recorded_the_generation(
        device: tuple[Engine, DeviceHandle], url: str) -> None:
    engine, dev = device
    full = backup(engine, dev, url, sync="full")
    assert full is not None and full.bitmap_generation == generation(dev)
    parent = full
    for round_ in range(2):
        write(dev, [1, 7, 8 + round_], seed=10 + round_)
        inc = backup(engine, dev, url)
        assert inc is not None and inc.parent == parent.id and inc.sync == "incremental"
        assert inc.bitmap_generation == generation(dev) != parent.bitmap_generation
        assert inc.stats["received_bytes"] == 3 * CLUSTER  # only what changed
        parent = inc
    # Merging adds bits: the bitmap still holds every write since its generation began.
    dev.add_bitmap("extra")
    write(dev, [20], seed=30)
    before = generation(dev)
    dev.merge_bitmaps("b", ["extra"])
    assert generation(dev) == before
    inc = backup(engine, dev, url)
    assert inc is not None and inc.parent == parent.id


def test_a_never_backup_records_no_generation_and_the_chain_stays_on_its_parent(
        device: tuple[Engine, DeviceHandle], url: str) -> None:
    """bitmap-mode never keeps the bits (a differential): the bitmap keeps its
    generation, the backup records none, and the next incremental's parent is the
    backup before it."""
    engine, dev = device
    full = backup(engine, dev, url, sync="full")
    assert full is not None
    write(dev, [2], seed=11)
    diff = backup(engine, dev, url, sync="bitmap", mode="never")
    assert diff is not None and diff.parent == full.id and diff.bitmap_generation is None
    assert generation(dev) == full.bitmap_generation
    write(dev, [4], seed=12)
    inc = backup(engine, dev, url)
    assert inc is not None and inc.parent == full.id
    assert inc.stats["received_bytes"] == 2 * CLUSTER


# -- every way to break a chain is refused -----------------------------------------------


def consumed_by_a_file_backup(engine: Engine, dev: DeviceHandle, tmp: Path) -> None:
    backup(engine, dev, str(tmp / "elsewhere.raw"), sync="incremental")


def cleared(engine: Engine, dev: DeviceHandle, tmp: Path) -> None:
    dev.clear_bitmap("b")


def removed_and_re_added(engine: Engine, dev: DeviceHandle, tmp: Path) -> None:
    dev.remove_bitmap("b")
    dev.add_bitmap("b")


def disabled_then_enabled(engine: Engine, dev: DeviceHandle, tmp: Path) -> None:
    dev.disable_bitmap("b")
    write(dev, [5], seed=21)  # missed by the bitmap
    dev.enable_bitmap("b")


def consumed_by_a_transaction_clear(engine: Engine, dev: DeviceHandle, tmp: Path) -> None:
    from shmblock.transaction import BitmapClear
    engine.transaction([BitmapClear(dev, "b")]).wait(60.0)


BREAKS: list[Callable[[Engine, DeviceHandle, Path], None]] = [
    consumed_by_a_file_backup, cleared, removed_and_re_added, disabled_then_enabled,
    consumed_by_a_transaction_clear]


@pytest.mark.parametrize("break_chain", BREAKS, ids=lambda f: f.__name__)
def test_a_broken_chain_is_refused(device: tuple[Engine, DeviceHandle], url: str,
                                   tmp_path: Path,
                                   break_chain: Callable[[Engine, DeviceHandle, Path],
                                                         None]) -> None:
    engine, dev = device
    full = backup(engine, dev, url, sync="full")
    assert full is not None
    write(dev, [3, 9], seed=20)
    break_chain(engine, dev, tmp_path)
    write(dev, [6], seed=22)
    with pytest.raises(JobError, match=REFUSED) as caught:
        engine.create_backup(dev, url, sync="incremental", bitmap="b")
    assert full.id in str(caught.value), "the error names the newest backup of the bitmap"
    assert not dev.busy_bitmaps
    # The way on: a full backup with the bitmap starts a new chain.
    write(dev, [10], seed=23)
    again = backup(engine, dev, url, sync="full")
    write(dev, [11], seed=24)
    inc = backup(engine, dev, url)
    assert again is not None and inc is not None and inc.parent == again.id


def test_a_change_between_preparation_and_instant_fails_the_job(
        device: tuple[Engine, DeviceHandle], url: str) -> None:
    """The worker was told the generation when the job was prepared; a disable before
    the instant ends it, and the snapshot refuses instead of using the wrong parent."""
    engine, dev = device
    backup(engine, dev, url, sync="full")
    write(dev, [3], seed=20)
    job = engine.create_backup(dev, url, sync="incremental", bitmap="b")
    dev.disable_bitmap("b")
    with pytest.raises(BitmapError, match=r"changed .* after job .* was prepared"):
        job.start()
    job.wait(60.0)
    assert not dev.busy_bitmaps
    assert dev.bitmap("b")[3], "the refused job consumed nothing"


# -- a job that does not complete leaves the generation as it was --------------------------


@pytest.mark.parametrize("sync,mode", [("incremental", None), ("bitmap", "on-success"),
                                       ("bitmap", "always"), ("bitmap", "never"),
                                       ("full", "on-success")])
def test_a_cancelled_job_restores_the_generation_and_the_chain_goes_on(
        device: tuple[Engine, DeviceHandle], url: str, tmp_path: Path, sync: str,
        mode: str | None) -> None:
    engine, dev = device
    full = backup(engine, dev, url, sync="full")
    assert full is not None
    write(dev, list(range(1, N, 2)), seed=40)  # enough to copy slowly
    before = generation(dev)
    bits = dev.bitmap("b")
    for target in (url, str(tmp_path / "cancelled.raw")):  # into the repository, and a file
        job = engine.backup(dev, target, sync=sync, bitmap="b", bitmap_mode=mode, speed=SLOW)
        assert generation(dev) != before, "the instant starts the job's generation"
        wait_until(lambda: int(np.count_nonzero(dev.device.saved)) >= 2, 30.0,
                   what="a few clusters copied")
        job.cancel()
        assert job.wait(60.0).outcome is Outcome.CANCELLED
        assert generation(dev) == before, f"{target}: the pre-job generation is back"
        assert np.array_equal(dev.bitmap("b") & bits, bits), "the bits are back"
    assert newest(url).id == full.id, "a cancelled job writes no manifest"
    inc = backup(engine, dev, url)
    assert inc is not None and inc.parent == full.id


def test_a_grouped_transaction_that_fails_takes_the_generation_back(
        tmp_path: Path, url: str) -> None:
    """A repository job that completed (its manifest is written) in a grouped
    transaction whose other job fails is settled as failed: its bitmap gets its bits
    and its old generation back, and the next incremental builds on the backup before,
    not on the manifest the group discarded."""
    from shmblock.transaction import Backup
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER)
        other = engine.create_device(SIZE, CLUSTER, name="dev1")
        dev.add_bitmap("b")
        write(dev, range(N), seed=1)
        write(other, range(N), seed=2)
        full = backup(engine, dev, url, sync="full")
        assert full is not None
        write(dev, [2], seed=3)
        before = generation(dev)
        (tmp_path / "blocked").mkdir()
        txn = engine.transaction([
            Backup(dev, url, sync="incremental", bitmap="b"),
            Backup(other, str(tmp_path / "slow.raw"), speed=SLOW)],
            completion_mode="grouped")
        wait_until(lambda: len(repo_of(url).manifest_keys("d")) == 2, 60.0,
                   what="the repository job's manifest")
        txn.cancel()
        txn.wait(60.0)
        assert not txn.succeeded
        assert generation(dev) == before and dev.bitmap("b")[2]
        write(dev, [4], seed=5)
        inc = backup(engine, dev, url)
        assert inc is not None and inc.parent == full.id


# -- persistence ------------------------------------------------------------------------------


def test_the_generation_survives_a_restart_of_a_file_backed_device(
        tmp_path: Path, url: str) -> None:
    disk = str(tmp_path / "disk.raw")
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER, backing_file=disk)
        dev.add_bitmap("b")
        write(dev, range(0, N, 4), seed=1)
        full = backup(engine, dev, url, sync="full")
        assert full is not None
        write(dev, [1], seed=2)
        gen = generation(dev)
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER, backing_file=disk)
        assert generation(dev) == gen == full.bitmap_generation
        write(dev, [5], seed=3)
        inc = backup(engine, dev, url)
        assert inc is not None and inc.parent == full.id
        assert inc.stats["received_bytes"] == 2 * CLUSTER


def test_a_run_that_dies_mid_backup_leaves_the_prior_generation(tmp_path: Path) -> None:
    """The frozen copy keeps the generation the bitmap had: the next open puts back the
    bits and that generation (a crash never leaves the job's, which no backup has)."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(SIZE))
    store = PersistentBitmapFile.open(disk, CLUSTER)
    store.add("b")
    store.dirty[store.rows()["b"], [1, 2]] = 1
    prior = store.generation("b")
    store.begin_backup("b", "job1")
    assert store.generation("b") not in ("", prior)
    store.abandon()  # the run dies
    with PersistentBitmapFile.open(disk, CLUSTER) as again:
        assert again.recovery.restored == {"b": "job1"}
        assert again.generation("b") == prior
        assert again.load("b")[[1, 2]].all()


@pytest.mark.parametrize("put_back,same", [(True, True), (False, False), ("half", False)])
def test_end_backup_settles_the_generation(tmp_path: Path, put_back: object,
                                           same: bool) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(SIZE))
    with PersistentBitmapFile.open(disk, CLUSTER) as store:
        store.add("b")
        store.dirty[store.rows()["b"], [1, 2]] = 1
        prior = store.generation("b")
        minted = "ab" * 16
        store.begin_backup("b", "job1", generation=minted)
        if put_back == "half":
            half = np.zeros(N, dtype=np.uint8)
            half[1] = 1
            store.end_backup("b", "job1", half)
            assert store.generation("b") not in (prior, minted)  # a partial copy: new
        else:
            assert isinstance(put_back, bool)
            store.end_backup("b", "job1", put_back)
            assert store.generation("b") == (prior if same else minted)


def test_a_store_written_before_lineage_is_upgraded(tmp_path: Path) -> None:
    """Version 1 (no lineage tail): read, each bitmap given a fresh generation at the
    owner's open, the superblock rewritten as version 2; inspect shows none before."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(SIZE))
    with PersistentBitmapFile.open(disk, CLUSTER) as store:
        store.add("b")
    maps = disk.with_name("disk.raw.bitmaps") / "maps"
    raw = bytearray(maps.read_bytes())
    # Back to version 1: the entry without its tail, the superblock's version 1.
    for i in range(D.MAX_BITMAPS):
        off = D.DIR_OFFSET + i * D.ENTRY_SIZE
        raw[off + D.TAIL_OFFSET : off + D.ENTRY_SIZE] = bytes(D.ENTRY_SIZE - D.TAIL_OFFSET)
    sup = D.SUPER.unpack_from(raw, 0)
    body = D.SUPER.pack(sup[0], 1, *sup[2:])
    raw[: len(body) + 4] = body + D.CRC.pack(D.crc32(body))
    maps.write_bytes(bytes(raw))
    from shmblock.bitmaps import inspect
    assert [b.generation for b in inspect(disk).bitmaps] == [""]
    with PersistentBitmapFile.open(disk, CLUSTER) as store:
        assert len(store.generation("b")) == 32
        gen = store.generation("b")
    assert D.SUPER.unpack_from(maps.read_bytes(), 0)[1] == D.VERSION == 2
    assert [b.generation for b in inspect(disk).bitmaps] == [gen]


def test_a_torn_lineage_tail_makes_the_bitmap_inconsistent(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(SIZE))
    with PersistentBitmapFile.open(disk, CLUSTER) as store:
        store.add("b")
        i = store.rows()["b"]
    maps = disk.with_name("disk.raw.bitmaps") / "maps"
    raw = bytearray(maps.read_bytes())
    raw[D.DIR_OFFSET + i * D.ENTRY_SIZE + D.TAIL_OFFSET] ^= 0xFF
    maps.write_bytes(bytes(raw))
    with PersistentBitmapFile.open(disk, CLUSTER) as store:
        (info,) = store.list()
        assert info.status == "inconsistent" and "lineage checksum" in info.reason


# -- the manifest and the worker's URL ----------------------------------------------------


def test_a_manifest_from_before_lineage_restores_but_is_no_parent() -> None:
    from shmblock.errors import TargetUnreachable
    from shmblock.lineage import new_generation
    from shmblock.repo.format import ManifestError, new_backup_id
    from shmblock.repo.target import RepoTarget, job_target
    url = f"mem://{uuid.uuid4().hex}?chunk-size=256K"
    old = Manifest(id=new_backup_id("h"), device_id="d", host="h", created=1.0, size=SIZE,
                   cluster_size=CLUSTER, chunk_size=256 << 10, digest="sha256",
                   chunks=[None] * (SIZE // (256 << 10)), bitmap="b",
                   bitmap_mode="on-success", version=1)
    assert Manifest.decode(old.encode()).bitmap_generation is None
    repo_of(url).put_manifest(old)
    assert restored(url, old) == bytes(SIZE)
    gen = new_generation()
    with pytest.raises(ManifestError, match="needs format version 2"):
        Manifest(**{**old.__dict__, "bitmap_generation": gen})
    with pytest.raises(ManifestError, match="32 lower-case hex"):
        Manifest(**{**old.__dict__, "version": 2, "bitmap_generation": "xyz"})
    # A generation a user puts in the URL is dropped: only the engine says it.
    target = job_target(f"{url}&device=d&bitmap-generation={gen}", sync="incremental",
                        bitmap="b", bitmap_mode="on-success", device_name="d",
                        device_file=None)
    assert "bitmap-generation" not in target
    target = job_target(f"{url}&device=d", sync="incremental", bitmap="b",
                        bitmap_mode="on-success", device_name="d", device_file=None,
                        bitmap_generation=gen, bitmap_next=new_generation())
    with pytest.raises(TargetUnreachable, match=r"before bitmap lineage.*take a full backup"):
        RepoTarget(target, SIZE, CLUSTER)
