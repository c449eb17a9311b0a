"""An NBD server for shmblock devices (contracts.md C3).

* :mod:`shmblock.nbd.wire` -- the protocol, sans I/O (fuzzable);
* :mod:`shmblock.nbd.exports` -- what an export serves: a live device (writes through
  copy-before-write) or the point-in-time view of a running ``sync=none`` job;
* :mod:`shmblock.nbd.server` -- sockets and threads.
"""

from shmblock.nbd.exports import (
    ExportGone,
    ExportSource,
    FleecingExport,
    LiveExport,
    fleecing_export,
    live_export,
)
from shmblock.nbd.server import ExportInfo, NbdServer
from shmblock.nbd.wire import NbdError, RemoteProtocolError

__all__ = ["ExportGone", "ExportInfo", "ExportSource", "FleecingExport", "LiveExport",
           "NbdError", "NbdServer", "RemoteProtocolError", "fleecing_export",
           "live_export"]
