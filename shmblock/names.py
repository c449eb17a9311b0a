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
the registry.

The registry, and why it can be trusted
---------------------------------------
``cleanup`` kills processes and deletes files on the registry's word, so the registry
must be writable by this user alone. It lives in ``$XDG_RUNTIME_DIR/shmblock`` when that
is a directory of ours that nobody else can write (it is per user, 0700, on tmpfs), else
in ``/tmp/shmblock-<uid>``; ``SHMBLOCK_RUN_DIR`` overrides both (tests). It is created
0700, and a registry directory that is a symlink, is owned by someone else or is
group/other-writable is refused (:class:`RegistryError`) — in the sticky ``/tmp``
another local user could have created ``/tmp/shmblock-<uid>`` first. Records are opened
relative to the checked directory's descriptor with ``O_NOFOLLOW``, must be regular files
of ours, and every field is validated (:meth:`RunRecord.load`): the run id must be the
one in the file name, every name must start with exactly ``/<prefix>-<run>-`` of the
record itself, every file must be an absolute ``.part`` path, every pid a positive int.
A record that fails is skipped, never acted on.

Each child is recorded with its pid's start time (``/proc/<pid>/stat`` field 22) and the
command line it was started with, and the record carries the boot id, so ``cleanup``
can prove a live pid is still the process the run started before it kills it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from shmblock.errors import ShmblockError, UsageError
from shmblock.paths import remove_part

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
        """Names of a run (a fresh id unless given); raises UsageError for a bad id, which
        ``cleanup`` could not recognise later."""
        if run_id is not None and not RUN_ID_RE.match(run_id):
            raise UsageError(f"run id {run_id!r} must be 8 lowercase hex digits")
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


RECORD_MAX_BYTES = 1 << 20  # a run with 1000 writers records about 150 KiB
RECORD_MAX_ITEMS = 100_000
_RECORD_NAME_RE = re.compile(r"^([A-Za-z0-9_.-]{1,64})-([0-9a-f]{8})\.json$")
_OBJECT_TAIL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
# One lock for every record of this process: the reference image's .part is recorded
# from the digest thread while the main thread records queues.
_record_lock = threading.RLock()
# Records removed by this process: a late save (the digest thread recording the
# reference image's .part after Ctrl-C closed the engine) must not bring one back.
_removed: set[tuple[str, str]] = set()


class RegistryError(ShmblockError):
    """The run registry cannot be trusted (owner, mode, symlink) or used."""


def _private_dir(path: str) -> bool:
    """Whether ``path`` is a real directory of ours that no one else may write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & 0o022)


def registry_dir() -> Path:
    """Where run records live (see the module docstring for the choice)."""
    override = os.environ.get("SHMBLOCK_RUN_DIR")
    if override:
        return Path(override)
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    # Only a runtime directory that is really ours: `su` keeps another user's.
    if os.path.isabs(runtime) and _private_dir(runtime):
        return Path(runtime) / "shmblock"
    return Path(f"/tmp/shmblock-{os.getuid()}")


def check_registry_fd(fd: int, path: Path) -> None:
    """Raise RegistryError unless the open directory ``fd`` is ours and not writable by
    group or others."""
    st = os.fstat(fd)
    if st.st_uid != os.getuid():
        raise RegistryError(
            f"the run registry {str(path)!r} belongs to uid {st.st_uid}, not to you "
            f"(uid {os.getuid()}): someone else may have planted it; remove it, or set "
            "XDG_RUNTIME_DIR or SHMBLOCK_RUN_DIR to a directory of yours")
    if st.st_mode & 0o022:
        raise RegistryError(
            f"the run registry {str(path)!r} is writable by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); make it 0700 (chmod 700) or remove it")


@contextlib.contextmanager
def open_registry(create: bool) -> Iterator[int | None]:
    """The registry directory's descriptor, checked; None if it is absent and not created.

    Opened with O_NOFOLLOW|O_DIRECTORY and checked with fstat, so what is checked is what
    records are read from and written to (no window to swap the path). Raises
    RegistryError.
    """
    path = registry_dir()
    if create:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except FileExistsError:
            pass  # a non-directory there: refused by the open below
        except OSError as exc:
            raise RegistryError(f"cannot create the run registry {str(path)!r}: "
                                f"{exc.strerror}") from exc
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if create:
            raise RegistryError(f"the run registry {str(path)!r} vanished") from None
        yield None
        return
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise RegistryError(f"the run registry {str(path)!r} is not a directory "
                                "(a symlink or a file): refusing to use it") from exc
        raise RegistryError(f"cannot open the run registry {str(path)!r}: "
                            f"{exc.strerror}") from exc
    try:
        check_registry_fd(fd, path)
        yield fd
    finally:
        os.close(fd)


def boot_id() -> str:
    """This boot's id: pids and start times of an earlier boot mean nothing now."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22).

    With the pid it names one process for the whole boot: a recycled pid has a later
    start time. None when the process is gone.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            # Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22; fields[0] is field 3
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class ChildRecord:
    """A worker process as started: enough to recognise it later, whatever its pid does."""

    pid: int
    start: int  # process_start(pid) right after spawning
    argv: list[str]  # the command line it was started with (until it names itself)


