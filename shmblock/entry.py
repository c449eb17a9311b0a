"""The ``shmblock-run`` console script: Ctrl-C is handled before anything heavy loads.

Importing the CLI pulls in numpy, posix_ipc and the engine (a few hundred ms). A Ctrl-C
in that window would otherwise print a KeyboardInterrupt traceback; here it exits 130
with one line, like a Ctrl-C at any later point.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    print("shmblock-run: interrupted while starting; nothing was created", file=sys.stderr)
    sys.exit(130)


def main() -> int:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    signal.signal(signal.SIGTERM, _interrupted_while_starting)
    from shmblock.cli import main as cli_main

    return cli_main()
