"""What every worker process does at start: its name in ps, its death with the parent."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import select
import signal
import sys
from types import FrameType

from setproctitle import setproctitle

from shmblock.errors import Terminated
from shmblock.names import SUPERVISOR_PID_ENV

PR_SET_PDEATHSIG = 1

__all__ = ["OncePerProblem", "Terminated", "parent_alive", "read_job_token", "start_worker"]


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"signal {signum}")


def start_worker(title: str) -> int:
    """Name the process, stop with the parent, log to stderr; returns the parent's pid.

    PR_SET_PDEATHSIG (prctl(2)) delivers SIGTERM when the parent dies, but only if it
    dies after the call; workers also compare getppid() with the returned pid in their
    loops. Neither helps when the supervisor died while this process was still starting
    (interpreter and imports take a good part of a second): we would already belong to
    init, and its pid would look like a live parent forever. The supervisor therefore
    passes its pid in ``SHMBLOCK_SUPERVISOR_PID``, and a worker whose parent is not that
    process any more exits at once (status 1, one line on stderr).
    """
    setproctitle(title)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # The supervisor handles Ctrl-C for the whole run and tells workers to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    # After the prctl: a supervisor that dies from here on is covered by the signal.
    parent = os.getppid()
    expected = os.environ.get(SUPERVISOR_PID_ENV, "")
    if expected.isdigit() and int(expected) != parent:
        print(f"{title}: the supervisor (pid {expected}) died before this worker started",
              file=sys.stderr)
        raise SystemExit(1)
    level = os.environ.get("SHMBLOCK_LOG", "WARNING").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {title}: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if level != "DEBUG":
        for handler in logging.getLogger().handlers:
            handler.addFilter(OncePerProblem())
    return parent


class OncePerProblem(logging.Filter):
    """Let each kind of problem through once; drop its repeats.

    A writer whose guest writes are refused logs one warning per write, thousands a
    second, and a backup worker one per unanswerable request: stderr must stay one line
    per problem. A problem is the message template (before %-formatting) with its
    string arguments (a queue's name) and the types of its other arguments, so "write
    at %d failed: %s" with a timeout and with a target error are two problems, and the
    offsets do not matter. The counts are not lost: they are in the writer statistics
    of the run summary. SHMBLOCK_LOG=DEBUG shows every line.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str, tuple[str, ...]]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        key = (record.name, str(record.msg),
               tuple(a[:100] if isinstance(a, str) else type(a).__name__ for a in args))
        if key in self.seen:
            return False
        if len(self.seen) < 10_000:  # a bound, whatever the templates
            self.seen.add(key)
        return True


def parent_alive(parent: int) -> bool:
    """False once the process that started us is gone (we were re-parented)."""
    return os.getppid() == parent


def read_job_token(timeout: float = 5.0) -> str:
    """The job token the supervisor wrote to our stdin, or "" if there is none.

    The supervisor writes one line of hex and closes the pipe right after the spawn
    (see ``Engine._spawn``); a few bytes to a fresh pipe arrive in one piece, so one
    read after ``select`` gets them. Stdin that is not a pipe from the supervisor
    (/dev/null, a terminal) gives "" after at most ``timeout`` seconds: the worker then
    runs, but the supervisor refuses its reports.
    """
    try:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], timeout)
        data = os.read(sys.stdin.fileno(), 130) if ready else b""
    except (OSError, ValueError):
        return ""
    token = data.decode("ascii", "replace").strip()
    return token if re.fullmatch(r"[0-9a-f]{1,64}", token) else ""
