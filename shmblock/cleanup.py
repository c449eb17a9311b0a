"""Removing what crashed runs left behind (``shmblock-run cleanup``).

A run is *dead* when the supervisor pid in its registry record is gone. For each dead
run: kill any of its workers still alive (checking their command line names the run, so
a recycled pid is never hit), unlink its shared-memory segments and message queues,
delete partial target files, and drop the record. Segments in /dev/shm whose names carry
the prefix but no live run are removed too (queues cannot be listed without /dev/mqueue,
which is why the registry exists).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from dataclasses import dataclass, field

import posix_ipc

from shmblock.device import SHM_DIR
from shmblock.names import RunRecord, list_records, pid_alive, prefix
from shmblock.transport import unlink_queue


@dataclass
class CleanupReport:
    runs: list[str] = field(default_factory=list)
    segments: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.runs or self.segments or self.queues or self.files or self.killed)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _unlink_segment(name: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True


def clean_run(record: RunRecord, report: CleanupReport, dry_run: bool = False) -> None:
    """Remove everything one dead run recorded."""
    report.runs.append(record.run_id)
    for pid in record.children:
        if pid_alive(pid) and record.run_id in _cmdline(pid):
            report.killed.append(pid)
            if not dry_run:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
    for name in record.segments:
        if dry_run:
            if os.path.exists(SHM_DIR + name):
                report.segments.append(name)
        elif _unlink_segment(name):
            report.segments.append(name)
    for name in record.queues:
        if dry_run:
            with contextlib.suppress(posix_ipc.Error):
                posix_ipc.MessageQueue(name).close()
                report.queues.append(name)
        elif unlink_queue(name):
            report.queues.append(name)
    for path in record.files:
        if os.path.exists(path):
            report.files.append(path)
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    if not dry_run:
        record.remove()


def cleanup(dry_run: bool = False) -> CleanupReport:
    """Clean every dead run of the current prefix; live runs are left alone."""
    report = CleanupReport()
    ours = prefix()
    live: set[str] = set()
    for record in list_records():
        if record.prefix != ours:
            continue
        if pid_alive(record.pid):
            live.add(record.run_id)
        else:
            clean_run(record, report, dry_run)
    pattern = re.compile(rf"^{re.escape(ours)}-([0-9a-f]{{8}})-")
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(SHM_DIR)):
            match = pattern.match(entry)
            if match and match.group(1) not in live and "/" + entry not in report.segments:
                report.segments.append("/" + entry)
                if not dry_run:
                    _unlink_segment("/" + entry)
    return report
