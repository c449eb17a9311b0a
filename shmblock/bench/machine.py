"""The machine a benchmark ran on, and its own limits, measured in the same run.

Limits are what no copier on this machine can beat, so the engine's numbers are quoted
as shares of them:

* **shared-memory copy bandwidth**: ``np.copyto`` between two pre-faulted mappings of
  files in /dev/shm (one core; the same kind of copy a staging save does);
* **page-cache write bandwidth**: ``os.pwrite`` of 1 MiB chunks into a new file in the
  target directory, no fsync (what a backup to a file in that directory costs at best);
* **page-cache write from shared memory**: the same, from a large mapping of /dev/shm
  (a cold source, as a backup reads the device): the ceiling for the bytes a backup
  writes;
* **random 64 KiB writes into a sparse file**: the pattern copy-before-write saves make
  on a raw target.

Each is the best of a few repetitions: interference on a shared machine only ever makes
a copy slower, so the best run is the closest to the machine's limit.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import mmap
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from shmblock.device import SHM_DIR

PACKAGES = ("shmblock", "numpy", "msgpack", "posix_ipc", "rich", "matplotlib", "psutil",
            "pytest-benchmark")
TOOLS = {
    "qemu-img": ["qemu-img", "--version"],
    "qemu-storage-daemon": ["qemu-storage-daemon", "--version"],
    "nbdkit": ["nbdkit", "--version"],
}
CHUNK = 1 << 20
REPEATS = 3


def _first_line(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) \
        else None


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total() -> int:
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def fs_type(path: str) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and (path == parts[1] or path.startswith(
                    parts[1].rstrip("/") + "/")) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def describe(target_dir: str) -> dict[str, Any]:
    """CPU, memory, kernel, Python, package and tool versions."""
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    shm = os.statvfs(SHM_DIR)
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_bytes": _mem_total(),
        "shm_bytes": shm.f_blocks * shm.f_frsize,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "packages": packages,
        "tools": {name: _first_line(argv) for name, argv in TOOLS.items()},
        "target_dir_fs": fs_type(target_dir),
    }


# -- limits ---------------------------------------------------------------------------


def _shm_mapping(size: int) -> tuple[mmap.mmap, npt.NDArray[np.uint8]]:
    """An anonymous-named, pre-faulted shared mapping of a file in /dev/shm."""
    fd = os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)  # O_TMPFILE: the file goes away with its last mapping
    return m, np.frombuffer(m, dtype=np.uint8)


def memcpy_bandwidth(size: int, repeats: int = 5) -> dict[str, Any]:
    """Bytes per second of one core copying between two shared-memory mappings."""
    src_map, src = _shm_mapping(size)
    dst_map, dst = _shm_mapping(size)
    try:
        src[:] = np.frombuffer(np.random.default_rng(0).bytes(size), dtype=np.uint8)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            times.append(time.perf_counter() - t0)
        best = min(times)
        return {"bytes": size, "best_s": best, "bytes_per_s": size / best,
                "runs_s": times, "how": "np.copyto between two pre-faulted /dev/shm "
                "mappings, one core, best of runs"}
    finally:
        del src, dst
        src_map.close()
        dst_map.close()


def page_cache_write(directory: str, size: int, repeats: int = REPEATS) -> dict[str, Any]:
    """Bytes per second of writing a new file in 1 MiB pwrite chunks (no fsync)."""
    buf = memoryview(np.random.default_rng(1).bytes(CHUNK))
    times = []
    for i in range(repeats):
        path = os.path.join(directory, f"pagecache-{i}.tmp")
        fd = _create_scratch(path)
        try:
            t0 = time.perf_counter()
            for off in range(0, size, CHUNK):
                os.pwrite(fd, buf, off)
            times.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
            os.unlink(path)
    best = min(times)
    return {"bytes": size, "best_s": best, "bytes_per_s": size / best, "runs_s": times,
            "how": f"os.pwrite of 1 MiB chunks into a new file in {directory} "
            f"({fs_type(directory)}), no fsync, best of runs"}


def page_cache_write_from_shm(directory: str, size: int) -> dict[str, Any]:
    """Like :func:`page_cache_write`, but from a large pre-faulted shared-memory mapping.

    This is the copy a backup to a file makes: every source byte is read once from
    memory that is not in the CPU caches, every destination page is allocated. The
    fair ceiling for the bytes a backup writes (not for the zeros it skips).
    """
    src_map, src = _shm_mapping(size)
    try:
        pattern = np.frombuffer(np.random.default_rng(3).bytes(16 << 20), dtype=np.uint8)
        for off in range(0, size, pattern.size):
            n = min(pattern.size, size - off)
            src[off : off + n] = pattern[:n]
        view = memoryview(src_map)
        path = os.path.join(directory, "pagecache-shm.tmp")
        fd = _create_scratch(path)
        try:
            t0 = time.perf_counter()
            for off in range(0, size, CHUNK):
                os.pwrite(fd, view[off : off + CHUNK], off)
            elapsed = time.perf_counter() - t0
        finally:
            os.close(fd)
            os.unlink(path)
            view.release()
    finally:
        del src
        src_map.close()
    return {"bytes": size, "best_s": elapsed, "bytes_per_s": size / elapsed,
            "how": f"os.pwrite of 1 MiB chunks straight from a {size >> 20} MiB pre-faulted "
            f"/dev/shm mapping into a new file in {directory}, no fsync"}


def sparse_random_writes(directory: str, size: int, count: int = 4096,
                         cluster: int = 64 << 10) -> dict[str, Any]:
    """64 KiB pwrites at random cluster offsets of a new sparse file, per second."""
    rng = np.random.default_rng(2)
    clusters = max(size // cluster, 1)
    offsets = rng.permutation(clusters)[:count] * cluster
    buf = memoryview(rng.bytes(cluster))
    path = os.path.join(directory, "sparse.tmp")
    fd = _create_scratch(path)
    try:
        os.ftruncate(fd, size)
        t0 = time.perf_counter()
        for off in offsets.tolist():
            os.pwrite(fd, buf, off)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
    n = len(offsets)
    return {"writes": n, "seconds": elapsed, "writes_per_s": n / elapsed,
            "bytes_per_s": n * cluster / elapsed,
            "how": f"{n} pwrites of 64 KiB at distinct random offsets of a new sparse "
            f"file in {directory}"}


def measure_limits(directory: str, size: int, memcpy_size: int) -> dict[str, Any]:
    return {
        "memcpy": memcpy_bandwidth(memcpy_size),
        "page_cache_write": page_cache_write(directory, size),
        "page_cache_write_from_shm": page_cache_write_from_shm(directory, size),
        "sparse_random_64k": sparse_random_writes(directory, size),
    }


def _create_scratch(path: str) -> int:
    """A new scratch file of ours at ``path``: whatever is there (a stale file, or a
    symlink someone planted in a shared ``--target-dir``) is unlinked, never followed,
    and the file is created exclusively, 0600."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
