"""A guest writer that gives up waiting for a thaw says so, where the supervisor can see.

A writer frozen for longer than its freeze timeout writes on by itself (a supervisor
that never thaws must not stop the guest for good); a write during the supervisor's
freeze breaks the snapshot instant, so it must not happen silently. The real writer
(``workers.guest.GuestWriter`` and its GuestIO) runs in this process against real queues
and a real device, with the timeout shortened; the freeze word is set by hand.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest

import protocol
from shmblock import layout as L
from shmblock import membarrier
from shmblock.device import Device, Geometry
from shmblock.stats import W_FREEZE_TIMEOUTS, W_FREEZES, WriterStats
from shmblock.transport import SUPERVISOR_RECEIVES, WRITER_CONTROL_RECEIVES, Queue
from tests.helpers import CS, new_device, run_names
from workers import guest

GEO = Geometry(16 * CS, cluster_size=CS, max_writers=2, buffer_slots=4)


@pytest.fixture
def writer() -> Iterator[tuple[guest.GuestWriter, Queue, Queue, Device]]:
    names = run_names()
    with new_device(GEO, names=names) as dev, \
            Queue.create(names.writer_control_queue("dev0", 1), WRITER_CONTROL_RECEIVES) as ctl, \
            Queue.create(names.writer_reply_queue("dev0", 1), [protocol.CopyDone]), \
            Queue.create(names.supervisor_queue, SUPERVISOR_RECEIVES) as sup:
        args = guest.parse_args(["--meta", dev.meta_name, "--device", "dev0",
                                 "--run", names.run_id, "--prefix", names.prefix, "--id", "1"])
        w = guest.GuestWriter(args, parent=os.getppid())
        w.io.freeze_timeout = 0.3
        try:
            yield w, ctl, sup, dev
        finally:
            w.close()


def test_a_writer_that_gives_up_on_a_freeze_records_it(
        writer: tuple[guest.GuestWriter, Queue, Queue, Device],
        caplog: pytest.LogCaptureFixture) -> None:
    w, _, _, dev = writer
    dev.ctl[L.CTL_FREEZE] = 7  # a freeze that is never thawed
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="shmblock.guest"):
        w.io.write(0, b"\x01" * 4096)
    assert 0.3 <= time.monotonic() - t0 < 5.0
    assert dev.data[0] == 1, "it wrote on after giving up"
    assert int(dev.in_write[1, 0]) == 0, "and left its write"
    row = dev.stats[1].copy()  # a copy: no view may outlive the device
    assert (int(row[W_FREEZES]), int(row[W_FREEZE_TIMEOUTS])) == (1, 1)
    assert WriterStats.from_row(1, row).freeze_timeouts == 1
    assert int(dev.stats[0, W_FREEZE_TIMEOUTS]) == 0, "only its own row"
    assert "no thaw within" in caplog.text and "point-in-time" in caplog.text

    # A freeze thawed in time is counted as a freeze, not as one given up on.
    dev.ctl[L.CTL_FREEZE] = 8
    thaw = threading.Timer(0.1, lambda: (dev.ctl.__setitem__(L.CTL_FREEZE, 0),
                                         membarrier.futex_wake(
                                             dev.ctl.ctypes.data + L.CTL_FREEZE * 8)))
    thaw.start()
    t0 = time.monotonic()
    w.io.write(0, b"\x02" * 4096)
    waited = time.monotonic() - t0
    thaw.join()
    assert 0.09 <= waited < 0.29, waited
    assert dev.data[0] == 2
    row = dev.stats[1].copy()
    assert (int(row[W_FREEZES]), int(row[W_FREEZE_TIMEOUTS])) == (2, 1)
