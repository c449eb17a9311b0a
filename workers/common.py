"""What every worker process does at start: its name in ps, its death with the parent."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from types import FrameType

from setproctitle import setproctitle

PR_SET_PDEATHSIG = 1


class Terminated(Exception):
    """SIGTERM (or the parent's death) asked this worker to stop."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"signal {signum}")


def start_worker(title: str) -> int:
    """Name the process, stop with the parent, log to stderr; returns the parent's pid.

    PR_SET_PDEATHSIG (prctl(2)) delivers SIGTERM when the parent dies; workers also
    compare getppid() with the returned pid in their loops, which covers the case where
    the parent died before the prctl call.
    """
    setproctitle(title)
    parent = os.getppid()
    signal.signal(signal.SIGTERM, _on_sigterm)
    # The supervisor handles Ctrl-C for the whole run and tells workers to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    logging.basicConfig(
        level=os.environ.get("SHMBLOCK_LOG", "WARNING").upper(),
        format=f"%(asctime)s {title}: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return parent


def parent_alive(parent: int) -> bool:
    """False once the process that started us is gone (we were re-parented)."""
    return os.getppid() == parent
