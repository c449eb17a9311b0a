"""The machine's other load: how much CPU processes other than the bench used meanwhile.

The machine is shared, and a figure measured while another test suite used a core is a
figure about that suite as much as about shmblock. Every section, and every timed step of
the incremental and restore sections, records what others took (:class:`CpuMeter`), and a
figure taken while others used more than :data:`UNDER_LOAD_SHARE` of the CPUs is marked
*under load* in the results (issue 9: mark, or refuse to publish, such figures).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

#: Others may use this share of the CPUs before a figure counts as taken under load: a
#: tenth (0.2 of a core here) is the background of an idle Linux machine with a shell or
#: two, and well below what one busy process takes.
UNDER_LOAD_SHARE = 0.1


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as the kernel prints them."""
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])
    return "unknown"


def under_load(foreign_cores: float, cpu_count: int | None = None) -> bool:
    """Whether others used more than :data:`UNDER_LOAD_SHARE` of the CPUs."""
    cpus = cpu_count or os.cpu_count() or 1
    return foreign_cores > UNDER_LOAD_SHARE * cpus


class CpuMeter:
    """How much CPU other processes used since this meter was made.

    Machine-wide busy time from /proc/stat, less this process's own time and that of
    every child it has reaped. Read it only once every child started meanwhile has been
    reaped (a backup job's ``wait()`` reaps its worker; ``subprocess.run`` reaps
    ``qemu-img``; engines reap the rest when they close): a live child's time would be
    counted as someone else's.
    """

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start = self._read()

    def _read(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal
        busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]) / self.hz
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        return busy, ours, time.monotonic()

    def foreign_cores(self) -> float:
        """Cores' worth of CPU others used since the meter was made (0 to the CPU count)."""
        busy0, ours0, t0 = self.start
        busy1, ours1, t1 = self._read()
        return max(busy1 - busy0 - (ours1 - ours0), 0.0) / max(t1 - t0, 1e-9)

    def record(self) -> dict[str, Any]:
        """``foreign_cores`` and ``under_load``, for a figure's JSON."""
        cores = self.foreign_cores()
        return {"foreign_cores": cores, "under_load": under_load(cores)}
