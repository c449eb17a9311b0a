"""QEMU's job lifecycle on real backup jobs (issue 8 §5): verbs, pending, finalize,
dismiss, on-target-error, events.

Every test runs the real backup worker process. A job's outcome and its bitmap's fate
are decided in ``pending``: with ``auto_finalize=False`` the job waits there with its
``.part`` unpublished and its bitmap unsettled until ``finalize`` (commit) or ``cancel``
(abort). ``stop``/``enospc`` pause a job whose target filled up; ``resume`` retries the
failed chunk.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from shmblock.backup_job import BackupJob
from shmblock.device_handle import DeviceHandle
from shmblock.engine import Engine
from shmblock.errors import StateError, TargetError, UsageError
from shmblock.job import IoStatus, JobState, Outcome
from shmblock.options import BackupOptions
from shmblock.targets import TargetSpec, open_reader, open_target
from tests.helpers import small_tmpfs
from tests.procs import MiB, wait_until

CLUSTER = 64 * 1024
SIZE = 4 * MiB
N = SIZE // CLUSTER
DIRTY = [0, 3, 5, 8, 13, 21, 40, 63]
SLOW = 2 * CLUSTER  # bytes per second: the job is still copying when the test acts


def prepare(engine: Engine, size: int = SIZE) -> DeviceHandle:
    dev = engine.create_device(size, CLUSTER)
    dev.fill(1.0, seed=1)
    dev.add_bitmap("b0")
    for c in DIRTY:
        dev.write(c * CLUSTER, np.full(CLUSTER, c + 1, dtype=np.uint8))
    return dev


def dirty_mask(clusters: list[int]) -> np.ndarray:
    m = np.zeros(N, dtype=np.bool_)
    m[clusters] = True
    return m


def state_of(job: BackupJob) -> JobState:
    """The job's state, read afresh (so mypy does not narrow it across verbs)."""
    return job.state


def statuses(job: BackupJob) -> list[str]:
    return [e.data["status"] for e in job.events if e.kind == "status"]


def refused(call: object, job: BackupJob, state: str, verb: str) -> None:
    """``call()`` raises QEMU's StateError naming the job, its state and the verb."""
    assert callable(call)
    with pytest.raises(StateError) as info:
        call()
    err = info.value
    assert str(err).startswith(f"Job '{job.job}' in state '{state}' cannot accept "
                               f"command verb '{verb}'"), str(err)
    assert err.state == state


# -- pending, finalize, cancel in pending ----------------------------------------------


def test_manual_finalize_waits_in_pending_then_commits(tmp_path: Path) -> None:
    target = tmp_path / "b.raw"
    with Engine() as engine:
        dev = prepare(engine)
        job = engine.backup(dev, str(target), sync="incremental", bitmap="b0",
                            auto_finalize=False, verify=True)
        assert job.wait_work(30.0) is JobState.PENDING
        # Work done, outcome not decided: the finished image is still the .part, the
        # bitmap's frozen bits are still held and the bitmap busy.
        assert os.path.exists(str(target) + ".part")
        assert not target.exists()
        assert job.bitmap is not None and job.bitmap.frozen is not None
        assert "b0" in dev.busy_bitmaps
        assert job.proc.wait(10.0) == 0, "the worker exits once its work is done"
        assert [e.kind for e in job.events if e.kind == "pending"] == ["pending"]
        # Nothing watches a worker in pending: it is not "stuck" or "dead".
        engine.stuck_timeout = 0.5
        job.stuck_timeout = 0.5
        time.sleep(1.0)
        assert state_of(job) is JobState.PENDING
        for verb, call in [("pause", job.pause), ("resume", job.resume),
                           ("set-speed", lambda: job.set_speed(1)),
                           ("dismiss", job.dismiss)]:
            refused(call, job, "pending", verb)
        job.finalize()
        assert state_of(job) is JobState.CONCLUDED
        result = job.wait(30.0)
        refused(job.finalize, job, "concluded", "finalize")
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    assert target.exists() and not os.path.exists(str(target) + ".part")
    assert statuses(job) == ["created", "running", "waiting", "pending", "concluded"]


