"""The supervisor's pump and what it accepts from whom, in live runs.

* Only a job's own worker can report its progress or end it (issue 7, item 9): a
  well-formed JobCompleted, JobFailed, JobCancelled or JobProgress for the real job id,
  forged by another process of the user on the supervisor queue, is counted as rejected
  and changes nothing; the job concludes with what its worker reports.
* No message kills the pump (item 4): an exception while handling one is logged and
  counted, and the pump goes on. If the pump thread dies anyway, the run fails at once
  instead of hanging: the job is concluded failed, waits and freezes return.
* A stuck worker is told apart from a hung target: the stuck timeout is longer than
  the target timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import posix_ipc
import pytest

import protocol
from shmblock import layout as L
from shmblock import stats as S
from shmblock.engine import STUCK_MARGIN, Engine
from shmblock.errors import PeerGone
from shmblock.job import Outcome
from shmblock.pump import Pump
from shmblock.transport import WRITER_CONTROL_RECEIVES, WRITER_REPLY_RECEIVES
from shmblock.verify import SnapshotCapture
from tests.nbd_servers import OldNbdServer, server_group
from tests.procs import (
    MiB,
    assert_same_image,
    pid_gone,
    start_writer_stopping_in_write,
    unthrottle,
    wait_until,
)


def forge(queue_name: str, msg: protocol.Message) -> None:
    """Send ``msg`` as any other process of the user could: raw posix_ipc, no token."""
    mq = posix_ipc.MessageQueue(queue_name)
    try:
        mq.send(protocol.encode(msg), timeout=5.0)
    finally:
        mq.close()


FORGERIES: list[protocol.Message] = [
    protocol.JobCompleted(job="job1", bytes_written=1, clusters_copied=1, cbw_clusters=1),
    protocol.JobCompleted(job="job1", bytes_written=1, clusters_copied=1, cbw_clusters=1,
                          token="0" * 32),
    protocol.JobFailed(job="job1", error="forged failure"),
    protocol.JobFailed(job="job1", error="forged failure", token="a" * 32),
    protocol.JobCancelled(job="job1"),
    protocol.JobCancelled(job="job1", token="f" * 64),
    protocol.JobProgress(job="job1", done=2**62, total=2**62, token="1" * 32),
]


def test_forged_outcomes_for_the_real_job_are_rejected(tmp_path: Path) -> None:
    target, reference = tmp_path / "b.raw", tmp_path / "ref.raw"
    with Engine() as engine:
        dev = engine.create_device(16 * MiB, max_writers=1)
        engine.start_writers(dev, 1, workload="random", duration=60.0, seed=3, rate=500.0)
        # Slow enough that the job is still copying when the forgeries arrive.
        job = engine.backup(dev, str(target), speed=MiB, verify=True,
                            reference_image=str(reference))
        assert job.job == "job1"
        for msg in FORGERIES:
            forge(engine.names.supervisor_queue, msg)
        wait_until(lambda: engine.sup.rejected >= len(FORGERIES), 10.0,
                   what="the supervisor to reject the forgeries")
        assert job.state.value == "running"
        assert not job.tracker.concluded
        assert job.tracker.done < 2**62  # the forged progress was not taken either
        assert job.proc.poll() is None
        assert int(dev.device.ctl[L.CTL_JOB_ACTIVE]) == 1
        unthrottle(job)
        result = job.wait(60.0)
        engine.stop_writers()
    assert engine.sup.rejected == len(FORGERIES)
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    assert result.clusters_copied > 1  # the worker's own figures, not the forged ones
    assert_same_image(reference, target)


def test_a_forged_ready_does_not_stand_for_the_worker(tmp_path: Path) -> None:
    """A Ready that names another pid is rejected; the real worker's Ready still counts."""
    with Engine() as engine:
        dev = engine.create_device(4 * MiB)
        forge(engine.names.supervisor_queue, protocol.Ready(role="backup", ident=0, pid=1))
        job = engine.create_backup(dev, str(tmp_path / "b.raw"), verify=True)
        assert engine.sup.rejected == 1
        job.start()
        result = job.wait(30.0)
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True


