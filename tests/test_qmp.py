"""`shmblock.serve.Server` driven by the PyPI ``qemu.qmp`` library, QEMU's own client:
every command, the job events, errors before side effects, several clients, a client
that vanishes mid-command. Backups are judged with ``qemu-img compare`` against the
device's contents at the instant of the snapshot (written before, overwritten during)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from shmblock.serve import Server
from tests.helpers import pattern
from tests.qmp_helpers import (
    MiB,
    all_events,
    connect,
    error_of,
    ex,
    next_event,
    raw_client,
    read_line,
    running_server,
    short_dir,
    statuses,
)

QEMU_IMG = shutil.which("qemu-img")
pytestmark = pytest.mark.skipif(QEMU_IMG is None, reason="needs qemu-img")
CLUSTER = 65536


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG is not None
    return subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


def create_image(path: Path, size: int, fmt: str = "qcow2", backing: Path | None = None) -> None:
    args: list[str | Path] = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", backing, "-F", "qcow2"]
    proc = qemu_img(*args, path, str(size))
    assert proc.returncode == 0, proc.stderr


def assert_compare(reference: Path, image: Path, fmt: str = "qcow2") -> None:
    proc = qemu_img("compare", "-f", "raw", "-F", fmt, reference, image)
    assert proc.returncode == 0, f"qemu-img compare: {proc.stdout}{proc.stderr}"


def snapshot_of(server: Server, node: str, path: Path) -> Path:
    assert server.engine is not None
    dev = server.engine.devices[node]
    path.write_bytes(dev.read(0, dev.size))
    return path


def fill(server: Server, node: str, seed: int, clusters: range) -> None:
    assert server.engine is not None
    dev = server.engine.devices[node]
    for c in clusters:
        dev.write(c * CLUSTER, pattern(CLUSTER, seed * 100_000 + c))


async def add_device(c: QMPClient, name: str, size: int = 4 * MiB) -> None:
    await ex(c, "blockdev-add", {"driver": "shmblock", "node-name": name, "size": size,
                                     "cluster-size": CLUSTER})


async def add_target(c: QMPClient, d: Path, name: str, size: int = 4 * MiB,
                     fmt: str = "qcow2", backing: Path | None = None) -> Path:
    path = d / f"{name}.{fmt}"
    create_image(path, size, fmt, backing)
    await ex(c, "blockdev-add", {"driver": "file", "node-name": f"{name}-file",
                                     "filename": str(path)})
    await ex(c, "blockdev-add", {"driver": fmt, "node-name": name,
                                     "file": f"{name}-file"})
    return path


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- a full backup, with guest writes during it ------------------------------------------------


def test_full_backup_with_writes_during_it_and_qemus_events() -> None:
    with running_server() as (server, d):
        async def scenario() -> None:
            c, events = await connect(d / "qmp.sock")
            await add_device(c, "dev0")
            fill(server, "dev0", 1, range(0, 64, 2))
            ref = snapshot_of(server, "dev0", d / "ref.raw")
            target = await add_target(c, d, "t0")
            # Slow, so the guest writes below land while the job copies.
            await ex(c, "blockdev-backup", {"job-id": "j0", "device": "dev0",
                                                "target": "t0", "sync": "full",
                                                "speed": 256 * 1024})
            fill(server, "dev0", 2, range(0, 64))
            jobs = await ex(c, "query-jobs")
            assert isinstance(jobs, list) and jobs[0]["id"] == "j0"
            assert jobs[0]["type"] == "backup" and jobs[0]["total-progress"] == 4 * MiB
            await ex(c, "block-job-set-speed", {"device": "j0", "speed": 0})
            done = await next_event(events, "BLOCK_JOB_COMPLETED", device="j0")
            assert done["data"] == {"type": "backup", "device": "j0", "len": 4 * MiB,
                                    "offset": 4 * MiB, "speed": 0}
            assert set(done["timestamp"]) == {"seconds", "microseconds"}
            assert await ex(c, "query-jobs") == []  # auto-dismiss, as QEMU
            await c.disconnect()
            assert_compare(ref, target)

        run(scenario())


def test_job_status_changes_in_qemus_order() -> None:
    with running_server() as (server, d):
        async def scenario() -> None:
            c, events = await connect(d / "qmp.sock")
            await add_device(c, "dev0")
            fill(server, "dev0", 10, range(0, 64, 7))
            ref = snapshot_of(server, "dev0", d / "ref.raw")
            # A protocol node as the target, as QEMU allows: the raw bytes.
            create_image(d / "t0.raw", 4 * MiB, "raw")
            await ex(c, "blockdev-add", {"driver": "file", "node-name": "t0",
                                         "filename": str(d / "t0.raw")})
            await ex(c, "blockdev-backup", {"job-id": "j0", "device": "dev0",
                                            "target": "t0", "sync": "full"})
            seen = await statuses(events, "j0", "null")
            assert seen == ["created", "running", "waiting", "pending", "concluded", "null"]
            assert_compare(ref, d / "t0.raw", "raw")
            await c.disconnect()

        run(scenario())


# -- incremental with a bitmap -------------------------------------------------------------------


def test_incremental_backup_with_a_bitmap_into_a_qcow2_chain() -> None:
    with running_server() as (server, d):
        async def scenario() -> None:
            c, events = await connect(d / "qmp.sock")
            await add_device(c, "dev0")
            fill(server, "dev0", 1, range(64))
            full = await add_target(c, d, "full")
            # QEMU's recipe: the bitmap is created at the full backup's instant.
            await ex(c, "transaction", {"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "dev0", "name": "b0"}},
                {"type": "blockdev-backup", "data": {"job-id": "full", "device": "dev0",
                                                     "target": "full", "sync": "full"}}]})
            await next_event(events, "BLOCK_JOB_COMPLETED", device="full")
            fill(server, "dev0", 2, range(3, 10))
            nodes = await ex(c, "query-named-block-nodes")
            [dev] = [n for n in nodes if n["node-name"] == "dev0"]
            assert dev["dirty-bitmaps"] == [{"name": "b0", "granularity": CLUSTER,
                                             "count": 7 * CLUSTER, "recording": True,
                                             "busy": False, "persistent": False}]
            ref = snapshot_of(server, "dev0", d / "ref.raw")
            inc = await add_target(c, d, "inc", backing=full)
            await ex(c, "blockdev-backup", {"job-id": "inc", "device": "dev0",
                                                "target": "inc", "sync": "incremental",
                                                "bitmap": "b0"})
            done = await next_event(events, "BLOCK_JOB_COMPLETED", device="inc")
            assert "error" not in done["data"]
            nodes = await ex(c, "query-named-block-nodes")
            [dev] = [n for n in nodes if n["node-name"] == "dev0"]
            assert dev["dirty-bitmaps"][0]["count"] == 0
            await c.disconnect()
            assert_compare(ref, inc)
            info = json.loads(qemu_img("info", "--output=json", inc).stdout)
            assert info["backing-filename"] == str(full)

        run(scenario())


# -- transactions ------------------------------------------------------------------------------


def test_grouped_transaction_cancels_together_individual_completes() -> None:
    with running_server() as (server, d):
        async def scenario() -> None:
            c, events = await connect(d / "qmp.sock")
            for n in ("da", "db"):
                await add_device(c, n)
                fill(server, n, 3, range(0, 64, 3))
            await add_target(c, d, "ta")
            await add_target(c, d, "tb")
            slow = {"sync": "full", "speed": 64 * 1024}
            await ex(c, "transaction", {
                "actions": [
                    {"type": "blockdev-backup", "data": {"job-id": "ga", "device": "da",
                                                         "target": "ta", **slow}},
                    {"type": "blockdev-backup", "data": {"job-id": "gb", "device": "db",
                                                         "target": "tb", **slow}}],
                "properties": {"completion-mode": "grouped"}})
            await ex(c, "job-cancel", {"id": "ga"})
            await all_events(events, "BLOCK_JOB_CANCELLED", {"ga", "gb"})
            # Grouped refuses bitmap actions, as QEMU: before anything starts.
            cls, desc = await error_of(c, "transaction", {
                "actions": [{"type": "block-dirty-bitmap-add",
                             "data": {"node": "da", "name": "x"}}],
                "properties": {"completion-mode": "grouped"}})
            assert cls == "GenericError" and "grouped" in desc
            assert (await ex(c, "query-named-block-nodes"))[0]["dirty-bitmaps"] == []
            refs = [snapshot_of(server, n, d / f"ref-{n}.raw") for n in ("da", "db")]
            await ex(c, "transaction", {"actions": [
                {"type": "blockdev-backup", "data": {"job-id": "ia", "device": "da",
                                                     "target": "ta", "sync": "full"}},
                {"type": "blockdev-backup", "data": {"job-id": "ib", "device": "db",
                                                     "target": "tb", "sync": "full"}}]})
            await all_events(events, "BLOCK_JOB_COMPLETED", {"ia", "ib"})
            await c.disconnect()
            assert_compare(refs[0], d / "ta.qcow2")
            assert_compare(refs[1], d / "tb.qcow2")

        run(scenario())


# -- errors, before any side effect --------------------------------------------------------------


def test_unknown_commands_and_arguments_fail_before_any_side_effect() -> None:
    with running_server() as (server, d):
        async def scenario() -> None:
            c, _ = await connect(d / "qmp.sock")
            assert await error_of(c, "no-such-command") == (
                "CommandNotFound", "The command no-such-command has not been found")
            assert await error_of(c, "blockdev-add", {
                "driver": "shmblock", "node-name": "dev0", "size": MiB, "colour": "red"}) == (
                "GenericError", "Parameter 'colour' is unexpected")
            assert await error_of(c, "blockdev-add", {
                "driver": "shmblock", "node-name": "dev0", "size": "1M"}) == (
                "GenericError", "Invalid parameter type for 'size', expected: integer")
            assert await ex(c, "query-named-block-nodes") == []
            assert server.engine is not None and server.engine.devices == {}
            await add_device(c, "dev0")
            await add_target(c, d, "t0")
            bad = {"job-id": "j", "device": "dev0", "target": "t0", "sync": "full"}
            assert await error_of(c, "blockdev-backup", {**bad, "sync": "most"}) == (
                "GenericError", "Parameter 'sync' does not accept value 'most'")
            assert await error_of(c, "blockdev-backup", {**bad, "job-id": "_x"}) == (
                "GenericError", "Invalid job ID '_x'")
            assert await error_of(c, "blockdev-backup", {**bad, "device": "nope"}) == (
                "GenericError", "Cannot find device='nope' nor node-name='nope'")
            assert (await error_of(c, "blockdev-backup", {**bad, "sync": "incremental"}))[
                1].startswith("sync=incremental needs a bitmap")
            assert await error_of(c, "transaction", {"actions": [
                {"type": "blockdev-backup", "data": bad},
                {"type": "blockdev-backup", "data": {**bad, "job-id": "k", "x": 1}}]}) == (
                "GenericError", "Parameter 'actions[1].data.x' is unexpected")
            assert await error_of(c, "transaction", {"actions": [
                {"type": "blockdev-backup", "data": bad},
                {"type": "block-dirty-bitmap-remove", "data": {"node": "dev0",
                                                               "name": "nope"}}]}) == (
                "GenericError", "Dirty bitmap 'nope' not found")
            assert await ex(c, "query-jobs") == []
            assert server.engine.jobs == {}
            assert await error_of(c, "job-pause", {"id": "nope"}) == (
                "GenericError", "Job not found")
            assert await error_of(c, "block-job-pause", {"device": "nope"}) == (
                "DeviceNotActive", "No active block job on device 'nope'")
            assert await error_of(c, "blockdev-add", {"driver": "shmblock",
                                                      "node-name": "dev0", "size": MiB}) == (
                "GenericError", "Duplicate nodes with node-name='dev0'")
            assert (await error_of(c, "blockdev-add", {"driver": "file", "node-name": "f",
                                                       "filename": str(d / "none")}))[1] \
                .startswith(f"Could not open '{d / 'none'}'")
            assert await error_of(c, "block-export-add", {
                "type": "nbd", "id": "e", "node-name": "dev0", "writable": True}) == (
                "GenericError", "NBD server not running")
            assert await error_of(c, "nbd-server-start", {"addr": {
                "type": "inet", "data": {"host": "127.0.0.1", "port": "1"}},
                "tls-creds": "x"}) == (
                "GenericError", "TLS is not supported by shmblock's NBD server")
            assert await error_of(c, "blockdev-del", {"node-name": "t0-file"}) == (
                "GenericError", "Node 't0-file' is busy: node is used as child of 't0'")
            await c.disconnect()

        run(scenario())


# -- job verbs -----------------------------------------------------------------------------------


def test_job_verbs_and_block_job_verbs() -> None:
    with running_server() as (server, d):
        async def scenario() -> None:
            c, events = await connect(d / "qmp.sock")
            await add_device(c, "dev0")
            await add_device(c, "dev1")
            fill(server, "dev0", 4, range(0, 64, 4))
            ref = snapshot_of(server, "dev0", d / "ref.raw")
            target = await add_target(c, d, "t0")
            await add_target(c, d, "t1")
            await ex(c, "blockdev-backup", {
                "job-id": "j0", "device": "dev0", "target": "t0", "sync": "full",
                "speed": 64 * 1024, "auto-finalize": False, "auto-dismiss": False,
                "on-source-error": "stop", "on-target-error": "report"})
            await ex(c, "job-pause", {"id": "j0"})
            await next_event(events, "JOB_STATUS_CHANGE", id="j0", status="paused")
            [info] = await ex(c, "query-block-jobs")
            assert info["device"] == "j0" and info["paused"] is True
            assert info["status"] == "paused" and info["auto-finalize"] is False
            assert info["io-status"] == "ok" and info["ready"] is False
            assert info["type"] == "backup" and info["len"] == 4 * MiB
            cls, desc = await error_of(c, "job-complete", {"id": "j0"})
            assert cls == "GenericError" and "cannot accept command verb 'complete'" in desc
            await ex(c, "job-resume", {"id": "j0"})
            await ex(c, "block-job-set-speed", {"device": "j0", "speed": 0})
            await next_event(events, "BLOCK_JOB_PENDING", id="j0")
            [job] = await ex(c, "query-jobs")
            assert job["status"] == "pending"
            await ex(c, "job-finalize", {"id": "j0"})
            await next_event(events, "BLOCK_JOB_COMPLETED", device="j0")
            await next_event(events, "JOB_STATUS_CHANGE", id="j0", status="concluded")
            await ex(c, "job-dismiss", {"id": "j0"})
            assert await ex(c, "query-jobs") == []
            assert_compare(ref, target)
            # The block-job-* forms.
            await ex(c, "blockdev-backup", {
                "job-id": "j1", "device": "dev1", "target": "t1", "sync": "full",
                "speed": 64 * 1024, "auto-dismiss": False})
            await ex(c, "block-job-pause", {"device": "j1"})
            await next_event(events, "JOB_STATUS_CHANGE", id="j1", status="paused")
            await ex(c, "block-job-resume", {"device": "j1"})
            cls, _ = await error_of(c, "block-job-complete", {"device": "j1"})
            assert cls == "GenericError"
            await ex(c, "block-job-cancel", {"device": "j1", "force": True})
            await next_event(events, "BLOCK_JOB_CANCELLED", device="j1")
            await next_event(events, "JOB_STATUS_CHANGE", id="j1", status="concluded")
            await ex(c, "block-job-dismiss", {"id": "j1"})
            # A dismissed job's id can be used again, as in QEMU.
            await ex(c, "blockdev-backup", {
                "job-id": "j1", "device": "dev1", "target": "t1", "sync": "full",
                "auto-finalize": False})
            await next_event(events, "BLOCK_JOB_PENDING", id="j1")
            await ex(c, "block-job-finalize", {"id": "j1"})
            await next_event(events, "BLOCK_JOB_COMPLETED", device="j1")
            await c.disconnect()

        run(scenario())


# -- bitmaps and queries -------------------------------------------------------------------------


def test_bitmap_commands_and_node_queries() -> None:
    with running_server() as (server, d):
        async def scenario() -> None:
            c, _ = await connect(d / "qmp.sock")
            await add_device(c, "dev0")

            async def bitmaps() -> dict[str, dict[str, Any]]:
                nodes = await ex(c, "query-named-block-nodes")
                [dev] = [n for n in nodes if n["node-name"] == "dev0"]
                return {b["name"]: b for b in dev["dirty-bitmaps"]}

            await ex(c, "block-dirty-bitmap-add", {"node": "dev0", "name": "b0",
                                                       "granularity": CLUSTER})
            await ex(c, "block-dirty-bitmap-add", {"node": "dev0", "name": "b1",
                                                       "disabled": True})
            fill(server, "dev0", 5, range(2))
            b = await bitmaps()
            assert b["b0"]["count"] == 2 * CLUSTER and b["b0"]["recording"] is True
            assert b["b1"]["count"] == 0 and b["b1"]["recording"] is False
            await ex(c, "block-dirty-bitmap-enable", {"node": "dev0", "name": "b1"})
            await ex(c, "block-dirty-bitmap-disable", {"node": "dev0", "name": "b0"})
            fill(server, "dev0", 6, range(10, 11))
            b = await bitmaps()
            assert (b["b0"]["count"], b["b1"]["count"]) == (2 * CLUSTER, CLUSTER)
            await ex(c, "block-dirty-bitmap-merge", {"node": "dev0", "target": "b1",
                                                         "bitmaps": ["b0"]})
            assert (await bitmaps())["b1"]["count"] == 3 * CLUSTER
            await ex(c, "block-dirty-bitmap-clear", {"node": "dev0", "name": "b1"})
            assert (await bitmaps())["b1"]["count"] == 0
            await ex(c, "block-dirty-bitmap-remove", {"node": "dev0", "name": "b1"})
            assert list(await bitmaps()) == ["b0"]
            assert await error_of(c, "block-dirty-bitmap-add",
                                  {"node": "dev0", "name": "b0"}) == (
                "GenericError", "Bitmap already exists: b0")
            assert await error_of(c, "block-dirty-bitmap-clear",
                                  {"node": "nope", "name": "b0"}) == (
                "GenericError", "Node 'nope' not found")
            version = await ex(c, "query-version")
            assert version["qemu"]["major"] >= 7 and "shmblock" in version["package"]
            names = {x["name"] for x in await ex(c, "query-commands")}
            assert {"blockdev-backup", "transaction", "query-jobs", "nbd-server-start",
                    "block-export-add", "qmp_capabilities", "quit"} <= names
            [blk] = await ex(c, "query-block")
            assert blk["device"] == "dev0" and blk["inserted"]["image"]["virtual-size"] \
                == 4 * MiB
            await ex(c, "blockdev-del", {"node-name": "dev0"})
            assert await ex(c, "query-named-block-nodes") == []
            await c.disconnect()

        run(scenario())


# -- clients -------------------------------------------------------------------------------------


def test_negotiation_ids_and_crlf_on_a_raw_socket() -> None:
    with running_server() as (_, d):
        sock = raw_client(d / "qmp.sock")
        try:
            greeting = read_line(sock)
            assert greeting.endswith(b"}\r\n")
            assert json.loads(greeting)["QMP"]["capabilities"] == []
            sock.sendall(b'{"execute": "query-version", "id": "a"}')
            assert json.loads(read_line(sock)) == {"error": {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
                "id": "a"}
            sock.sendall(b'{"execute": "qmp_capabilities", "id": {"x": [1]}}')
            assert json.loads(read_line(sock)) == {"return": {}, "id": {"x": [1]}}
            sock.sendall(b'{"execute": "qmp_capabilities"}garbage{"execute": "quer')
            assert json.loads(read_line(sock))["error"]["class"] == "CommandNotFound"
            assert json.loads(read_line(sock))["error"]["class"] == "GenericError"
            sock.sendall(b'y-jobs", "id": 3}')
            assert json.loads(read_line(sock)) == {"return": [], "id": 3}
        finally:
            sock.close()


def test_two_clients_get_every_event_and_a_vanishing_client_loses_nothing() -> None:
    with running_server() as (server, d):
        async def scenario() -> None:
            a, events_a = await connect(d / "qmp.sock")
            b, events_b = await connect(d / "qmp.sock")
            await add_device(a, "dev0")
            fill(server, "dev0", 7, range(0, 64, 5))
            ref = snapshot_of(server, "dev0", d / "ref.raw")
            target = await add_target(a, d, "t0")
            # A third client sends a command and goes away without reading the reply.
            sock = raw_client(d / "qmp.sock")
            read_line(sock)
            sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "blockdev-backup", '
                         b'"arguments": {"job-id": "j0", "device": "dev0", "target": "t0", '
                         b'"sync": "full"}}')
            sock.close()
            for events in (events_a, events_b):
                done = await all_events(events, "BLOCK_JOB_COMPLETED", {"j0"})
                assert "error" not in done["j0"]["data"], done["j0"]["data"].get("error")
            assert server.clients == 2
            await a.disconnect()
            assert await ex(b, "query-jobs") == []
            await b.disconnect()
            assert_compare(ref, target)

        run(scenario())


def test_quit_stops_the_server_and_removes_its_socket() -> None:
    with running_server() as (server, d):
        async def scenario() -> None:
            c, events = await connect(d / "qmp.sock")
            await add_device(c, "dev0")
            await ex(c, "quit")
            ev = await next_event(events, "SHUTDOWN")
            assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
            with contextlib.suppress(Exception):
                await c.disconnect()

        run(scenario())
        assert server.wait(60)
        assert not (d / "qmp.sock").exists()


def test_socket_is_owner_only_and_a_live_socket_is_not_taken_over() -> None:
    with running_server() as (_server, d):
        assert (os.stat(d / "qmp.sock").st_mode & 0o777) == 0o600
        other = Server(qmp_path=str(d / "qmp.sock"))
        with pytest.raises(Exception, match="in use by a running server"):
            other.start()
        assert (d / "qmp.sock").exists()


def test_too_many_clients_are_told_and_closed() -> None:
    with running_server(max_clients=1) as (_, d):
        first = raw_client(d / "qmp.sock")
        try:
            read_line(first)
            second = raw_client(d / "qmp.sock")
            try:
                line = json.loads(read_line(second))
                assert "too many QMP connections" in line["error"]["desc"]
            finally:
                second.close()
        finally:
            first.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the first's slot is free again
            sock = raw_client(d / "qmp.sock")
            try:
                if b'"QMP"' in read_line(sock):
                    break
            finally:
                sock.close()
            time.sleep(0.1)
        else:
            pytest.fail("the slot of a closed client was not freed")


# -- error policies: BLOCK_JOB_ERROR ---------------------------------------------------------------


def test_target_error_with_stop_pauses_the_job_and_emits_block_job_error(
        tmp_path: Path) -> None:
    from tests.helpers import small_tmpfs

    with small_tmpfs(tmp_path, "1m") as small, running_server() as (server, d):
        async def scenario() -> None:
            c, events = await connect(d / "qmp.sock")
            await add_device(c, "dev0")
            fill(server, "dev0", 8, range(64))  # 4 MiB of data: more than the tmpfs
            target = small / "t.raw"
            target.write_bytes(b"")
            await ex(c, "blockdev-add", {"driver": "file", "node-name": "f",
                                         "filename": str(target)})
            await ex(c, "blockdev-add", {"driver": "raw", "node-name": "t", "file": "f"})
            await ex(c, "blockdev-backup", {"job-id": "j0", "device": "dev0", "target": "t",
                                            "sync": "full", "on-target-error": "stop"})
            ev = await next_event(events, "BLOCK_JOB_ERROR", device="j0")
            assert ev["data"] == {"device": "j0", "operation": "write", "action": "stop"}
            await next_event(events, "JOB_STATUS_CHANGE", id="j0", status="paused")
            [info] = await ex(c, "query-block-jobs")
            assert info["io-status"] == "nospace" and info["paused"] is True
            await ex(c, "job-cancel", {"id": "j0"})
            await next_event(events, "BLOCK_JOB_CANCELLED", device="j0")
            # report (the default): the job fails, BLOCK_JOB_COMPLETED carries the error.
            await ex(c, "blockdev-backup", {"job-id": "j1", "device": "dev0", "target": "t",
                                            "sync": "full"})
            done = await next_event(events, "BLOCK_JOB_COMPLETED", device="j1")
            assert "error" in done["data"]
            await c.disconnect()

        run(scenario())


# -- TCP, and garbage over the socket ------------------------------------------------------------


def test_qmp_over_loopback_tcp() -> None:
    with running_server(qmp_tcp=("127.0.0.1", 0)) as (server, _):
        async def scenario() -> None:
            c = QMPClient("tcp")
            assert server.qmp_port is not None
            await c.connect(("127.0.0.1", server.qmp_port))
            assert (await ex(c, "query-version"))["package"].startswith("shmblock")
            await c.disconnect()

        run(scenario())
    with pytest.raises(Exception, match="loopback"):
        Server(qmp_tcp=("0.0.0.0", 0))


def test_garbage_on_the_socket_gets_errors_or_a_hang_up_and_the_server_serves_on() -> None:
    import random

    rng = random.Random(1234)
    payloads = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4000)))
                for _ in range(20)]
    payloads += [b"{" * 5000, b'{"execute": "' + b"x" * (2 << 20), b"]]]}}}",
                 b'{"execute": "qmp_capabilities"}' * 3 + b'{"execute": "quit"',
                 b"\xff\xfe" * 1000]
    with running_server() as (server, d):
        for data in payloads:
            sock = raw_client(d / "qmp.sock", timeout=30)
            try:
                read_line(sock)
                with contextlib.suppress(OSError):
                    sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                # Every answer is a well-formed error line (or none: hung up).
                rest = b""
                while chunk := sock.recv(65536):
                    rest += chunk
                for line in rest.split(b"\r\n"):
                    if line:
                        msg = json.loads(line)
                        assert "error" in msg or msg.get("return") == {}, msg
            finally:
                sock.close()
        assert not server.stopped.is_set()

        async def still_serving() -> None:
            c, _ = await connect(d / "qmp.sock")
            assert await ex(c, "query-jobs") == []
            await c.disconnect()

        run(still_serving())


def test_a_server_on_a_programs_own_engine_leaves_the_engine_open() -> None:
    from shmblock.engine import Engine

    with Engine() as engine, short_dir() as d:
        dev = engine.create_device(4 * MiB, CLUSTER, name="mine")
        dev.write(0, pattern(CLUSTER, 1))
        with Server(engine, qmp_path=str(d / "qmp.sock")) as server:
            async def scenario() -> None:
                c, events = await connect(d / "qmp.sock")
                # The program's device is not a node; QMP adds its own beside it.
                assert await ex(c, "query-named-block-nodes") == []
                await add_device(c, "dev0")
                target = await add_target(c, d, "t0")
                await ex(c, "blockdev-backup", {"job-id": "j0", "device": "dev0",
                                                "target": "t0", "sync": "full"})
                await next_event(events, "BLOCK_JOB_COMPLETED", device="j0")
                await c.disconnect()
                assert target.exists()

            run(scenario())
            assert server.engine is engine
        assert not (d / "qmp.sock").exists()
        assert dev.read(0, CLUSTER) == pattern(CLUSTER, 1)  # the engine is still open
        assert sorted(engine.devices) == ["dev0", "mine"]


def test_shmblock_nodes_on_device_files() -> None:
    with running_server() as (_, d):
        existing = d / "disk.img"
        existing.write_bytes(pattern(2 * MiB, 11))

        async def scenario() -> None:
            c, events = await connect(d / "qmp.sock")
            # An existing file: its size is the device's.
            await ex(c, "blockdev-add", {"driver": "shmblock", "node-name": "disk",
                                         "filename": str(existing)})
            # A new file, created sparse with the size given.
            await ex(c, "blockdev-add", {"driver": "shmblock", "node-name": "new",
                                         "filename": str(d / "new.img"), "size": MiB})
            nodes = {n["node-name"]: n for n in await ex(c, "query-named-block-nodes")}
            assert nodes["disk"]["image"]["virtual-size"] == 2 * MiB
            assert nodes["disk"]["file"] == str(existing)
            assert (d / "new.img").stat().st_size == MiB
            assert await error_of(c, "blockdev-add", {
                "driver": "shmblock", "node-name": "x",
                "filename": str(d / "missing.img")}) == (
                "GenericError", f"Could not open '{d / 'missing.img'}': No such file or "
                "directory")
            target = await add_target(c, d, "t0", size=2 * MiB)
            await ex(c, "blockdev-backup", {"job-id": "j0", "device": "disk",
                                            "target": "t0", "sync": "full"})
            done = await next_event(events, "BLOCK_JOB_COMPLETED", device="j0")
            assert "error" not in done["data"]
            await c.disconnect()
            assert_compare(existing, target)

        run(scenario())