def test_cancel_in_pending_aborts_and_puts_the_bitmap_back(tmp_path: Path) -> None:
    target = tmp_path / "b.raw"
    with Engine() as engine:
        dev = prepare(engine)
        assert np.array_equal(dev.bitmap("b0") != 0, dirty_mask(DIRTY))
        job = engine.backup(dev, str(target), sync="incremental", bitmap="b0",
                            auto_finalize=False)
        assert job.wait_work(30.0) is JobState.PENDING
        assert not (dev.bitmap("b0") != 0).any(), "consumed while the job holds it"
        job.cancel()
        result = job.wait(30.0)
        after = dev.bitmap("b0") != 0
        busy = dict(dev.busy_bitmaps)
    assert result.outcome is Outcome.CANCELLED
    assert not target.exists() and not os.path.exists(str(target) + ".part")
    assert np.array_equal(after, dirty_mask(DIRTY)), "on-success: the bits come back"
    assert not busy
    assert statuses(job)[-3:] == ["pending", "aborting", "concluded"]
    assert [e.kind for e in job.events if e.kind in ("completed", "cancelled")] == \
        ["cancelled"]


def test_auto_finalize_settles_before_the_job_concludes(tmp_path: Path) -> None:
    target = tmp_path / "b.raw"
    with Engine() as engine:
        dev = prepare(engine)
        job = engine.backup(dev, str(target), sync="incremental", bitmap="b0")
        result = job.wait(30.0)
        after = dev.bitmap("b0") != 0
    assert result.outcome is Outcome.COMPLETED, result.error
    assert target.exists()
    assert not after.any(), "completed on-success: the copied bits are gone"
    kinds = [(e.kind, e.data.get("status")) for e in job.events
             if e.kind in ("status", "completed")]
    assert kinds[-4:] == [("status", "waiting"), ("status", "pending"),
                          ("completed", None), ("status", "concluded")]


# -- dismiss ---------------------------------------------------------------------------


def test_auto_dismiss_goes_to_null_and_keeps_the_result(tmp_path: Path) -> None:
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER)
        job = engine.backup(dev, str(tmp_path / "b.raw"), auto_dismiss=True, verify=True)
        result = job.wait(30.0)
        assert state_of(job) is JobState.NULL
        assert job.wait(1.0) is result
        for verb, call in [("dismiss", job.dismiss), ("finalize", job.finalize),
                           ("cancel", job.cancel), ("pause", job.pause)]:
            refused(call, job, "null", verb)
    assert result.outcome is Outcome.COMPLETED and result.verified is True
    assert statuses(job)[-2:] == ["concluded", "null"]


def test_manual_dismiss(tmp_path: Path) -> None:
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER)
        job = engine.backup(dev, str(tmp_path / "b.raw"))
        result = job.wait(30.0)
        assert state_of(job) is JobState.CONCLUDED
        for verb, call in [("pause", job.pause), ("resume", job.resume),
                           ("cancel", job.cancel), ("set-speed", lambda: job.set_speed(0)),
                           ("finalize", job.finalize)]:
            refused(call, job, "concluded", verb)
        job.dismiss()
        assert state_of(job) is JobState.NULL
        refused(job.dismiss, job, "null", "dismiss")
        assert job.wait(1.0) is result


# -- verbs while the work goes on -------------------------------------------------------


def test_verbs_in_created_running_paused(tmp_path: Path) -> None:
    target = tmp_path / "b.raw"
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER)
        job = engine.create_backup(dev, str(target), speed=SLOW, verify=True)
        assert state_of(job) is JobState.CREATED
        refused(job.finalize, job, "created", "finalize")
        refused(job.dismiss, job, "created", "dismiss")
        refused(job.resume, job, "created", "resume")  # not paused
        job.pause()  # QEMU: takes effect when the job starts
        refused(job.pause, job, "created", "pause")
        job.start()
        assert state_of(job) is JobState.PAUSED
        done = job.progress[0]
        refused(job.pause, job, "paused", "pause")
        refused(job.finalize, job, "paused", "finalize")
        job.set_speed(SLOW)
        job.resume()
        assert state_of(job) is JobState.RUNNING
        wait_until(lambda: job.progress[0] > done, 20.0, what="copying after resume")
        refused(job.resume, job, "running", "resume")
        refused(job.dismiss, job, "running", "dismiss")
        with pytest.raises(UsageError):
            job.complete()  # only sync=none ends on request
        job.set_speed(0)
        result = job.wait(30.0)
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True
    assert statuses(job) == ["created", "running", "paused", "running", "waiting",
                             "pending", "concluded"]
    speeds = [e.data["speed"] for e in job.events if e.kind == "speed"]
    assert speeds == [SLOW, 0]


