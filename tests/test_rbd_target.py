"""Ceph RBD as a backup target and restore source, today: qemu-nbd in front of an image.

Nothing in shmblock knows about RBD: QEMU's ``rbd:`` block driver (Debian's
``qemu-block-extra``) opens the image in the session's real Ceph cluster
(tests/ceph.py), ``qemu-nbd`` exports it on a Unix socket, and shmblock's NBD client
writes the backup into it and reads it back for a restore. Judged around shmblock:
``qemu-img compare`` reading the image through librbd, and ``rbd export``.

The image starts full of random bytes, so a backup that skipped zero clusters would show.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ceph import CephCluster
from tests.nbd_servers import ServerProcess
from tests.procs import run_cli

pytestmark = pytest.mark.ceph

MiB = 1 << 20
SIZE = 32 * MiB


def rbd_spec(cluster: CephCluster, image: str) -> str:
    """QEMU's ``rbd:`` file name: pool/image plus where the cluster is (its ceph.conf
    names the monitor; ``auth_supported=none`` matches the cluster's ``auth none``)."""
    return f"rbd:{image}:auth_supported=none:conf={cluster.conf}"


@pytest.fixture
def rbd_image(ceph_cluster: CephCluster, tmp_path: Path) -> Iterator[str]:
    """``pool/image`` of a fresh 32 MiB RBD image full of random bytes; removed after."""
    if shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None:
        pytest.skip("qemu-nbd/qemu-img are not installed (apt install qemu-utils)")
    if not Path("/usr/lib/x86_64-linux-gnu/qemu/block-rbd.so").exists():
        pytest.skip("QEMU's rbd driver is not installed (apt install qemu-block-extra)")
    pool = ceph_cluster.ensure_rbd_pool()
    image = f"{pool}/sbt-{uuid.uuid4().hex[:12]}"
    garbage = tmp_path / "garbage.raw"
    garbage.write_bytes(os.urandom(SIZE))
    ceph_cluster.rbd("import", str(garbage), image)
    garbage.unlink()
    try:
        yield image
    finally:
        ceph_cluster.rbd("snap", "purge", "--no-progress", image)
        ceph_cluster.rbd("rm", "--no-progress", image)


def qemu_nbd_rbd(cluster: CephCluster, image: str, tmp_path: Path, *,
                 readonly: bool = False) -> ServerProcess:
    """``qemu-nbd`` exporting the RBD image on a Unix socket until stopped."""
    sock = tmp_path / f"rbd-{uuid.uuid4().hex[:6]}.sock"
    argv = ["qemu-nbd", "--persistent", "--shared=4", "-f", "raw", "--cache=writeback",
            "-k", str(sock), *(["--read-only"] if readonly else []),
            rbd_spec(cluster, image)]
    log = tmp_path / f"{sock.stem}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = ServerProcess("qemu-nbd", argv, f"nbd+unix:///?socket={sock}", log, proc, sock)
    try:
        server.wait_ready(timeout=120)      # librbd connects to the monitor first
    except BaseException:
        server.stop()
        raise
    return server


def qemu_img_compare(a: str, b: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                          capture_output=True, text=True, timeout=300, check=False)


def test_rbd_behind_qemu_nbd_is_a_backup_target_and_restore_source(
        ceph_cluster: CephCluster, rbd_image: str, tmp_path: Path) -> None:
    reference, summary = tmp_path / "ref.raw", tmp_path / "run.json"
    server = qemu_nbd_rbd(ceph_cluster, rbd_image, tmp_path)
    try:
        proc = run_cli("run", "--size", "32M", "--prefill", "0.5", "--writers", "2",
                       "--workload", "random", "--duration", "2.5", "--backup-at", "0.5",
                       "--target", server.uri, "--format", "nbd",
                       "--reference-image", reference, "--json", summary, timeout=300)
    finally:
        server.stop()                                   # flushes librbd's cache
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    backup = json.loads(summary.read_text())["backup"]
    assert backup["outcome"] == "completed" and backup["verified"] is True, backup

    # Read around shmblock: QEMU through librbd, and Ceph's own rbd tool.
    same = qemu_img_compare(str(reference), rbd_spec(ceph_cluster, rbd_image))
    assert same.returncode == 0, same.stdout + same.stderr
    exported = tmp_path / "exported.raw"
    ceph_cluster.rbd("export", "--no-progress", rbd_image, str(exported))
    assert exported.read_bytes() == reference.read_bytes()
    exported.unlink()

    # And back: an RBD snapshot of it (what later backups cannot change), exported
    # read-only, is the source of a restore. The image itself changes meanwhile.
    ceph_cluster.rbd("snap", "create", f"{rbd_image}@backup1")
    ceph_cluster.rbd("bench", "--io-type", "write", "--io-size", "64K", "--io-total", "4M",
                     "--io-pattern", "rand", rbd_image)
    changed = qemu_img_compare(str(reference), rbd_spec(ceph_cluster, rbd_image))
    assert changed.returncode == 1, changed.stdout + changed.stderr
    server = qemu_nbd_rbd(ceph_cluster, f"{rbd_image}@backup1", tmp_path, readonly=True)
    try:
        restored = tmp_path / "restored.raw"
        proc = run_cli("restore", server.uri, restored, "--json", timeout=300)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verified"] is True, proc.stdout
    same = qemu_img_compare(str(reference), str(restored))
    assert same.returncode == 0, same.stdout + same.stderr
