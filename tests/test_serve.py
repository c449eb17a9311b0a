"""``shmblock-run serve`` as a process: starts with one command, stops cleanly on SIGTERM
and Ctrl-C (jobs cancelled, shared memory and queues unlinked, sockets removed), bad
usage is exit code 2, ``qmp-shell`` (from qemu.qmp) drives it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import kill_tree, run_cli, start_cli, wait_until
from tests.qmp_helpers import MiB, connect, ex, short_dir

QEMU_IMG = shutil.which("qemu-img")
QMP_SHELL = Path(sys.executable).parent / "qmp-shell"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as d:
        yield d


def start_serve(d: Path, *extra: str) -> subprocess.Popen[str]:
    proc = start_cli("serve", "--qmp", d / "qmp.sock", "--json", *extra)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once listening
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        kill_tree(proc)
        pytest.fail(f"serve did not start: {err}")
    ready = json.loads(line)
    assert ready["qmp"] == str(d / "qmp.sock") and ready["pid"] == proc.pid
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.skipif(QEMU_IMG is None, reason="needs qemu-img")
def test_signal_stops_serve_cleanly_mid_backup(sock_dir: Path, sig: signal.Signals,
                                               shm_prefix: str) -> None:
    d = sock_dir
    proc = start_serve(d, "--nbd", str(d / "nbd.sock"))
    try:
        assert (os.stat(d / "qmp.sock").st_mode & 0o777) == 0o600
        assert (d / "nbd.sock").exists()
        target = d / "t.qcow2"
        subprocess.run([str(QEMU_IMG), "create", "-q", "-f", "qcow2", str(target), "8M"],
                       check=True, timeout=60)

        async def scenario() -> None:
            c, _ = await connect(d / "qmp.sock")
            await ex(c, "blockdev-add", {"driver": "shmblock", "node-name": "dev0",
                                         "size": 8 * MiB})
            await ex(c, "blockdev-add", {"driver": "file", "node-name": "f",
                                         "filename": str(target)})
            await ex(c, "blockdev-add", {"driver": "qcow2", "node-name": "t", "file": "f"})
            await ex(c, "blockdev-backup", {"job-id": "j", "device": "dev0", "target": "t",
                                            "sync": "full", "speed": 64 * 1024})
            [job] = await ex(c, "query-jobs")
            assert job["status"] == "running"
            await c.disconnect()

        asyncio.run(scenario())
        assert any(p.name.startswith(shm_prefix) for p in Path("/dev/shm").iterdir())
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert not (d / "qmp.sock").exists() and not (d / "nbd.sock").exists()
        assert not (d / "t.qcow2.part").exists()
        assert sorted(p.name for p in d.iterdir()) == ["t.qcow2"]  # nothing else left
        assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith(shm_prefix)]
    finally:
        kill_tree(proc)


def test_bad_usage_is_exit_code_2(sock_dir: Path) -> None:
    assert run_cli("serve").returncode == 2
    proc = run_cli("serve", "--qmp", sock_dir / "q.sock", "--qmp-tcp", "0.0.0.0:4444")
    assert proc.returncode == 2 and "loopback" in proc.stderr
    proc = run_cli("serve", "--qmp", sock_dir / "no" / "dir" / "q.sock")
    assert proc.returncode == 2 and "cannot listen" in proc.stderr
    (sock_dir / "file").write_text("x")
    proc = run_cli("serve", "--qmp", sock_dir / "file")
    assert proc.returncode == 2 and "not a socket" in proc.stderr
    assert (sock_dir / "file").read_text() == "x"


def test_qmp_shell_drives_serve(sock_dir: Path) -> None:
    if not QMP_SHELL.exists():
        pytest.skip("qmp-shell is not installed beside this Python")
    proc = start_serve(sock_dir)
    try:
        script = ("blockdev-add driver=shmblock node-name=dev0 size=1048576\n"
                  "block-dirty-bitmap-add node=dev0 name=b0\n"
                  "query-named-block-nodes\n")
        shell = subprocess.run([str(QMP_SHELL), str(sock_dir / "qmp.sock")], input=script,
                               capture_output=True, text=True, timeout=60, check=False)
        assert shell.returncode == 0, shell.stderr
        replies = [json.loads(line.split(" ", 1)[1]) for line in shell.stdout.splitlines()
                   if line.startswith("(QEMU) {")]
        assert replies[:2] == [{"return": {}}, {"return": {}}]
        [node] = replies[2]["return"]
        assert node["node-name"] == "dev0" and node["dirty-bitmaps"][0]["name"] == "b0"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        kill_tree(proc)
    assert proc.returncode == 0
    wait_until(lambda: not (sock_dir / "qmp.sock").exists(), 10, what="the socket removed")

