"""Output files that are ours alone: exclusive creation, no symlinks, no collisions.

Theory of operation
-------------------
Every file shmblock writes — a raw or qcow2 backup, the reference image, the ``--json``
summary — is written under a temporary name in the same directory and renamed into place
(rename(2) is atomic within a directory). The rules, and why:

* **The temporary file is created exclusively** (``O_CREAT|O_EXCL|O_NOFOLLOW``, mode
  0600). A symlink planted at ``<target>.part`` then makes creation fail instead of
  making us overwrite whatever it points to; two jobs (in one engine, two engines or two
  processes) can never share one ``.part`` and report each other's data; and nobody else
  can read the backup while it is written (the device itself is 0600).
* **An existing destination must be a regular file** (checked with ``lstat``): a symlink,
  directory, FIFO, socket or device node at the target is refused, never replaced.
* **No output may be an input or another output** (:func:`check_distinct`): the target,
  the reference image, the JSON summary, their ``.part`` names, the device's own file and
  the files of other running jobs are compared by resolved path *and* by inode (hard
  links, symlinks and ``..`` all lead to the same inode), before the snapshot is taken.
  Publishing a backup onto the device's own file would otherwise replace it by rename,
  and every later guest write would go to an unlinked inode.
* **Only a ``.part`` we created is ever removed** (:func:`remove_part`): it must still be
  a regular file of ours with the inode recorded when it was created, or — when the
  creator died before the inode could be recorded — one changed since the run started
  that no live process has open.

Everything here raises :class:`~shmblock.errors.UsageError` (bad paths, found before a
run) or plain ``OSError`` (the caller wraps it into its own error kind).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable

from shmblock.errors import UsageError

#: A file target is written under this suffix and renamed into place on commit.
PART_SUFFIX = ".part"

#: Flags of every temporary output file: exclusive, never through a symlink.
CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Backups and reference images hold the device's data: the user's alone, as the device.
PRIVATE_MODE = 0o600

Identity = tuple[int, int]  # (st_dev, st_ino)


def describe_mode(mode: int) -> str:
    """What kind of file ``mode`` is, in words."""
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return what
    return "not a regular file"


def check_output(role: str, path: str) -> None:
    """Refuse an output path whose directory is missing or that is not a regular file.

    ``role`` names the option in the message ("target", "--json"). Raises UsageError.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{role} {path!r}: directory {parent!r} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"{role} {path!r}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{role} {path!r} exists and is {describe_mode(st.st_mode)}; "
                         "shmblock only replaces regular files")


def check_no_part(role: str, path: str) -> None:
    """Refuse when ``<path>.part`` exists: another job is writing there, or one crashed."""
    part = path + PART_SUFFIX
    try:
        st = os.lstat(part)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"{role} {path!r}: cannot check {part!r}: {exc.strerror}") from exc
    if stat.S_ISREG(st.st_mode):
        why = ("another backup is writing it, or a crashed run left it behind "
               "(`shmblock-run cleanup` removes those; delete it yourself if no backup is "
               "running)")
    else:
        why = f"it is {describe_mode(st.st_mode)}"
    raise UsageError(f"{role} {path!r}: the partial file {part!r} already exists: {why}")


def check_device_file(path: str, size: int) -> None:
    """Refuse a device file that cannot back a device of ``size`` bytes (UsageError).

    It may be missing (it is created) or an empty regular file (it is sized); otherwise it
    must be a regular file of exactly ``size`` bytes. A dangling symlink is refused: the
    creation would follow it to wherever it points.
    """
    what = f"device file {path!r}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise UsageError(f"{what} is a symbolic link to a missing file") from None
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise UsageError(f"{what}: directory {parent!r} does not exist") from None
        return
    except OSError as exc:
        raise UsageError(f"{what}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} is {describe_mode(st.st_mode)}, not a regular file")
    if st.st_size not in (0, size):
        raise UsageError(f"{what} has {st.st_size} bytes; the device is {size} bytes "
                         "(give a matching --size, or an empty or new file)")


def _identity(path: str) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def with_parts(role: str, path: str) -> list[tuple[str, str]]:
    """An output and its temporary name, as (role, path) pairs for :func:`check_distinct`."""
    return [(role, path), (f"{role}'s partial file", path + PART_SUFFIX)]


def check_distinct(files: Iterable[tuple[str, str]]) -> None:
    """Raise UsageError if two of the (role, path) pairs are one file.

    Compared by resolved path (symlinks and ``..``) and, for files that exist, by inode
    (hard links, bind mounts). The message names both roles and both paths.
    """
    seen: list[tuple[str, str, str, Identity | None]] = []
    for role, path in files:
        real = os.path.realpath(path)
        ident = _identity(path)
        for other_role, other_path, other_real, other_ident in seen:
            if real == other_real or (ident is not None and ident == other_ident):
                raise UsageError(f"{role} {path!r} and {other_role} {other_path!r} are the "
                                 "same file; a backup must never overwrite its own input "
                                 "or another output")
        seen.append((role, path, real, ident))