def test_an_exception_handling_one_message_does_not_stop_the_pump(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Pump.dispatch
    failures: list[protocol.Message] = []

    def flaky(self: Pump, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.JobProgress) and len(failures) < 3:
            failures.append(msg)
            raise RuntimeError("a bug in a handler")
        real(self, msg)

    monkeypatch.setattr(Pump, "dispatch", flaky)
    with Engine() as engine:
        dev = engine.create_device(8 * MiB)
        job = engine.backup(dev, str(tmp_path / "b.raw"), speed=4 * MiB, verify=True)
        result = job.wait(60.0)
        assert engine.pump.alive
    assert len(failures) == 3
    assert engine.pump_errors == 3
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True


class PumpKiller(BaseException):
    """Not an Exception: nothing in a handler would catch it; it ends the pump thread."""


def kill_the_pump(monkeypatch: pytest.MonkeyPatch) -> None:
    def fatal(self: Pump) -> None:
        raise PumpKiller("simulated death of the pump")

    monkeypatch.setattr(Pump, "watch_children", fatal)


def test_a_dead_pump_fails_the_job_instead_of_hanging(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "b.raw"
    with Engine() as engine:
        dev = engine.create_device(8 * MiB)
        job = engine.backup(dev, str(target), speed=MiB)  # ~8 s of copying
        worker = job.proc.pid
        kill_the_pump(monkeypatch)
        t0 = time.monotonic()
        result = job.wait(20.0)  # used to time out (or, without a timeout, hang forever)
        elapsed = time.monotonic() - t0
        assert not engine.pump.alive
        assert result.outcome is Outcome.FAILED
        assert "pump" in result.error and "PumpKiller" in result.error, result.error
        assert elapsed < 15.0
        assert pid_gone(worker)
        assert not dev.device.needs_copy.any()
        # Later calls fail at once too, naming the cause.
        with pytest.raises(PeerGone, match="pump"):
            engine.create_backup(dev, str(tmp_path / "again.raw"))
    assert not target.exists() and not Path(str(target) + ".part").exists()


def test_a_freeze_with_writers_does_not_need_the_pump(monkeypatch: pytest.MonkeyPatch) -> None:
    """The freeze exchanges no messages (shmblock.freeze): a dead pump neither hangs it
    nor lets a write through it."""
    with Engine() as engine:
        dev = engine.create_device(4 * MiB, max_writers=1)
        engine.start_writers(dev, 1, workload="random", duration=60.0, rate=100.0)
        kill_the_pump(monkeypatch)
        wait_until(lambda: not engine.pump.alive, 5.0, what="the pump to die")
        t0 = time.monotonic()
        with engine.freeze([dev]):
            first = dev.device.data.copy()
            time.sleep(0.1)
            assert np.array_equal(first, dev.device.data), "a write landed in the freeze"
        assert time.monotonic() - t0 < 5.0


def test_stuck_timeout_outlasts_the_target_timeout(tmp_path: Path) -> None:
    """A worker blocked in a target call for the whole target timeout is not 'stuck'."""
    with Engine() as engine:
        dev = engine.create_device(4 * MiB)
        job = engine.create_backup(dev, str(tmp_path / "b.raw"), target_timeout=30.0)
        assert job.stuck_timeout == 2 * 30.0 + STUCK_MARGIN
        job.cancel()
        job.wait(30.0)
        engine.stuck_timeout = 1.5  # an explicit setting wins
        job2 = engine.create_backup(dev, str(tmp_path / "c.raw"), target_timeout=5.0)
        assert job2.stuck_timeout == 1.5
        job2.cancel()
        job2.wait(30.0)


def test_a_stale_jobstart_does_not_start_the_next_job(tmp_path: Path) -> None:
    """The device's backup queue outlives jobs: a JobStart that an earlier worker died
    before reading must not start the next job's worker before its snapshot."""
    with Engine() as engine:
        dev = engine.create_device(4 * MiB)
        dev.backup_queue().send(protocol.JobStart(job="old", sync="full", speed=0), 1.0)
        job = engine.create_backup(dev, str(tmp_path / "b.raw"), verify=True)
        time.sleep(1.0)  # time enough for a worker that took it to finish a 4 MiB job
        assert job.state.value == "created"
        job.start()
        result = job.wait(30.0)
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error


def test_a_worker_that_dies_during_the_snapshot_leaves_no_map(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pump concludes the job (worker died) while the maps are being set: the
    snapshot must not leave clusters marked that no worker will ever copy."""
    real = SnapshotCapture.capture
    victim: list[int] = []

    def capture_while_the_worker_dies(self: SnapshotCapture) -> None:
        # Inside the freeze, before the job is marked active.
        os.kill(victim[0], signal.SIGKILL)
        time.sleep(0.5)  # the pump sees the death and concludes the job meanwhile
        real(self)

    monkeypatch.setattr(SnapshotCapture, "capture", capture_while_the_worker_dies)
    with Engine() as engine:
        dev = engine.create_device(4 * MiB)
        job = engine.create_backup(dev, str(tmp_path / "b.raw"), verify=True)
        victim.append(job.proc.pid)
        job.start()
        assert job.tracker.concluded
        result = job.wait(15.0)
        assert result.outcome is Outcome.FAILED
        assert "died" in result.error, result.error
        assert int(dev.device.ctl[L.CTL_JOB_ACTIVE]) == 0
        assert not dev.device.needs_copy.any()
        t0 = time.monotonic()
        dev.write(0, b"\x01" * 4096)
        assert time.monotonic() - t0 < 0.5  # no copy-before-write wait for a dead job


def test_a_forged_frozen_during_a_freeze_does_not_stand_for_the_writer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A process of the user that watches the freeze word and answers Frozen for a
    writer stopped inside a write must not let the snapshot start while that writer can
    still write (the freeze reads the writer's in-write word; no Frozen counts)."""
    with Engine() as engine:
        dev = engine.create_device(16 * MiB, max_writers=1)
        writer = start_writer_stopping_in_write(engine, dev, 200, monkeypatch,
                                                workload="random", duration=60.0, seed=8)
        forged = threading.Event()

        def forger() -> None:
            # The meta segment is the user's: another of their processes can read it.
            deadline = time.monotonic() + 10.0
            while not int(dev.device.ctl[L.CTL_FREEZE]):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.0005)
            epoch = int(dev.device.ctl[L.CTL_FREEZE])
            forge(engine.names.supervisor_queue, protocol.Frozen(epoch=epoch, writer=0))
            forge(engine.names.supervisor_queue,
                  protocol.Frozen(epoch=epoch, writer=0, token="ab" * 16))
            forged.set()

        try:
            thread = threading.Thread(target=forger)
            thread.start()
            resume = threading.Timer(1.0, os.kill, (writer.pid, signal.SIGCONT))
            resume.start()
            t0 = time.monotonic()
            with engine.freeze([dev]):
                waited = time.monotonic() - t0
                first = dev.device.data.copy()
                time.sleep(0.1)
                second = dev.device.data.copy()
            resume.join()
            thread.join()
        finally:
            os.kill(writer.pid, signal.SIGCONT)
        assert forged.is_set()
        assert waited >= 0.9, "the freeze took the forged Frozen for the writer's"
        assert np.array_equal(first, second), "a write landed during the freeze"
        wait_until(lambda: engine.sup.rejected == 2, 10.0, what="both to be rejected")
        assert writer.alive


class HungNbdServer(OldNbdServer):
    """Completes the handshake, then reads requests and never answers one."""

    keeps_connections = True

    def _transmission(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, EOFError):
            while not self._stop.is_set():
                header = self.recv_exact(conn, 28)
                length = int.from_bytes(header[24:28], "big")
                if int.from_bytes(header[6:8], "big") == 1:  # NBD_CMD_WRITE: its payload
                    self.recv_exact(conn, length)


def test_a_hung_target_is_blamed_on_the_target(tmp_path: Path) -> None:
    """A server that stops answering fails the job with the worker's own report naming
    the server, not as a 'stuck worker' killed by the supervisor."""
    with server_group(tmp_path) as servers:
        fake = servers.add_fake(HungNbdServer(tmp_path / "hung.sock", 8 * MiB))
        with Engine() as engine:
            dev = engine.create_device(8 * MiB)
            dev.fill(1.0)
            job = engine.backup(dev, fake.uri, format="nbd", target_timeout=2.0)
            assert job.stuck_timeout > 2 * 2.0
            result = job.wait(60.0)
    assert result.outcome is Outcome.FAILED
    assert "did not answer within 2 s" in result.error, result.error
    assert str(tmp_path / "hung.sock") in result.error or "NBD" in result.error, result.error
    assert "stopped responding" not in result.error


def test_a_forged_thaw_does_not_let_a_writer_write_during_the_snapshot() -> None:
    """A Thaw (or Shutdown) message forged on a writer's control queue during a freeze
    must not let the writer write in the middle of the snapshot: the thaw is the freeze
    word, which only the supervisor clears; and a forged Shutdown is ignored."""
    with Engine() as engine:
        dev = engine.create_device(16 * MiB, max_writers=1)
        (writer,) = engine.start_writers(dev, 1, workload="random", duration=60.0, seed=5)
        wait_until(lambda: bool(dev.device.stats[0, S.W_OPS] > 0), 10.0, what="writes")
        control = engine.names.writer_control_queue("dev0", 0)
        with engine.freeze([dev]):
            epoch = int(dev.device.ctl[L.CTL_FREEZE])
            first = dev.device.data.copy()
            forge(control, protocol.Thaw(epoch=epoch))
            forge(control, protocol.Thaw(epoch=epoch, token="cd" * 16))
            forge(control, protocol.Shutdown(reason="forged"))
            time.sleep(0.5)
            second = dev.device.data.copy()
        assert np.array_equal(first, second), "the writer wrote during the freeze"
        mq = posix_ipc.MessageQueue(control)
        try:
            wait_until(lambda: int(mq.current_messages) == 0, 10.0,
                       what="the writer to read the forgeries")
        finally:
            mq.close()
        # It writes on (the forged Shutdown was ignored).
        before = int(dev.device.stats[0, S.W_OPS])
        wait_until(lambda: int(dev.device.stats[0, S.W_OPS]) > before, 10.0,
                   what="the writer to write again")
        assert writer.alive


def test_the_writer_loop_survives_an_error_handling_one_message(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """workers.guest in this process: a message whose handling raises is logged and
    counted; the next message is still handled."""
    from workers import guest as writer_module

    with Engine() as engine:
        dev = engine.create_device(4 * MiB, max_writers=1)
        names = engine.names
        engine.run.create_queue(names.writer_control_queue("dev0", 0),
                             WRITER_CONTROL_RECEIVES, small=True)
        engine.run.create_queue(names.writer_reply_queue("dev0", 0),
                             WRITER_REPLY_RECEIVES, small=True)
        args = writer_module.parse_args([
            "--meta", dev.device.meta_name, "--device", "dev0", "--run", names.run_id,
            "--prefix", names.prefix, "--id", "0"])
        writer = writer_module.GuestWriter(args, os.getppid())
        try:
            writer.token = "ab" * 16

            calls = [0]
            real_warning = writer_module.log.warning

            def broken(*args: object) -> None:
                calls[0] += 1
                if calls[0] == 1:
                    raise RuntimeError("a bug while handling an unexpected Freeze")
                real_warning(*args)

            # A Freeze is no longer sent to writers: it is logged as unexpected, and
            # that is where this bug strikes.
            monkeypatch.setattr(writer_module.log, "warning", broken)
            control = names.writer_control_queue("dev0", 0)
            forge(control, protocol.Freeze(epoch=7, token=writer.token))
            forge(control, protocol.Shutdown(reason="stop", token=writer.token))
            writer.service_control(1.0)
            assert writer.control.rejected == 1
            assert writer.stop  # the Shutdown after the failed Freeze was handled
        finally:
            writer.close()
