"""The backup job loop in-process: a real device, target and copier, a fake inbox.

:class:`shmblock.backup_loop.BackupLoop` is what ``workers.backup`` runs; here it runs in
the test's own process, fed by a list of messages, so the worker's behaviour (JobStart,
tokens, pause, cancel, the end of a job) is tested without processes or queues.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import protocol
from shmblock import backup_loop
from shmblock import layout as L
from shmblock.backup_loop import BackupLoop
from shmblock.claims import Claims
from shmblock.device import Device, Geometry
from shmblock.errors import TargetIOError
from shmblock.options import BackupOptions, WorkerOptions
from shmblock.targets import TargetSpec
from shmblock.targets.base import Buffer, Target
from shmblock.targets.raw import RawTarget
from tests.helpers import CS, begin_job, new_device, pattern, run_names

N = 32
GEO = Geometry(N * CS, cluster_size=CS, max_writers=2, buffer_slots=4)
TOKEN = "ab" * 16


class FakeInbox:
    """A backup queue: messages in a list; ``receive`` never blocks."""

    def __init__(self, *msgs: protocol.Message) -> None:
        self.msgs = list(msgs)
        self.rejected = 0
        self.lock = threading.Lock()

    def put(self, msg: protocol.Message) -> None:
        with self.lock:
            self.msgs.append(msg)

    def receive(self, timeout: float) -> protocol.Message | None:
        with self.lock:
            return self.msgs.pop(0) if self.msgs else None

    def drain(self) -> list[protocol.Message]:
        with self.lock:
            out, self.msgs = self.msgs, []
        return out


class FakeOutbox:
    """The supervisor queue: records what the job reports."""

    def __init__(self) -> None:
        self.sent: list[protocol.Message] = []

    def try_send(self, msg: protocol.Message) -> bool:
        self.sent.append(msg)
        return True

    def send(self, msg: protocol.Message, timeout: float) -> None:
        self.sent.append(msg)


@pytest.fixture
def device() -> Iterator[Device]:
    with new_device(GEO) as dev:
        yield dev


def make_loop(device: Device, target: Target, inbox: FakeInbox,
              outbox: FakeOutbox) -> tuple[BackupLoop, Claims]:
    claims = Claims(device.meta_name)
    answers: list[protocol.CopyDone] = []
    loop = BackupLoop(device, claims, inbox, outbox, lambda req, done: answers.append(done),
                      lambda: target, "job1", TOKEN, chunk=4 * CS)
    return loop, claims


def fill(device: Device) -> bytes:
    data = pattern(N * CS, seed=3)
    device.data[:] = np.frombuffer(data, dtype=np.uint8)
    device.allocated[:] = 1
    return data


def test_a_full_job_runs_in_process_and_commits_the_snapshot(device: Device,
                                                             tmp_path: Path) -> None:
    data = fill(device)
    path = tmp_path / "b.raw"
    target = RawTarget(str(path), device.size, device.cluster_size)
    begin_job(device, "full")
    inbox = FakeInbox(protocol.JobStart(job="job1", sync="full", speed=0, token=TOKEN))
    outbox = FakeOutbox()
    loop, claims = make_loop(device, target, inbox, outbox)
    ready: list[bool] = []
    final = loop.execute(lambda: ready.append(True))
    assert ready == [True]
    assert isinstance(final, protocol.JobCompleted), final
    assert final.clusters_copied == N
    loop.conclude(final)
    loop.close()
    claims.close()
    assert path.read_bytes() == data
    assert not device.needs_copy.any() and not device.ctl[L.CTL_JOB_ACTIVE]
    assert isinstance(outbox.sent[-1], protocol.JobCompleted)
    assert outbox.sent[-1].token == TOKEN  # else the supervisor ignores the report


def test_control_without_the_token_is_ignored_and_cancel_with_it_ends_the_job(
        device: Device, tmp_path: Path) -> None:
    fill(device)
    path = tmp_path / "b.raw"
    target = RawTarget(str(path), device.size, device.cluster_size)
    begin_job(device, "full")
    inbox = FakeInbox(protocol.JobStart(job="job1", sync="full", speed=0, token=TOKEN),
                      protocol.Pause(job="job1", token=TOKEN),
                      protocol.Cancel(job="job1", token="cd" * 16))
    outbox = FakeOutbox()
    loop, claims = make_loop(device, target, inbox, outbox)
    done = threading.Event()
    result: list[protocol.Message] = []

    def run() -> None:
        result.append(loop.execute())
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert not done.wait(0.3), "a paused job whose Cancel is forged must keep waiting"
        assert loop.paused and inbox.rejected == 1
        assert device.needs_copy.all()  # paused before its first chunk
        inbox.put(protocol.Cancel(job="job1", token=TOKEN))
        assert done.wait(10.0)
    finally:
        inbox.put(protocol.Cancel(job="job1", token=TOKEN))
        thread.join(10.0)
    assert isinstance(result[0], protocol.JobCancelled)
    loop.conclude(result[0])
    loop.close()
    claims.close()
    assert not path.exists() and not (tmp_path / "b.raw.part").exists()
    assert not device.needs_copy.any()


class FailingTarget(RawTarget):
    def write(self, offset: int, data: Buffer) -> None:
        raise TargetIOError("disk on fire")


def test_a_target_error_fails_the_job_and_marks_it_a_target_failure(
        device: Device, tmp_path: Path) -> None:
    fill(device)
    target = FailingTarget(str(tmp_path / "b.raw"), device.size, device.cluster_size)
    begin_job(device, "full")
    inbox = FakeInbox(protocol.JobStart(job="job1", sync="full", speed=0, token=TOKEN))
    loop, claims = make_loop(device, target, inbox, FakeOutbox())
    final = loop.execute()
    assert isinstance(final, protocol.JobFailed) and "disk on fire" in final.error
    assert loop.target_failed
    loop.conclude(final)
    loop.close()
    claims.close()
    assert not (tmp_path / "b.raw.part").exists()


def test_the_worker_argv_round_trips(tmp_path: Path) -> None:
    opts = BackupOptions(TargetSpec.parse(str(tmp_path / "b.qcow2"), None,
                                          str(tmp_path / "base.qcow2"), "qcow2"),
                         chunk=3 * CS, target_timeout=2.5)
    names = run_names()
    worker = opts.worker("/meta", "dev0", "job7")
    argv = ["--run", names.run_id, "--prefix", names.prefix, *worker.to_argv()]
    got_names, got = WorkerOptions.from_argv(argv)
    assert got == worker
    assert got_names == names
    # The sync mode and the speed travel once, in JobStart.
    assert "--sync" not in argv and "--speed" not in argv


# -- bursts of background chunks --------------------------------------------------------------


def _started_loop(device: Device, tmp_path: Path, speed: int = 0) -> tuple[BackupLoop, Claims]:
    fill(device)
    target = RawTarget(str(tmp_path / "b.raw"), device.size, device.cluster_size)
    begin_job(device, "full")
    inbox = FakeInbox(protocol.JobStart(job="job1", sync="full", speed=speed, token=TOKEN))
    loop, claims = make_loop(device, target, inbox, FakeOutbox())
    loop.open()
    loop.wait_for_start(timeout=10.0)
    return loop, claims


def _close(loop: BackupLoop, claims: Claims) -> None:
    assert loop.target is not None
    loop.target.abort()
    loop.close()
    claims.close()


def test_an_idle_step_copies_a_burst_of_chunks(device: Device, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing else waiting, one step copies up to BURST_CHUNKS chunks (the old loop
    copied one per step and looked at its queue and buffer between every two)."""
    monkeypatch.setattr(backup_loop, "BURST_SECONDS", 60.0)  # no timing on a busy machine
    loop, claims = _started_loop(device, tmp_path)
    try:
        assert loop.copier is not None
        loop.step(time.monotonic())
        assert loop.copier.cursor == backup_loop.BURST_CHUNKS * 4  # chunk = 4 clusters
        assert device.saved[: loop.copier.cursor].all()
        assert not device.needs_copy[: loop.copier.cursor].any()
        assert device.needs_copy[loop.copier.cursor :].all()
    finally:
        _close(loop, claims)


def test_a_speed_limited_step_copies_one_chunk(device: Device, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup_loop, "BURST_SECONDS", 60.0)
    loop, claims = _started_loop(device, tmp_path, speed=1 << 40)
    try:
        assert loop.copier is not None
        loop.step(time.monotonic())
        assert loop.copier.cursor == 4
    finally:
        _close(loop, claims)


def test_a_burst_ends_when_its_time_is_up(device: Device, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup_loop, "BURST_SECONDS", 0.0)
    loop, claims = _started_loop(device, tmp_path)
    try:
        assert loop.copier is not None
        loop.step(time.monotonic())
        assert loop.copier.cursor == 4
    finally:
        _close(loop, claims)
