"""shmblock: live point-in-time backups of shared-memory block devices.

The public API::

    from shmblock import Engine, parse_size

    with Engine() as engine:
        dev = engine.create_device(parse_size("256M"))
        job = engine.backup(dev, "backup.qcow2", verify=True)
        result = job.wait()

See :mod:`shmblock.engine` for the API and :mod:`shmblock.errors` for the error tree.
The names below are imported on first use (PEP 562), so ``import shmblock.entry`` — the
console script — stays cheap enough to install its Ctrl-C handler before numpy loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shmblock.engine import BackupJob, DeviceHandle, Engine, WriterProcess
    from shmblock.errors import ShmblockError
    from shmblock.job import JobEvent, JobResult, JobState, Outcome
    from shmblock.units import format_size, parse_size

__version__ = "0.1.0"

_EXPORTS = {
    "BackupJob": "shmblock.engine",
    "DeviceHandle": "shmblock.engine",
    "Engine": "shmblock.engine",
    "WriterProcess": "shmblock.engine",
    "ShmblockError": "shmblock.errors",
    "JobEvent": "shmblock.job",
    "JobResult": "shmblock.job",
    "JobState": "shmblock.job",
    "Outcome": "shmblock.job",
    "format_size": "shmblock.units",
    "parse_size": "shmblock.units",
}

__all__ = [
    "BackupJob",
    "DeviceHandle",
    "Engine",
    "JobEvent",
    "JobResult",
    "JobState",
    "Outcome",
    "ShmblockError",
    "WriterProcess",
    "__version__",
    "format_size",
    "parse_size",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shmblock' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
