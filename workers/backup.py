"""The backup-worker process: ``python -m workers.backup --run RUN --prefix P --meta NAME ...``.

A thin process loop around :class:`shmblock.backup_loop.BackupLoop`, which is the job
(its docstring is the theory of operation): read the argv
(:meth:`shmblock.options.WorkerOptions.from_argv`, the one definition of it) and the
job's token (stdin), attach to the device and the queues, run the loop, report its end,
detach. A worker that cannot even attach exits 1 with one line on stderr; the supervisor
sees its exit code.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import protocol
from shmblock.backup_loop import BackupLoop
from shmblock.claims import Claims
from shmblock.device import Device
from shmblock.errors import ShmblockError, Terminated, TransportError
from shmblock.names import RunNames
from shmblock.options import WorkerOptions
from shmblock.targets import open_target
from shmblock.transport import Queue
from workers.common import parent_alive, read_job_token, start_worker

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


def main(argv: list[str] | None = None) -> int:
    names, opts = WorkerOptions.from_argv(sys.argv[1:] if argv is None else argv)
    parent = start_worker(f"shmblock: backup-worker run={names.run_id} job={opts.job}")
    token = read_job_token()
    with contextlib.ExitStack() as stack:
        try:
            device = stack.enter_context(Device.attach(opts.meta, run_id=names.run_id))
            claims = stack.enter_context(Claims(opts.meta))
            inbox = stack.enter_context(Queue.attach(names.backup_queue(opts.device)))
            sup = stack.enter_context(Queue.attach(names.supervisor_queue))
        except (ShmblockError, Terminated) as exc:
            # Could not even attach: the supervisor sees our exit code and stderr.
            print(f"backup worker: {protocol.short_error(str(exc))}", file=sys.stderr)
            return 1
        replies = ReplyQueues(names, opts.device)
        stack.callback(replies.close)
        loop = BackupLoop(
            device, claims, inbox, sup, replies.answer,
            lambda: open_target(opts.spec, device.size, device.cluster_size,
                                timeout=opts.target_timeout),
            opts.job, token, opts.chunk, lambda: parent_alive(parent),
            # The supervisor publishes the .part when it finalizes the job (job.py's
            # pending status); the worker only seals it.
            publish=False, on_target_error=opts.on_target_error,
            on_source_error=opts.on_source_error)
        stack.callback(loop.close)
        final = loop.execute(lambda: sup.send(loop.ready_message(), timeout=5.0))
        try:
            loop.conclude(final)
        except ShmblockError as exc:
            print(f"backup worker: could not report the end of the job: {exc}",
                  file=sys.stderr)
    return 0 if isinstance(final, protocol.JobCompleted) else 1


if __name__ == "__main__":
    sys.exit(main())
