"""The machine's other load: how much CPU processes outside the bench used meanwhile.

The machine is shared, and a figure measured while another test suite used a core is a
figure about that suite as much as about shmblock. Every cell, section and timed step
records what others took (:class:`CpuMeter`), and a figure taken while others used more
than :data:`UNDER_LOAD_SHARE` of the CPUs is *under load* (issue 9: mark, or refuse to
publish, such figures; :mod:`shmblock.bench.runner` refuses to write them into the
repository's ``bench/results/`` without ``--allow-load``).

Theory of operation. The meter reads two things at its start and at its end:

* the machine's busy time, from the first line of ``/proc/stat`` (user, nice, system,
  irq, softirq; steal is recorded apart, it is the hypervisor's other guests);
* the CPU time of the bench's own process tree: every process whose parent chain leads
  to the bench's process (``/proc/PID/stat``: utime + stime of the process and all its
  threads, plus cutime + cstime, the time of its children it has reaped).

The tree's total is conserved across exits: a descendant that exits and is reaped moves
its whole time into its parent's cutime, and the parent is in the tree too, so a worker
that lived for part of the interval is counted once, as ours. A zombie not yet reaped
still shows its time in its own ``stat``. Kernel threads (children of ``kthreadd``, pid
2: page-cache writeback, kswapd, ...) mostly work for the bench's own I/O; they are
reported apart (``kernel_cores``) and not counted as others' load. What remains is the
other processes' time::

    foreign = Δbusy − Δtree − Δkernel_threads      (clipped at 0)

and ``foreign / interval`` is in cores. The meter also names the processes that took
the most (``top``: pid, name, cores), so a tainted figure says who loaded the machine.

A descendant that double-forks away (its parent exits, it is reparented to init) leaves
the tree; nothing the bench starts does that (qemu-storage-daemon, fio and the engine's
workers stay children).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

#: Others may use this share of the CPUs before a figure counts as taken under load: a
#: tenth (0.2 of a core here) is the background of an idle Linux machine with a shell or
#: two, and well below what one busy process takes.
UNDER_LOAD_SHARE = 0.1
#: how many of the busiest other processes a record names
TOP = 3
KTHREADD = 2


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as the kernel prints them."""
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])
    return "unknown"


def under_load(foreign_cores: float, cpu_count: int | None = None) -> bool:
    """Whether others used more than :data:`UNDER_LOAD_SHARE` of the CPUs."""
    cpus = cpu_count or os.cpu_count() or 1
    return foreign_cores > UNDER_LOAD_SHARE * cpus


@dataclass(frozen=True, slots=True)
class Proc:
    """One process as ``/proc/PID/stat`` shows it (times in seconds)."""

    pid: int
    ppid: int
    name: str
    own: float  # utime + stime (every thread of it)
    reaped: float  # cutime + cstime (children it has waited for)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The machine's CPU accounting at one instant."""

    taken: float  # time.monotonic()
    busy: float  # machine busy seconds (all CPUs), without steal
    steal: float
    procs: dict[int, Proc]


def read_stat(pid: int, hz: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:  # gone meanwhile
        return None
    # The name is in parentheses and may contain anything, spaces and ')' included.
    lpar, rpar = raw.find("("), raw.rfind(")")
    if lpar < 0 or rpar < 0:
        return None
    fields = raw[rpar + 2 :].split()
    try:
        # fields[0] is field 3 (state): ppid is field 4, utime..cstime fields 14-17.
        ppid = int(fields[1])
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    except (IndexError, ValueError):
        return None
    return Proc(pid, ppid, raw[lpar + 1 : rpar], (utime + stime) / hz, (cutime + cstime) / hz)


def take(hz: int | None = None) -> Snapshot:
    """Read ``/proc/stat`` and every process's ``stat`` now."""
    hz = hz or os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    busy = (cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6]) / hz
    steal = (cpu[7] if len(cpu) > 7 else 0) / hz
    procs: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            p = read_stat(int(entry.name), hz)
            if p is not None:
                procs[p.pid] = p
    return Snapshot(time.monotonic(), busy, steal, procs)


