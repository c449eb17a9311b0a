"""Removing what crashed runs left behind (``shmblock-run cleanup``).

Theory of operation
-------------------
``cleanup`` acts only on what the registry *proves* was created by a run of this user
that is dead, because anything it kills or deletes on weaker evidence could be someone
else's (another local user's, or a live run's):

* The registry must be ours and private (:func:`shmblock.names.open_registry`); each
  record is validated field by field (:meth:`shmblock.names.RunRecord.from_json`), and a
  record that fails is reported in ``skipped`` and left alone.
* A run is *dead* unless its supervisor is provably alive: same boot, a live pid with the
  start time recorded at run start (a recycled pid does not keep a dead run alive, and
  does not get killed).
* A worker pid is killed only if it is still the process the run spawned: same boot,
  same start time (``/proc/<pid>/stat`` field 22), owned by this user, and its command
  line is the one it was started with or the title a worker of this exact run gives
  itself (``shmblock: … run=<run id> …``).
* Shared-memory segments and queues are unlinked only by the names the record lists —
  each of which starts with exactly ``/<prefix>-<run>-`` of the record itself — and a
  segment only when it is a file of ours that no live process has mapped or open.
* Files are deleted only if they are ``.part`` files the run recorded, still regular
  files of ours, with the inode recorded when they were created (or, for one whose
  creator died before its inode was recorded, changed since the run started and open
  in no live process): :func:`shmblock.paths.remove_part`.
* The ``/dev/shm`` sweep (segments whose record is gone) takes only names of the form
  ``<prefix>-<8 hex digits>-<device>-(meta|data)`` with exactly our prefix (``shmblock2-…``
  is not ``shmblock``) whose meta header carries that run id (``shmblock-0badcafe-…`` is
  not run ``0badcafe`` of ``shmblock``), of no live run of our registry, owned by us and
  mapped or open by no live process — a run alive under another registry still has
  them mapped (:func:`swept_segments`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import time
from dataclasses import dataclass, field

import posix_ipc

from shmblock import layout as L
from shmblock.device import SHM_DIR
from shmblock.names import (
    ChildRecord,
    RunRecord,
    boot_id,
    list_records,
    pid_alive,
    prefix,
    process_start,
)
from shmblock.paths import Identity, inodes_in_use, remove_part
from shmblock.transport import unlink_queue

KILL_WAIT = 2.0  # seconds to wait for killed workers to go before checking who maps what


@dataclass
class CleanupReport:
    runs: list[str] = field(default_factory=list)
    segments: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # records not trusted, and why

    @property
    def empty(self) -> bool:
        return not (self.runs or self.segments or self.queues or self.files or self.killed)


def _argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def child_is_ours(record: RunRecord, child: ChildRecord) -> bool:
    """Whether ``child.pid`` is still, provably, the worker ``record``'s run spawned."""
    if not child.start or record.boot != boot_id():
        return False
    if process_start(child.pid) != child.start or not pid_alive(child.pid):
        return False
    try:
        if os.stat(f"/proc/{child.pid}").st_uid != os.getuid():
            return False
    except OSError:
        return False
    argv = _argv(child.pid)
    if argv == child.argv:
        return True
    # A worker renames itself (setproctitle): "shmblock: backup-worker run=<id> job=…".
    title = " ".join(argv)
    return title.startswith("shmblock: ") and f"run={record.run_id}" in title.split()


def _segment_removable(name: str, in_use: set[Identity]) -> bool:
    """A segment file of ours that no live process has mapped or open."""
    try:
        st = os.lstat(SHM_DIR + name)
    except OSError:
        return False
    return (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()
            and (st.st_dev, st.st_ino) not in in_use)