def test_cancel_a_created_job_concludes_at_once(tmp_path: Path) -> None:
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER)
        job = engine.create_backup(dev, str(tmp_path / "b.raw"))
        job.cancel()
        assert state_of(job) is JobState.CONCLUDED
        refused(job.start, job, "concluded", "start")
        result = job.wait(30.0)
        assert job.proc.wait(10.0) is not None
    assert result.outcome is Outcome.CANCELLED
    assert not (tmp_path / "b.raw.part").exists()


def test_complete_of_a_sync_none_job(tmp_path: Path) -> None:
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER)
        job = engine.backup(dev, str(tmp_path / "b.raw"), sync="none",
                            auto_finalize=False)
        dev.write(0, np.full(4096, 7, dtype=np.uint8))
        job.complete()
        assert job.wait_work(30.0) is JobState.PENDING
        refused(job.complete, job, "pending", "complete")
        job.finalize()
        result = job.wait(30.0)
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.cbw_clusters >= 1


# -- on-target-error -------------------------------------------------------------------


def test_on_target_error_is_checked() -> None:
    spec = TargetSpec.parse("nbd://localhost/x")
    with pytest.raises(UsageError, match="on-target-error"):
        BackupOptions(TargetSpec.parse("/tmp/x.raw"), on_target_error="retry")
    with pytest.raises(UsageError, match="file target"):
        BackupOptions(spec, on_target_error="stop")
    assert BackupOptions(spec, on_target_error="report").on_target_error == "report"


@pytest.mark.parametrize("policy", ["stop", "enospc"])
def test_stop_pauses_on_enospc_and_resume_retries(tmp_path: Path, policy: str) -> None:
    """A target file system fills up: the job pauses with an error event (io-status
    nospace), the operator frees space, resumes, and the job completes and verifies."""
    size = 8 * MiB
    with small_tmpfs(tmp_path, "12m") as fs, Engine() as engine:
        filler = fs / "filler"
        filler.write_bytes(b"\1" * (7 * MiB))
        dev = engine.create_device(size, CLUSTER)
        dev.fill(1.0, seed=5)  # every cluster data: the target needs the full 8 MiB
        job = engine.backup(dev, str(fs / "b.raw"), on_target_error=policy, verify=True,
                            chunk=4 * CLUSTER)
        wait_until(lambda: job.state is JobState.PAUSED, 30.0, what="the job to stop")
        errors = [e for e in job.events if e.kind == "error"]
        assert errors and errors[0].data["action"] == "stop"
        assert errors[0].data["operation"] == "write"
        assert errors[0].data["errno"] == 28
        assert job.lifecycle.io_status is IoStatus.NOSPACE
        assert job.proc.poll() is None, "a stopped job's worker waits"
        job.stuck_timeout = 1.5  # a stopped worker still beats: it is not stuck
        time.sleep(2.5)
        assert state_of(job) is JobState.PAUSED and job.proc.poll() is None
        filler.unlink()
        job.resume()
        result = job.wait(60.0)
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    assert statuses(job)[:4] == ["created", "running", "paused", "running"]


def test_report_fails_the_job_on_enospc(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path, "2m") as fs, Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER)
        dev.fill(1.0, seed=5)
        job = engine.backup(dev, str(fs / "b.raw"), on_target_error="report")
        result = job.wait(30.0)
        assert not (fs / "b.raw").exists() and not (fs / "b.raw.part").exists()
    assert result.outcome is Outcome.FAILED
    assert "No space" in result.error, result.error
    assert not [e for e in job.events if e.kind == "error"]


