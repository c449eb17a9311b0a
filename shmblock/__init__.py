"""shmblock: live point-in-time backups of shared-memory block devices.

The public API::

    from shmblock import Engine, parse_size

    with Engine() as engine:
        dev = engine.create_device(parse_size("256M"))
        job = engine.backup(dev, "backup.qcow2", verify=True)
        result = job.wait()

See :mod:`shmblock.engine` for the API and :mod:`shmblock.errors` for the error tree.
"""

from shmblock.engine import BackupJob, DeviceHandle, Engine, WriterProcess
from shmblock.errors import ShmblockError
from shmblock.job import JobEvent, JobResult, JobState, Outcome
from shmblock.units import format_size, parse_size

__version__ = "0.1.0"

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
