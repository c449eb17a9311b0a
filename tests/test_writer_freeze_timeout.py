"""A guest writer that gives up waiting for a Thaw says so, where the supervisor can see.

A writer frozen for longer than its freeze timeout writes on by itself (a supervisor
that never thaws must not stop the guest for good); a write during the supervisor's
freeze breaks the snapshot instant, so it must not happen silently. The real writer
loop (``workers.guest.GuestWriter``) runs in this process against real queues and a
real device, with the timeout shortened.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import pytest

import protocol
from shmblock.device import Device, Geometry
from shmblock.stats import W_FREEZE_TIMEOUTS, W_FREEZES, WriterStats
from shmblock.transport import SUPERVISOR_RECEIVES, WRITER_CONTROL_RECEIVES, Queue
from tests.helpers import CS, new_device, run_names
from workers import guest

GEO = Geometry(16 * CS, cluster_size=CS, max_writers=2, buffer_slots=4)


@pytest.fixture
def writer(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[guest.GuestWriter, Queue, Queue,
                                                               Device]]:
    monkeypatch.setattr(guest, "FREEZE_TIMEOUT", 0.3)
    names = run_names()
    with new_device(GEO, names=names) as dev, \
            Queue.create(names.writer_control_queue("dev0", 1), WRITER_CONTROL_RECEIVES) as ctl, \
            Queue.create(names.writer_reply_queue("dev0", 1), [protocol.CopyDone]), \
            Queue.create(names.supervisor_queue, SUPERVISOR_RECEIVES) as sup:
        args = guest.parse_args(["--meta", dev.meta_name, "--device", "dev0",
                                 "--run", names.run_id, "--prefix", names.prefix, "--id", "1"])
        w = guest.GuestWriter(args, parent=os.getppid())
        try:
            yield w, ctl, sup, dev
        finally:
            w.close()


def test_a_writer_that_gives_up_on_a_freeze_records_it(
        writer: tuple[guest.GuestWriter, Queue, Queue, Device],
        caplog: pytest.LogCaptureFixture) -> None:
    w, ctl, sup, dev = writer
    ctl.send(protocol.Freeze(epoch=7), timeout=1.0)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="shmblock.guest"):
        w.service_control()
    assert 0.3 <= time.monotonic() - t0 < 5.0
    assert sup.receive(1.0) == protocol.Frozen(epoch=7, writer=1)
    row = dev.stats[1].copy()  # a copy: no view may outlive the device
    assert (int(row[W_FREEZES]), int(row[W_FREEZE_TIMEOUTS])) == (1, 1)
    assert WriterStats.from_row(1, row).freeze_timeouts == 1
    assert int(dev.stats[0, W_FREEZE_TIMEOUTS]) == 0, "only its own row"
    assert "no Thaw for freeze 7" in caplog.text and "point-in-time" in caplog.text

    # A freeze thawed in time is counted as a freeze, not as one given up on.
    ctl.send(protocol.Freeze(epoch=8), timeout=1.0)
    ctl.send(protocol.Thaw(epoch=8), timeout=1.0)
    w.service_control()
    assert sup.receive(1.0) == protocol.Frozen(epoch=8, writer=1)
    row = dev.stats[1].copy()
    assert (int(row[W_FREEZES]), int(row[W_FREEZE_TIMEOUTS])) == (2, 1)
