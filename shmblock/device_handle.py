"""A device owned by an engine, and the guest-writer processes that write to it.

:class:`DeviceHandle` is the engine's side of one device: guest reads and writes from the
calling process (through the same copy-before-write path as writer processes, under the
device's last writer index), and its dirty bitmaps. :class:`WriterProcess` is what the
supervisor knows of one guest-writer process.
"""

from __future__ import annotations

import subprocess
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from shmblock import layout as L
from shmblock.copier import runs
from shmblock.device import Device
from shmblock.errors import BitmapBusy, UsageError
from shmblock.guest import GuestIO, WriteData
from shmblock.names import NAME_RE
from shmblock.snapshot import BitmapUse
from shmblock.transport import BACKUP_RECEIVES, WRITER_REPLY_RECEIVES, Queue

if TYPE_CHECKING:
    from shmblock.engine import Engine


@dataclass
class WriterProcess:
    """A guest-writer worker process and what the supervisor knows of it."""

    ident: int
    device: DeviceHandle
    proc: subprocess.Popen[bytes]
    control: Queue
    reply: Queue
    token: str = field(default="", repr=False)  # its secret; its Frozen must carry it
    ready: bool = False
    done: bool = False
    ok: bool = True
    error: str = ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def status(self) -> str:
        """How the writer ended: "running", "ok", "killed by signal N", "exit code N: …"."""
        code = self.proc.poll()
        if code is None:
            return "running"
        if code < 0:
            return f"killed by signal {-code}"
        if code == 0 and self.ok:
            return "ok"
        return f"exit code {code}" + (f": {self.error}" if self.error else "")


class DeviceHandle:
    """A device owned by an engine; guest reads and writes go through copy-before-write."""

    def __init__(self, engine: Engine, name: str, device: Device, io_writer: int) -> None:
        self.engine = engine
        self.name = name
        self.device = device
        self.gate = threading.Lock()  # held by guest writes of this process and by freezes
        self._io_writer = io_writer
        self._io: GuestIO | None = None
        self._reply: Queue | None = None
        self._backup_queue: Queue | None = None
        #: bitmap name → the id of the job that consumes it (busy until the job ends)
        self.busy_bitmaps: dict[str, str] = {}

    @property
    def size(self) -> int:
        return self.device.size

    @property
    def cluster_size(self) -> int:
        return self.device.cluster_size

    def backup_queue(self) -> Queue:
        """The queue of this device's backup worker (created on first use, kept)."""
        if self._backup_queue is None:
            self._backup_queue = self.engine.run.create_queue(
                self.engine.names.backup_queue(self.name), BACKUP_RECEIVES)
        return self._backup_queue

    def _guest(self) -> GuestIO:
        if self._io is None:
            self._reply = self.engine.run.create_queue(
                self.engine.names.writer_reply_queue(self.name, self._io_writer),
                WRITER_REPLY_RECEIVES, small=True)
            self._io = GuestIO(self.device, self._io_writer,
                               self.engine.names.backup_queue(self.name),
                               reply_queue=self._reply, gate=self.gate)
        return self._io

    def write(self, offset: int, data: WriteData) -> None:
        """A guest write from this process (copy-before-write applies)."""
        self._guest().write(offset, data)

    def read(self, offset: int, length: int) -> bytes:
        """A guest read from this process."""
        return self._guest().read(offset, length)

    def fill(self, fraction: float, seed: int = 0) -> int:
        """Write random data to ``fraction`` of the clusters (chosen at random), as a guest.

        For benchmarks and demos that need a device with data and holes. Returns the
        number of clusters written.
        """
        if not 0 <= fraction <= 1:
            raise UsageError(f"fill fraction {fraction} must be between 0 and 1")
        rng = np.random.default_rng(seed)
        n = self.device.clusters
        chosen = np.sort(rng.choice(n, size=round(n * fraction), replace=False))
        cs = self.cluster_size
        pool = rng.integers(0, 256, 8 << 20, dtype=np.uint8)
        # Write maximal runs of chosen clusters, up to 4 MiB at a time.
        step = max((4 << 20) // cs, 1)
        for a, b, picked in runs(np.isin(np.arange(n), chosen)):
            if not picked:
                continue
            for c in range(a, b, step):
                e = min(c + step, b)
                start = int(rng.integers(0, pool.size - (e - c) * cs + 1))
                self.write(c * cs, pool[start : start + (e - c) * cs])
        return int(chosen.size)

    # -- dirty bitmaps ------------------------------------------------------------------

    def add_bitmap(self, name: str) -> None:
        """Define a persistent dirty bitmap that records every guest write from now on.

        The map is cleared and enabled while the writers are frozen, so no write is
        half-recorded.
        """
        if not NAME_RE.match(name):
            raise UsageError(f"bitmap name {name!r} must be 1-32 of [A-Za-z0-9_.-]")
        names = self.device.bitmap_names()
        if name in names:
            raise UsageError(f"device {self.name} already has a bitmap named {name!r}")
        free = [i for i in range(L.MAX_BITMAPS) if i not in names.values()]
        if not free:
            raise UsageError(f"device {self.name} already has {L.MAX_BITMAPS} bitmaps")
        index = free[0]
        with self.engine.freeze([self]):
            self.device.dirty[index] = 0
            self.device.set_bitmap_name(index, name)
            ctl = self.device.ctl
            ctl[L.CTL_BITMAP_MASK] = int(ctl[L.CTL_BITMAP_MASK]) | (1 << index)

    def remove_bitmap(self, name: str) -> None:
        """Stop recording into bitmap ``name`` and forget it (BitmapBusy while a job uses it)."""
        index = self._bitmap_index(name)
        self.check_bitmap_free(name)
        with self.engine.freeze([self]):
            ctl = self.device.ctl
            ctl[L.CTL_BITMAP_MASK] = int(ctl[L.CTL_BITMAP_MASK]) & ~(1 << index)
            self.device.set_bitmap_name(index, "")

    def bitmaps(self) -> list[str]:
        """Names of the device's dirty bitmaps."""
        return sorted(self.device.bitmap_names())

    def bitmap(self, name: str) -> npt.NDArray[np.bool_]:
        """A copy of bitmap ``name``: True for every cluster written since it was added."""
        return np.asarray(self.device.dirty[self._bitmap_index(name)] != 0, dtype=np.bool_)

    def use_bitmap(self, name: str, mode: str, job: str) -> BitmapUse:
        """Mark bitmap ``name`` busy for ``job`` (see :meth:`check_bitmap`)."""
        index = self.check_bitmap(name)
        self.busy_bitmaps[name] = job
        return BitmapUse(name, index, mode)

    def check_bitmap(self, name: str) -> int:
        """The index of bitmap ``name``; UsageError if unknown, BitmapBusy if a job uses it."""
        index = self._bitmap_index(name)
        self.check_bitmap_free(name)
        return index

    def check_bitmap_free(self, name: str) -> None:
        if (job := self.busy_bitmaps.get(name)) is not None:
            raise BitmapBusy(f"bitmap {name!r} of device {self.name} is busy: job {job} "
                             "uses it")

    def release_bitmap(self, name: str, job: str) -> None:
        """``job`` is over: its bitmap is free again."""
        if self.busy_bitmaps.get(name) == job:
            del self.busy_bitmaps[name]

    def _bitmap_index(self, name: str) -> int:
        try:
            return self.device.bitmap_names()[name]
        except KeyError:
            raise UsageError(f"device {self.name} has no bitmap named {name!r}") from None

    def close(self) -> None:
        if self._io is not None:
            self._io.close()
            self._io = None
