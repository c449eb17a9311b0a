"""Two parties stepped line by line through the real code: every interleaving, in order.

A race between a guest writer and the backup worker lives between two lines of one of
them. Instead of hoping that threads meet there, :class:`Stepper` runs one party in a
thread under a trace function that stops it before *each* line it executes in the module
under test; the test lets it run to its n-th line, runs the other party to the end of
what it can do without waiting, then lets the first one finish -- for every n. Each
check is deterministic: a mutant that opens a window between two lines is caught every
time, at the n where the window is.

* the writer's stage-mode save (``shmblock/guest.py``) against the worker's background
  copy and its end of the job: a writer that cleared ``needs_copy`` before its staged
  data was stored lets the worker skip the cluster and complete without it;
* the worker's background chunk (``shmblock/copier.py``) against a stage-mode write: a
  copy that reads ``needs_copy`` before taking the chunk's claims saves a cluster the
  writer already staged -- with the writer's new data.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest

from shmblock import cbw_buffer as cbw_buffer_module
from shmblock import copier as copier_module
from shmblock import guest as guest_module
from shmblock.claims import Claims
from shmblock.copier import Copier
from shmblock.device import Device, Geometry
from shmblock.errors import CopyBeforeWriteError
from shmblock.guest import GuestIO
from shmblock.targets.raw import RawTarget
from tests.helpers import CS, begin_job, new_device, pattern, run_names

N = 8
GEO = Geometry(N * CS, cluster_size=CS, max_writers=2, buffer_slots=4)
STEP_TIMEOUT = 10.0

Tracer = Callable[[FrameType, str, Any], Any]


class Stepper:
    """Run ``work`` in a thread that stops before every line it runs in ``source`` (a
    module's file, or several: a guest's save runs in guest.py and cbw_buffer.py)."""

    def __init__(self, work: Callable[[], object], source: str | tuple[str, ...]) -> None:
        self._work = work
        self._source = (source,) if isinstance(source, str) else source
        self._go = threading.Semaphore(0)
        self._paused = threading.Semaphore(0)
        self._free = False
        self.done = False
        self.error: BaseException | None = None
        self.lines = 0
        self._thread = threading.Thread(target=self._run, name="stepped", daemon=True)
        self._thread.start()
        self._wait()  # stopped before its first traced line (or already done)

    def _local(self, frame: FrameType, event: str, arg: Any) -> Tracer | None:
        if event == "line" and not self._free:
            self.lines += 1
            self._paused.release()
            if not self._go.acquire(timeout=STEP_TIMEOUT):
                self._free = True  # the test gave up on us: run free
        return self._local

    def _global(self, frame: FrameType, event: str, arg: Any) -> Tracer | None:
        if event == "call" and frame.f_code.co_filename in self._source:
            return self._local
        return None

    def _run(self) -> None:
        sys.settrace(self._global)
        try:
            self._work()
        except BaseException as exc:  # reported to the test
            self.error = exc
        finally:
            sys.settrace(None)
            self.done = True
            self._paused.release()

    def _wait(self) -> None:
        assert self._paused.acquire(timeout=STEP_TIMEOUT), "the stepped party hangs"

    def step(self) -> bool:
        """Let it run one more line; False once it has finished."""
        if self.done:
            return False
        self._go.release()
        self._wait()
        return not self.done

    def finish(self) -> None:
        """Let it run to its end without stopping."""
        self._free = True
        if not self.done:
            self._go.release()
        self._thread.join(STEP_TIMEOUT)
        assert not self._thread.is_alive(), "the stepped party did not finish"


class Rig:
    """A device with a full job on it, its snapshot, and the worker's copier."""

    def __init__(self, device: Device, target: Path, chunk: int, zeros: bool) -> None:
        self.device = device
        # Every cluster written before the job: with data, or with (allocated) zeros.
        if not zeros:
            device.data[:] = np.frombuffer(pattern(device.size, 7), np.uint8)
        device.allocated[:] = 1
        self.target = RawTarget(str(target), device.size, CS)
        self.claims = Claims(device.meta_name)
        self.copier = Copier(device, self.target, self.claims, chunk_bytes=chunk * CS)
        begin_job(device, "full", cbw_mode="stage", cbw_timeout=0.05)
        self.copier.begin()
        self.snapshot = device.data.tobytes()
        self.guest = GuestIO(device, 0, run_names().backup_queue("dev0"))
        self.steppers: list[Stepper] = []

    def stepped(self, work: Callable[[], object], source: str | tuple[str, ...]) -> Stepper:
        stepper = Stepper(work, source)
        self.steppers.append(stepper)
        return stepper

    def background_until_blocked(self) -> None:
        """The worker's background pass, as far as it goes without a held claim."""
        copier = self.copier
        while not copier.background_done:
            before = copier.cursor
            copier.copy_next_chunk()
            if copier.cursor == before:
                return  # a writer holds a claim in this chunk

    def complete_and_check(self) -> None:
        """Finish the job as the worker does, then compare the backup with the snapshot."""
        self.background_until_blocked()
        assert self.copier.background_done
        self.copier.finish("full")
        image = self.target.read(0, self.device.size)
        bad = [c for c in range(N)
               if image[c * CS : (c + 1) * CS] != self.snapshot[c * CS : (c + 1) * CS]]
        assert not bad, f"clusters {bad} of the backup differ from the snapshot"
        assert self.copier.clusters_saved == N, "a cluster was saved more than once"

    def close(self) -> None:
        for stepper in self.steppers:  # a failed check may leave one stopped mid-way
            with contextlib.suppress(AssertionError):
                stepper.finish()
        self.guest.close()
        self.copier.close()
        self.claims.close()
        self.target.abort()


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[Callable[[int, bool], Rig]]:
    made: list[tuple[Rig, Any]] = []

    def make(chunk: int, zeros: bool) -> Rig:
        ctx = new_device(GEO)
        device = ctx.__enter__()
        try:
            # A target of its own: .part files are created exclusively, and the rigs of
            # one test live side by side until it ends.
            rig = Rig(device, tmp_path / f"b{len(made)}.raw", chunk, zeros)
        except BaseException:
            ctx.__exit__(None, None, None)
            raise
        made.append((rig, ctx))
        return rig

    yield make
    for rig, ctx in made:
        rig.close()
        ctx.__exit__(None, None, None)