def tree(procs: dict[int, Proc], root: int) -> set[int]:
    """``root`` and every process whose parent chain leads to it."""
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo += children.get(pid, [])
    return found


def _kernel_threads(procs: dict[int, Proc]) -> set[int]:
    return {p.pid for p in procs.values() if KTHREADD in (p.pid, p.ppid)}


@dataclass(frozen=True, slots=True)
class Load:
    """What happened on the machine between two snapshots, in cores (CPU-seconds per
    second of the interval)."""

    seconds: float
    foreign_cores: float
    ours_cores: float
    kernel_cores: float
    steal_cores: float
    top: list[tuple[int, str, float]]  # the busiest other processes: pid, name, cores

    @property
    def under_load(self) -> bool:
        return under_load(self.foreign_cores)

    def to_json(self) -> dict[str, Any]:
        return {"foreign_cores": self.foreign_cores, "under_load": self.under_load,
                "ours_cores": self.ours_cores, "kernel_cores": self.kernel_cores,
                "steal_cores": self.steal_cores, "seconds": self.seconds,
                "top": [{"pid": pid, "name": name, "cores": c} for pid, name, c in self.top]}


def between(a: Snapshot, b: Snapshot, root: int) -> Load:
    """The load between snapshots ``a`` and ``b``, the bench being ``root``'s tree."""
    dt = max(b.taken - a.taken, 1e-9)
    ours_a, ours_b = tree(a.procs, root), tree(b.procs, root)

    def total(s: Snapshot, pids: set[int]) -> float:
        return sum(s.procs[p].own + s.procs[p].reaped for p in pids if p in s.procs)

    d_ours = max(total(b, ours_b) - total(a, ours_a), 0.0)
    # Kernel threads and other processes: only those alive at both ends can be
    # differenced (a short-lived one shows up in its parent's cutime, which is).
    kern = _kernel_threads(a.procs) & _kernel_threads(b.procs)
    d_kern = sum(max(b.procs[p].own - a.procs[p].own, 0.0) for p in kern)
    d_busy = max(b.busy - a.busy, 0.0)
    foreign = max(d_busy - d_ours - d_kern, 0.0)
    others = []
    for pid in (set(a.procs) & set(b.procs)) - ours_b - ours_a - kern:
        pa, pb = a.procs[pid], b.procs[pid]
        used = (pb.own + pb.reaped) - (pa.own + pa.reaped)
        if used > 0:
            others.append((pid, pb.name, used / dt))
    others.sort(key=lambda x: -x[2])
    return Load(dt, foreign / dt, d_ours / dt, d_kern / dt,
                max(b.steal - a.steal, 0.0) / dt, others[:TOP])


class CpuMeter:
    """How much CPU processes outside the bench's process tree used since it was made.

    Read it at any time (:meth:`load`, :meth:`foreign_cores`, :meth:`record`); the
    bench's live children and its reaped ones both count as the bench's. ``root`` is
    the bench's process (default this one).
    """

    def __init__(self, root: int | None = None) -> None:
        self.root = root or os.getpid()
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start = take(self.hz)

    def load(self) -> Load:
        return between(self.start, take(self.hz), self.root)

    def foreign_cores(self) -> float:
        """Cores' worth of CPU others used since the meter was made (0 to the CPU count)."""
        return self.load().foreign_cores

    def record(self) -> dict[str, Any]:
        """``foreign_cores``, ``under_load`` and the detail, for a figure's JSON."""
        return self.load().to_json()


def tainted(res: Any, path: str = "") -> list[str]:
    """Every figure of a results tree that carries ``under_load: true``, by its path
    (``scenarios[3]``, ``foreign_load.peers``, ...): what the report marks as tainted. A
    tainted figure covers what is inside it (its runs, its load record)."""
    found: list[str] = []
    if isinstance(res, dict):
        if res.get("under_load") is True:
            return [path or "(top)"]
        for key, value in res.items():
            if isinstance(value, dict | list):
                found += tainted(value, f"{path}.{key}" if path else str(key))
    elif isinstance(res, list):
        for i, value in enumerate(res):
            found += tainted(value, f"{path}[{i}]")
    return found
