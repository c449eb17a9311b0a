"""Persistent dirty bitmaps across crashes.

* SIGKILL of every process (real processes): an owner and a writer record bits, both are
  killed, and a new owner finds every bit — nothing lost, nothing marked inconsistent.
* Power loss (modelled): the region map goes through a VolatileDisk that keeps only what
  was synced, the maps file is cut back page by page to what was last synced, and the
  power is cut at a random operation. Recovery must report a superset of the clusters
  written since each bitmap was last cleared (plus the bits a backup job held and had
  not safely backed up), and leave untouched regions clean.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmblock.bitmaps import PersistentBitmapFile, VolatileDisk, store_dir
from shmblock.bitmaps import ondisk as D
from shmblock.errors import BitmapBusy
from tests.procs import ROOT, pid_gone

CS = 64 * 1024
REGION = 1 << 20  # 16 clusters per region
SIZE = 8 << 20  # 128 clusters, 8 regions
CPR = REGION // CS
BOOT_A = b"\xaa" * 16
BOOT_B = b"\xbb" * 16

# -- SIGKILL of every process ----------------------------------------------------------------

OWNER = f"""
import sys, time
from shmblock.bitmaps import PersistentBitmapFile
s = PersistentBitmapFile.open(sys.argv[1], cluster_size={CS}, region_size={REGION}, run_id="victim")
for c in (0, 1, 2, 99):
    s.note_write(c, c + 1)
    s.dirty[0, c] = 1
print("open", flush=True)
time.sleep(120)
"""

WRITER = """
import sys, time
from shmblock.bitmaps import PersistentBitmapFile
s = PersistentBitmapFile.attach(sys.argv[1])
mask = s.enabled_mask()
for c in range(40, 128, 3):
    s.note_write(c, c + 1)
    for i in range(8):
        if mask >> i & 1:
            s.dirty[i, c] = 1
print("written", flush=True)
time.sleep(120)
"""


def start(script: str, image: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, str(image)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def expect_line(proc: subprocess.Popen[str], want: str, timeout: float = 30) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        pytest.fail(f"no {want!r} from pid {proc.pid} within {timeout} s")
    line = proc.stdout.readline().strip()
    if line != want:
        err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
        pytest.fail(f"pid {proc.pid} said {line!r}, not {want!r}: {err}")


def kill9(proc: subprocess.Popen[str]) -> None:
    # Popen has not reaped the child, so its pid cannot have been reused: it is ours.
    assert proc.poll() is None, "the child exited before we killed it"
    proc.kill()
    proc.wait(timeout=10)
    assert proc.returncode == -9
    assert pid_gone(proc.pid)


@pytest.fixture
def shm_image(shm_prefix: str) -> Iterator[Path]:
    """An image in /dev/shm named with the test's prefix (the leak check covers it)."""
    image = Path(f"/dev/shm/{shm_prefix}-disk.raw")
    with open(image, "wb") as f:
        f.truncate(SIZE)
    try:
        yield image
    finally:
        d = store_dir(image)
        if d.exists():
            for p in d.iterdir():
                p.unlink()
            d.rmdir()
        image.unlink()


def test_sigkill_of_every_process_loses_no_bit(shm_image: Path) -> None:
    with PersistentBitmapFile.open(shm_image, cluster_size=CS, region_size=REGION) as s:
        s.add("rec")  # row 0
        s.add("frozen", enabled=False)
        s.add("other")  # row 2
    procs: list[subprocess.Popen[str]] = []
    try:
        owner = start(OWNER, shm_image)
        procs.append(owner)
        expect_line(owner, "open")
        with pytest.raises(BitmapBusy, match=rf"open by run victim \(pid {owner.pid}\)"):
            PersistentBitmapFile.open(shm_image, cluster_size=CS)
        writer = start(WRITER, shm_image)
        procs.append(writer)
        expect_line(writer, "written")
        kill9(writer)
        kill9(owner)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
    with PersistentBitmapFile.open(shm_image, cluster_size=CS) as s:
        assert s.recovery.stop == "process-crash"
        assert s.recovery.previous_run == "victim"
        assert s.recovery.inconsistent == {}
        assert [i.status for i in s.list()] == ["consistent"] * 3
        by_writer = list(range(40, 128, 3))
        assert np.flatnonzero(s.load("rec")).tolist() == sorted([0, 1, 2, 99, *by_writer])
        assert np.flatnonzero(s.load("other")).tolist() == by_writer
        assert not s.load("frozen").any()
    with PersistentBitmapFile.open(shm_image, cluster_size=CS) as s:
        assert s.recovery.stop == "clean"  # and the recovered state was stored cleanly