def test_the_worker_at_every_line_of_a_stage_mode_save(
        rigs: Callable[[int, bool], Rig]) -> None:
    """The worker runs its background pass and, if that ends, completes the job, at
    every line of a stage-mode save of cluster 5. A writer that cleared needs_copy[5]
    before its slot was FULL would let the pass skip 5 and the job complete without it.
    """
    source = (guest_module.__file__, cbw_buffer_module.__file__)
    n = 0
    while True:
        rig = rigs(1, False)
        writer = rig.stepped(functools.partial(rig.guest.write, 5 * CS + 1, b"\xa5" * 100),
                             source)
        alive = all(writer.step() for _ in range(n))
        rig.background_until_blocked()
        if rig.copier.background_done:
            rig.complete_and_check()
        writer.finish()
        assert writer.error is None, writer.error
        if not rig.copier.background_done:
            rig.complete_and_check()  # the writer let go of its claim
        if not alive:
            break
        n += 1
    assert n > 10, "the save was not traced line by line"


def test_a_drain_at_every_line_of_a_stage_mode_save(
        rigs: Callable[[int, bool], Rig]) -> None:
    """The worker drains the copy-before-write buffer at every line of a stage-mode save
    of cluster 5 (in guest.py and cbw_buffer.py). A writer that published its slot (FULL)
    before storing the data and the cluster number would have the drain write stale
    bytes for 5, free the slot, and the backup would keep them."""
    source = (guest_module.__file__, cbw_buffer_module.__file__)
    n = 0
    while True:
        rig = rigs(1, False)
        writer = rig.stepped(functools.partial(rig.guest.write, 5 * CS + 1, b"\xa5" * 100),
                             source)
        alive = all(writer.step() for _ in range(n))
        rig.copier.drain_staging()
        writer.finish()
        assert writer.error is None, writer.error
        rig.complete_and_check()
        if not alive:
            break
        n += 1
    assert n > 10, "the save was not traced line by line"


@pytest.mark.parametrize("zeros", [False, True], ids=["data", "allocated-zeros"])
def test_a_stage_mode_write_at_every_line_of_a_background_chunk(
        rigs: Callable[[int, bool], Rig], zeros: bool) -> None:
    """A writer saves and overwrites cluster 2 at every line of the worker's copy of the
    chunk [0, 4). A copy that read needs_copy before claiming would save 2 again, with
    the new data (which the staged zeros of a raw target never repair)."""
    source = copier_module.__file__
    n = 0
    while True:
        rig = rigs(4, zeros)
        worker = rig.stepped(rig.copier.copy_next_chunk, source)
        alive = all(worker.step() for _ in range(n))
        # If the worker holds the chunk's claims, the write would have waited: here it
        # times out instead (cbw_timeout is short) and changes nothing.
        with contextlib.suppress(CopyBeforeWriteError):
            rig.guest.write(2 * CS, b"\x5a" * CS)
        worker.finish()
        assert worker.error is None, worker.error
        rig.copier.drain_staging()
        rig.complete_and_check()
        if not alive:
            break
        n += 1
    assert n > 10, "the chunk was not traced line by line"


def test_sync_none_completes_at_every_line_of_a_stage_mode_save(
        rigs: Callable[[int, bool], Rig]) -> None:
    """sync=none: the job is told to complete while a writer is at each line of a
    stage-mode save of cluster 5. Whatever the writer staged must reach the target
    before the job completes -- finish() stops copy-before-write and waits for the
    writer's claim before its last drain (before, a cluster staged after the last drain
    was dropped with the staging slots)."""
    source = (guest_module.__file__, cbw_buffer_module.__file__)
    n = 0
    while True:
        rig = rigs(1, False)
        begin_job(rig.device, "none", cbw_mode="stage", cbw_timeout=0.05)
        rig.copier.begin()
        writer = rig.stepped(functools.partial(rig.guest.write, 5 * CS + 1, b"\xa5" * 100),
                             source)
        alive = all(writer.step() for _ in range(n))
        errors: list[BaseException] = []

        def finish(copier: Copier = rig.copier, errors: list[BaseException] = errors) -> None:
            try:
                copier.finish("none")
            except BaseException as exc:  # reported below
                errors.append(exc)

        finisher = threading.Thread(target=finish)
        finisher.start()
        finisher.join(0.2)  # done at once, unless the writer holds a claim it waits for
        writer.finish()
        finisher.join(STEP_TIMEOUT)
        assert not finisher.is_alive() and not errors, errors
        assert writer.error is None, writer.error
        # Copies: a failing assert must not keep a view of the device alive.
        slots, saved = rig.device.slot_state.copy(), rig.device.saved.copy()
        assert not slots.any(), "a staged cluster was left behind"
        image = rig.target.read(0, rig.device.size)
        for c in range(N):
            if saved[c]:
                assert image[c * CS : (c + 1) * CS] == rig.snapshot[c * CS : (c + 1) * CS]
        if not alive:
            break
        n += 1
    assert n > 10
