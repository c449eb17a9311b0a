"""Run bookkeeping: the run's names, its registry record, its queues, its processes.

A :class:`Run` is what ``shmblock-run cleanup`` relies on: every shared object and file
is written to the run's record (:class:`~shmblock.names.RunRecord`) *before* it exists,
and every worker process with the pid, start time and command line that ``cleanup``
checks before it kills. The run owns its queues (exclusive create here, close and unlink
in :meth:`close`); devices are created by the engine, whose names come from here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import protocol
from shmblock.names import SUPERVISOR_PID_ENV, RunNames, RunRecord
from shmblock.transport import WRITER_QUEUE_BYTES, WRITER_QUEUE_MESSAGES, Queue


class Run:
    """The names, record, queues and spawned processes of one run."""

    def __init__(self, run_id: str | None = None) -> None:
        self.names = RunNames.new(run_id)
        self.record = RunRecord(self.names.run_id, self.names.prefix, os.getpid())
        self.record.save()
        self.queues: list[Queue] = []

    def create_queue(self, name: str, kinds: tuple[type[protocol.Message], ...],
                     small: bool = False) -> Queue:
        """Create (and record) a queue; ``small``: a writer's own, see shmblock.transport."""
        self.record.queues.append(name)
        self.record.save()
        queue = Queue.create(name, kinds, WRITER_QUEUE_MESSAGES, WRITER_QUEUE_BYTES) \
            if small else Queue.create(name, kinds)
        self.queues.append(queue)
        return queue

    def record_segments(self, names: list[str]) -> None:
        """Record shared-memory segments about to be created."""
        self.record.segments += names
        self.record.save()

    def spawn(self, module: str, args: list[str], secret: str | None = None,
              keep_stdin: bool = False) -> subprocess.Popen[bytes]:
        """Start ``python -P -m module --run RUN --prefix PREFIX *args`` and record it.

        ``secret`` (a writer's token) goes to the child's stdin, never argv.
        ``keep_stdin``: the child's stdin stays an open pipe for the caller to write
        (a backup worker's jobs, :mod:`shmblock.backup_workers`).
        """
        argv, env = python_module(module, ["--run", self.names.run_id,
                                           "--prefix", self.names.prefix, *args])
        # So a worker can tell that we died before it got going (workers.common).
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        proc = subprocess.Popen(
            argv, env=env,
            stdin=subprocess.DEVNULL if secret is None and not keep_stdin else subprocess.PIPE,
            start_new_session=False)
        if proc.stdin is not None and not keep_stdin:
            # The worker's token goes through a pipe: argv is readable by every user in
            # /proc, the environment by every process of ours for the worker's whole
            # life; the pipe is empty once the worker has read it. A write of a few
            # bytes to a fresh pipe never blocks; a child that already died is its own
            # error (it never says Ready).
            with contextlib.suppress(OSError):
                proc.stdin.write(f"{secret}\n".encode())
            with contextlib.suppress(OSError):
                proc.stdin.close()
        # Pid, start time and command line: what `cleanup` checks before it kills.
        self.record.add_child(proc.pid, argv)
        return proc

    def close_queues(self) -> None:
        for q in self.queues:
            q.close()
            q.unlink()

    def forget(self) -> None:
        """The run is over: remove its leftover ``.part`` files and its record."""
        self.record.discard_parts()
        self.record.remove()


def python_module(module: str, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """argv and environment to run ``python -P -m module *args`` as one of ours.

    Child processes must import our packages from wherever this process did, and never
    from the caller's working directory (untrusted: a planted ``workers/guest.py`` or
    ``numpy.py`` would run as the user). ``python -P`` (3.11) keeps the working directory
    off ``sys.path``; relative ``PYTHONPATH`` entries (and empty ones, which mean the
    working directory) would put it back, so only absolute ones are passed on.
    """
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if os.path.isabs(p)]
    env["PYTHONPATH"] = os.pathsep.join([root, *inherited])
    return [sys.executable, "-P", "-m", module, *args], env
