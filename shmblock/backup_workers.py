"""The backup-worker processes of a run, as the supervisor sees them: one per device.

Theory of operation. A backup worker (``python -P -m workers.backup``) is started for a
device, not for a job: it attaches to the device (mapping it with ``MAP_POPULATE``),
its claims and its queues once, then serves the jobs the supervisor hands it one after
another, each exactly as a worker of its own would (open the target, say Ready, wait
for JobStart, copy, conclude). So what a job pays between ``create_backup`` and its
snapshot instant is the target's open and two queue messages, not an interpreter start,
numpy's import and a mapping of the whole device (0.2-0.5 s on this machine).

Jobs travel on the worker's **stdin**, one JSON line each (:meth:`DeviceWorker.assign`):
the job's worker argv (:class:`shmblock.options.WorkerOptions`, the one definition of
it), its token, and a fresh random ``ready`` number. The pipe's write end is held by
the supervisor alone, so, unlike the backup queue, nobody else can hand the worker a
job; the token still never appears in argv or the environment. The worker answers
with ``Ready(role="backup", ident=<ready>, pid)`` on the supervisor queue once the
target is open; the pump counts a backup Ready only for a number it was told to expect
(:meth:`shmblock.pump.Pump.expect_ready`) and only from the worker's pid, so a forged
or stale Ready never stands for a job's worker. A line with only ``ready`` is a ping:
the worker answers once it is attached (:meth:`Engine.start_backup_worker
<shmblock.engine.Engine.start_backup_worker>` waits for that, to pay the start-up
before the first job). EOF on stdin (the supervisor closed it, or died) ends the
worker between jobs.

Two modes (``Engine(prestart_backup_worker=...)``):

* per job (the default): a worker is started for each job and its stdin closed right
  after the job's line, so it serves that one job and exits — the process model every
  fault test was written against (``job.proc`` is that job's own process);
* per device: the worker is started with the device (:meth:`Engine.create_device`,
  without waiting for it) and kept; ``job.proc`` is the device's worker, shared by the
  device's successive jobs.

The engine admits one unconcluded job per device, so a device worker is busy with at
most the tail of the previous job (its report sent, its target being closed) when the
next job's line arrives: the line waits in the pipe (FIFO) and the new job's Ready
comes once the worker is free. Jobs of different devices run on different workers, in
parallel. A worker found dead when a job is assigned (killed between jobs, or killed
by the pump as stuck) is replaced by a new one, and the job's events say so
(``worker-restarted``); one that accepts a job and does not say Ready in time is
killed, so the next job starts on a fresh process instead of queueing behind it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import subprocess

from shmblock.run import Run

log = logging.getLogger("shmblock.engine")

#: How long closing a worker waits for it to leave after EOF before it is killed.
WORKER_EXIT_TIMEOUT = 5.0


def new_ready_number() -> int:
    """A fresh number for a worker's Ready: random, so nobody can forge it ahead."""
    return secrets.randbits(62) + 1


class DeviceWorker:
    """One backup-worker process of one device (see the module docstring)."""

    def __init__(self, run: Run, meta: str, device: str, persistent: bool) -> None:
        self.device = device
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] = run.spawn(
            "workers.backup", ["--meta", meta, "--device", device], keep_stdin=True)
        #: jobs handed to this process so far
        self.jobs = 0

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def exit_reason(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def _write(self, line: dict[str, object]) -> bool:
        """Write one line to the worker's stdin; False if the worker is gone."""
        stdin = self.proc.stdin
        if stdin is None or stdin.closed:
            return False
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        try:
            # A line of a few hundred bytes into a pipe with 64 KiB of room: never
            # blocks unless the worker stopped reading jobs altogether, and then the
            # pipe has room for hundreds of them.
            stdin.write(data)
            stdin.flush()
        except (OSError, ValueError):
            return False
        return True

    def assign(self, argv: list[str], token: str, ready: int) -> bool:
        """Hand the worker a job; False if it is gone (the caller starts another)."""
        ok = self._write({"ready": ready, "token": token, "job": argv})
        if ok:
            self.jobs += 1
            if not self.persistent:
                self.close_stdin()  # one job, then EOF: the worker exits after it
        return ok

    def ping(self, ready: int) -> bool:
        """Ask for a Ready once the worker is attached (no job)."""
        return self._write({"ready": ready})

    def close_stdin(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def kill(self) -> None:
        self.close_stdin()
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(WORKER_EXIT_TIMEOUT)

    def close(self, timeout: float = WORKER_EXIT_TIMEOUT) -> None:
        """EOF, then wait for the worker to leave; SIGKILL if it does not."""
        self.close_stdin()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the backup worker of device %s did not exit after EOF: killing it",
                        self.device)
            self.kill()
