"""Helpers for the multi-process tests: waiting, processes, files, the CLI, qemu-img.

Everything here has a bounded wait: a multi-process test that hangs is worse than one
that fails, so every loop takes a timeout and every subprocess call a ``timeout=``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from shmblock import layout as L
from shmblock.engine import BackupJob, DeviceHandle, Engine, WriterProcess
from shmblock.errors import StateError

ROOT = Path(__file__).resolve().parent.parent
SHMBLOCK_RUN = str(Path(sys.executable).parent / "shmblock-run")
QEMU_IMG = shutil.which("qemu-img")

needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None,
                                    reason="qemu-img is not installed (apt install qemu-utils)")

MiB = 1 << 20


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01,
               what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def cmdline(pid: int) -> str:
    """``/proc/PID/cmdline`` as one string ('' if the process is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def children(pid: int) -> list[int]:
    """Pids of the live children of ``pid``."""
    try:
        return [c.pid for c in psutil.Process(pid).children() if not pid_gone(c.pid)]
    except psutil.NoSuchProcess:
        return []


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block; always SIGCONT it afterwards (if still there)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def read_image(path: str | Path) -> np.ndarray:
    """A raw image as a numpy uint8 array."""
    return np.fromfile(str(path), dtype=np.uint8)


def assert_same_image(expected: str | Path, actual: str | Path) -> None:
    """Byte-for-byte equality of two raw images, naming the first differing cluster."""
    a, b = read_image(expected), read_image(actual)
    assert a.size == b.size, f"{actual} has {b.size} bytes, expected {a.size}"
    diff = np.flatnonzero(a != b)
    if diff.size:
        first = int(diff[0])
        pytest.fail(f"{actual} differs from {expected} in {diff.size} bytes; first at "
                    f"offset {first} (64K cluster {first >> 16})")


def qemu_img(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG is not None
    proc = subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)
    if ok:
        assert proc.returncode == 0, f"qemu-img {args}: {proc.stdout}{proc.stderr}"
    return proc


def qcow2_as_raw(image: str | Path, out: str | Path) -> Path:
    """``qemu-img check`` the image (must be clean), then convert it to raw at ``out``."""
    qemu_img("check", image)
    qemu_img("convert", "-f", "qcow2", "-O", "raw", image, out)
    return Path(out)


def run_cli(*args: str | Path, cwd: str | Path | None = None, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``shmblock-run ARGS`` to completion (stdin closed, output captured)."""
    return subprocess.run([SHMBLOCK_RUN, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL, env=env)


def start_cli(*args: str | Path, cwd: str | Path | None = None) -> subprocess.Popen[str]:
    """Start ``shmblock-run ARGS`` in the background (output to pipes)."""
    return subprocess.Popen([SHMBLOCK_RUN, *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """Best effort: SIGKILL a process we started and its children (for finally blocks)."""
    pids = children(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=10)


def unthrottle(job: BackupJob) -> None:
    """Let the background copy run at full speed (a job that just concluded is fine)."""
    with contextlib.suppress(StateError):
        job.set_speed(0)


def wait_for_cbw(job: BackupJob, clusters: int, timeout: float = 30.0) -> None:
    """Wait until the job has saved ``clusters`` clusters by copy-before-write (or ended)."""
    ctl = job.device.device.ctl
    wait_until(lambda: int(ctl[L.CTL_CBW_CLUSTERS]) >= clusters or job.tracker.concluded,
               timeout, what=f"{clusters} copy-before-write saves")


def start_writer_stopping_in_write(engine: Engine, dev: DeviceHandle, nth: int,
                                   monkeypatch: pytest.MonkeyPatch, **kwargs: Any
                                   ) -> WriterProcess:
    """Start one writer that stops itself (SIGSTOP) inside its ``nth`` write, after it
    published "in a write" (workers.guest's test hook); returns once it is stopped
    there. The caller continues it (SIGCONT)."""
    from workers.guest import STOP_IN_WRITE_ENV

    with monkeypatch.context() as m:
        m.setenv(STOP_IN_WRITE_ENV, str(nth))
        (writer,) = engine.start_writers(dev, 1, **kwargs)
    wait_until(lambda: psutil.Process(writer.pid).status() == psutil.STATUS_STOPPED, 60.0,
               what=f"writer {writer.ident} to stop in write {nth}")
    assert int(dev.device.in_write[writer.ident, 0]) == writer.pid, "not in a write"
    return writer