def check_backup_paths(target: str | None, reference_image: str | None, *,
                       inputs: Iterable[tuple[str, str]] = (),
                       busy: Iterable[tuple[str, str]] = ()) -> None:
    """All the path checks of one backup, before anything starts (UsageError).

    ``target`` is a file target (None for NBD; :meth:`TargetSpec.parse` has checked it),
    ``inputs`` (role, path) files that are read or mapped (a device's file), ``busy``
    (role, path) outputs of jobs still running. Each output and its ``.part`` must be
    distinct from every other file named, and no ``.part`` of ours may exist already.
    """
    files: list[tuple[str, str]] = []
    if target:
        files += with_parts("target", target)
    if reference_image:
        check_output("reference image", reference_image)
        files += with_parts("reference image", reference_image)
    for role, path in busy:
        files += with_parts(role, path)
    check_distinct([*files, *inputs])
    # After the collisions, whose message is more precise about a job of this engine.
    for role, output in (("target", target), ("reference image", reference_image)):
        if output:
            check_no_part(role, output)


# -- creating, publishing and removing temporary files ---------------------------------


def create_part(path: str, flags: int = os.O_RDWR) -> int:
    """Create ``path`` exclusively (never through a symlink), mode 0600; returns the fd.

    Raises OSError; EEXIST when the file exists (another job's, or a crashed run's).
    """
    return os.open(path, flags | CREATE_FLAGS, PRIVATE_MODE)


def explain_create_error(path: str, exc: OSError, what: str = "") -> str:
    """Why :func:`create_part` failed, in words that say what to do.

    ``what`` names the file's role ("raw target"), for the generic case.
    """
    if exc.errno == errno.EEXIST:
        with contextlib.suppress(OSError):
            mode = os.lstat(path).st_mode
            if not stat.S_ISREG(mode):
                return (f"{path!r} already exists and is {describe_mode(mode)}; refusing to "
                        "write through or replace it")
        return (f"{path!r} already exists: another backup is writing the same target, or "
                "a crashed run left it (`shmblock-run cleanup` removes those; delete it "
                "yourself if no backup is running)")
    return f"cannot create {what + ' ' if what else ''}{path!r}: {exc.strerror}"


def publish(fd: int, part_path: str, path: str) -> None:
    """Make ``part_path`` durable, rename it onto ``path``, make the rename durable.

    The order matters for a crash: fsync(file) before rename(2), or the new name may
    point at data that never reached the disk; fsync(directory) after, or the rename
    itself may be lost. Raises OSError.
    """
    os.fsync(fd)
    os.rename(part_path, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_file_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write a small file by a private temporary name and a rename (the ``--json`` summary).

    The temporary name is unique (mkstemp: O_EXCL, O_NOFOLLOW), so a symlink or a stale
    file there is never followed or reused; a non-regular ``path`` is refused.
    """
    check_output("output file", path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        os.fchmod(fd, mode & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    # The only portable way to read it is to set it; done once per summary written.
    current = os.umask(0o022)
    os.umask(current)
    return current


def inodes_in_use(exclude: set[int] | None = None) -> set[Identity]:
    """(dev, ino) of every file some live process we can see has open or mapped.

    Processes in ``exclude`` (pids) are not looked at.

    Reads /proc/<pid>/fd and /proc/<pid>/maps; processes we may not inspect (other
    users', when not root) are skipped: they cannot have our 0600 files open anyway.
    """
    found: set[Identity] = set()
    try:
        pids = [p for p in os.listdir("/proc")
                if p.isdigit() and int(p) not in (exclude or ())]
    except OSError:
        return found
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    found.add((st.st_dev, st.st_ino))
        with contextlib.suppress(OSError, ValueError), \
                open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) < 6 or fields[4] == "0":
                    continue
                major, minor = fields[3].split(":")
                found.add((os.makedev(int(major, 16), int(minor, 16)), int(fields[4])))
    return found


def remove_part(path: str, ident: Identity | None, since: float,
                in_use: set[Identity] | None = None) -> bool:
    """Remove a temporary file of ours; True if it was removed.

    Only a regular file owned by this user is considered. With ``ident`` (recorded when it
    was created) the inode must match. Without one (its creator died before the inode
    was recorded) it must have changed since ``since`` (the run's start) and no live
    process may have it open (``in_use``, computed when not given): a running job of
    another run could otherwise own a file at the same name.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        return False
    if ident is not None:
        if (st.st_dev, st.st_ino) != ident:
            return False
    else:
        if st.st_ctime < since:
            return False
        if in_use is None:
            in_use = inodes_in_use()
        if (st.st_dev, st.st_ino) in in_use:
            return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