@dataclass
class PartRecord:
    """A temporary output file (``<target>.part``, the reference image's ``.part``)."""

    path: str  # absolute
    dev: int = 0  # (dev, ino) once the file exists and the run has seen it; 0: not yet
    ino: int = 0

    @property
    def identity(self) -> tuple[int, int] | None:
        return (self.dev, self.ino) if self.ino else None


def _fail(name: str, why: str) -> ValueError:
    return ValueError(f"run record {name}: {why}")


def _int(name: str, what: str, value: object, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise _fail(name, f"{what} must be an integer >= {minimum}, not {value!r}")
    return value


def _str_list(name: str, what: str, value: object) -> list[str]:
    if not isinstance(value, list) or len(value) > RECORD_MAX_ITEMS \
            or not all(isinstance(v, str) for v in value):
        raise _fail(name, f"{what} must be a list of strings")
    return list(value)


@dataclass
class RunRecord:
    """What one run created, written before each object is created."""

    run_id: str
    prefix: str
    pid: int
    started: float = field(default_factory=time.time)
    pid_start: int = field(default_factory=lambda: process_start(os.getpid()) or 0)
    boot: str = field(default_factory=boot_id)
    segments: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    files: list[PartRecord] = field(default_factory=list)
    children: list[ChildRecord] = field(default_factory=list)

    @property
    def file_name(self) -> str:
        return f"{self.prefix}-{self.run_id}.json"

    @property
    def path(self) -> Path:
        return registry_dir() / self.file_name

    @property
    def name_base(self) -> str:
        """What every object name of this run starts with."""
        return f"/{self.prefix}-{self.run_id}-"

    def save(self) -> None:
        """Write atomically (private temp file + rename), so a crash never leaves half a
        record; raises RegistryError."""
        with _record_lock:
            if (self.prefix, self.run_id) in _removed:
                return
            data = json.dumps(asdict(self)).encode()
            with open_registry(create=True) as dir_fd:
                assert dir_fd is not None
                tmp = f".{self.file_name}.{secrets.token_hex(4)}.tmp"
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
                    try:
                        os.write(fd, data)
                    finally:
                        os.close(fd)
                    os.replace(tmp, self.file_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except OSError as exc:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dir_fd)
                    raise RegistryError(f"cannot write the run record "
                                        f"{str(self.path)!r}: {exc.strerror}") from exc

    def remove(self) -> None:
        """Delete the record; later saves of it in this process do nothing."""
        with _record_lock:
            _removed.add((self.prefix, self.run_id))
            with contextlib.suppress(OSError, RegistryError), \
                    open_registry(create=False) as dir_fd:
                if dir_fd is not None:
                    os.unlink(self.file_name, dir_fd=dir_fd)

    # -- what the engine records ---------------------------------------------------------

    def add_part(self, path: str) -> PartRecord:
        """Record a temporary file before it is created (saved)."""
        with _record_lock:
            part = PartRecord(os.path.abspath(path))
            self.files.append(part)
            self.save()
            return part

    def part_created(self, path: str, identity: tuple[int, int]) -> None:
        """Record the inode of a recorded temporary file that now exists (saved)."""
        with _record_lock:
            for part in self.files:
                if part.path == os.path.abspath(path) and part.identity is None:
                    part.dev, part.ino = identity
                    self.save()
                    return

    def discard_part(self, path: str) -> bool:
        """Remove the recorded temporary file at ``path`` if it is still the one this run
        created (:func:`shmblock.paths.remove_part`); True if it was removed."""
        path = os.path.abspath(path)
        with _record_lock:
            entries = [p for p in self.files if p.path == path]
        # The latest entry: an earlier job to the same target has published or lost its.
        return bool(entries) and remove_part(path, entries[-1].identity, self.started)

    def discard_parts(self) -> None:
        """Remove every recorded temporary file that is still this run's."""
        with _record_lock:
            entries = list(self.files)
        for part in entries:
            remove_part(part.path, part.identity, self.started)

    def add_child(self, pid: int, argv: list[str]) -> None:
        """Record a spawned worker: pid, start time and command line (saved)."""
        with _record_lock:
            self.children.append(ChildRecord(pid, process_start(pid) or 0, list(argv)))
            self.save()

    # -- reading it back -------------------------------------------------------------------

    @classmethod
    def from_json(cls, name: str, raw: bytes) -> RunRecord:
        """Parse and validate the record stored under file name ``name``.

        Raises ValueError naming the first field that is wrong.
        """
        m = _RECORD_NAME_RE.match(name)
        if not m or not RUN_ID_RE.match(m.group(2)):
            raise _fail(name, "the file name is not <prefix>-<run id>.json")
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise _fail(name, "not a JSON object")
        expected = {f.name for f in fields(cls)}
        if set(data) != expected:
            raise _fail(name, f"fields {sorted(data)} are not {sorted(expected)}")
        run_id, pfx = data["run_id"], data["prefix"]
        # Exactly the file's own run id and prefix: an empty or odd id must match nothing.
        if run_id != m.group(2) or pfx != m.group(1):
            raise _fail(name, f"run id {run_id!r} or prefix {pfx!r} is not the file name's")
        base = f"/{pfx}-{run_id}-"
        objects = {}
        for key in ("segments", "queues"):
            names = _str_list(name, key, data[key])
            for obj in names:
                if not obj.startswith(base) or not _OBJECT_TAIL_RE.match(obj[len(base):]):
                    raise _fail(name, f"{key} entry {obj!r} is not a name of run {run_id}")
            objects[key] = names
        files = []
        if not isinstance(data["files"], list) or len(data["files"]) > RECORD_MAX_ITEMS:
            raise _fail(name, "files must be a list")
        for entry in data["files"]:
            if not isinstance(entry, dict) or set(entry) != {"path", "dev", "ino"}:
                raise _fail(name, f"files entry {entry!r} is not {{path, dev, ino}}")
            path = entry["path"]
            if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path \
                    or os.path.normpath(path) != path or not path.endswith(".part"):
                raise _fail(name, f"files entry {path!r} is not an absolute .part path")
            files.append(PartRecord(path, _int(name, "dev", entry["dev"]),
                                    _int(name, "ino", entry["ino"])))
        children = []
        if not isinstance(data["children"], list) or len(data["children"]) > RECORD_MAX_ITEMS:
            raise _fail(name, "children must be a list")
        for entry in data["children"]:
            if not isinstance(entry, dict) or set(entry) != {"pid", "start", "argv"}:
                raise _fail(name, f"children entry {entry!r} is not {{pid, start, argv}}")
            children.append(ChildRecord(_int(name, "child pid", entry["pid"], 1),
                                        _int(name, "child start", entry["start"]),
                                        _str_list(name, "child argv", entry["argv"])))
        started = data["started"]
        if type(started) not in (int, float) or not started >= 0:
            raise _fail(name, f"started {started!r} is not a time")
        if not isinstance(data["boot"], str):
            raise _fail(name, "boot must be a string")
        return cls(run_id=run_id, prefix=pfx, pid=_int(name, "pid", data["pid"], 1),
                   started=float(started), pid_start=_int(name, "pid_start", data["pid_start"]),
                   boot=data["boot"], segments=objects["segments"], queues=objects["queues"],
                   files=files, children=children)

    @classmethod
    def load_at(cls, dir_fd: int, name: str) -> RunRecord:
        """Read and validate one record (O_NOFOLLOW; a regular file of ours, bounded).

        Raises ValueError (or OSError) when it is not a valid record of ours.
        """
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise _fail(name, "not a regular file of yours")
            if st.st_size > RECORD_MAX_BYTES:
                raise _fail(name, f"{st.st_size} bytes is too large for a record")
            raw = os.read(fd, RECORD_MAX_BYTES + 1)
        finally:
            os.close(fd)
        return cls.from_json(name, raw)

    def supervisor_alive(self) -> bool:
        """Whether this run's supervisor is provably still running (same boot, pid and
        start time): a recycled pid does not keep a dead run alive."""
        if self.boot != boot_id():
            return False
        start = process_start(self.pid)
        return start is not None and start == self.pid_start and pid_alive(self.pid)


def list_records(skipped: list[str] | None = None) -> list[RunRecord]:
    """Every valid run record in the registry.

    Invalid ones are skipped; with ``skipped``, a line saying why is appended for each.
    Raises RegistryError when the registry itself cannot be trusted.
    """
    records = []
    with open_registry(create=False) as dir_fd:
        if dir_fd is None:
            return []
        for name in sorted(os.listdir(dir_fd)):
            if not name.endswith(".json"):
                continue
            try:
                records.append(RunRecord.load_at(dir_fd, name))
            except (OSError, ValueError, RecursionError) as exc:  # deep JSON nesting
                if skipped is not None:
                    skipped.append(f"{name}: {exc}")
    return records


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")
