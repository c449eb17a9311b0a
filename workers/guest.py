"""The guest-writer process: ``python -m workers.guest --meta NAME --id N ...``.

Runs one synthetic workload against the device through :class:`shmblock.guest.GuestIO`
(the copy-before-write path), for a duration or an op count, optionally rate limited.
Freezes need nothing from this loop: GuestIO publishes "in a write" around every write
and sleeps through a freeze by itself (:mod:`shmblock.freeze`); while it sleeps this
process checks that the supervisor still lives. The control queue carries Shutdown.
Statistics go to its row in shared memory as it runs.

Test hook: ``SHMBLOCK_TEST_STOP_IN_WRITE=N`` makes the writer stop itself (SIGSTOP) in
its N-th write, after it has published "in a write" and before it stores anything, so
that a test can hold a write in flight at a known point (tests/test_freeze_fence.py).
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import signal
import sys
import time

import numpy as np
import numpy.typing as npt

import protocol
from shmblock.device import Device
from shmblock.errors import CopyBeforeWriteError, ShmblockError
from shmblock.guest import WORKLOADS, GuestIO
from shmblock.names import RunNames
from shmblock.transport import Queue
from workers.common import Terminated, parent_alive, read_job_token, start_worker
from workers.workloads import batches

log = logging.getLogger("shmblock.guest")

PAYLOAD_BYTES = 1 << 20
STOP_IN_WRITE_ENV = "SHMBLOCK_TEST_STOP_IN_WRITE"


class GuestWriter:
    """One writer: a workload driving a GuestIO, and its control queue."""

    def __init__(self, args: argparse.Namespace, parent: int) -> None:
        self.args = args
        self.parent = parent
        self.ident = args.id
        self.names = RunNames(args.run, args.prefix)
        self.device = Device.attach(args.meta, run_id=args.run)
        self.control = Queue.attach(self.names.writer_control_queue(args.device, self.ident))
        self.reply = Queue.attach(self.names.writer_reply_queue(args.device, self.ident))
        self.sup = Queue.attach(self.names.supervisor_queue)
        self.io = GuestIO(self.device, self.ident, self.names.backup_queue(args.device),
                          reply_queue=self.reply,
                          on_epoch=self.service_control)
        self.io.on_freeze_wait = self.check_parent
        self.stop = False
        self.token = ""  # our secret, from stdin: control messages must carry it
        if (stop_at := os.environ.get(STOP_IN_WRITE_ENV, "")).isdigit():
            self._stop_in_write(int(stop_at))

    def _stop_in_write(self, nth: int) -> None:
        """The test hook (see the module docstring): SIGSTOP in write ``nth``."""
        io = self.io
        write = io._write
        count = 0

        def stopping(offset: int, buf: npt.NDArray[np.uint8], n: int) -> None:
            nonlocal count
            count += 1
            if count == nth:
                os.kill(os.getpid(), signal.SIGSTOP)
            write(offset, buf, n)

        io._write = stopping  # type: ignore[method-assign]

    def check_parent(self) -> None:
        """Between slices of a freeze: an orphaned writer exits, it would never thaw."""
        if not parent_alive(self.parent):
            raise Terminated("the supervisor died while we were frozen")

    # -- control ------------------------------------------------------------------------

    def service_control(self, wait: float = 0.0) -> None:
        """Handle queued control messages (Shutdown; nothing else is sent here now)."""
        msg = self.control.receive(wait)
        while msg is not None:
            try:
                if not hmac.compare_digest(getattr(msg, "token", ""), self.token):
                    # Anyone of this user can write here; only the supervisor has our token.
                    log.warning("ignoring %s without this writer's token",
                                type(msg).__name__)
                elif isinstance(msg, protocol.Shutdown):
                    self.stop = True
                else:
                    # Freeze/Thaw are no longer sent (shmblock.freeze uses shared words).
                    log.warning("unexpected %s on the control queue", type(msg).__name__)
            except Terminated:
                raise
            except Exception:
                # One message must never end the guest's workload: log, count, go on.
                self.control.rejected += 1
                log.exception("error handling %s (carrying on)", type(msg).__name__)
            msg = self.control.receive(0.0)

    # -- the workload -------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        rng = np.random.default_rng(args.seed ^ 0x5EED)
        payload = rng.integers(0, 256, PAYLOAD_BYTES + args.block_size, dtype=np.uint8)
        payload_offsets = rng.integers(0, PAYLOAD_BYTES // 8, 1 << 16) * 8
        bs = args.block_size
        io = self.io
        end = time.monotonic() + args.duration if args.duration > 0 else float("inf")
        interval = 1.0 / args.rate if args.rate > 0 else 0.0
        next_op = time.monotonic()
        ops = 0
        for offsets, writes in batches(args.workload, self.device.size,
                                       self.device.cluster_size, bs, args.seed):
            for off, is_write in zip(offsets.tolist(), writes.tolist(), strict=True):
                if self.stop or (args.ops and ops >= args.ops):
                    return
                if is_write:
                    p = payload_offsets[ops & 0xFFFF]
                    try:
                        io.write(off, payload[p : p + bs])
                    except CopyBeforeWriteError as exc:
                        log.warning("write at %d failed: %s", off, exc)
                else:
                    io.read(off, bs)
                ops += 1
                if interval:
                    next_op += interval
                    while (delay := next_op - time.monotonic()) > 0:
                        self.service_control(min(delay, 0.001))
                        if self.stop:
                            return
                # Every 1024 ops at full speed (ms apart); every op when rate limited,
                # else a slow writer would overrun its duration by 1024 / rate seconds.
                if interval or ops & 0x3FF == 0:
                    if time.monotonic() >= end:
                        return
                    if not parent_alive(self.parent):
                        raise Terminated("the supervisor died")
                    # Reads never pass the epoch check of the write path: poll here too.
                    self.service_control(0.0)

    def close(self) -> None:
        self.io.close()
        for q in (self.control, self.reply, self.sup):
            q.close()
        self.device.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="workers.guest")
    p.add_argument("--meta", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--workload", default="random", choices=WORKLOADS)
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rate", type=float, default=0.0, help="ops per second, 0 = unlimited")
    p.add_argument("--duration", type=float, default=0.0, help="seconds, 0 = until told")
    p.add_argument("--ops", type=int, default=0, help="stop after this many ops, 0 = no limit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    parent = start_worker(f"shmblock: guest-writer {args.id} run={args.run}")
    token = read_job_token()
    writer: GuestWriter | None = None
    ok, error = True, ""
    try:
        writer = GuestWriter(args, parent)
        writer.token = token
        writer.sup.send(protocol.Ready(role="writer", ident=args.id, pid=os.getpid()),
                        timeout=5.0)
        writer.run()
    except Terminated as exc:
        ok, error = False, f"terminated: {exc}"
    except ShmblockError as exc:
        ok, error = False, str(exc)
    except Exception as exc:
        log.exception("guest writer crashed")
        ok, error = False, f"crashed: {type(exc).__name__}: {exc}"
    if writer is None:
        print(f"guest writer {args.id}: {error}", file=sys.stderr)
        return 1
    try:
        writer.io.flush_stats()
        writer.sup.try_send(protocol.WriterDone(writer=args.id, ok=ok,
                                                error=protocol.short_error(error)))
    except ShmblockError:
        pass
    finally:
        writer.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