def test_ignore_retries_until_there_is_room(tmp_path: Path) -> None:
    size = 8 * MiB
    with small_tmpfs(tmp_path, "12m") as fs, Engine() as engine:
        filler = fs / "filler"
        filler.write_bytes(b"\1" * (7 * MiB))
        dev = engine.create_device(size, CLUSTER)
        dev.fill(1.0, seed=6)
        job = engine.backup(dev, str(fs / "b.raw"), on_target_error="ignore", verify=True,
                            chunk=4 * CLUSTER)
        wait_until(lambda: any(e.kind == "error" for e in job.events), 30.0,
                   what="an error event")
        assert state_of(job) is JobState.RUNNING, "ignore never pauses"
        filler.unlink()
        result = job.wait(60.0)
    assert result.outcome is Outcome.COMPLETED, result.error
    assert result.verified is True, result.verify_error
    actions = {e.data["action"] for e in job.events if e.kind == "error"}
    assert actions == {"ignore"}


def test_closing_the_engine_aborts_a_job_left_pending(tmp_path: Path) -> None:
    target = tmp_path / "b.raw"
    with Engine() as engine:
        dev = engine.create_device(SIZE, CLUSTER)
        job = engine.backup(dev, str(target), auto_finalize=False)
        assert job.wait_work(30.0) is JobState.PENDING
        assert os.path.exists(str(target) + ".part")
    assert state_of(job) is JobState.CONCLUDED
    assert job.tracker.outcome is Outcome.CANCELLED
    assert not target.exists() and not os.path.exists(str(target) + ".part")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_seal_leaves_a_complete_part_that_commit_publishes(tmp_path: Path,
                                                           fmt: str) -> None:
    """What the worker does at the end (seal) and the supervisor later (rename): the
    sealed .part is already the finished image; no write is accepted after seal."""
    path = tmp_path / f"b.{fmt}"
    data = np.random.default_rng(3).integers(1, 256, CLUSTER, dtype=np.uint8)
    with open_target(TargetSpec.parse(str(path)), SIZE, CLUSTER) as target:
        target.write(CLUSTER, data.tobytes())
        target.seal()
        assert not path.exists() and Path(str(path) + ".part").exists()
        if fmt == "qcow2":
            with pytest.raises(TargetError):
                target.write(0, data.tobytes())
            check = subprocess.run(["qemu-img", "check", str(path) + ".part"],
                                   capture_output=True, text=True, check=False)
            assert check.returncode == 0, check.stdout + check.stderr
        target.commit()
    assert path.exists() and not Path(str(path) + ".part").exists()
    reader = open_reader(TargetSpec.parse(str(path)), SIZE, CLUSTER)
    try:
        assert reader.read(CLUSTER, CLUSTER) == data.tobytes()
        assert reader.read(0, CLUSTER) == bytes(CLUSTER)
    finally:
        reader.close()


def test_a_part_replaced_in_pending_fails_prepare_and_aborts(tmp_path: Path) -> None:
    """prepare() checks that the .part is still the file our worker created: a file put
    in its place is never published, and the bitmap gets its bits back."""
    target = tmp_path / "b.raw"
    part = Path(str(target) + ".part")
    with Engine() as engine:
        dev = prepare(engine)
        job = engine.backup(dev, str(target), sync="incremental", bitmap="b0",
                            auto_finalize=False)
        assert job.wait_work(30.0) is JobState.PENDING
        other = tmp_path / "other"
        other.write_bytes(b"not the backup")  # a new inode while the .part still exists
        other.rename(part)
        job.finalize()
        result = job.wait(30.0)
        after = dev.bitmap("b0") != 0
    assert result.outcome is Outcome.FAILED
    assert "not the file this job's worker created" in result.error, result.error
    assert not target.exists()
    assert part.read_bytes() == b"not the backup", "someone else's file is left alone"
    assert np.array_equal(after, dirty_mask(DIRTY))
