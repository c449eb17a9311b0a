"""Self-verification of a backup: what the device held at the snapshot instant.

While the writers are frozen, :meth:`SnapshotCapture.capture` copies the device into a
private buffer that was faulted in beforehand (so the freeze costs one memcpy, about
10 GB/s, and no page faults). After the thaw, a background thread turns the copy into
per-cluster BLAKE2b digests and, if asked, a plain sparse raw *reference image*, then
drops the copy. At the end :func:`verify_target` reads the finished backup back through
an independent reader (the file, our qcow2 reader, a new NBD connection) and compares
digests cluster by cluster.

The copy costs as much memory as the device: :func:`check_capture_memory` refuses a
capture that would not fit in ``MemAvailable`` (with a margin) before anything starts,
rather than let the kernel's OOM killer end the run in the middle of a backup.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from shmblock.copier import nonzero_clusters, runs
from shmblock.device import Device
from shmblock.errors import TargetError, UsageError, VerificationError
from shmblock.paths import (
    PART_SUFFIX,
    Identity,
    check_output,
    create_part,
    explain_create_error,
    publish,
)
from shmblock.targets import TargetSpec, open_reader

DIGEST_BYTES = 16
READ_CHUNK = 8 << 20
MEMINFO = "/proc/meminfo"
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"
#: memory left to everything else once the copy is made: the digest thread, the
#: reference image's page cache, the writers, the rest of the machine
CAPTURE_MARGIN_BYTES = 256 << 20
CAPTURE_MARGIN_FRACTION = 0.05

BoolArray = npt.NDArray[np.bool_]


class NotEnoughMemoryError(UsageError):
    """The verification copy of the device would not fit in the memory available."""


def mem_available(meminfo: str = MEMINFO, proc_cgroup: str = PROC_CGROUP,
                  cgroup_root: str = CGROUP_ROOT) -> int | None:
    """Bytes a new allocation of this process can take without the OOM killer.

    ``MemAvailable`` of ``/proc/meminfo``, capped by the headroom under every cgroup v2
    ``memory.max`` from our cgroup up to the root (a container or a systemd slice is
    OOM-killed at its own limit, whatever the machine has free). None when the kernel
    says neither.
    """
    found = [v for v in (_meminfo_available(meminfo), _cgroup_headroom(proc_cgroup,
                                                                         cgroup_root))
             if v is not None]
    return min(found) if found else None


def _meminfo_available(meminfo: str) -> int | None:
    try:
        with open(meminfo, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "MemAvailable":
                    value, _, unit = rest.strip().partition(" ")
                    return int(value) * (1024 if unit.strip() == "kB" else 1)
    except (OSError, ValueError):
        return None
    return None


def _cgroup_headroom(proc_cgroup: str, cgroup_root: str) -> int | None:
    """Smallest ``memory.max - memory.current`` from our cgroup v2 up; None if unlimited.

    Shared-memory pages are charged to the cgroup that faulted them in, so the device
    itself is already in ``memory.current``.
    """
    try:
        with open(proc_cgroup, encoding="ascii", errors="replace") as f:
            paths = [line.strip()[3:] for line in f if line.startswith("0::")]
    except OSError:
        return None
    if not paths:
        return None
    headroom: int | None = None
    path = paths[0]
    while True:
        directory = os.path.join(cgroup_root, path.lstrip("/"))
        try:
            with open(os.path.join(directory, "memory.max"), encoding="ascii") as f:
                limit = f.read().strip()
            with open(os.path.join(directory, "memory.current"), encoding="ascii") as f:
                current = int(f.read().strip())
            if limit != "max":
                room = max(int(limit) - current, 0)
                headroom = room if headroom is None else min(headroom, room)
        except (OSError, ValueError):
            pass  # the root cgroup has neither file; a controller may not be enabled
        if path in ("", "/"):
            return headroom
        path = os.path.dirname(path.rstrip("/"))


def capture_memory_needed(device_size: int) -> int:
    """Bytes that must be available to take a verification copy of a device."""
    return device_size + max(CAPTURE_MARGIN_BYTES, int(device_size * CAPTURE_MARGIN_FRACTION))


def check_capture_memory(device_size: int,
                         available: Callable[[], int | None] | None = None) -> None:
    """Refuse (NotEnoughMemoryError) a verification copy that would not fit in memory.

    The copy is a private, pre-faulted mapping as large as the device, on top of the
    device itself (already counted: shared-memory pages are not "available"). Without
    this check a device of half the machine's memory is OOM-killed mid-run instead of
    refused. ``available`` (default :func:`mem_available`, looked up at call time so a
    test can replace it) returns bytes, or None when unknown: then nothing is refused.
    """
    avail = (available or mem_available)()
    need = capture_memory_needed(device_size)
    if avail is not None and need > avail:
        raise NotEnoughMemoryError(
            f"verification needs a copy of the device: {need / 2**20:.0f} MiB "
            f"({device_size / 2**20:.0f} MiB plus a margin), but only "
            f"{avail / 2**20:.0f} MiB of memory is available (MemAvailable, or the "
            "cgroup's memory.max); use "
            "--no-verify (verify=False) and no reference image, or a smaller device"
        )


def cluster_digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


#: Told the (dev, ino) of a temporary file right after it is created, so the run record
#: can prove later that a file at that name is the one this run made.
PartCreated = Callable[[str, Identity], None]


def write_sparse_raw(path: str, data: npt.NDArray[np.uint8], cluster_size: int,
                     on_created: PartCreated | None = None) -> None:
    """Write ``data`` to a raw file, leaving all-zero clusters as holes.

    Written to ``<path>.part`` (created exclusively, never through a symlink, mode 0600:
    :func:`shmblock.paths.create_part`) and published by rename; an existing ``path``
    that is not a regular file is refused. On any failure the ``.part`` is removed.
    Raises OSError (UsageError for a non-regular ``path``).
    """
    check_output("reference image", path)
    tmp = path + PART_SUFFIX
    try:
        fd = create_part(tmp, os.O_WRONLY)
    except OSError as exc:
        raise OSError(exc.errno, explain_create_error(tmp, exc)) from exc
    try:
        if on_created is not None:
            st = os.fstat(fd)
            on_created(tmp, (st.st_dev, st.st_ino))
        os.ftruncate(fd, data.size)
        view = data.data
        step = READ_CHUNK
        for start in range(0, data.size, step):
            chunk = data[start : start + step]
            for a, b, has_data in runs(nonzero_clusters(chunk, cluster_size)):
                if has_data:
                    off = start + a * cluster_size
                    os.pwrite(fd, view[off : start + b * cluster_size], off)
        publish(fd, tmp, path)
    except BaseException:
        # Also when the rename fails (``path`` became a directory meanwhile): no .part left.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


class SnapshotCapture:
    """The device's contents at the snapshot instant, kept as digests (and a file)."""

    def __init__(self, device: Device, reference_image: str | None = None,
                 on_part_created: PartCreated | None = None, *,
                 available: Callable[[], int | None] | None = None) -> None:
        check_capture_memory(device.size, available)
        self.on_part_created = on_part_created
        self.cluster_size = device.cluster_size
        self.size = device.size
        self.reference_image = reference_image
        # Every page faulted in now, outside the freeze, by the kernel in one go
        # (MAP_POPULATE): the copy in the freeze is then a plain memcpy.
        self._map: mmap.mmap | None = mmap.mmap(
            -1, device.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        self._copy: npt.NDArray[np.uint8] | None = np.frombuffer(self._map, dtype=np.uint8)
        self.digests: list[bytes] = []
        self.error = ""
        #: seconds the copy took inside the freeze (the part of the guest stall that
        #: verification adds; the rest of the freeze is the snapshot itself)
        self.copy_s = 0.0
        self._thread: threading.Thread | None = None
        self._device = device

    def capture(self) -> None:
        """Copy the device; call only while every writer is frozen."""
        assert self._copy is not None
        t0 = time.monotonic()
        np.copyto(self._copy, self._device.data)
        self.copy_s = time.monotonic() - t0

    def finish_async(self) -> None:
        """Digest the copy (and write the reference image) in a background thread."""
        self._thread = threading.Thread(target=self._finish, name="snapshot-digests",
                                        daemon=True)
        self._thread.start()

    def _finish(self) -> None:
        copy = self._copy
        assert copy is not None
        # Hashing a large device takes seconds of CPU: let the writers and the backup
        # worker go first (a thread's nice value is its own on Linux, setpriority(2)).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        try:
            cs = self.cluster_size
            view = copy.data
            self.digests = [cluster_digest(view[i : i + cs]) for i in range(0, copy.size, cs)]
            view.release()
            if self.reference_image:
                write_sparse_raw(self.reference_image, copy, cs, self.on_part_created)
        except (OSError, UsageError) as exc:
            self.error = f"cannot write the reference image {self.reference_image!r}: {exc}"
        finally:
            self._copy = None
            del copy
            if self._map is not None:
                self._map.close()
                self._map = None

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


def verify_target(spec: TargetSpec, capture: SnapshotCapture,
                  covered: BoolArray | None = None) -> None:
    """Raise VerificationError unless every covered cluster of the backup matches."""
    capture.join()
    if capture.error:
        raise VerificationError(capture.error)
    cs = capture.cluster_size
    if len(capture.digests) != -(-capture.size // cs):
        raise VerificationError("the snapshot has no digests to compare with (their "
                                "computation never ran)")
    try:
        reader = open_reader(spec, capture.size, cs)
    except (OSError, TargetError) as exc:
        raise VerificationError(f"cannot open the backup to verify it: {exc}") from exc
    bad: list[int] = []
    try:
        for start in range(0, capture.size, READ_CHUNK):
            length = min(READ_CHUNK, capture.size - start)
            data = reader.read(start, length)
            if len(data) != length:
                raise VerificationError(f"the backup is short: {len(data)} bytes at {start}")
            view = memoryview(data)
            for i in range(0, length, cs):
                c = (start + i) // cs
                if covered is not None and not covered[c]:
                    continue
                if cluster_digest(view[i : i + cs]) != capture.digests[c]:
                    bad.append(c)
    except (OSError, TargetError) as exc:
        raise VerificationError(f"cannot read the backup back: {exc}") from exc
    finally:
        reader.close()
    if bad:
        shown = ", ".join(str(c) for c in bad[:10])
        raise VerificationError(
            f"{len(bad)} cluster(s) of the backup differ from the snapshot (first: {shown})")