def test_in_use_flag_is_on_disk_while_open_and_gone_after_a_clean_close(tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(SIZE))
    s = PersistentBitmapFile.open(image, cluster_size=CS, region_size=REGION)
    s.add("a")
    raw = (store_dir(image) / "maps").read_bytes()
    assert D.unpack_super(raw[: D.SUPER_SIZE]).state == D.STATE_OPEN
    assert D.unpack_entry(raw[D.DIR_OFFSET : D.DIR_OFFSET + D.ENTRY_SIZE]).flags & D.F_IN_USE
    s.close()
    raw = (store_dir(image) / "maps").read_bytes()
    assert D.unpack_super(raw[: D.SUPER_SIZE]).state == D.STATE_CLEAN
    entry = D.unpack_entry(raw[D.DIR_OFFSET : D.DIR_OFFSET + D.ENTRY_SIZE])
    assert not entry.flags & D.F_IN_USE and entry.flags & D.F_CRC_VALID


# -- modelled power loss ----------------------------------------------------------------------


class PowerCut(Exception):
    """The machine lost power in the middle of an operation."""


class Machine:
    """Counts durability-relevant operations and cuts the power at the chosen one."""

    def __init__(self) -> None:
        self.countdown = -1  # never
        self.ticks = 0

    def tick(self, _what: str = "") -> None:
        self.ticks += 1
        if self.countdown == 0:
            raise PowerCut
        if self.countdown > 0:
            self.countdown -= 1


class ModelledStore(PersistentBitmapFile):
    """The maps file's disk is modelled as the bytes at its last sync."""

    machine: Machine
    durable: bytes

    def _sync_maps(self) -> None:
        machine = getattr(type(self), "machine", None)
        if machine is not None:
            machine.tick("maps-sync")
        assert self._map is not None
        # The model's disk is this snapshot; a real fdatasync would only cost time.
        self.durable = bytes(self._map)


