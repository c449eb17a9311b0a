"""Guest I/O: the copy-before-write write path, its policies, and its statistics."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import protocol
from shmblock import layout as L
from shmblock import stats as S
from shmblock.claims import Claims
from shmblock.copier import Copier, Served
from shmblock.device import Device, Geometry
from shmblock.errors import CopyBeforeWriteError, UsageError
from shmblock.guest import STATS_FLUSH_NS, STATS_FLUSH_OPS, GuestIO
from shmblock.names import RunNames
from shmblock.snapshot import release as release_writers
from shmblock.targets.raw import RawTarget
from shmblock.transport import BACKUP_RECEIVES, WRITER_REPLY_RECEIVES, Queue
from tests.helpers import CS, begin_job, end_job, new_device, pattern, run_names

N = 16
GEO = Geometry(N * CS, cluster_size=CS, max_writers=2, buffer_slots=4)


@dataclass
class Env:
    names: RunNames
    device: Device
    reply: Queue
    guests: list[GuestIO] = field(default_factory=list)

    @property
    def backup_name(self) -> str:
        return self.names.backup_queue("dev0")

    def guest(self, writer: int = 0, reply: bool = True,
              on_epoch: Callable[[], None] | None = None) -> GuestIO:
        g = GuestIO(self.device, writer, self.backup_name,
                    reply_queue=self.reply if reply else None, on_epoch=on_epoch)
        self.guests.append(g)
        return g


@pytest.fixture
def env() -> Iterator[Env]:
    names = run_names()
    with new_device(GEO, names=names) as dev, \
            Queue.create(names.writer_reply_queue("dev0", 0), WRITER_REPLY_RECEIVES) as reply:
        e = Env(names, dev, reply)
        try:
            yield e
        finally:
            for g in e.guests:
                g.close()


def fill_device(device: Device) -> bytes:
    """Give every cluster distinct contents (as if written before the job)."""
    content = pattern(device.size, 42)
    device.data[:] = np.frombuffer(content, np.uint8)
    device.allocated[:] = 1
    return content


def fill_slots(device: Device, writer: int) -> None:
    """Fill the copy-before-write buffer (shared by every writer: ``writer`` is moot)."""
    device.slot_state[:] = L.SLOT_FULL
    device.slot_cluster[:] = 0


def cluster(device: Device, c: int) -> bytes:
    return device.data[c * CS : (c + 1) * CS].tobytes()


class Server:
    """A stand-in backup worker thread that answers copy requests with ``handle``."""

    def __init__(self, queue: Queue, reply: Queue,
                 handle: Callable[[protocol.CopyRequest], protocol.CopyDone | None]) -> None:
        self.queue, self.reply, self.handle = queue, reply, handle
        self.requests: list[protocol.CopyRequest] = []
        self.other: list[protocol.Message] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                msg = self.queue.receive(0.01)
                if isinstance(msg, protocol.CopyRequest):
                    self.requests.append(msg)
                    answer = self.handle(msg)
                    if answer is not None:
                        self.reply.send(answer, timeout=1.0)
                elif msg is not None:
                    self.other.append(msg)
        except BaseException as exc:  # surfaced by stop()
            self.errors.append(exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()
        if self.errors:
            raise self.errors[0]


def done(req: protocol.CopyRequest, ok: bool = True, error: str = "",
         target_error: bool = False) -> protocol.CopyDone:
    return protocol.CopyDone(seq=req.seq, cluster=req.cluster, count=req.count, ok=ok,
                             error=error, target_error=target_error)


# -- no job: straight writes ----------------------------------------------------------------


def test_write_without_a_job_goes_straight_through(env: Env) -> None:
    dev = env.device
    g = env.guest()
    payload = pattern(2 * CS + 100, 1)
    g.write(CS - 50, payload)  # unaligned, touches clusters 0..3
    assert dev.data[CS - 50 : CS - 50 + len(payload)].tobytes() == payload
    assert np.flatnonzero(dev.allocated).tolist() == [0, 1, 2, 3]
    assert not dev.dirty.any()  # no bitmap enabled
    assert (dev.slot_state == L.SLOT_FREE).all()
    assert g.read(CS - 50, len(payload)) == payload
    # a write of exactly one cluster marks only that cluster
    g.write(9 * CS, bytes(CS))
    assert np.flatnonzero(dev.allocated).tolist() == [0, 1, 2, 3, 9]
    # numpy arrays are accepted as data
    g.write(N * CS - 3, np.array([1, 2, 3], dtype=np.uint8))
    assert dev.data[-3:].tolist() == [1, 2, 3]
    assert dev.allocated[N - 1] == 1


def test_dirty_rows_follow_the_bitmap_mask(env: Env) -> None:
    dev = env.device
    g = env.guest()
    dev.ctl[L.CTL_BITMAP_MASK] = 0b1001  # bitmaps 0 and 3
    g.write(2 * CS, b"x" * (CS + 1))  # clusters 2, 3
    assert np.flatnonzero(dev.dirty[0]).tolist() == [2, 3]
    assert np.flatnonzero(dev.dirty[3]).tolist() == [2, 3]
    assert dev.dirty.sum() == 4
    dev.ctl[L.CTL_BITMAP_MASK] = 0b0100  # only bitmap 2 now
    g.write(7 * CS + 5, b"y")
    assert np.flatnonzero(dev.dirty[2]).tolist() == [7]
    assert np.flatnonzero(dev.dirty[0]).tolist() == [2, 3]  # disabled: unchanged
    dev.ctl[L.CTL_BITMAP_MASK] = 0
    g.write(11 * CS, b"z")
    assert dev.dirty[:, 11].sum() == 0
    assert dev.allocated[11] == 1


@pytest.mark.parametrize(("offset", "length"),
                         [(-1, 1), (N * CS, 1), (N * CS - 1, 2), (0, N * CS + 1), (0, 0)])
def test_out_of_range_writes(env: Env, offset: int, length: int) -> None:
    g = env.guest()
    with pytest.raises(UsageError, match="outside the device"):
        g.write(offset, b"\x01" * length)
    assert not env.device.data.any()
    assert not env.device.allocated.any()


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (N * CS, 1), (0, -1), (5, N * CS)])
def test_out_of_range_reads(env: Env, offset: int, length: int) -> None:
    with pytest.raises(UsageError, match="outside the device"):
        env.guest().read(offset, length)


def test_whole_device_write_and_empty_read(env: Env) -> None:
    g = env.guest()
    payload = pattern(N * CS, 9)
    g.write(0, payload)
    assert g.read(0, N * CS) == payload
    assert g.read(N * CS, 0) == b""
    assert env.device.allocated.all()


def test_writer_index_out_of_range(env: Env) -> None:
    for writer in (-1, GEO.max_writers):
        with pytest.raises(UsageError, match="writer index"):
            GuestIO(env.device, writer, env.backup_name)


def test_on_epoch_is_called_on_the_first_write_and_on_change(env: Env) -> None:
    calls: list[int] = []
    dev = env.device
    g = env.guest(on_epoch=lambda: calls.append(int(dev.ctl[L.CTL_EPOCH])))
    g.write(0, b"a")
    g.write(1, b"b")
    assert calls == [0]
    dev.ctl[L.CTL_EPOCH] = 5
    g.write(2, b"c")
    g.write(3, b"d")
    assert calls == [0, 5]


# -- stage mode ------------------------------------------------------------------------------


def test_stage_mode_saves_old_contents_in_a_slot(env: Env) -> None:
    dev = env.device
    before = fill_device(dev)
    begin_job(dev, "full", cbw_mode="stage")
    g = env.guest(writer=1)
    g.write(5 * CS + 10, b"\x00" * 20)
    full = [s for s in range(dev.geometry.slots) if dev.slot_state[s] == L.SLOT_FULL]
    assert len(full) == 1
    s = full[0]
    assert dev.slot_cluster[s] == 5
    assert dev.staging[s].tobytes() == before[5 * CS : 6 * CS]
    assert dev.needs_copy[5] == 0
    assert dev.needs_copy.sum() == N - 1
    after = bytearray(before)
    after[5 * CS + 10 : 5 * CS + 30] = bytes(20)
    assert dev.data.tobytes() == bytes(after)
    # no other slot is taken (a buffer of 4 slots: batches of one)
    assert int((dev.slot_state != L.SLOT_FREE).sum()) == 1
    # writing the same cluster again needs no save
    g.write(5 * CS, b"\x01")
    assert int((dev.slot_state == L.SLOT_FULL).sum()) == 1
    g.flush_stats()
    assert dev.stats[1, S.W_CBW_SAVES] == 1
    assert dev.stats[1, S.W_OPS] == 2


def test_stage_mode_multi_cluster_write(env: Env) -> None:
    dev = env.device
    before = fill_device(dev)
    begin_job(dev, "full", cbw_mode="stage")
    dev.needs_copy[3] = 0  # already saved by the background copy
    g = env.guest()
    g.write(2 * CS + 1, b"\x07" * (2 * CS))  # clusters 2, 3, 4
    staged = {int(dev.slot_cluster[s]): dev.staging[s].tobytes()
              for s in range(dev.geometry.slots) if dev.slot_state[s] == L.SLOT_FULL}
    assert staged == {2: before[2 * CS : 3 * CS], 4: before[4 * CS : 5 * CS]}
    assert dev.needs_copy[2:5].tolist() == [0, 0, 0]
    assert dev.data[2 * CS + 1 : 4 * CS + 1].tobytes() == b"\x07" * (2 * CS)


def test_stage_mode_rings_the_doorbell_of_an_idle_worker(env: Env) -> None:
    dev = env.device
    fill_device(dev)
    begin_job(dev, "full")
    with Queue.create(env.backup_name, BACKUP_RECEIVES) as backup:
        g = env.guest()
        g.write(0, b"x")
        assert backup.receive(0.0) is None  # the worker is busy: no doorbell
        dev.ctl[L.CTL_WORKER_IDLE] = 1
        g.write(CS, b"x")
        assert backup.receive(1.0) == protocol.Staged(writer=0)


def test_doorbell_without_a_worker_is_harmless(env: Env) -> None:
    dev = env.device
    begin_job(dev, "full")
    dev.ctl[L.CTL_WORKER_IDLE] = 1
    g = env.guest()
    g.write(0, b"x")  # no backup queue exists: the save still happens
    assert dev.needs_copy[0] == 0


# -- slots full, no worker: on-cbw-error ---------------------------------------------------------


@pytest.mark.parametrize("reply", [True, False], ids=["no-backup-queue", "no-reply-queue"])
def test_break_guest_write_leaves_the_device_unchanged(env: Env, reply: bool) -> None:
    dev = env.device
    before = fill_device(dev)
    begin_job(dev, "full", cbw_mode="stage", on_cbw_error="break-guest-write",
              cbw_timeout=0.05)
    fill_slots(dev, 0)
    g = env.guest(reply=reply)
    with pytest.raises(CopyBeforeWriteError):
        g.write(3 * CS, b"\xff" * 10)
    assert dev.data.tobytes() == before
    assert dev.needs_copy.all()
    assert dev.ctl[L.CTL_BROKEN] == 0
    g.flush_stats()
    assert dev.stats[0, S.W_ERRORS] == 1
    assert dev.stats[0, S.W_OPS] == 0


def test_break_guest_write_multi_cluster_is_all_or_nothing(env: Env) -> None:
    """The first cluster gets the last free slot, the second has nowhere to go."""
    dev = env.device
    before = fill_device(dev)
    begin_job(dev, "full", cbw_mode="stage", cbw_timeout=0.05)
    dev.slot_state[1:] = L.SLOT_FULL  # one slot of the buffer left
    g = env.guest()
    with pytest.raises(CopyBeforeWriteError):
        g.write(6 * CS, b"\xff" * (2 * CS))
    assert dev.data.tobytes() == before
    # cluster 6 was saved (harmless), cluster 7 was not
    assert dev.needs_copy[6] == 0 and dev.needs_copy[7] == 1


def test_break_snapshot_lets_the_write_through(env: Env) -> None:
    dev = env.device
    before = fill_device(dev)
    begin_job(dev, "full", cbw_mode="stage", on_cbw_error="break-snapshot", cbw_timeout=0.05)
    fill_slots(dev, 0)
    g = env.guest()
    g.write(3 * CS, b"\xff" * 10)
    assert dev.ctl[L.CTL_BROKEN] == 1
    assert dev.data[3 * CS : 3 * CS + 10].tobytes() == b"\xff" * 10
    assert dev.data[3 * CS + 10 :].tobytes() == before[3 * CS + 10 :]
    assert dev.needs_copy[3] == 1  # never saved: the job must fail, not complete
    # once broken, later failures do not stop the guest either
    g.write(9 * CS, b"\xee")
    assert dev.data[9 * CS] == 0xEE


def test_once_broken_writes_do_not_wait_for_copy_before_write(env: Env) -> None:
    """Issue 7 item 3: with break-snapshot, after CTL_BROKEN is set writers skip
    copy-before-write at once instead of waiting the timeout on every write."""
    dev = env.device
    fill_device(dev)
    begin_job(dev, "full", cbw_mode="request", on_cbw_error="break-snapshot",
              cbw_timeout=5.0)
    dev.ctl[L.CTL_BROKEN] = 1  # an earlier write broke the snapshot
    with Queue.create(env.backup_name, BACKUP_RECEIVES) as backup:  # nobody serves it
        g = env.guest()
        t0 = time.monotonic()
        for c in range(4):
            g.write(c * CS, b"\x05")
        assert time.monotonic() - t0 < 1.0
        assert backup.receive(0.0) is None  # nobody was even asked
    assert all(dev.data[c * CS] == 5 for c in range(4))


def test_a_broken_snapshot_under_break_guest_write_is_not_skipped(env: Env) -> None:
    """CTL_BROKEN only ever comes from break-snapshot; under break-guest-write a stray
    flag must not turn copy-before-write off."""
    dev = env.device
    before = fill_device(dev)
    begin_job(dev, "full", cbw_mode="request", cbw_timeout=0.05)
    dev.ctl[L.CTL_BROKEN] = 1
    with pytest.raises(CopyBeforeWriteError):
        env.guest().write(0, b"\x01")
    assert dev.data.tobytes() == before


def test_write_after_the_job_ended_proceeds(env: Env) -> None:
    dev = env.device
    fill_device(dev)
    begin_job(dev, "full", cbw_mode="stage", cbw_timeout=0.05)
    fill_slots(dev, 0)
    end_job(dev)  # the worker cleared the maps
    fill_slots(dev, 0)
    g = env.guest()
    g.write(4 * CS, b"\x01" * CS)
    assert cluster(dev, 4) == b"\x01" * CS


# -- request mode ------------------------------------------------------------------------------


@pytest.fixture
def backup(env: Env) -> Iterator[Queue]:
    with Queue.create(env.backup_name, BACKUP_RECEIVES) as q:
        yield q


def test_request_mode_waits_for_the_worker(env: Env, backup: Queue, tmp_path: Path) -> None:
    dev = env.device
    before = fill_device(dev)
    begin_job(dev, "full", cbw_mode="request")
    target = RawTarget(str(tmp_path / "b.raw"), dev.size, CS)
    claims_free: list[bool] = []
    with Claims(dev.meta_name) as worker_claims, Claims(dev.meta_name) as probe:
        copier = Copier(dev, target, worker_claims)
        copier.begin()

        def serve(req: protocol.CopyRequest) -> protocol.CopyDone:
            # The writer waits without holding the claim: a stale request served now
            # could otherwise race a stage-mode writer (issue 7, item 1).
            free = probe.try_claim(req.cluster)
            claims_free.append(free)
            if free:
                probe.release(req.cluster)
            assert copier.serve_request(req.cluster, req.count, req.job) is Served.SAVED
            return done(req)

        server = Server(backup, env.reply, serve)
        try:
            g = env.guest()
            g.write(7 * CS + 3, b"\x00" * (CS + 2))  # clusters 7 and 8
        finally:
            server.stop()
            copier.close()
    assert [(r.writer, r.cluster, r.count) for r in server.requests] == [(0, 7, 1), (0, 8, 1)]
    assert [r.seq for r in server.requests] == [1, 2]
    assert [r.job for r in server.requests] == [int(dev.ctl[L.CTL_JOB_SEQ])] * 2
    assert claims_free == [True, True]
    assert dev.needs_copy[7] == 0 and dev.needs_copy[8] == 0
    assert (dev.slot_state == L.SLOT_FREE).all()  # request mode uses no slot
    assert target.read(7 * CS, 2 * CS) == before[7 * CS : 9 * CS]
    assert dev.data[7 * CS + 3 : 8 * CS + 5].tobytes() == bytes(CS + 2)
    target.abort()
    g.flush_stats()
    assert dev.stats[0, S.W_CBW_REQUESTS] == 2
    assert dev.stats[0, S.W_CBW_WAIT_NS] > 0


def test_an_ok_answer_for_a_cluster_still_marked_asks_again(env: Env, backup: Queue) -> None:
    """The writer trusts the map, not the answer: it asks until needs_copy[c] is 0."""
    dev = env.device
    fill_device(dev)
    begin_job(dev, "full", cbw_mode="request")

    def serve(req: protocol.CopyRequest) -> protocol.CopyDone:
        if len(server.requests) == 2:
            dev.needs_copy[req.cluster] = 0  # saved on the second request only
        return done(req)

    server = Server(backup, env.reply, serve)
    try:
        env.guest().write(3 * CS, b"\x07")
    finally:
        server.stop()
    assert [r.cluster for r in server.requests] == [3, 3]
    assert dev.data[3 * CS] == 7


def test_stage_mode_with_full_slots_releases_the_claim_before_asking(env: Env,
                                                                    backup: Queue) -> None:
    dev = env.device
    fill_device(dev)
    begin_job(dev, "full", cbw_mode="stage")
    fill_slots(dev, 0)
    free: list[bool] = []
    with Claims(dev.meta_name) as probe:

        def serve(req: protocol.CopyRequest) -> protocol.CopyDone:
            free.append(probe.try_claim(req.cluster))
            probe.release(req.cluster)
            dev.needs_copy[req.cluster] = 0
            return done(req)

        server = Server(backup, env.reply, serve)
        try:
            env.guest().write(5 * CS, b"\x01")
        finally:
            server.stop()
    assert free == [True]


def test_full_slots_fall_back_to_a_request(env: Env, backup: Queue) -> None:
    dev = env.device
    fill_device(dev)
    begin_job(dev, "full", cbw_mode="stage")
    fill_slots(dev, 0)

    def serve(req: protocol.CopyRequest) -> protocol.CopyDone:
        dev.needs_copy[req.cluster] = 0  # as if saved
        return done(req)

    server = Server(backup, env.reply, serve)
    try:
        env.guest().write(2 * CS, b"q")
    finally:
        server.stop()
    assert [r.cluster for r in server.requests] == [2]
    assert dev.data[2 * CS] == ord("q")


def test_request_timeout_fails_the_write(env: Env, backup: Queue) -> None:
    dev = env.device
    before = fill_device(dev)
    begin_job(dev, "full", cbw_mode="request", cbw_timeout=0.05)
    g = env.guest()
    t0 = time.monotonic()
    with pytest.raises(CopyBeforeWriteError, match="did not save cluster 4"):
        g.write(4 * CS, b"\x01")
    assert 0.045 <= time.monotonic() - t0 < 2.0
    assert dev.data.tobytes() == before
    assert isinstance(backup.receive(0.0), protocol.CopyRequest)  # it was asked
    # no claim is held: the worker can claim the cluster
    with Claims(dev.meta_name) as c:
        assert c.try_claim(4)


def test_request_refused_by_the_worker(env: Env, backup: Queue) -> None:
    dev = env.device
    before = fill_device(dev)
    begin_job(dev, "full", cbw_mode="request")
    server = Server(backup, env.reply, lambda req: done(req, ok=False, error="disk full"))
    try:
        with pytest.raises(CopyBeforeWriteError, match="disk full"):
            env.guest().write(0, b"\x01")
    finally:
        server.stop()
    assert dev.data.tobytes() == before


def test_request_answered_ok_after_the_job_ended_lets_the_write_through(
        env: Env, backup: Queue) -> None:
    """The job completed or was cancelled while the writer waited: nothing needs saving."""
    dev = env.device
    fill_device(dev)
    begin_job(dev, "full", cbw_mode="request")

    def cancel(req: protocol.CopyRequest) -> protocol.CopyDone:
        end_job(dev)  # release_writers: maps cleared, pending requests answered ok
        return done(req)

    server = Server(backup, env.reply, cancel)
    try:
        env.guest().write(CS, b"\x09" * 4)
    finally:
        server.stop()
    assert dev.data[CS : CS + 4].tobytes() == b"\x09" * 4


@pytest.mark.parametrize("target_error", [True, False])
def test_a_failed_save_fails_the_write_even_if_the_job_ends_right_after(
        env: Env, backup: Queue, target_error: bool) -> None:
    """Issue 7 item 3: under break-guest-write, a write whose save was reported failed
    fails and leaves the device unchanged, though the failing job cleared needs_copy
    before the writer looked again (the old code let it through then)."""
    dev = env.device
    before = fill_device(dev)
    begin_job(dev, "full", cbw_mode="request", on_cbw_error="break-guest-write")

    def fail(req: protocol.CopyRequest) -> protocol.CopyDone:
        end_job(dev)  # the job fails: release_writers clears the maps first
        return done(req, ok=False, error="No space left on device", target_error=target_error)

    server = Server(backup, env.reply, fail)
    g = env.guest()
    try:
        with pytest.raises(CopyBeforeWriteError, match="No space left on device"):
            g.write(2 * CS, b"\x01" * 8)
    finally:
        server.stop()
    assert dev.data.tobytes() == before
    g.flush_stats()
    assert dev.stats[0, S.W_ERRORS] == 1
    assert dev.stats[0, S.W_TARGET_ERRORS] == int(target_error)
    assert dev.stats[0, S.W_OPS] == 0


def test_a_timed_out_save_fails_the_write_even_if_the_job_ends_meanwhile(
        env: Env, backup: Queue) -> None:
    dev = env.device
    before = fill_device(dev)
    begin_job(dev, "full", cbw_mode="request", cbw_timeout=0.1)
    timer = threading.Timer(0.03, end_job, (dev,))  # a dead worker's job is failed
    timer.start()
    try:
        with pytest.raises(CopyBeforeWriteError, match="did not save cluster 2"):
            env.guest().write(2 * CS, b"\x01")
    finally:
        timer.join()
    assert dev.data.tobytes() == before


@pytest.mark.parametrize("completed", [True, False], ids=["completed", "failed"])
def test_a_request_the_ending_job_never_saw(env: Env, backup: Queue, completed: bool) -> None:
    """The request reached the queue after the worker's last look at it. A job that
    completed (or was cancelled) says so in CTL_JOB_RELEASED and the write goes ahead at
    once; after a failed or dead job it fails at its deadline (break-guest-write)."""
    dev = env.device
    before = fill_device(dev)
    begin_job(dev, "full", cbw_mode="request", cbw_timeout=0.5)
    job = int(dev.ctl[L.CTL_JOB_SEQ])

    def end() -> None:
        release_writers(dev, released_job=job if completed else 0)

    timer = threading.Timer(0.03, end)
    timer.start()
    t0 = time.monotonic()
    try:
        if completed:
            env.guest().write(2 * CS, b"\x01")
        else:
            with pytest.raises(CopyBeforeWriteError, match="did not save cluster 2"):
                env.guest().write(2 * CS, b"\x01")
    finally:
        timer.join()
    elapsed = time.monotonic() - t0
    assert isinstance(backup.receive(0.0), protocol.CopyRequest)  # nobody answered it
    if completed:
        assert elapsed < 0.3
        assert dev.data[2 * CS] == 1
    else:
        assert elapsed >= 0.45
        assert dev.data.tobytes() == before


@pytest.mark.parametrize("released", [True, False])
def test_a_full_backup_queue_of_a_released_job(env: Env, released: bool) -> None:
    """The worker died with its queue full. Once the supervisor has released the job the
    blocked writer goes ahead; until then (or if it never does) it fails at its
    deadline."""
    dev = env.device
    before = fill_device(dev)
    begin_job(dev, "full", cbw_mode="request", cbw_timeout=0.5)
    job = int(dev.ctl[L.CTL_JOB_SEQ])
    with Queue.create(env.backup_name, BACKUP_RECEIVES, 2) as backup:
        for seq in (1, 2):
            backup.send(protocol.CopyRequest(writer=1, seq=seq, cluster=0, count=1, job=job),
                        1.0)
        timer = threading.Timer(0.05, release_writers, (dev,), {"released_job": job}) \
            if released else None
        if timer is not None:
            timer.start()
        t0 = time.monotonic()
        try:
            if released:
                env.guest().write(3 * CS, b"\x01")
            else:
                with pytest.raises(CopyBeforeWriteError, match="queue stayed full"):
                    env.guest().write(3 * CS, b"\x01")
        finally:
            if timer is not None:
                timer.join()
    if released:
        assert time.monotonic() - t0 < 0.4
        assert dev.data[3 * CS] == 1
    else:
        assert time.monotonic() - t0 >= 0.45
        assert dev.data.tobytes() == before


def test_late_answers_are_ignored(env: Env, backup: Queue) -> None:
    dev = env.device
    fill_device(dev)
    begin_job(dev, "full", cbw_mode="request")
    # answers to requests that timed out long ago sit in the reply queue
    env.reply.send(protocol.CopyDone(seq=999, cluster=1, count=1, ok=False, error="old"), 1.0)
    env.reply.send(protocol.CopyDone(seq=0, cluster=1, count=1, ok=True, error=""), 1.0)

    def serve(req: protocol.CopyRequest) -> protocol.CopyDone:
        dev.needs_copy[req.cluster] = 0
        return done(req)

    server = Server(backup, env.reply, serve)
    try:
        env.guest().write(CS, b"\x02")
    finally:
        server.stop()
    assert dev.data[CS] == 2
    assert env.reply.receive(0.0) is None


def test_a_new_job_reattaches_the_backup_queue(env: Env) -> None:
    """Each job may have a new backup worker and queue: requests go to the current one."""
    dev = env.device
    fill_device(dev)
    begin_job(dev, "full", cbw_mode="request")

    def serve(req: protocol.CopyRequest) -> protocol.CopyDone:
        dev.needs_copy[req.cluster] = 0
        return done(req)

    g = env.guest()
    with Queue.create(env.backup_name, BACKUP_RECEIVES) as first:
        server = Server(first, env.reply, serve)
        try:
            g.write(0, b"\x01")
        finally:
            server.stop()
    end_job(dev)
    begin_job(dev, "full", cbw_mode="request")
    with Queue.create(env.backup_name, BACKUP_RECEIVES) as second:
        server = Server(second, env.reply, serve)
        try:
            g.write(CS, b"\x01")
        finally:
            server.stop()
    assert [r.cluster for r in server.requests] == [1]


def test_a_cluster_claimed_by_someone_else_times_out(env: Env) -> None:
    dev = env.device
    before = fill_device(dev)
    begin_job(dev, "full", cbw_mode="stage", cbw_timeout=0.05)
    with Claims(dev.meta_name) as other:
        assert other.try_claim(5)
        with pytest.raises(CopyBeforeWriteError, match="stayed claimed"):
            env.guest().write(5 * CS, b"\x01")
    assert dev.data.tobytes() == before
    assert dev.needs_copy[5] == 1


def test_save_racing_with_the_background_copy(env: Env) -> None:
    """The claim is granted after the worker saved the cluster: nothing to stage."""
    dev = env.device
    fill_device(dev)
    begin_job(dev, "full", cbw_mode="stage", cbw_timeout=5.0)
    with Claims(dev.meta_name) as worker:
        assert worker.try_claim(0, 4)

        def worker_saves() -> None:
            dev.needs_copy[0:4] = 0
            worker.release(0, 4)

        timer = threading.Timer(0.05, worker_saves)
        timer.start()
        try:
            env.guest().write(2 * CS, b"\x01")
        finally:
            timer.join()
    assert (dev.slot_state == L.SLOT_FREE).all()  # re-checked under the claim
    assert dev.data[2 * CS] == 1


# -- statistics --------------------------------------------------------------------------------


def test_stats_are_flushed_to_the_writers_row(env: Env) -> None:
    dev = env.device
    g = env.guest(writer=1)
    row = dev.stats[1]
    assert row[S.W_RUNNING] == 1
    assert row[S.W_PID] > 0
    for i in range(10):
        g.write(i * 100, b"\x01" * 100)
    g.read(0, 50)
    g.flush_stats()
    assert row[S.W_OPS] == 10
    assert row[S.W_BYTES] == 1000
    assert row[S.W_READS] == 1
    assert row[S.W_READ_BYTES] == 50
    hist = row[S.HIST_BASE : S.HIST_BASE + S.HIST_BUCKETS]
    assert int(hist.sum()) == 11  # every write and read has a latency
    assert row[S.W_MAX_STALL_NS] > 0
    assert row[S.W_END_NS] >= row[S.W_START_NS] > 0
    assert not dev.stats[0].any()  # another writer's row is untouched
    ws = S.WriterStats.from_row(1, row)
    assert ws.ops == 10 and ws.p50_us > 0
    g.close()
    assert row[S.W_RUNNING] == 0
    g.close()  # idempotent


def test_stats_flush_every_few_hundred_ops(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shmblock.guest.STATS_FLUSH_NS", 10**15)  # count-based flush only
    g = env.guest()
    ops = env.device.stats[0, S.W_OPS : S.W_OPS + 1]
    for _ in range(STATS_FLUSH_OPS - 1):
        g.write(0, b"\x01")
    assert int(ops[0]) == 0
    g.write(0, b"\x01")
    assert int(ops[0]) == STATS_FLUSH_OPS
    del ops


def test_stats_of_a_slow_writer_are_flushed_on_time(env: Env) -> None:
    """A writer doing a few ops a second still publishes them within STATS_FLUSH_NS,
    so a writer killed by SIGKILL leaves (nearly) all its counts."""
    g = env.guest()
    g.write(0, b"\x01")
    time.sleep(STATS_FLUSH_NS / 1e9 * 1.5)
    g.write(0, b"\x01")
    assert int(env.device.stats[0, S.W_OPS]) == 2
    assert int(env.device.stats[0, S.W_BYTES]) == 2


@pytest.mark.parametrize("policy", ["no-slot", "claimed", "request-timeout"])
def test_a_failed_write_does_not_keep_the_device_open(policy: str) -> None:
    """After a CopyBeforeWriteError the caller can close the device at once: the error
    does not hold the write path's views of the mapping in a reference cycle (which only
    the garbage collector, some time later, would break)."""
    names = run_names()
    gc.disable()
    try:
        with new_device(GEO, names=names) as dev, \
                Queue.create(names.backup_queue("dev0"), BACKUP_RECEIVES), \
                Queue.create(names.writer_reply_queue("dev0", 0), WRITER_REPLY_RECEIVES) as rep, \
                Claims(dev.meta_name) as other:
            begin_job(dev, "full", cbw_mode="request" if policy == "request-timeout" else "stage",
                      cbw_timeout=0.02)
            if policy == "no-slot":
                fill_slots(dev, 0)
            if policy == "claimed":
                assert other.try_claim(0)
            g = GuestIO(dev, 0, names.backup_queue("dev0"),
                        reply_queue=None if policy == "no-slot" else rep)
            try:
                g.write(0, b"x")
            except CopyBeforeWriteError:
                pass
            else:
                pytest.fail("the write should have failed")
            g.close()
            dev.close()  # no BufferError
            assert dev.closed
    finally:
        gc.enable()


def test_guest_close_lets_the_device_close() -> None:
    names = run_names()
    with new_device(GEO, names=names) as dev:
        g = GuestIO(dev, 0, names.backup_queue("dev0"))
        g.write(0, b"abc")
        g.close()
        dev.close()
        assert dev.closed
        g.close()  # after the device closed: still fine
