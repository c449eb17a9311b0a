"""The operating-system side of the bitmap store: files, directories, locks, boot id.

Kept apart from :mod:`.store` so that module reads as the protocol. Every failure here
becomes a :class:`~shmblock.errors.BitmapError` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import uuid
from pathlib import Path

from shmblock.bitmaps import ondisk as D
from shmblock.errors import BitmapError

_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on Linux x86-64 / aarch64


def current_boot_id() -> bytes:
    """This boot's id (16 bytes): a different one means the machine went down since."""
    try:
        text = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return uuid.UUID(text).bytes
    except (OSError, ValueError):
        # No /proc: treat every open as after a machine crash (the safe assumption).
        return bytes(16)


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (start time in clock ticks), or 0."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
        return int(raw.rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def lock(fd: int, kind: int, offset: int) -> bool:
    """Set (or with F_UNLCK drop) an OFD lock on byte ``offset``; False if another open
    file description holds a conflicting one. Never blocks."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def lock_held(fd: int, offset: int) -> bool:
    """True if another open file description holds a lock on byte ``offset``
    (F_OFD_GETLK: a test that takes nothing, so it never races with a real owner)."""
    probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    l_type = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0]
    return bool(l_type != fcntl.F_UNLCK)


def fdatasync_path(path: str) -> None:
    """The default ``image_sync``: make the image's written data durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise BitmapError(f"cannot sync the device image {path!r}: {exc.strerror}") from exc


def make_private_dir(directory: Path) -> None:
    """Create ``directory`` 0700, or accept it only if it is already ours and private."""
    try:
        directory.mkdir(mode=0o700)
        fsync_dir(directory.parent)  # the new name must survive a power loss too
    except FileExistsError:
        pass
    except OSError as exc:
        raise BitmapError(f"cannot create {directory}: {exc.strerror}") from exc
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise BitmapError(f"{directory} is not a private directory of this user "
                          "(a symlink, someone else's, or group/other-writable): refusing it")


def open_nofollow(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BitmapError(f"{path}: is a symlink; refusing to use it") from exc
        raise BitmapError(f"cannot open {path}: {exc.strerror}") from exc


def create_maps_file(path: Path, shape: D.Shape) -> None:
    sup = D.Super(shape, uuid.uuid4().bytes, bytes(16), D.STATE_CLEAN, 0, 0, "", 0)
    tmp = path.with_name(f"{path.name}.new.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            os.ftruncate(fd, shape.maps_file_size)
            os.pwrite(fd, sup.pack(), 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        # Publish with link(2), which never replaces: a crash mid-create leaves no
        # half-made store, and of two runs creating at once one store wins.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    except OSError as exc:
        raise BitmapError(f"cannot create {path}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` durable (a new file is not, until this)."""
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise BitmapError(f"cannot sync the directory {directory}: {exc.strerror}") from exc


def stored_cluster_size(maps_path: Path) -> int | None:
    """The cluster size an existing store was made for (None: no readable store; the
    open that follows reports why)."""
    try:
        with open(maps_path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
            return D.unpack_super(f.read(D.SUPER_SIZE)).shape.cluster_size
    except (OSError, D.FormatError):
        return None


def read_super(fd: int, path: str) -> D.Super:
    try:
        raw = os.pread(fd, D.SUPER_SIZE, 0)
        sup = D.unpack_super(raw)
        size = os.fstat(fd).st_size
        if size != sup.shape.maps_file_size:
            raise D.FormatError(f"the file has {size} bytes, its superblock says "
                                f"{sup.shape.maps_file_size}")
    except D.FormatError as exc:
        raise BitmapError(f"{path}: {exc}; the bitmaps cannot be read (remove "
                          f"{os.path.dirname(path)} to start over with none)") from None
    return sup


def busy_message(fd: int, path: str) -> str:
    try:
        sup = D.unpack_super(os.pread(fd, D.SUPER_SIZE, 0))
        who = f"run {sup.run_id or '?'} (pid {sup.owner_pid})"
    except (D.FormatError, OSError):
        who = "another live run"
    return f"{path}: the bitmaps are open by {who}"