def disk_after_power_loss(durable: bytes, current: bytes, pick: Callable[[int], bool]) -> bytes:
    """Each 4 KiB page of the maps file is either as last synced or as now (the page
    cache may have written any page back on its own)."""
    out = bytearray(durable)
    for off in range(0, len(current), D.PAGE):
        if pick(off // D.PAGE):
            out[off : off + D.PAGE] = current[off : off + D.PAGE]
    return bytes(out)


WRITE = st.tuples(st.just("write"), st.integers(0, 127), st.integers(1, 20))
OPS = st.lists(st.one_of(
    WRITE, WRITE, WRITE,
    st.tuples(st.just("consume"), st.sampled_from(["a", "b"]), st.just(0)),
    st.tuples(st.just("checkpoint"), st.just(0), st.just(0)),
    st.tuples(st.just("epoch"), st.just(0), st.just(0)),
    st.tuples(st.just("job-start"), st.sampled_from(["a", "b"]), st.just(0)),
    st.tuples(st.just("job-end"), st.sampled_from(["a", "b"]), st.integers(0, 2)),
    st.tuples(st.just("toggle"), st.sampled_from(["a", "b"]), st.just(0)),
), max_size=40)


def run_power_loss(tmp_path: Path, ops: list[tuple[str, object, int]], cut_at: int | None,
                   rng: np.random.Generator) -> int:
    """Run ``ops``, cut the power at tick ``cut_at`` (None: after the last op), recover,
    check. Returns how many ticks the run took before the cut."""
    tmp_path.mkdir(exist_ok=True)
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    machine = Machine()
    ModelledStore.machine = machine
    disk = VolatileDisk(before_op=machine.tick)
    s = ModelledStore.open(image, cluster_size=CS, region_size=REGION, intent=disk,
                           image_sync=lambda: machine.tick("image-sync"), boot_id=BOOT_A)
    s.add("a")
    s.add("b")
    expected = {"a": set[int](), "b": set[int]()}
    # Bits a running backup job holds: they must come back unless the job completed.
    held: dict[str, set[int]] = {}
    enabled = {"a": True, "b": True}
    touched: set[int] = set()  # regions a write was ever noted in
    machine.countdown = -1 if cut_at is None else cut_at  # None: after the last op
    try:
        for op, arg, n in ops:
            if op == "write":
                c0 = int(arg)  # type: ignore[call-overload]
                c1 = min(c0 + n, s.shape.clusters)
                # Touched from the moment its intent may be written, even if the power
                # goes before the write itself.
                touched.update(range(c0 // CPR, (c1 - 1) // CPR + 1))
                s.note_write(c0, c1)
                mask = s.enabled_mask()
                for i in range(D.MAX_BITMAPS):
                    if mask >> i & 1:
                        s.dirty[i, c0:c1] = 1
                # The data write would follow here; from now on the write happened.
                for name in ("a", "b"):
                    if enabled[name]:
                        expected[name].update(range(c0, c1))
            elif op == "consume":  # a backup's snapshot instant, writers frozen
                name = str(arg)
                if name in held:
                    continue  # busy: refused
                expected[name] = set()  # taken before: the clear may or may not land
                s.clear(name)
                s.begin_epoch()
            elif op == "job-start":  # snapshot instant of a job that consumes `name`
                name = str(arg)
                if name in held:
                    continue
                held[name], expected[name] = expected[name], set()
                s.begin_backup(name, "job-" + name)
                s.begin_epoch()
            elif op == "job-end":
                name = str(arg)
                if name not in held:
                    continue
                if n == 0:  # completed: the held bits are safely backed up
                    del held[name]
                    s.end_backup(name, "job-" + name, put_back=False)
                elif n == 1:  # failed or cancelled (on-success): every held bit back
                    s.end_backup(name, "job-" + name, put_back=True)
                    expected[name] |= held.pop(name)
                else:  # bitmap-mode always after a failure: clusters < 64 were saved
                    back = (np.arange(s.shape.clusters) >= 64).astype(np.uint8)
                    keep = {c for c in held[name] if c >= 64}
                    held[name] = keep  # the saved ones may go, whether or not we finish
                    s.end_backup(name, "job-" + name, put_back=back)
                    expected[name] |= held.pop(name)
            elif op == "checkpoint":  # after the thaw
                s.checkpoint()
            elif op == "epoch":  # a snapshot that consumes nothing (bitmap-mode never)
                s.begin_epoch()
            else:
                name = str(arg)
                if enabled[name]:
                    enabled[name] = False  # writes after this are not expected
                    s.disable(name)
                else:
                    s.enable(name)
                    enabled[name] = True
        machine.countdown = 0  # the power goes now, if it did not already
        machine.tick()
    except PowerCut:
        pass
    machine.countdown = -1
    ticks = machine.ticks
    durable, current = s.durable, bytes(s._map or b"")
    s.abandon()  # the processes are gone with the machine
    pages = rng.integers(0, 2, size=len(current) // D.PAGE + 1)
    (store_dir(image) / "maps").write_bytes(
        disk_after_power_loss(durable, current, lambda p: bool(pages[p])))
    kept = rng.integers(0, 2, size=len(disk.pending) + 1)
    intent_disk = disk.power_loss(keep=lambda i: bool(kept[i]))

    ModelledStore.machine = Machine()
    r = ModelledStore.open(image, cluster_size=CS, intent=VolatileDisk(intent_disk),
                           image_sync=lambda: None, boot_id=BOOT_B)
    try:
        assert r.recovery.stop == "machine-crash"
        assert r.recovery.inconsistent == {}
        for name in ("a", "b"):
            got = set(np.flatnonzero(r.load(name)).tolist())
            missed = (expected[name] | held.get(name, set())) - got
            assert not missed, f"bitmap {name} lost writes to clusters {sorted(missed)}"
            regions = {c // CPR for c in got}
            assert regions <= touched, f"{name}: untouched regions {regions - touched} dirty"
    finally:
        r.close()
    return ticks


REGIME: list[tuple[str, object, int]] = [
    ("write", 0, 3), ("write", 40, 2), ("toggle", "b", 0), ("write", 70, 20),
    ("job-start", "a", 0), ("write", 1, 1), ("write", 100, 5), ("checkpoint", 0, 0),
    ("write", 9, 1), ("job-end", "a", 1), ("toggle", "b", 0), ("job-start", "b", 0),
    ("write", 50, 1), ("job-end", "b", 2), ("job-start", "a", 0), ("epoch", 0, 0),
    ("write", 3, 1), ("job-end", "a", 0), ("consume", "b", 0), ("checkpoint", 0, 0),
    ("write", 33, 2), ("epoch", 0, 0), ("checkpoint", 0, 0), ("write", 120, 8),
]


def test_power_cut_at_every_point_of_a_backup_regime(tmp_path: Path) -> None:
    """The property test samples; this walks every durability point of one regime."""
    total = run_power_loss(tmp_path / "all", REGIME, None, np.random.default_rng(0))
    assert total > 40
    for cut in range(total + 1):
        for seed in range(3):
            run_power_loss(tmp_path / f"c{cut}-{seed}", REGIME, cut,
                           np.random.default_rng(seed))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, cut_at=st.one_of(st.none(), st.integers(0, 200)),
       seed=st.integers(0, 2**32 - 1))
def test_power_loss_recovery_never_misses_a_write(tmp_path_factory: pytest.TempPathFactory,
                                                  ops: list[tuple[str, object, int]],
                                                  cut_at: int | None, seed: int) -> None:
    run_power_loss(tmp_path_factory.mktemp("pl"), ops, cut_at, np.random.default_rng(seed))


def test_power_loss_after_a_checkpoint_replays_only_regions_written_since(
        tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    ModelledStore.machine = Machine()
    disk = VolatileDisk()
    s = ModelledStore.open(image, cluster_size=CS, region_size=REGION, intent=disk,
                           image_sync=lambda: None, boot_id=BOOT_A)
    s.add("a")
    for c in (0, 17):  # regions 0 and 1
        s.note_write(c, c + 1)
        s.dirty[0, c] = 1
    s.clear("a")  # a backup consumed it
    s.begin_epoch()
    s.checkpoint()
    s.note_write(40, 41)  # region 2, after the checkpoint
    s.dirty[0, 40] = 1
    durable = s.durable
    s.abandon()
    (store_dir(image) / "maps").write_bytes(durable)  # every unsynced page lost
    r = ModelledStore.open(image, cluster_size=CS, intent=VolatileDisk(disk.power_loss()),
                           image_sync=lambda: None, boot_id=BOOT_B)
    try:
        assert r.recovery.stop == "machine-crash"
        assert r.recovery.regions_replayed == 1
        assert np.flatnonzero(r.load("a")).tolist() == list(range(32, 48))
    finally:
        r.close()


def test_a_region_armed_before_a_checkpoint_stays_covered_after_it(tmp_path: Path) -> None:
    """The checkpoint must not clear a region written in the new epoch: later writes
    there take the fast path and rely on its intent byte."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    ModelledStore.machine = Machine()
    disk = VolatileDisk()
    s = ModelledStore.open(image, cluster_size=CS, region_size=REGION, intent=disk,
                           image_sync=lambda: None, boot_id=BOOT_A)
    s.add("a")
    s.begin_epoch()
    s.note_write(5, 6)
    s.dirty[0, 5] = 1
    s.checkpoint()
    assert s.note_write(6, 7) is False  # fast path: relies on region 0's intent
    s.dirty[0, 6] = 1
    durable = s.durable
    s.abandon()
    (store_dir(image) / "maps").write_bytes(durable)
    r = ModelledStore.open(image, cluster_size=CS, intent=VolatileDisk(disk.power_loss()),
                           image_sync=lambda: None, boot_id=BOOT_B)
    try:
        assert r.load("a")[5:7].all()
    finally:
        r.close()


def test_power_loss_with_nothing_written_marks_nothing(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    ModelledStore.machine = Machine()
    disk = VolatileDisk()
    s = ModelledStore.open(image, cluster_size=CS, region_size=REGION, intent=disk,
                           image_sync=lambda: None, boot_id=BOOT_A)
    s.add("a")
    durable = s.durable
    s.abandon()
    (store_dir(image) / "maps").write_bytes(durable)
    r = ModelledStore.open(image, cluster_size=CS, intent=VolatileDisk(disk.power_loss()),
                           image_sync=lambda: None, boot_id=BOOT_B)
    try:
        assert r.recovery.regions_replayed == 0
        assert r.info("a").count == 0
    finally:
        r.close()


@pytest.mark.parametrize(("damage", "reason"), [
    ("missing", "region map is unusable: the region map is truncated"),
    ("header", "region map is unusable: the region map has a bad magic"),
    ("foreign", "region map is unusable: the region map belongs to another store"),
])
def test_machine_crash_without_a_usable_region_map_is_inconsistent(
        tmp_path: Path, damage: str, reason: str) -> None:
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    s = PersistentBitmapFile.open(image, cluster_size=CS, region_size=REGION,
                                  run_id="gone", boot_id=BOOT_A)
    s.add("rec")
    s.add("frozen", enabled=False)
    s.note_write(3, 4)
    s.dirty[0, 3] = 1
    shape = s.shape
    s.abandon()
    intent = store_dir(image) / "intent"
    if damage == "missing":
        intent.unlink()
    elif damage == "header":
        with open(intent, "r+b") as f:
            f.write(b"garbage!")
    else:
        intent.write_bytes(D.pack_intent_header(shape, b"\1" * 16) + bytes(D.PAGE))
    with PersistentBitmapFile.open(image, cluster_size=CS, boot_id=BOOT_B) as r:
        assert r.recovery.stop == "machine-crash"
        rec = r.info("rec")
        assert rec.status == "inconsistent"
        assert rec.reason.startswith("the machine stopped while run gone had the bitmap "
                                     "open, and the " + reason)
        assert r.info("frozen").status == "consistent"  # checked by its checksum
        with pytest.raises(Exception, match="inconsistent"):
            r.require_consistent("rec")


def test_process_crash_keeps_bits_that_were_never_synced(tmp_path: Path) -> None:
    """Same boot: the page cache holds the truth; the region map is not even needed."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    s = PersistentBitmapFile.open(image, cluster_size=CS, region_size=REGION, boot_id=BOOT_A)
    s.add("a")
    s.dirty[0, 77] = 1  # never synced, and no note_write at all
    s.abandon()
    (store_dir(image) / "intent").unlink()
    t0 = time.monotonic()
    with PersistentBitmapFile.open(image, cluster_size=CS, boot_id=BOOT_A) as r:
        assert r.recovery.stop == "process-crash"
        assert np.flatnonzero(r.load("a")).tolist() == [77]
    assert time.monotonic() - t0 < 30
    assert os.path.exists(store_dir(image) / "intent")  # a fresh one was made


@pytest.mark.parametrize(("row_is", "status"), [
    ("old", "consistent"), ("new", "consistent"), ("half", "inconsistent")])
def test_a_change_cut_short_leaves_the_old_or_new_row_or_says_so(
        tmp_path: Path, row_is: str, status: str) -> None:
    """A non-recording bitmap is trusted by its checksum: a clear cut short by a crash
    must leave a row that is wholly old or wholly new, or be named inconsistent."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(2 * 4096 * CS)  # 8192 clusters: each row spans two pages
    s = PersistentBitmapFile.open(image, cluster_size=CS, region_size=REGION, boot_id=BOOT_A)
    s.add("d", enabled=False)
    old = np.ones(s.shape.clusters, dtype=np.uint8)
    s.store("d", old)
    shape = s.shape
    s.abandon()
    # The entry as _change_row writes it before touching the row (a clear).
    new = np.zeros(shape.clusters, dtype=np.uint8)
    entry = D.Entry("d", CS, D.F_DEFINED | D.F_CRC_VALID | D.F_CHANGING,
                    D.crc32(old.tobytes()), "", D.crc32(new.tobytes()))
    row = {"old": old, "new": new, "half": np.concatenate([new[:4096], old[4096:]])}[row_is]
    with open(store_dir(image) / "maps", "r+b") as f:
        f.seek(D.DIR_OFFSET)
        f.write(entry.pack())
        f.seek(D.MAPS_OFFSET)
        f.write(row.tobytes())
    with PersistentBitmapFile.open(image, cluster_size=CS, boot_id=BOOT_B) as r:
        info = r.info("d")
        assert info.status == status
        if status == "consistent":
            assert info.count == int(row.sum()) * CS
        else:
            assert info.reason == ("a change to the map was cut short by a crash and left "
                                   "it half old, half new")
    with PersistentBitmapFile.open(image, cluster_size=CS) as r:
        assert r.info("d").status == status  # settled, and stored so
