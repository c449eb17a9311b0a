"""The ``shmblock-run`` console script: Ctrl-C is handled before anything heavy loads.

Importing the CLI pulls in numpy, posix_ipc and the engine (a few hundred ms). A Ctrl-C
in that window would otherwise print a KeyboardInterrupt traceback; here it exits 130
with one line, like a Ctrl-C at any later point.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    print("shmblock-run: interrupted while starting; nothing was created", file=sys.stderr)
    sys.exit(130)


def main() -> int:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    signal.signal(signal.SIGTERM, _interrupted_while_starting)
    from shmblock.cli import main as cli_main

    status = cli_main()
    # Everything the run made is removed and its output written by now. Skip the
    # interpreter's teardown of numpy and every module (0.05-0.1 s of every run) —
    # unless a thread still runs, which a normal exit would wait for.
    if threading.active_count() == 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
