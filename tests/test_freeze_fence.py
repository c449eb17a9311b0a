"""The fence-based freeze (shmblock.freeze): it waits only for writers in a write.

Real writer processes throughout. A writer stopped *between* writes costs the freeze
nothing (the old message-based freeze waited for it to be scheduled, and failed when it
never was); a writer stopped *inside* a write holds the freeze until it is continued;
and under storms of SIGSTOP/SIGCONT every snapshot is point-in-time exact — nothing is
stored to the device during a freeze, and backups verify against the copy taken in the
freeze (shmblock.verify). Plus the membarrier/futex wrapper on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from shmblock import freeze as freeze_module
from shmblock import layout as L
from shmblock import membarrier
from shmblock import stats as S
from shmblock.device import Device, Geometry
from shmblock.engine import Engine
from shmblock.errors import PeerGone
from shmblock.job import Outcome
from tests.helpers import CS, new_device
from tests.procs import start_writer_stopping_in_write, wait_until

MiB = 1 << 20


def is_stopped(pid: int) -> bool:
    return bool(psutil.Process(pid).status() == psutil.STATUS_STOPPED)


def stop_between_writes(dev: Device, ident: int, pid: int) -> None:
    """SIGSTOP ``pid`` at a moment it is not in a write (retry until so)."""
    for _ in range(1000):
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: is_stopped(pid), 10.0, interval=0.001, what="the stop")
        if int(dev.in_write[ident, 0]) == 0:
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(random.uniform(0, 0.002))
    pytest.fail("the writer was always stopped inside a write")


def frozen_copies_equal(dev: Device, pause: float) -> bool:
    """Inside a freeze: two copies of the contents ``pause`` apart are equal."""
    first = dev.data.copy()
    time.sleep(pause)
    return bool(np.array_equal(first, dev.data))


# -- (a) a writer stopped between writes ---------------------------------------------------


def test_a_writer_stopped_between_writes_does_not_delay_the_freeze(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The old freeze waited FREEZE_TIMEOUT for its Frozen, then failed.
    monkeypatch.setattr(freeze_module, "FREEZE_TIMEOUT", 5.0)
    with Engine() as engine:
        dev = engine.create_device(16 * MiB, max_writers=2)
        writers = engine.start_writers(dev, 2, workload="random", duration=120.0, seed=3)
        wait_until(lambda: bool((dev.device.stats[:2, S.W_OPS] > 0).all()), 30.0,
                   what="writes")
        victim = writers[0]
        stop_between_writes(dev.device, victim.ident, victim.pid)
        try:
            t0 = time.monotonic()
            with engine.freeze([dev]):
                waited = time.monotonic() - t0
                assert frozen_copies_equal(dev.device, 0.05), "a write landed in the freeze"
            assert waited < 2.0, f"the freeze waited {waited:.2f} s for a stopped writer"
            # A whole backup while it stays stopped: exact against the frozen copy.
            job = engine.backup(dev, str(tmp_path / "b.raw"), format="raw", verify=True)
            result = job.wait(120.0)
            assert result.outcome is Outcome.COMPLETED, result.error
            assert result.verified is True, result.verify_error
            assert is_stopped(victim.pid), "the writer stayed stopped throughout"
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        before = int(dev.device.stats[victim.ident, S.W_OPS])
        wait_until(lambda: int(dev.device.stats[victim.ident, S.W_OPS]) > before, 30.0,
                   what="the continued writer to write again")
        engine.stop_writers()


# -- (b) a writer stopped inside a write ---------------------------------------------------


def test_a_writer_stopped_inside_a_write_holds_the_freeze_until_continued(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Engine() as engine:
        dev = engine.create_device(16 * MiB, max_writers=2)
        (other,) = engine.start_writers(dev, 1, workload="random", duration=120.0, seed=4)
        held = start_writer_stopping_in_write(engine, dev, 300, monkeypatch,
                                              workload="random", duration=120.0, seed=5)
        try:
            job = engine.create_backup(dev, str(tmp_path / "b.raw"), format="raw",
                                       verify=True)
            started: list[BaseException | None] = []

            def start() -> None:
                try:
                    job.start()
                    started.append(None)
                except BaseException as exc:  # reported by the test below
                    started.append(exc)

            thread = threading.Thread(target=start)
            thread.start()
            time.sleep(1.0)
            assert thread.is_alive() and not started, "the snapshot ran over a write in flight"
            assert int(dev.device.ctl[L.CTL_FREEZE]) != 0
            # The other writer is frozen meanwhile (it met the freeze word and sleeps).
            ops = int(dev.device.stats[other.ident, S.W_OPS])
            time.sleep(0.2)
            assert int(dev.device.stats[other.ident, S.W_OPS]) == ops
            os.kill(held.pid, signal.SIGCONT)
            thread.join(60.0)
            assert started == [None]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(held.pid, signal.SIGCONT)
        result = job.wait(120.0)
        assert result.outcome is Outcome.COMPLETED, result.error
        # The held write finished before the instant: the frozen copy has it, and the
        # backup is exactly that copy.
        assert result.verified is True, result.verify_error
        assert int(dev.device.in_write[held.ident, 0]) in (0, held.pid)
        engine.stop_writers()


def test_a_writer_that_stays_inside_a_write_fails_the_freeze_in_bounded_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(freeze_module, "FREEZE_TIMEOUT", 1.0)
    with Engine() as engine:
        dev = engine.create_device(16 * MiB, max_writers=1)
        held = start_writer_stopping_in_write(engine, dev, 50, monkeypatch,
                                              workload="random", duration=120.0)
        try:
            t0 = time.monotonic()
            with pytest.raises(PeerGone,
                               match=r"writer 0 of dev0 .* stayed in a write"), \
                    engine.freeze([dev]):
                pass
            assert time.monotonic() - t0 < 5.0
            assert int(dev.device.ctl[L.CTL_FREEZE]) == 0, "thawed after the failure"
        finally:
            os.kill(held.pid, signal.SIGCONT)
        engine.stop_writers()


def test_a_writer_killed_inside_a_write_is_not_waited_for() -> None:
    with Engine() as engine:
        dev = engine.create_device(16 * MiB, max_writers=1)
        (writer,) = engine.start_writers(dev, 1, workload="random", duration=120.0)
        wait_until(lambda: int(dev.device.stats[0, S.W_OPS]) > 0, 30.0, what="writes")
        # Its word as a kill inside a write leaves it.
        writer.proc.kill()
        writer.proc.wait(10.0)
        dev.device.in_write[0, 0] = writer.pid
        t0 = time.monotonic()
        with engine.freeze([dev]):
            pass
        assert time.monotonic() - t0 < 2.0


# -- (c) storms of preemption --------------------------------------------------------------


def test_every_snapshot_is_exact_under_stop_and_continue_storms(tmp_path: Path) -> None:
    """Writers stopped and continued at random, also inside their writes, while freezes
    and backups come and go: no store reaches the device during any freeze, and every
    backup verifies against the copy taken in its freeze. Without the wait for writers
    in a write (tests/mutants.py: freeze-no-in-write-wait) a writer stopped inside a
    write and continued during a freeze lands its write in the middle of it."""
    rng = random.Random(9)
    with Engine() as engine:
        dev = engine.create_device(16 * MiB, max_writers=6)
        writers = engine.start_writers(dev, 6, workload="random", duration=300.0, seed=6)
        wait_until(lambda: bool((dev.device.stats[:6, S.W_OPS] > 0).all()), 30.0,
                   what="writes")
        stop = threading.Event()
        stopped_pids: set[int] = set()
        lock = threading.Lock()

        def storm() -> None:
            srng = random.Random(10)
            while not stop.is_set():
                w = srng.choice(writers)
                with lock:
                    os.kill(w.pid, signal.SIGSTOP)
                    stopped_pids.add(w.pid)
                time.sleep(srng.uniform(0, 0.004))
                with lock:
                    os.kill(w.pid, signal.SIGCONT)
                    stopped_pids.discard(w.pid)
                time.sleep(srng.uniform(0, 0.001))

        thread = threading.Thread(target=storm)
        thread.start()
        try:
            torn = 0
            freezes = 60
            for _ in range(freezes):
                with engine.freeze([dev]):
                    if not frozen_copies_equal(dev.device, 0.01):
                        torn += 1
                time.sleep(rng.uniform(0, 0.01))
            assert torn == 0, f"{torn} of {freezes} freezes saw a write land inside them"
            for i in range(3):
                job = engine.backup(dev, str(tmp_path / f"b{i}.raw"), format="raw",
                                    verify=True)
                result = job.wait(120.0)
                assert result.outcome is Outcome.COMPLETED, result.error
                assert result.verified is True, result.verify_error
        finally:
            stop.set()
            thread.join(10.0)
            for w in writers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGCONT)
        assert all(w.alive for w in writers)
        engine.stop_writers()


# -- (d) the membarrier and futex wrapper --------------------------------------------------


def test_membarrier_query_and_register() -> None:
    mask = membarrier.query()
    assert mask & membarrier.NEEDED == membarrier.NEEDED
    membarrier.require()
    membarrier.register()
    membarrier.register()  # once per process; again is a no-op
    membarrier.barrier()


@pytest.mark.parametrize(("err", "words"), [
    (errno.ENOSYS, "CONFIG_MEMBARRIER"), (errno.EINVAL, "4.16"), (errno.EPERM, "seccomp"),
    (errno.EIO, os.strerror(errno.EIO))])
def test_membarrier_errors_name_what_is_missing(monkeypatch: pytest.MonkeyPatch, err: int,
                                                words: str) -> None:
    def failing(*args: object) -> int:
        return -1

    monkeypatch.setattr(membarrier, "_syscall", lambda: failing)
    monkeypatch.setattr(ctypes, "get_errno", lambda: err)
    with pytest.raises(membarrier.MembarrierUnavailable, match=words) as info:
        membarrier.barrier()
    assert "MEMBARRIER_CMD_GLOBAL_EXPEDITED" in str(info.value)


def test_a_kernel_without_the_commands_is_refused_before_a_device_is_made(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(membarrier, "_checked", False)
    monkeypatch.setattr(membarrier, "query", lambda: 1 << membarrier.MEMBARRIER_CMD_GLOBAL)
    with pytest.raises(membarrier.MembarrierUnavailable, match="global expedited"), \
            new_device(Geometry(4 * CS, cluster_size=CS, max_writers=1)):
        pass


def test_futex_wait_returns_on_wake_change_or_timeout() -> None:
    with new_device(Geometry(4 * CS, cluster_size=CS, max_writers=1)) as dev:
        addr = dev.ctl.ctypes.data + L.CTL_FREEZE * 8
        dev.ctl[L.CTL_FREEZE] = 5
        t0 = time.monotonic()
        membarrier.futex_wait(addr, 5, 0.1)
        assert 0.09 <= time.monotonic() - t0 < 2.0, "the timeout"
        t0 = time.monotonic()
        membarrier.futex_wait(addr, 6, 5.0)
        assert time.monotonic() - t0 < 1.0, "the word is not the expected one: no wait"
        timer = threading.Timer(0.1, lambda: (dev.ctl.__setitem__(L.CTL_FREEZE, 0),
                                              membarrier.futex_wake(addr)))
        t0 = time.monotonic()
        timer.start()
        membarrier.futex_wait(addr, 5, 10.0)
        timer.join()
        assert time.monotonic() - t0 < 5.0, "woken"
