"""Snapshot start: quiesce every writer of some devices (no write in flight).

Theory of operation. The supervisor takes each device's in-process write gate (a lock
every :meth:`DeviceHandle.write <shmblock.device_handle.DeviceHandle.write>` holds),
sends ``Freeze(epoch)`` to every live writer's control queue, *then* stores ``epoch`` in
``CTL_EPOCH``. Writers compare that word at the start of every write and, when it
changed, drain their control queue: on ``Freeze`` they answer ``Frozen`` and block until
``Thaw``. Because the message is queued before the word changes, a writer that sees the
change always finds it. When every live writer has answered (the pump records only a
``Frozen`` with the writer's token, for an epoch being frozen right now), no write is in
flight; a writer that dies meanwhile is dropped from the wait, one that does not answer
within :data:`FREEZE_TIMEOUT` fails the freeze. ``Thaw`` is sent whatever happens.

Each device gets its own epoch: writer numbers are per device and a Frozen names only
(epoch, writer), so with one epoch writer 0 of one device would answer for writer 0 of
the other.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import protocol
from shmblock import layout as L
from shmblock.errors import PeerGone, ShmblockError

if TYPE_CHECKING:
    from shmblock.device_handle import DeviceHandle, WriterProcess
    from shmblock.pump import Pump

FREEZE_TIMEOUT = 10.0


@contextlib.contextmanager
def freeze(pump: Pump, writers: list[WriterProcess], devices: list[DeviceHandle],
           epochs: Iterator[int]) -> Iterator[float]:
    """Quiesce every writer of ``devices``: no write is in flight inside the block.

    Yields the monotonic time the last writer froze; ``epochs`` numbers the freezes of
    the run. Raises PeerGone when a live writer does not answer within FREEZE_TIMEOUT
    or the pump is dead (everyone is thawed again).
    """
    epoch_of = {h: next(epochs) for h in devices}
    with pump.cond:
        pump.freezing.update({epoch: h for h, epoch in epoch_of.items()})
    gates = [h.gate for h in devices]
    for g in gates:
        g.acquire()
    asked: list[WriterProcess] = []
    try:
        for w in writers:
            if w.device in epoch_of and w.alive:
                w.control.send(protocol.Freeze(epoch=epoch_of[w.device], token=w.token),
                               timeout=1.0)
                asked.append(w)
        # Bump the hint only after the messages are queued (see workers.guest).
        for h, epoch in epoch_of.items():
            h.device.ctl[L.CTL_EPOCH] = epoch
        deadline = time.monotonic() + FREEZE_TIMEOUT
        with pump.cond:
            while True:
                waiting = [w for w in asked
                           if (epoch_of[w.device], w.ident) not in pump.frozen and w.alive]
                if not waiting:
                    break
                if time.monotonic() > deadline:
                    raise PeerGone(f"guest writer {waiting[0].ident} did not freeze "
                                   f"within {FREEZE_TIMEOUT:.0f} s")
                if failure := pump.failure():
                    # Nobody would ever record the Frozen answers.
                    raise PeerGone(f"cannot freeze the writers: {failure}")
                pump.cond.wait(0.001)
        yield time.monotonic()
    finally:
        for w in asked:
            with contextlib.suppress(ShmblockError):
                w.control.send(protocol.Thaw(epoch=epoch_of[w.device], token=w.token),
                               timeout=1.0)
        with pump.cond:
            for epoch in epoch_of.values():
                pump.freezing.pop(epoch, None)
            pump.frozen = {k for k in pump.frozen if k[0] not in epoch_of.values()}
        for g in gates:
            g.release()
