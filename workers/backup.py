"""The backup-worker process: ``python -m workers.backup --run R --prefix P --meta M --device D``.

A worker of one device (:mod:`shmblock.backup_workers` is the supervisor's side and
the theory of operation): attach to the device and the queues once, then serve the jobs
that arrive on stdin, one JSON line each, one after another. Each job is a thin process
loop around :class:`shmblock.backup_loop.BackupLoop`, which is the job (its docstring
is the job's theory of operation): open the target, say Ready with the line's number,
run the loop, report its end with the job's token, close the target. A job that fails
(its target cannot be opened, say) is reported and the worker waits for the next one.
EOF on stdin ends the worker (status: the last job's, 0 for completed); so does the
supervisor's death. A worker that cannot even attach exits 1 with one line on stderr;
the supervisor sees its exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import sys
from typing import Any, NoReturn

from setproctitle import setproctitle

import protocol
from shmblock.backup_loop import BackupLoop
from shmblock.claims import Claims
from shmblock.device import Device
from shmblock.errors import ShmblockError, Terminated, TransportError, UsageError
from shmblock.names import RunNames
from shmblock.options import WorkerOptions
from shmblock.targets import open_target
from shmblock.transport import Queue
from workers.common import parent_alive, start_worker

log = logging.getLogger("shmblock.backup")


class ReplyQueues:
    """The writers' reply queues, attached on first use (a writer may be gone)."""

    def __init__(self, names: RunNames, device: str) -> None:
        self.names = names
        self.device = device
        self.queues: dict[int, Queue] = {}

    def answer(self, req: protocol.CopyRequest, reply: protocol.CopyDone) -> None:
        queue = self.queues.get(req.writer)
        if queue is None:
            try:
                queue = Queue.attach(self.names.writer_reply_queue(self.device, req.writer))
            except TransportError:
                return
            self.queues[req.writer] = queue
        if not queue.try_send(reply):
            log.warning("writer %d's reply queue is full; it will time out", req.writer)

    def close(self) -> None:
        for q in self.queues.values():
            q.close()


#: The longest job line the supervisor writes (an argv of a few paths).
MAX_LINE = 64 * 1024
#: How often a worker waiting for a job checks that its supervisor is still there.
IDLE_CHECK_EVERY = 0.5


class JobLines:
    """The job lines on stdin (:mod:`shmblock.backup_workers`): read, parsed, bounded."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.eof = False

    def next(self, parent: int) -> dict[str, Any] | None:
        """The next line as a dict; None at EOF or once the supervisor is gone."""
        while b"\n" not in self.buffer:
            if self.eof or not parent_alive(parent):
                return None
            ready, _, _ = select.select([self.fd], [], [], IDLE_CHECK_EVERY)
            if not ready:
                continue
            data = os.read(self.fd, 65536)
            if not data:
                self.eof = True
                continue
            self.buffer += data
            if len(self.buffer) > MAX_LINE and b"\n" not in self.buffer:
                raise UsageError(f"a job line longer than {MAX_LINE} bytes on stdin")
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            parsed = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"a job line on stdin is not JSON: {exc}") from None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("ready"), int):
            raise UsageError("a job line on stdin has no ready number")
        return parsed


def serve_job(names: RunNames, line: dict[str, Any], device: Device, claims: Claims,
              inbox: Queue, sup: Queue, replies: ReplyQueues, parent: int) -> bool:
    """Run the job of one line to its end; True if it completed."""
    _, opts = WorkerOptions.from_argv(
        ["--run", names.run_id, "--prefix", names.prefix, *line["job"]])
    token = str(line.get("token", ""))
    setproctitle(f"shmblock: backup-worker run={names.run_id} job={opts.job}")
    ready = protocol.Ready(role="backup", ident=int(line["ready"]), pid=os.getpid())
    loop = BackupLoop(
        device, claims, inbox, sup, replies.answer,
        lambda: open_target(opts.spec, device.size, device.cluster_size,
                            timeout=opts.target_timeout),
        opts.job, token, opts.chunk, lambda: parent_alive(parent),
        # The supervisor publishes the .part when it finalizes the job (job.py's
        # pending status); the worker only seals it.
        publish=False, on_target_error=opts.on_target_error,
        on_source_error=opts.on_source_error)
    try:
        final = loop.execute(lambda: sup.send(ready, timeout=5.0))
        try:
            loop.conclude(final)
        except ShmblockError as exc:
            print(f"backup worker: could not report the end of job {opts.job}: {exc}",
                  file=sys.stderr)
    finally:
        loop.close()  # the target and the copier: this job's, not the device's
    return isinstance(final, protocol.JobCompleted)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="workers.backup")
    for option in ("--run", "--prefix", "--meta", "--device"):
        p.add_argument(option, required=True)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    names = RunNames(a.run, a.prefix)
    parent = start_worker(f"shmblock: backup-worker run={names.run_id} device={a.device}")
    lines = JobLines(sys.stdin.fileno())
    with contextlib.ExitStack() as stack:
        try:
            device = stack.enter_context(Device.attach(a.meta, run_id=names.run_id))
            claims = stack.enter_context(Claims(a.meta))
            inbox = stack.enter_context(Queue.attach(names.backup_queue(a.device)))
            sup = stack.enter_context(Queue.attach(names.supervisor_queue))
        except (ShmblockError, Terminated) as exc:
            # Could not even attach: the supervisor sees our exit code and stderr.
            print(f"backup worker: {protocol.short_error(str(exc))}", file=sys.stderr)
            return 1
        replies = ReplyQueues(names, a.device)
        stack.callback(replies.close)
        status = 0
        try:
            while (line := lines.next(parent)) is not None:
                if "job" not in line:  # a ping: attached and waiting
                    sup.send(protocol.Ready(role="backup", ident=int(line["ready"]),
                                            pid=os.getpid()), timeout=5.0)
                    continue
                status = 0 if serve_job(names, line, device, claims, inbox, sup, replies,
                                        parent) else 1
        except Terminated:
            return 1
        except (UsageError, TransportError) as exc:
            print(f"backup worker: {protocol.short_error(str(exc))}", file=sys.stderr)
            return 2
    return status


def leave(status: int) -> NoReturn:
    """Exit without the interpreter's teardown of numpy and every module.

    Everything of ours is closed by then (main's ExitStack: queues, claims, the
    device's mapping). The teardown took 0.1-0.3 s on this machine, and the supervisor
    waits for it at the end of every run (Engine.close reaps its workers).
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    leave(main())