def _unlink_segment(name: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True


def kill_children(record: RunRecord, report: CleanupReport, dry_run: bool) -> list[int]:
    """SIGKILL the workers of a dead run that are provably still its own."""
    killed = []
    for child in record.children:
        if child_is_ours(record, child):
            report.killed.append(child.pid)
            killed.append(child.pid)
            if not dry_run:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(child.pid, signal.SIGKILL)
    return killed


def clean_run(record: RunRecord, report: CleanupReport, dry_run: bool,
              in_use: set[Identity]) -> None:
    """Remove the objects and files one dead run recorded (its workers already killed)."""
    report.runs.append(record.run_id)
    for name in record.segments:
        if _segment_removable(name, in_use) and (dry_run or _unlink_segment(name)):
            report.segments.append(name)
    for name in record.queues:
        if dry_run:
            with contextlib.suppress(posix_ipc.Error):
                posix_ipc.MessageQueue(name).close()
                report.queues.append(name)
        elif unlink_queue(name):
            report.queues.append(name)
    for part in record.files:
        if dry_run:
            with contextlib.suppress(OSError):
                st = os.lstat(part.path)
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and \
                        (part.identity is None or part.identity == (st.st_dev, st.st_ino)):
                    report.files.append(part.path)
        elif remove_part(part.path, part.identity, record.started, in_use):
            report.files.append(part.path)
    if not dry_run:
        record.remove()


def cleanup(dry_run: bool = False) -> CleanupReport:
    """Clean every dead run of the current prefix; live runs are left alone.

    Raises RegistryError when the registry cannot be trusted (owner, mode, symlink).
    """
    report = CleanupReport()
    ours = prefix()
    live: set[str] = set()
    dead: list[RunRecord] = []
    for record in list_records(report.skipped):
        if record.prefix != ours:
            continue
        if record.supervisor_alive():
            live.add(record.run_id)
        else:
            dead.append(record)
    killed: list[int] = []
    for record in dead:
        killed += kill_children(record, report, dry_run)
    if not dry_run:
        deadline = time.monotonic() + KILL_WAIT
        while any(pid_alive(p) for p in killed) and time.monotonic() < deadline:
            time.sleep(0.01)
    # Who maps or holds what, once the killed workers are gone (a dry run pretends they
    # are): what is still in use belongs to a live process, whatever a record says.
    in_use = inodes_in_use(exclude=set(killed) if dry_run else set())
    for record in dead:
        clean_run(record, report, dry_run, in_use)
    for name in swept_segments(ours, live, in_use):
        if name not in report.segments and (dry_run or _unlink_segment(name)):
            report.segments.append(name)
    return report


def _meta_header(name: str) -> tuple[str, str] | None:
    """(run id, contents name) from a meta segment's header; None if it has none."""
    try:
        fd = os.open(SHM_DIR + name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.pread(fd, L.HEADER_STRUCT.size, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) < L.HEADER_STRUCT.size:
        return None
    fields = L.HEADER_STRUCT.unpack(raw)
    if fields[0] != L.MAGIC or fields[1] != L.VERSION:
        return None
    return (fields[10].rstrip(b"\0").decode(errors="replace"),
            fields[11].rstrip(b"\0").decode(errors="replace"))


def swept_segments(ours: str, live: set[str], in_use: set[Identity]) -> list[str]:
    """Segments in /dev/shm that provably belong to a dead run of prefix ``ours``.

    The name alone is not proof: a prefix may contain ``-`` (``shmblock-0badcafe`` makes
    names that parse as run ``0badcafe`` of ``shmblock``), so a meta segment's header
    must carry the run id the name says, and a data segment must be the one its meta
    segment's header names. Segments of live runs (in our registry) or in use by any
    live process (a run alive under another registry) are never taken.
    """
    pattern = re.compile(rf"^/{re.escape(ours)}-([0-9a-f]{{8}})-([A-Za-z0-9_.-]+)-(meta|data)$")
    try:
        entries = sorted("/" + e for e in os.listdir(SHM_DIR))
    except FileNotFoundError:
        return []
    found = []
    for name in entries:
        match = pattern.match(name)
        if not match or match.group(1) in live or not _segment_removable(name, in_use):
            continue
        run, device, kind = match.groups()
        meta = f"/{ours}-{run}-{device}-meta"
        header = _meta_header(meta)
        if header is None or header[0] != run:
            continue
        if kind == "data" and header[1] != name:
            continue
        found.append(name)
    return found
