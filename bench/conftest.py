"""Fixtures of the micro-benchmarks: a unique name prefix, a device, targets, nbdkit.

Run with ``.venv/bin/pytest bench -p no:cacheprovider --benchmark-only`` (pyproject's
``testpaths`` is ``tests/``, so bench/ runs only when named). Everything the benchmarks
create carries a per-session prefix; the session fails if any of it is left in /dev/shm.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shmblock.device import Device, Geometry
from shmblock.names import RunNames

DEVICE_SIZE = 256 << 20
SHM = Path("/dev/shm")


@pytest.fixture(scope="session")
def prefix() -> Iterator[str]:
    """A per-session SHMBLOCK_PREFIX; nothing with it may be left in /dev/shm."""
    value = f"sbb{uuid.uuid4().hex[:10]}"
    old = os.environ.get("SHMBLOCK_PREFIX")
    os.environ["SHMBLOCK_PREFIX"] = value
    yield value
    if old is None:
        del os.environ["SHMBLOCK_PREFIX"]
    else:
        os.environ["SHMBLOCK_PREFIX"] = old
    leaked = [p.name for p in SHM.iterdir() if p.name.startswith(value)]
    assert not leaked, f"the benchmarks left shared memory behind: {leaked}"


@pytest.fixture(scope="session")
def device(prefix: str) -> Iterator[Device]:
    """A 256 MiB pre-faulted device, half random data (even MiBs), half zeros."""
    names = RunNames.new()
    dev = Device.create(names.meta("bench"), names.data("bench"),
                        Geometry(DEVICE_SIZE, max_writers=2), names.run_id)
    try:
        rng = np.random.default_rng(0)
        mib = 1 << 20
        for off in range(0, DEVICE_SIZE, 2 * mib):
            dev.data[off : off + mib] = np.frombuffer(rng.bytes(mib), dtype=np.uint8)
        dev.allocated[:] = 1
        yield dev
    finally:
        dev.close()
        dev.unlink()


@pytest.fixture(scope="session")
def shm_dir() -> Iterator[str]:
    """A scratch directory in /dev/shm (tmpfs), where the scenario benchmark writes too."""
    path = tempfile.mkdtemp(prefix="shmblock-micro-", dir=str(SHM))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def nbdkit_uri(shm_dir: str) -> Iterator[str]:
    """``nbdkit memory 4G`` on a Unix socket in a temporary directory."""
    binary = shutil.which("nbdkit")
    if binary is None:
        pytest.skip("nbdkit is not installed (Debian: nbdkit)")
    sock_dir = tempfile.mkdtemp(prefix="shmblock-nbd-")
    sock = os.path.join(sock_dir, "nbd.sock")
    proc = subprocess.Popen([binary, "-f", "--exit-with-parent", "-U", sock, "memory", "4G"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nbdkit did not start (exit {proc.poll()})")
            time.sleep(0.01)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(sock_dir, ignore_errors=True)
