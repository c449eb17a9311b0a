"""NBD over QMP: nbd-server-start/stop, block-export-add/del, query-block-exports, a
live export written by ``qemu-io`` during a backup, and fleecing set up the two ways
QEMU's users do (a temporary qcow2 node + ``blockdev-backup sync=none``; a
copy-before-write filter + snapshot-access), pulled with ``qemu-img convert`` and
``nbdcopy`` while a guest keeps writing."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.qmp_helpers import (
    MiB,
    all_events,
    connect,
    error_of,
    ex,
    next_event,
    running_server,
)
from tests.test_qmp import add_device, add_target, assert_compare, fill, snapshot_of

TOOLS = ("qemu-img", "qemu-io", "nbdcopy")
pytestmark = [pytest.mark.external,
              pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                 reason=f"needs {', '.join(TOOLS)}")]


def tool(*args: str | Path) -> None:
    proc = subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=120,
                          check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"


def uri(d: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={d / 'nbd.sock'}"


def test_live_export_written_by_qemu_io_during_a_backup() -> None:
    with running_server() as (server, d):
        async def scenario() -> None:
            c, events = await connect(d / "qmp.sock")
            await add_device(c, "dev0")
            fill(server, "dev0", 1, range(0, 64, 2))
            ref = snapshot_of(server, "dev0", d / "ref.raw")
            target = await add_target(c, d, "t0")
            await ex(c, "nbd-server-start", {"addr": {"type": "unix",
                                                      "data": {"path": str(d / "nbd.sock")}}})
            assert await error_of(c, "nbd-server-start", {"addr": {
                "type": "unix", "data": {"path": str(d / "other.sock")}}}) == (
                "GenericError", "NBD server already running")
            await ex(c, "block-export-add", {"type": "nbd", "id": "live", "node-name": "dev0",
                                             "name": "dev0", "writable": True})
            assert await ex(c, "query-block-exports") == [
                {"id": "live", "type": "nbd", "node-name": "dev0", "shutting-down": False}]
            await ex(c, "blockdev-backup", {"job-id": "j0", "device": "dev0", "target": "t0",
                                            "sync": "full", "speed": 256 * 1024})
            # The guest (qemu-io over NBD) overwrites everything while the job copies.
            await asyncio.to_thread(tool, "qemu-io", "-f", "raw", "-c",
                                    f"write -P 0x5a 0 {4 * MiB}", uri(d, "dev0"))
            await ex(c, "block-job-set-speed", {"device": "j0", "speed": 0})
            done = await next_event(events, "BLOCK_JOB_COMPLETED", device="j0")
            assert "error" not in done["data"]
            assert_compare(ref, target)
            assert server.engine is not None
            assert server.engine.devices["dev0"].read(0, 4) == b"\x5a" * 4
            await ex(c, "block-export-del", {"id": "live"})
            ev = await next_event(events, "BLOCK_EXPORT_DELETED")
            assert ev["data"] == {"id": "live"}
            assert await ex(c, "query-block-exports") == []
            await ex(c, "nbd-server-stop")
            assert await error_of(c, "nbd-server-stop") == ("GenericError",
                                                             "NBD server not running")
            await c.disconnect()

        asyncio.run(scenario())


def test_fleecing_with_a_temporary_node_and_with_copy_before_write() -> None:
    with running_server() as (server, d):
        async def scenario() -> None:
            c, events = await connect(d / "qmp.sock")
            await add_device(c, "dev0")
            await ex(c, "nbd-server-start", {"addr": {"type": "unix",
                                                      "data": {"path": str(d / "nbd.sock")}}})
            # (1) QEMU's classic image fleecing: a qcow2 temp node backed by the device.
            fill(server, "dev0", 1, range(64))
            ref1 = snapshot_of(server, "dev0", d / "ref1.raw")
            tool("qemu-img", "create", "-q", "-f", "qcow2", d / "temp1.qcow2", str(4 * MiB))
            await ex(c, "blockdev-add", {"driver": "file", "node-name": "temp1-file",
                                         "filename": str(d / "temp1.qcow2")})
            await ex(c, "blockdev-add", {"driver": "qcow2", "node-name": "temp1",
                                         "file": "temp1-file", "backing": "dev0"})
            _, desc = await error_of(c, "blockdev-backup", {
                "job-id": "x", "device": "dev0", "target": "temp1", "sync": "full"})
            assert "only sync=none" in desc
            await ex(c, "blockdev-backup", {"job-id": "fleece", "device": "dev0",
                                            "target": "temp1", "sync": "none"})
            await ex(c, "block-export-add", {"type": "nbd", "id": "e1", "node-name": "temp1",
                                             "name": "snap1"})
            fill(server, "dev0", 2, range(0, 64, 3))  # the guest writes on
            await asyncio.to_thread(tool, "qemu-img", "convert", "-f", "raw", "-O", "raw",
                                    uri(d, "snap1"), d / "pulled1.raw")
            assert_compare(ref1, d / "pulled1.raw", "raw")
            await ex(c, "block-export-del", {"id": "e1"})
            await next_event(events, "BLOCK_EXPORT_DELETED", id="e1")
            await ex(c, "job-cancel", {"id": "fleece"})
            await all_events(events, "BLOCK_JOB_CANCELLED", {"fleece"})
            await ex(c, "blockdev-del", {"node-name": "temp1"})
            await ex(c, "blockdev-del", {"node-name": "temp1-file"})

            # (2) QEMU >= 7: copy-before-write filter + snapshot-access, exported.
            ref2 = snapshot_of(server, "dev0", d / "ref2.raw")
            tool("qemu-img", "create", "-q", "-f", "qcow2", d / "temp2.qcow2", str(4 * MiB))
            await ex(c, "blockdev-add", {"driver": "file", "node-name": "temp2-file",
                                         "filename": str(d / "temp2.qcow2")})
            await ex(c, "blockdev-add", {"driver": "qcow2", "node-name": "temp2",
                                         "file": "temp2-file"})
            await ex(c, "blockdev-add", {"driver": "copy-before-write", "node-name": "cbw",
                                         "file": "dev0", "target": "temp2",
                                         "on-cbw-error": "break-snapshot",
                                         "cbw-timeout": 30})
            await ex(c, "blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                         "file": "cbw"})
            assert await ex(c, "query-jobs") == []  # the filter's job is internal
            await ex(c, "block-export-add", {"type": "nbd", "id": "e2", "node-name": "acc",
                                             "name": "snap2"})
            fill(server, "dev0", 3, range(64))
            await asyncio.to_thread(tool, "nbdcopy", uri(d, "snap2"), d / "pulled2.raw")
            assert_compare(ref2, d / "pulled2.raw", "raw")
            await ex(c, "block-export-del", {"id": "e2"})
            await next_event(events, "BLOCK_EXPORT_DELETED", id="e2")
            _, desc = await error_of(c, "blockdev-del", {"node-name": "cbw"})
            assert "busy" in desc and "acc" in desc
            await ex(c, "blockdev-del", {"node-name": "acc"})
            await ex(c, "blockdev-del", {"node-name": "cbw"})  # ends the internal job
            assert server.engine is not None
            assert all(j.tracker.concluded for j in server.engine.jobs.values())
            await c.disconnect()

        asyncio.run(scenario())


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-nbd")
def test_backup_to_an_nbd_target_node_over_unix_and_tcp() -> None:
    from tests.nbd_servers import ServerGroup

    with running_server() as (server, d), ServerGroup(d) as group:
        async def scenario() -> None:
            c, events = await connect(d / "qmp.sock")
            await add_device(c, "dev0")
            fill(server, "dev0", 9, range(0, 64, 2))
            ref = snapshot_of(server, "dev0", d / "ref.raw")
            images = []
            for i, host in enumerate((None, "127.0.0.1")):
                image = d / f"nbd{i}.raw"
                image.write_bytes(b"")
                os.truncate(image, 4 * MiB)
                images.append(image)
                srv = group.qemu_nbd(image, export="e", host=host)
                address = {"type": "unix", "path": str(srv.socket_path)} if host is None else \
                    {"type": "inet", "host": host, "port": str(srv.port)}
                await ex(c, "blockdev-add", {"driver": "nbd", "node-name": f"n{i}",
                                             "server": address, "export": "e"})
                await ex(c, "blockdev-backup", {"job-id": f"j{i}", "device": "dev0",
                                                "target": f"n{i}", "sync": "full"})
                done = await next_event(events, "BLOCK_JOB_COMPLETED", device=f"j{i}")
                assert "error" not in done["data"], done["data"]
            await c.disconnect()
            for image in images:
                assert_compare(ref, image, "raw")

        asyncio.run(scenario())
