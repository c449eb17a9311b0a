"""Snapshot start: quiesce every writer of some devices (no write in flight).

Theory of operation
===================

The freeze waits only for writers that are *in a write*, never for a writer to be
scheduled. Two kinds of word in the device's metadata segment carry it:

* ``in_write[w]`` (:data:`shmblock.layout.IN_WRITE_STRIDE` apart, a cache line each):
  writer identity ``w`` (a writer process, or the engine's own guest I/O) stores its pid
  there before it looks at anything of a write, and 0 after the write's last store;
* ``ctl[CTL_FREEZE]``: nonzero while a freeze is on.

Writer (:meth:`GuestIO._fenced_write <shmblock.guest.GuestIO._fenced_write>`)::

    in_write[w] = pid          (W1)
    if ctl[CTL_FREEZE]:        (R1)  -> in_write[w] = 0, sleep on the futex, retry
    ... the write ...
    in_write[w] = 0

Freezer (:func:`freeze`)::

    ctl[CTL_FREEZE] = epoch    (W2)
    membarrier(GLOBAL_EXPEDITED)
    for w: wait while in_write[w] != 0 and its owner lives   (R2)
    ... the snapshot ...
    ctl[CTL_FREEZE] = 0; FUTEX_WAKE

This is Dekker's handshake: it is safe only if at least one side sees the other's
store — if the writer's R1 sees 0 the freezer's R2 must see its W1, and vice versa.
Each side's store must therefore be visible before its own load is done: a store-load
fence on *both* sides. x86-64 (TSO) keeps stores in order and loads in order, but lets a
load overtake an earlier store of the same CPU (the store waits in the store buffer):
without fences both loads can read 0, and a write runs through the snapshot instant.

numpy cannot issue a fence, and a fence in every guest write would cost every write.
``membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)`` (:mod:`shmblock.membarrier`) makes the
fence asymmetric: the freezer's syscall is a full barrier for the freezer (W2 is globally
visible before the IPIs go out), and before it returns the kernel has run a full barrier
on every CPU that runs a thread of a registered process (writers register once, when
their :class:`~shmblock.guest.GuestIO` is made); a thread that is not running passed the
scheduler's barrier when it was switched out. So every writer thread has a barrier at
some point of its program during the call. If that point is after W1, W1 is visible when
the freezer does R2, and the freezer waits. If it is before W1, then R1, later still,
comes after W2 became visible, and the writer sees the freeze and steps back. Either
way no write is in flight once every in-write word read 0 (or belongs to the dead).

What the interpreter adds: each numpy store or load of one aligned uint64 is a single
machine store or load (atomic on x86-64), and CPython executes them in program order —
they are separate calls into numpy, which the C compiler cannot merge or reorder, and
there is no speculative reordering at the bytecode level. The in-process writer (a
thread of the engine's process) is ordered with the freezer thread by the GIL as well:
every GIL hand-over is a locked (fully fenced) operation.

The end of a write needs no fence: its data, map stores and then ``in_write = 0`` are
stores in program order, which TSO keeps; the freezer's loads after it read 0 are in
order too, so the snapshot sees the whole write.

Dead writers: a writer killed inside a write leaves its pid in its word. A word whose
writer process has exited (our child, polled; or for a pid that is not ours, no such
process or a zombie) is ignored, as a dead writer was before. A live writer that stays
in a write for :data:`FREEZE_TIMEOUT` (a stopped process, a copy-before-write wait that
does not end) fails the freeze with PeerGone, and everyone is thawed.

No messages: the old Freeze / Frozen / Thaw exchange is gone from the freeze (the
supervisor no longer answers any ``Frozen``: the pump rejects every one, since no epoch
is "being frozen"), so there is no token to forge. Each device gets its own epoch value
in its freeze word.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from shmblock import layout as L
from shmblock import membarrier
from shmblock.errors import PeerGone

if TYPE_CHECKING:
    from shmblock.device_handle import DeviceHandle, WriterProcess
    from shmblock.pump import Pump

FREEZE_TIMEOUT = 10.0
#: sleep between looks at a writer that is in a write (it usually leaves within µs)
POLL = 0.0001


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists and is not a zombie (any user's process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # "pid (comm) S ...": the state follows the last ')' (comm may contain one).
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def _writer_alive(pid: int, ident: int, device: DeviceHandle,
                  writers: list[WriterProcess]) -> bool:
    if pid == os.getpid():
        return True  # the engine's own guest I/O, a thread of this process
    for w in writers:
        if w.device is device and w.ident == ident and w.pid == pid:
            # Our child: poll() reaps it, so its pid cannot have been reused meanwhile.
            return w.alive
    return pid_alive(pid)


def in_a_write(device: DeviceHandle, writers: list[WriterProcess]) -> list[tuple[int, int]]:
    """(writer index, pid) of every live writer of ``device`` that is in a write now."""
    words = device.device.in_write[:, 0]
    busy = []
    # A copy to look for nonzero words (numpy refuses a count that changes under it);
    # each word found is read again, now.
    for ident in words.copy().nonzero()[0].tolist():
        pid = int(words[ident])
        if pid and _writer_alive(pid, ident, device, writers):
            busy.append((ident, pid))
    return busy


def thaw(devices: list[DeviceHandle]) -> None:
    """Clear the freeze word of every device and wake the writers sleeping on it."""
    for h in devices:
        dev = h.device
        if dev.closed:
            continue
        dev.ctl[L.CTL_FREEZE] = 0
        membarrier.futex_wake(dev.ctl.ctypes.data + L.CTL_FREEZE * 8)


@contextlib.contextmanager
def freeze(pump: Pump, writers: list[WriterProcess], devices: list[DeviceHandle],
           epochs: Iterator[int]) -> Iterator[float]:
    """Quiesce every writer of ``devices``: no write is in flight inside the block.

    Yields the monotonic time the last writer left its write; ``epochs`` numbers the
    freezes of the run (each device's freeze word gets its own). Raises PeerGone when a
    live writer stays in a write for FREEZE_TIMEOUT (everyone is thawed again).
    ``pump`` is unused: the freeze exchanges no messages any more.
    """
    del pump
    # One freeze of a device at a time (a thaw clears the word another freeze set),
    # taken in one order so that two transactions cannot deadlock.
    locked: list[DeviceHandle] = []
    try:
        deadline = time.monotonic() + FREEZE_TIMEOUT
        for h in sorted({id(h): h for h in devices}.values(), key=lambda h: h.name):
            if not h.freeze_lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                raise PeerGone(f"device {h.name} stayed frozen by another freeze for "
                               f"{FREEZE_TIMEOUT:.0f} s")
            locked.append(h)
        for h in devices:
            epoch = next(epochs) & 0xFFFFFFFF or 1  # the futex compares 32 bits
            h.device.ctl[L.CTL_FREEZE] = epoch
        # The freezer's half of the fence (see the theory of operation above).
        membarrier.barrier()
        for h in devices:
            while busy := in_a_write(h, writers):
                if time.monotonic() > deadline:
                    ident, pid = busy[0]
                    raise PeerGone(f"guest writer {ident} of {h.name} (pid {pid}) stayed "
                                   f"in a write for {FREEZE_TIMEOUT:.0f} s: cannot freeze")
                time.sleep(POLL)
        yield time.monotonic()
    finally:
        thaw(locked)
        for h in locked:
            h.freeze_lock.release()
