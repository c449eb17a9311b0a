"""One backup worker per device (``Engine(prestart_backup_worker=True)``).

The worker is started with the device and serves the device's jobs one after another
(:mod:`shmblock.backup_workers`): a job starts on the running process, a failed job
leaves it serving, a worker killed between jobs is replaced at the next job (and the
job's events say so), and nobody but the supervisor can hand it a job or stand in for
its Ready. No timing is asserted here: the latency is the bench's business.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

import protocol
from shmblock import layout as L
from shmblock.backup_workers import new_ready_number
from shmblock.engine import DeviceHandle, Engine
from shmblock.errors import JobError, UsageError
from shmblock.job import JobState, Outcome
from tests.procs import MiB, assert_same_image, cmdline, pid_gone, wait_until
from tests.test_supervisor import forge

CLUSTER = 64 * 1024
SIZE = 4 * MiB


def fill(dev: DeviceHandle, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8)
    dev.write(0, data)
    return data


def image(path: Path, data: np.ndarray) -> Path:
    data.tofile(path)
    return path


def worker_of(engine: Engine, dev: DeviceHandle) -> int:
    return engine.backup_workers[dev.name].proc.pid


def test_jobs_start_on_the_running_worker_one_after_another(tmp_path: Path) -> None:
    with Engine(prestart_backup_worker=True) as engine:
        dev = engine.create_device(SIZE)
        engine.start_backup_worker(dev)
        pid = worker_of(engine, dev)
        assert "backup-worker" in cmdline(pid)
        for i in range(3):
            data = fill(dev, i)
            job = engine.create_backup(dev, str(tmp_path / f"b{i}.raw"), verify=True)
            assert job.proc.pid == pid, "the job runs on the device's worker"
            assert job.state is JobState.CREATED
            job.start()
            result = job.wait(60.0)
            assert result.outcome is Outcome.COMPLETED, result.error
            assert result.verified is True, result.verify_error
            assert_same_image(image(tmp_path / f"e{i}.raw", data), tmp_path / f"b{i}.raw")
            assert job.proc.poll() is None, "the worker outlives its job"
        assert engine.record.children and len(engine.record.children) == 1
    assert pid_gone(pid), "closing the engine ends the worker"


def test_each_device_has_its_own_worker_and_they_run_together(tmp_path: Path) -> None:
    with Engine(prestart_backup_worker=True) as engine:
        devs = [engine.create_device(SIZE, name=f"d{i}") for i in range(2)]
        datas = [fill(d, 10 + i) for i, d in enumerate(devs)]
        # Slow, so both copy at the same time.
        jobs = [engine.backup(d, str(tmp_path / f"{d.name}.raw"), speed=SIZE)
                for d in devs]
        assert jobs[0].proc.pid != jobs[1].proc.pid
        assert all(j.state is JobState.RUNNING for j in jobs)
        for j in jobs:
            j.set_speed(0)
        for d, j, data in zip(devs, jobs, datas, strict=True):
            assert j.wait(60.0).outcome is Outcome.COMPLETED
            assert_same_image(image(tmp_path / f"{d.name}.e", data), tmp_path / f"{d.name}.raw")


def test_a_failed_job_leaves_the_worker_serving(tmp_path: Path) -> None:
    """The target cannot be opened: the job fails before the snapshot, the worker stays
    and takes the next job."""
    with Engine(prestart_backup_worker=True) as engine:
        dev = engine.create_device(SIZE)
        data = fill(dev, 3)
        engine.start_backup_worker(dev)
        pid = worker_of(engine, dev)
        socket = tmp_path / "nobody.sock"
        with pytest.raises(JobError, match="could not start"):
            engine.create_backup(dev, f"nbd+unix:///x?socket={socket}", job_id="bad",
                                 target_timeout=2.0)
        assert engine.jobs["bad"].tracker.outcome is Outcome.FAILED
        assert int(dev.device.ctl[L.CTL_JOB_ACTIVE]) == 0
        job = engine.backup(dev, str(tmp_path / "b.raw"))
        assert job.proc.pid == pid
        assert job.wait(60.0).outcome is Outcome.COMPLETED
        assert_same_image(image(tmp_path / "e.raw", data), tmp_path / "b.raw")
        assert job.proc.poll() is None


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_worker_killed_between_jobs_is_replaced_at_the_next_job(
        tmp_path: Path, sig: signal.Signals) -> None:
    with Engine(prestart_backup_worker=True) as engine:
        dev = engine.create_device(SIZE)
        fill(dev, 4)
        assert engine.backup(dev, str(tmp_path / "a.raw")).wait(60.0).outcome \
            is Outcome.COMPLETED
        pid = worker_of(engine, dev)
        assert "backup-worker" in cmdline(pid)  # still our process: pids are reused
        os.kill(pid, sig)
        wait_until(lambda: engine.backup_workers[dev.name].proc.poll() is not None, 30.0,
                   what="the worker to die")
        data = fill(dev, 5)
        job = engine.backup(dev, str(tmp_path / "b.raw"), verify=True)
        assert job.proc.pid != pid
        result = job.wait(60.0)
        assert result.outcome is Outcome.COMPLETED, result.error
        assert result.verified is True
        assert_same_image(image(tmp_path / "e.raw", data), tmp_path / "b.raw")
        restarted = [e for e in job.events if e.kind == "worker-restarted"]
        assert len(restarted) == 1
        # SIGTERM is the worker's orderly stop: it leaves with status 1.
        how = "killed by signal 9" if sig is signal.SIGKILL else "exit code 1"
        assert how in restarted[0].data["reason"]


def test_a_worker_killed_during_a_job_fails_it_and_the_next_job_works(
        tmp_path: Path) -> None:
    with Engine(prestart_backup_worker=True) as engine:
        dev = engine.create_device(SIZE)
        fill(dev, 6)
        job = engine.backup(dev, str(tmp_path / "a.raw"), speed=CLUSTER)
        assert "backup-worker" in cmdline(job.proc.pid)
        os.kill(job.proc.pid, signal.SIGKILL)
        result = job.wait(30.0)
        assert result.outcome is Outcome.FAILED
        assert "died" in result.error
        assert int(dev.device.ctl[L.CTL_JOB_ACTIVE]) == 0
        data = fill(dev, 7)
        second = engine.backup(dev, str(tmp_path / "b.raw"))
        assert second.wait(60.0).outcome is Outcome.COMPLETED
        assert_same_image(image(tmp_path / "e.raw", data), tmp_path / "b.raw")


def test_forged_job_messages_do_not_reach_the_waiting_worker(tmp_path: Path) -> None:
    """Jobs come only on the worker's stdin: a forged JobStart or Cancel on the backup
    queue (no token) is rejected, and a forged Ready, even with the worker's pid and a
    plausible number, never stands for it."""
    with Engine(prestart_backup_worker=True) as engine:
        dev = engine.create_device(SIZE)
        engine.start_backup_worker(dev)
        pid = worker_of(engine, dev)
        bk = engine.names.backup_queue(dev.name)
        # Waiting between jobs: these sit in the queue until the next job reads it.
        forge(bk, protocol.JobStart(job="job1", sync="full", speed=0, token="0" * 32))
        forge(bk, protocol.Cancel(job="job1", token="0" * 32))
        forge(engine.names.supervisor_queue,
              protocol.Ready(role="backup", ident=new_ready_number(), pid=pid))
        wait_until(lambda: engine.sup.rejected >= 1, 10.0, what="the forged Ready rejected")
        snapshot = fill(dev, 8)
        job = engine.create_backup(dev, str(tmp_path / "b.raw"), verify=True)
        assert job.job == "job1" and job.state is JobState.CREATED
        # A forged JobStart would have started copying before the snapshot: what is
        # written now must not reach the backup.
        fill(dev, 9)
        snapshot = np.frombuffer(dev.read(0, SIZE), dtype=np.uint8).copy()
        job.start()
        fill(dev, 10)
        result = job.wait(60.0)
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    assert_same_image(image(tmp_path / "e.raw", snapshot), tmp_path / "b.raw")
    assert engine.sup.rejected == 1


def test_start_backup_worker_needs_the_per_device_mode() -> None:
    with Engine() as engine:
        dev = engine.create_device(SIZE)
        with pytest.raises(UsageError, match="prestart_backup_worker"):
            engine.start_backup_worker(dev)
        assert engine.backup_workers == {}
