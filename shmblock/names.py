"""Run ids, the names of every shared object a run creates, and the run registry.

Every name carries the run id, so two runs never collide and ``shmblock-run cleanup``
can tell which objects belong to a run whose supervisor is gone::

    /<prefix>-<run>-<device>-meta     header, cluster maps, staging slots, writer stats
    /<prefix>-<run>-<device>-data     device contents (absent for file-backed devices)
    /<prefix>-<run>-sup               supervisor's queue (events from every worker)
    /<prefix>-<run>-<device>-bk       backup worker's queue (copy requests, job control)
    /<prefix>-<run>-<device>-w<i>-ctl writer i's control queue (freeze, thaw, shutdown)
    /<prefix>-<run>-<device>-w<i>-rep writer i's reply queue (copy done)

The prefix is ``shmblock`` unless ``SHMBLOCK_PREFIX`` says otherwise (tests give each
test its own, then assert nothing with it is left in /dev/shm).

POSIX message queues cannot be listed without /dev/mqueue mounted, so the supervisor
records every name it creates in a registry file before creating it; ``cleanup`` reads
the registry. The registry lives in ``SHMBLOCK_RUN_DIR`` or ``/tmp/shmblock-<uid>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUN_ID_RE = re.compile(r"^[0-9a-f]{8}$")
# The supervisor's pid, in every worker's environment: a worker that finds another
# parent at start-up knows the supervisor died while it was starting (workers.common).
SUPERVISOR_PID_ENV = "SHMBLOCK_SUPERVISOR_PID"
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


def prefix() -> str:
    """The name prefix of shared objects (``SHMBLOCK_PREFIX``, default ``shmblock``)."""
    value = os.environ.get("SHMBLOCK_PREFIX", "shmblock")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ValueError(f"SHMBLOCK_PREFIX {value!r} must be 1-64 of [A-Za-z0-9_.-]")
    return value


def new_run_id() -> str:
    """A fresh 8-hex-digit run id."""
    return secrets.token_hex(4)


@dataclass(frozen=True, slots=True)
class RunNames:
    """Every shared-object name of one run."""

    run_id: str
    prefix: str

    @classmethod
    def new(cls, run_id: str | None = None) -> RunNames:
        return cls(run_id or new_run_id(), prefix())

    @property
    def base(self) -> str:
        return f"/{self.prefix}-{self.run_id}"

    def meta(self, device: str) -> str:
        return f"{self.base}-{device}-meta"

    def data(self, device: str) -> str:
        return f"{self.base}-{device}-data"

    @property
    def supervisor_queue(self) -> str:
        return f"{self.base}-sup"

    def backup_queue(self, device: str) -> str:
        return f"{self.base}-{device}-bk"

    def writer_control_queue(self, device: str, writer: int) -> str:
        return f"{self.base}-{device}-w{writer}-ctl"

    def writer_reply_queue(self, device: str, writer: int) -> str:
        return f"{self.base}-{device}-w{writer}-rep"


def registry_dir() -> Path:
    """Where run records live."""
    return Path(os.environ.get("SHMBLOCK_RUN_DIR") or f"/tmp/shmblock-{os.getuid()}")


@dataclass
class RunRecord:
    """What one run created, written before each object is created."""

    run_id: str
    prefix: str
    pid: int
    started: float = field(default_factory=time.time)
    segments: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    children: list[int] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return registry_dir() / f"{self.prefix}-{self.run_id}.json"

    def save(self) -> None:
        """Write atomically (temp file + rename), so a crash never leaves half a record."""
        directory = registry_dir()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        data = json.loads(path.read_text())
        return cls(**data)


def list_records() -> list[RunRecord]:
    """Every run record in the registry (unreadable ones are skipped)."""
    directory = registry_dir()
    if not directory.is_dir():
        return []
    records = []
    for path in sorted(directory.glob("*.json")):
        with contextlib.suppress(OSError, ValueError, TypeError):
            records.append(RunRecord.load(path))
    return records


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")
