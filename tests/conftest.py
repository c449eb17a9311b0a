"""Fixtures shared by every test: a unique name prefix per test, and the leak check.

Every test runs with its own ``SHMBLOCK_PREFIX`` and ``SHMBLOCK_RUN_DIR``, so whatever a
test creates is recognisable, and afterwards :func:`no_leaks` asserts that nothing with
that prefix is left in /dev/shm — nor among the POSIX message queues, which can only be
listed through an mqueue file system: the session mounts one when it may (root), and
otherwise the check falls back to the run registry.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# The real single-node Ceph (session-scoped, started only for tests that ask for it).
from tests.ceph import ceph_cluster, ceph_s3, pytest_terminal_summary, s3_bucket  # noqa: F401

SHM = Path("/dev/shm")


@pytest.fixture(scope="session")
def mqueue_dir() -> Iterator[Path | None]:
    """A mounted mqueue file system to list queues with, or None if we cannot mount one."""
    if Path("/dev/mqueue").is_dir() and os.path.ismount("/dev/mqueue"):
        yield Path("/dev/mqueue")
        return
    mount = Path(tempfile.mkdtemp(prefix="shmblock-mq-"))
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "mqueue", "none", str(mount)],
                                 capture_output=True, check=False).returncode == 0
    try:
        yield mount if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            mount.rmdir()


def leftovers(prefix: str, mqueue: Path | None) -> list[str]:
    """Names with ``prefix`` still present in /dev/shm and the mqueue file system."""
    found = [f"/dev/shm/{p.name}" for p in SHM.iterdir() if p.name.startswith(prefix)]
    if mqueue is not None:
        found += [f"mqueue:{p.name}" for p in mqueue.iterdir() if p.name.startswith(prefix)]
    return found


@pytest.fixture(autouse=True)
def shm_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
               mqueue_dir: Path | None) -> Iterator[str]:
    """Give the test its own prefix and run registry; fail it if anything leaked."""
    prefix = f"sbt{uuid.uuid4().hex[:10]}"
    run_dir = tmp_path / "runs"
    monkeypatch.setenv("SHMBLOCK_PREFIX", prefix)
    monkeypatch.setenv("SHMBLOCK_RUN_DIR", str(run_dir))
    yield prefix
    leaked = leftovers(prefix, mqueue_dir)
    records = sorted(p.name for p in run_dir.glob("*.json")) if run_dir.is_dir() else []
    # Clean up before failing, so one leaky test does not exhaust queue memory for all.
    if leaked or records:
        subprocess.run([sys.executable, "-c",
                        "from shmblock.cleanup import cleanup; cleanup()"],
                       env={**os.environ, "SHMBLOCK_PREFIX": prefix,
                            "SHMBLOCK_RUN_DIR": str(run_dir)},
                       capture_output=True, check=False, timeout=60)
    assert not leaked, f"the test left shared objects behind: {leaked}"
    assert not records, f"the test left run records behind: {records}"
