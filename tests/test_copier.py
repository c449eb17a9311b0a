"""The backup worker's hands: background copy, copy requests, staging drain, run helpers."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from shmblock import layout as L
from shmblock.claims import Claims
from shmblock.copier import Copier, Served, nonzero_clusters, runs
from shmblock.device import Device, Geometry
from shmblock.errors import JobError
from shmblock.targets.base import Buffer, Target
from shmblock.targets.raw import RawTarget
from tests.helpers import CS, begin_job, new_device, pattern

N = 32
GEO = Geometry(N * CS, cluster_size=CS, max_writers=2, buffer_slots=4)


# -- runs() and nonzero_clusters() ------------------------------------------------------------


def test_runs_edge_cases() -> None:
    assert runs(np.zeros(0, dtype=np.bool_)) == []
    assert runs(np.array([True])) == [(0, 1, True)]
    assert runs(np.array([False])) == [(0, 1, False)]
    assert runs(np.array([True, True, True])) == [(0, 3, True)]
    assert runs(np.array([False, True])) == [(0, 1, False), (1, 2, True)]
    assert runs(np.array([True, False, True])) == [(0, 1, True), (1, 2, False), (2, 3, True)]
    assert runs(np.array([0, 0, 1, 1, 0], dtype=np.uint8) != 0) == [
        (0, 2, False), (2, 4, True), (4, 5, False)]


@pytest.mark.parametrize("seed", range(20))
def test_runs_reassemble_the_mask(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random(int(rng.integers(1, 200))) < rng.random()
    out = runs(mask)
    assert out[0][0] == 0 and out[-1][1] == mask.size
    for (_, b, v), (c, _, w) in itertools.pairwise(out):
        assert b == c and v != w  # contiguous, maximal
    for a, b, v in out:
        assert a < b
        assert (mask[a:b] == v).all()
    assert all(type(v) is bool for _, _, v in out)


def test_nonzero_clusters() -> None:
    data = np.zeros(6 * CS, dtype=np.uint8)
    data[0] = 1  # first byte of cluster 0
    data[3 * CS - 1] = 0x80  # last byte of cluster 2
    data[5 * CS + CS // 2] = 0xFF
    assert nonzero_clusters(data, CS).tolist() == [True, False, True, False, False, True]
    assert nonzero_clusters(np.zeros(CS, dtype=np.uint8), CS).tolist() == [False]
    assert nonzero_clusters(data[CS : 2 * CS], CS).dtype == np.bool_


def test_nonzero_clusters_of_a_staging_row() -> None:
    """A single cluster-sized row (what drain_staging passes) works too."""
    row = np.zeros((2, CS), dtype=np.uint8)
    row[1, 7] = 1
    assert nonzero_clusters(row[0], CS).tolist() == [False]
    assert nonzero_clusters(row[1], CS).tolist() == [True]


# -- fixtures -------------------------------------------------------------------------------


@dataclass
class Rig:
    device: Device
    target: RawTarget
    claims: Claims
    copier: Copier
    path: Path

    def target_bytes(self) -> bytes:
        return self.target.read(0, self.device.size)


@pytest.fixture
def device() -> Iterator[Device]:
    with new_device(GEO) as dev:
        yield dev


def make_rig(device: Device, tmp_path: Path, chunk_bytes: int = 4 * CS) -> Rig:
    path = tmp_path / "backup.raw"
    target = RawTarget(str(path), device.size, device.cluster_size)
    claims = Claims(device.meta_name)
    return Rig(device, target, claims, Copier(device, target, claims, chunk_bytes), path)


@pytest.fixture
def rig(device: Device, tmp_path: Path) -> Iterator[Rig]:
    r = make_rig(device, tmp_path)
    try:
        yield r
    finally:
        r.copier.close()
        r.claims.close()
        r.target.abort()
        r.target.close()


def guest_fill(device: Device, clusters: list[int], seed: int = 0) -> None:
    """Put data in ``clusters`` the way a guest write would (data + allocated)."""
    for c in clusters:
        device.data[c * CS : (c + 1) * CS] = np.frombuffer(pattern(CS, seed + c), np.uint8)
        device.allocated[c] = 1


def copy_all(copier: Copier) -> None:
    for _ in range(10 * N):
        if copier.background_done:
            return
        copier.copy_next_chunk()
    raise AssertionError("background copy made no progress")


# -- background copy --------------------------------------------------------------------------


def test_background_copy_equals_the_device_and_is_sparse(rig: Rig) -> None:
    dev = rig.device
    data_clusters = [0, 1, 5, 9, 10, 11, 31]
    guest_fill(dev, data_clusters)
    dev.allocated[20] = 1  # written, but with zeros
    begin_job(dev, "full")
    copy_all(rig.copier)
    assert not dev.needs_copy.any()
    assert rig.copier.clusters_saved == N
    assert rig.copier.bytes_written == len(data_clusters) * CS
    assert rig.copier.marked_clusters() == 0
    # saved covers everything the job covered
    assert dev.saved.all()
    rig.target.commit()
    assert rig.path.read_bytes() == dev.data.tobytes()
    st = os.stat(rig.path)
    assert st.st_size == dev.size
    # Zero clusters stay holes: 7 data clusters, some slack for file-system metadata.
    assert st.st_blocks * 512 <= (len(data_clusters) + 4) * CS


def test_background_copy_of_an_empty_device_writes_nothing(rig: Rig) -> None:
    begin_job(rig.device, "full")
    copy_all(rig.copier)
    assert rig.copier.bytes_written == 0
    rig.target.commit()
    assert os.stat(rig.path).st_blocks * 512 <= 4 * CS
    assert rig.path.read_bytes() == bytes(rig.device.size)


def test_sync_top_copies_only_allocated(rig: Rig) -> None:
    dev = rig.device
    guest_fill(dev, [3, 17])
    begin_job(dev, "top")
    assert np.flatnonzero(dev.needs_copy).tolist() == [3, 17]
    assert rig.copier.copy_next_chunk() == 1  # chunk 0..3 holds cluster 3
    assert rig.copier.cursor == 4
    assert rig.copier.copy_next_chunk() == 1  # skips straight to chunk 16..19
    assert rig.copier.cursor == 20
    assert rig.copier.copy_next_chunk() == 0
    assert rig.copier.background_done
    assert rig.copier.cursor == N
    assert np.flatnonzero(dev.saved).tolist() == [3, 17]
    assert rig.target_bytes() == dev.data.tobytes()


def test_cursor_stops_at_the_end_with_a_ragged_last_chunk(device: Device, tmp_path: Path) -> None:
    r = make_rig(device, tmp_path, chunk_bytes=5 * CS)  # 32 = 6*5 + 2
    try:
        guest_fill(device, [30, 31])
        begin_job(device, "full")
        saved = [r.copier.copy_next_chunk() for _ in range(7)]
        assert saved == [5, 5, 5, 5, 5, 5, 2]
        assert r.copier.cursor == N
        assert r.copier.background_done
        assert r.copier.copy_next_chunk() == 0
        assert r.target_bytes() == device.data.tobytes()
    finally:
        r.copier.close()
        r.claims.close()
        r.target.abort()


def test_chunk_smaller_than_a_cluster_is_one_cluster(device: Device, tmp_path: Path) -> None:
    r = make_rig(device, tmp_path, chunk_bytes=1)
    try:
        assert r.copier.chunk == 1
        begin_job(device, "full")
        assert r.copier.copy_next_chunk() == 1
        assert r.copier.cursor == 1
    finally:
        r.copier.close()
        r.claims.close()
        r.target.abort()


def test_a_claimed_chunk_is_skipped_without_advancing(rig: Rig) -> None:
    dev = rig.device
    guest_fill(dev, [0, 5, 6])
    begin_job(dev, "full")
    with Claims(dev.meta_name) as writer:
        assert writer.try_claim(6)  # a writer is saving cluster 6 right now
        assert rig.copier.copy_next_chunk() == 4  # chunk [0,4) is free
        assert rig.copier.copy_next_chunk() == 0  # chunk [4,8) holds 6
        assert rig.copier.cursor == 4
        assert dev.needs_copy[4:8].all()  # nothing of the chunk was taken
        assert not dev.saved[4:8].any()
        assert rig.copier.copy_next_chunk() == 0
        assert rig.copier.cursor == 4
        writer.release(6)
    assert rig.copier.copy_next_chunk() == 4
    assert rig.copier.cursor == 8
    copy_all(rig.copier)
    assert rig.target_bytes() == dev.data.tobytes()


def test_background_copy_releases_its_claims(rig: Rig) -> None:
    begin_job(rig.device, "full")
    rig.copier.copy_next_chunk()
    with Claims(rig.device.meta_name) as other:
        assert other.try_claim(0, N)


def test_background_copy_skips_what_writers_saved(rig: Rig) -> None:
    dev = rig.device
    guest_fill(dev, [1, 2])
    begin_job(dev, "full")
    dev.needs_copy[1] = 0  # a writer staged cluster 1 and cleared its bit
    assert rig.copier.copy_next_chunk() == 3
    assert dev.saved[:4].tolist() == [1, 0, 1, 1]
    assert rig.target_bytes()[CS : 2 * CS] == bytes(CS)  # not written by the background


# -- copy requests ------------------------------------------------------------------------------


def test_serve_request_writes_and_clears(rig: Rig) -> None:
    dev = rig.device
    guest_fill(dev, [7, 8, 9])
    begin_job(dev, "full")
    rig.copier.begin()
    job = int(dev.ctl[L.CTL_JOB_SEQ])
    assert rig.copier.serve_request(8, 1, job) is Served.SAVED
    assert dev.needs_copy[8] == 0
    assert dev.needs_copy[7] == 1 and dev.needs_copy[9] == 1
    assert dev.saved[8] == 1 and dev.saved.sum() == 1
    assert rig.copier.cbw_clusters == 1
    assert rig.target_bytes()[8 * CS : 9 * CS] == dev.data[8 * CS : 9 * CS].tobytes()
    # serving it again writes nothing (it is no longer marked)
    before = rig.copier.bytes_written
    assert rig.copier.serve_request(8, 1, job) is Served.ALREADY_SAVED
    assert rig.copier.bytes_written == before
    assert rig.copier.cbw_clusters == 1
    with Claims(dev.meta_name) as other:
        assert other.try_claim(0, N)  # every claim was released


def test_serve_request_range_with_holes(rig: Rig) -> None:
    dev = rig.device
    guest_fill(dev, [10, 12])
    begin_job(dev, "full")
    rig.copier.begin()
    dev.needs_copy[11] = 0
    assert rig.copier.serve_request(10, 4, int(dev.ctl[L.CTL_JOB_SEQ])) is Served.SAVED
    assert not dev.needs_copy[10:14].any()
    assert dev.saved[10:14].tolist() == [1, 0, 1, 1]
    assert rig.copier.cbw_clusters == 3


def test_serve_request_past_the_end_is_clipped(rig: Rig) -> None:
    begin_job(rig.device, "full")
    rig.copier.begin()
    job = int(rig.device.ctl[L.CTL_JOB_SEQ])
    assert rig.copier.serve_request(N - 1, 5, job) is Served.SAVED
    assert rig.device.needs_copy[N - 1] == 0
    # nothing there: nothing happens
    assert rig.copier.serve_request(N + 3, 1, job) is Served.ALREADY_SAVED
    assert rig.copier.cbw_clusters == 1


def test_serve_request_outside_a_job_is_a_no_op(rig: Rig) -> None:
    guest_fill(rig.device, [4])
    assert rig.copier.serve_request(4, 1, 0) is Served.STALE
    assert rig.copier.bytes_written == 0
    assert rig.target_bytes() == bytes(rig.device.size)


def test_serve_request_of_another_job_copies_nothing(rig: Rig) -> None:
    """A request left in the queue by an earlier job is answered, never served."""
    dev = rig.device
    guest_fill(dev, [4])
    begin_job(dev, "full")
    rig.copier.begin()
    job = int(dev.ctl[L.CTL_JOB_SEQ])
    for stale in (job - 1, job + 1, 0):
        assert rig.copier.serve_request(4, 1, stale) is Served.STALE
    assert dev.needs_copy[4] == 1 and not dev.saved.any()
    assert rig.copier.bytes_written == 0


def test_serve_request_before_the_job_began_is_stale(rig: Rig) -> None:
    """Until begin() the copier does not know the job: the worker keeps such requests."""
    dev = rig.device
    begin_job(dev, "full")
    assert rig.copier.serve_request(4, 1, int(dev.ctl[L.CTL_JOB_SEQ])) is Served.STALE
    assert dev.needs_copy[4] == 1


def test_serve_request_under_a_held_claim_is_busy(rig: Rig) -> None:
    """A writer staging the cluster holds its claim: the request waits, nothing is read."""
    dev = rig.device
    guest_fill(dev, [5])
    begin_job(dev, "full")
    rig.copier.begin()
    job = int(dev.ctl[L.CTL_JOB_SEQ])
    with Claims(dev.meta_name) as writer:
        assert writer.try_claim(5)
        assert rig.copier.serve_request(5, 1, job) is Served.BUSY
        assert rig.copier.serve_request(4, 2, job) is Served.BUSY  # any claim of the range
        assert dev.needs_copy[4] == 1 and dev.needs_copy[5] == 1
        assert not dev.saved.any()
        # the writer stages 5 and writes new data, then lets go
        old = stage(dev, 0, 5)
        dev.data[5 * CS : 6 * CS] = 0xAB
        writer.release(5)
    assert rig.copier.serve_request(5, 1, job) is Served.ALREADY_SAVED
    assert not dev.saved[5]  # the stale request copied nothing; the drain saves it
    assert rig.copier.drain_staging() == 1
    assert rig.target_bytes()[5 * CS : 6 * CS] == old


def test_stale_request_after_a_writer_staged_copies_nothing(rig: Rig) -> None:
    """Issue 7 item 1 on a raw target: the snapshot cluster is all zeros, a stage-mode
    writer saves it and writes data; a stale request for it must not copy the new data
    (the staged zeros would not repair it: zero writes are skipped on a raw target)."""
    dev = rig.device
    begin_job(dev, "full")
    rig.copier.begin()
    job = int(dev.ctl[L.CTL_JOB_SEQ])
    stage(dev, 0, 3)
    dev.data[3 * CS : 4 * CS] = 0x5A
    dev.allocated[3] = 1
    assert rig.copier.serve_request(3, 1, job) is Served.ALREADY_SAVED
    rig.copier.drain_staging()
    copy_all(rig.copier)
    assert rig.target_bytes()[3 * CS : 4 * CS] == bytes(CS)


# -- staging drain --------------------------------------------------------------------------------


def stage(device: Device, slot: int, cluster: int) -> bytes:
    """What GuestIO does in stage mode: copy the old contents, FULL, clear needs_copy."""
    old = device.data[cluster * CS : (cluster + 1) * CS].tobytes()
    device.staging[slot] = device.data[cluster * CS : (cluster + 1) * CS]
    device.slot_cluster[slot] = cluster
    device.slot_state[slot] = L.SLOT_FULL
    device.needs_copy[cluster] = 0
    return old


def test_drain_writes_the_staged_contents_not_the_device(rig: Rig) -> None:
    dev = rig.device
    guest_fill(dev, [2, 6])
    begin_job(dev, "full")
    old2 = stage(dev, 0, 2)
    old6 = stage(dev, 3, 6)  # writer 1's second slot
    # the guest overwrites both after staging
    dev.data[2 * CS : 3 * CS] = 0xAA
    dev.data[6 * CS : 7 * CS] = 0
    assert rig.copier.drain_staging() == 2
    assert (dev.slot_state == L.SLOT_FREE).all()
    assert rig.copier.cbw_clusters == 2
    assert dev.saved[2] == 1 and dev.saved[6] == 1
    back = rig.target_bytes()
    assert back[2 * CS : 3 * CS] == old2
    assert back[6 * CS : 7 * CS] == old6
    # and the background copy does not overwrite them with the new contents
    copy_all(rig.copier)
    back = rig.target_bytes()
    assert back[2 * CS : 3 * CS] == old2
    assert back[6 * CS : 7 * CS] == old6
    assert rig.copier.drain_staging() == 0


def test_drain_of_a_zero_cluster(rig: Rig) -> None:
    dev = rig.device
    begin_job(dev, "full")
    stage(dev, 1, 9)  # cluster 9 was all zeros at the snapshot
    dev.data[9 * CS : 10 * CS] = 0x55
    dev.allocated[9] = 1
    assert rig.copier.drain_staging() == 1
    assert rig.copier.bytes_written == 0  # zeros are a hole on a fresh raw file
    assert rig.target_bytes()[9 * CS : 10 * CS] == bytes(CS)
    assert dev.saved[9] == 1


def test_drain_with_nothing_staged(rig: Rig) -> None:
    begin_job(rig.device, "full")
    assert rig.copier.drain_staging() == 0
    assert rig.copier.cbw_clusters == 0


class RecordingTarget(Target):
    """A target that remembers every call, and does not start zeroed (like NBD)."""

    kind = "recording"
    starts_zeroed = False

    def __init__(self, size: int, cluster_size: int) -> None:
        super().__init__(size, cluster_size)
        self.calls: list[tuple[str, int, int]] = []
        self.image = bytearray(b"\xee" * size)  # unknown prior contents

    def write(self, offset: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        self.calls.append(("write", offset, len(view)))
        self.image[offset : offset + len(view)] = view

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        self.calls.append(("zeroes", offset, length))
        self.image[offset : offset + length] = bytes(length)

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.image[offset : offset + length])

    def describe(self) -> str:
        return "recording"


def test_target_not_zeroed_gets_explicit_zeroes_in_runs(device: Device) -> None:
    guest_fill(device, [2, 3, 9])
    begin_job(device, "full")
    target = RecordingTarget(device.size, CS)
    with Claims(device.meta_name) as claims:
        copier = Copier(device, target, claims, chunk_bytes=N * CS)
        try:
            assert copier.copy_next_chunk() == N
        finally:
            copier.close()
    assert target.image == device.data.tobytes()
    # one write per run of data, one write_zeroes per run of zeros
    assert target.calls == [
        ("zeroes", 0, 2 * CS), ("write", 2 * CS, 2 * CS), ("zeroes", 4 * CS, 5 * CS),
        ("write", 9 * CS, CS), ("zeroes", 10 * CS, (N - 10) * CS)]


def test_zeroed_target_skips_never_written_clusters(device: Device) -> None:
    class Zeroed(RecordingTarget):
        starts_zeroed = True

    guest_fill(device, [4])
    device.allocated[6:8] = 1  # written with zeros: must be recorded as zeros
    begin_job(device, "full")
    target = Zeroed(device.size, CS)
    with Claims(device.meta_name) as claims:
        copier = Copier(device, target, claims, chunk_bytes=N * CS)
        try:
            copier.copy_next_chunk()
        finally:
            copier.close()
    assert target.calls == [("write", 4 * CS, CS), ("zeroes", 6 * CS, 2 * CS)]


def test_close_lets_the_device_close(tmp_path: Path) -> None:
    with new_device(GEO) as dev:
        r = make_rig(dev, tmp_path)
        begin_job(dev, "full")
        r.copier.copy_next_chunk()
        r.copier.close()
        r.claims.close()
        r.target.abort()
        dev.close()  # no BufferError: the copier dropped its views
        assert dev.closed


# -- finishing a job --------------------------------------------------------------------------


def test_finish_drains_what_was_staged_after_the_last_drain(rig: Rig) -> None:
    """A mutant of finish() without its final drain loses this cluster every time."""
    dev = rig.device
    guest_fill(dev, [2])
    begin_job(dev, "full")
    rig.copier.begin()
    old = stage(dev, 1, 2)  # a writer staged it after the worker's last drain
    dev.data[2 * CS : 3 * CS] = 0x11
    copy_all(rig.copier)
    rig.copier.finish("full")
    slots = dev.slot_state.copy()  # no view of the device in a failing assert
    assert (slots == L.SLOT_FREE).all(), "finish() left a staged cluster"
    assert rig.target_bytes()[2 * CS : 3 * CS] == old


def test_finish_refuses_a_cluster_left_unsaved(rig: Rig) -> None:
    begin_job(rig.device, "full")
    rig.copier.begin()
    with pytest.raises(JobError, match=f"{N} clusters left unsaved"):
        rig.copier.finish("full")


def test_finish_of_sync_none_waits_for_a_writer_staging_now(rig: Rig) -> None:
    """sync=none: a writer that read needs_copy == 1 under its claim just before the job
    completes still stages; finish() must wait for it and drain its slot."""
    dev = rig.device
    guest_fill(dev, [6])
    begin_job(dev, "none")
    rig.copier.begin()
    with Claims(dev.meta_name) as writer:
        assert writer.try_claim(6)
        assert dev.needs_copy[6] == 1  # the writer has checked, and is about to stage
        staged: list[bytes] = []

        def stage_and_release() -> None:
            staged.append(stage(dev, 0, 6))
            dev.data[6 * CS : 7 * CS] = 0x22
            writer.release(6)

        timer = threading.Timer(0.05, stage_and_release)
        timer.start()
        try:
            rig.copier.finish("none")
        finally:
            timer.join()
    # Copies: a failing assert must not keep a view of the device alive.
    nc, slots, saved = dev.needs_copy.copy(), dev.slot_state.copy(), dev.saved.tolist()
    assert not nc.any()  # copy-before-write stopped: later writes go ahead
    assert (slots == L.SLOT_FREE).all(), "the cluster staged at the end was left behind"
    assert saved == [int(c == 6) for c in range(N)]
    assert rig.target_bytes()[6 * CS : 7 * CS] == staged[0]


def test_finish_of_sync_none_gives_up_on_a_stuck_claim(rig: Rig) -> None:
    begin_job(rig.device, "none")
    with Claims(rig.device.meta_name) as writer:
        assert writer.try_claim(3)
        with pytest.raises(JobError, match="kept a cluster claimed"):
            rig.copier.stop_copy_before_write(timeout=0.05)


def test_finish_settles_the_target(device: Device) -> None:
    class Settling(RecordingTarget):
        def settle(self) -> None:
            self.calls.append(("settle", 0, 0))

    begin_job(device, "full")
    target = Settling(device.size, CS)
    with Claims(device.meta_name) as claims:
        copier = Copier(device, target, claims, chunk_bytes=N * CS)
        try:
            copier.copy_next_chunk()
            copier.finish("full")
        finally:
            copier.close()
    assert target.calls[-1] == ("settle", 0, 0)


# -- never-allocated clusters are not read (targets that start zeroed) ------------------------


class _ZeroedFlagTarget(RawTarget):
    """A raw target that says it does not start zeroed (as an NBD export would)."""

    starts_zeroed = False


def test_never_allocated_clusters_are_not_read_on_a_zeroed_target(rig: Rig) -> None:
    """Clusters whose ``allocated`` byte is 0 are left out without reading them.

    Planting bytes in a cluster while leaving it unallocated (no real writer does that:
    every path that stores device data sets ``allocated`` first) shows whether the
    copier read it: the old code read every cluster of the chunk and wrote the planted
    bytes; the target must hold zeros there instead.
    """
    dev = rig.device
    guest_fill(dev, [0, 2, 9])
    dev.data[5 * CS : 6 * CS] = 0xAB  # data, but never "allocated": never read
    dev.data[12 * CS : 14 * CS] = 0xCD
    begin_job(dev, "full")
    copy_all(rig.copier)
    assert rig.copier.clusters_saved == N
    assert dev.saved.all() and not dev.needs_copy.any()
    assert rig.copier.bytes_written == 3 * CS
    expected = dev.data.copy()
    expected[5 * CS : 6 * CS] = 0
    expected[12 * CS : 14 * CS] = 0
    rig.target.commit()
    assert rig.path.read_bytes() == expected.tobytes()


def test_a_request_for_a_never_allocated_run_reads_nothing(rig: Rig) -> None:
    dev = rig.device
    guest_fill(dev, [7])
    dev.data[8 * CS : 10 * CS] = 0xEE  # planted, unallocated
    job = begin_job(dev, "full")
    rig.copier.begin()
    assert rig.copier.serve_request(6, 4, job) is Served.SAVED
    assert rig.copier.bytes_written == CS
    assert dev.saved[6:10].all() and not dev.needs_copy[6:10].any()
    got = rig.target.read(6 * CS, 4 * CS)
    assert got == bytes(CS) + pattern(CS, 7) + bytes(2 * CS)


def test_every_cluster_is_read_when_the_target_does_not_start_zeroed(
        device: Device, tmp_path: Path) -> None:
    """A target with unknown prior contents gets the real bytes of every cluster."""
    path = tmp_path / "backup.raw"
    target = _ZeroedFlagTarget(str(path), device.size, device.cluster_size)
    claims = Claims(device.meta_name)
    copier = Copier(device, target, claims, 4 * CS)
    try:
        device.data[5 * CS : 6 * CS] = 0xAB
        begin_job(device, "full")
        copy_all(copier)
        assert target.read(0, device.size) == device.data.tobytes()
    finally:
        copier.close()
        claims.close()
        target.abort()
