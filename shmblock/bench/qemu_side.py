"""The same guest, the same backup, over NBD: shmblock beside qemu-storage-daemon (issue 10).

One guest workload, fio's ``nbd`` engine (4 KiB random writes, ``plan.qemu_iodepth`` in
flight, time-based, ``plan.qemu_runtime_s`` seconds, every completion logged with its Unix
time: ``--write_lat_log --log_avg_msec=0 --log_unix_epoch=1``), runs against two servers
exporting an image of ``plan.qemu_size`` with the same content (half random, half zero,
:func:`shmblock.bench.wholeprocess.make_device_file`):

* **QEMU**: ``qemu-storage-daemon`` with only a QMP monitor (``--chardev socket,...,
  server=on,wait=off --monitor chardev=...``); over QMP a ``file`` node on a raw image in
  the target directory (/dev/shm when it fits) and a ``raw`` node on it, ``nbd-server-start``
  on a Unix socket and a writable ``block-export-add``;
* **shmblock**: ``shmblock-run serve --qmp PATH`` (``python -P -m shmblock.cli serve``,
  this very package) and the very same QMP script (contract
  C2), except the device node: ``{"driver": "shmblock", "filename": <device file>}``.
  Skipped, with a note saying so, when ``shmblock.serve`` is not importable.

Each server runs two cells on the same process: *no backup* (fio alone) and *backup*
(fio, and after a lead-in of a quarter of the run counted from fio's job start,
``blockdev-backup sync=full`` to a raw file made by ``qemu-img create`` in the same
directory, through ``file`` + ``raw`` nodes, until ``BLOCK_JOB_COMPLETED``). Figures come
from fio's completion log, over a window: the backup's, from the command to the event,
for the backup cell (fio then runs on at least as long as the no-backup run and a little
past the event, and is stopped with SIGINT); the rest of the run after the same lead-in
for the no-backup cell. They are guest IOPS, completion latency p50/p99/p99.9, the
longest completion latency and the longest gap between two completions (the longest
stall a guest saw), and the backup's duration. fio's own
whole-run summary is kept beside them. The headline ratios, shmblock over QEMU: IOPS
retained during the backup (backup-window IOPS ÷ no-backup IOPS, each server against
itself) and backup duration. The QMP client is the ``qemu.qmp`` library, the one
libvirt-style tooling uses; every command has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shmblock.bench.load import CpuMeter
from shmblock.bench.options import Plan
from shmblock.bench.wholeprocess import make_device_file
from shmblock.run import python_module

QMP_TIMEOUT = 30.0
BACKUP_TIMEOUT = 600.0
READY_TIMEOUT = 30.0
#: fio runs on this long after a backup ended (its completions at the very end count)
TAIL_S = 0.3
Note = Callable[[str], None]


class SideFailure(RuntimeError):
    """A server, fio or a QMP command did not do what the section needs."""


# -- fio ------------------------------------------------------------------------------


def fio_argv(socket_path: str, export: str, runtime_s: float, iodepth: int,
             log_prefix: str, output: str) -> list[str]:
    return ["fio", "--name=guest", "--ioengine=nbd",
            f"--uri=nbd+unix:///{export}?socket={socket_path}",
            "--rw=randwrite", "--bs=4k", f"--iodepth={iodepth}", "--time_based",
            f"--runtime={max(runtime_s, 0.5):g}s", "--randrepeat=1", "--norandommap",
            "--output-format=json", f"--output={output}",
            f"--write_lat_log={log_prefix}", "--log_avg_msec=0", "--log_unix_epoch=1"]


def read_completion_log(path: str) -> tuple[np.ndarray, np.ndarray]:
    """fio's clat log: completion Unix times (ms) and completion latencies (ns)."""
    times, lats = [], []
    with open(path) as f:
        for line in f:
            parts = line.split(",", 2)
            if len(parts) >= 2:
                times.append(int(parts[0]))
                lats.append(int(parts[1]))
    return np.asarray(times, dtype=np.int64), np.asarray(lats, dtype=np.int64)


def window_figures(times_ms: np.ndarray, lats_ns: np.ndarray, start_ms: float,
                   end_ms: float) -> dict[str, Any]:
    """IOPS, latency percentiles and the longest stall of the completions in a window."""
    sel = (times_ms >= start_ms) & (times_ms <= end_ms)
    t, lat = times_ms[sel], lats_ns[sel]
    span = max(end_ms - start_ms, 1.0) / 1e3
    if t.size == 0:
        return {"window_s": span, "ios": 0, "iops": 0.0, "p50_us": None, "p99_us": None,
                "p999_us": None, "max_latency_ms": None, "max_gap_ms": span * 1e3}
    # The gap before the first and after the last completion counts too: a guest stuck
    # for the whole window completed nothing in it.
    edges = np.concatenate([[start_ms], t, [end_ms]])
    return {"window_s": span, "ios": int(t.size), "iops": t.size / span,
            "p50_us": float(np.percentile(lat, 50)) / 1e3,
            "p99_us": float(np.percentile(lat, 99)) / 1e3,
            "p999_us": float(np.percentile(lat, 99.9)) / 1e3,
            "max_latency_ms": float(lat.max()) / 1e6,
            "max_gap_ms": float(np.diff(edges).max())}


def _fio_summary(path: str) -> dict[str, Any]:
    with open(path) as f:
        text = f.read()
    # fio may print notes before the JSON object.
    data = json.loads(text[text.index("{"):])
    w = data["jobs"][0]["write"]
    pct = w["clat_ns"].get("percentile", {})
    return {"iops": w["iops"], "ios": w["total_ios"],
            "p50_us": pct.get("50.000000", 0) / 1e3, "p99_us": pct.get("99.000000", 0) / 1e3,
            "p999_us": pct.get("99.900000", 0) / 1e3, "max_latency_ms": w["clat_ns"]["max"] / 1e6,
            "runtime_ms": data["jobs"][0]["job_runtime"], "error": data["jobs"][0]["error"]}


# -- servers -------------------------------------------------------------------------------


class Server:
    """A QMP server process (qemu-storage-daemon or shmblock-run serve) and its client."""

    def __init__(self, kind: str, argv: list[str], env: dict[str, str] | None,
                 qmp_path: str, log_path: str) -> None:
        self.kind = kind
        self.qmp_path = qmp_path
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.qmp: Any = None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return f.read()[-400:].strip()
        return ""

    async def connect(self) -> None:
        from qemu.qmp import QMPClient

        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise SideFailure(f"{self.kind} exited {self.proc.returncode} before its QMP "
                                  f"socket accepted: {self.log_tail()}")
            if not os.path.exists(self.qmp_path):  # not listening yet: no client to make
                if time.monotonic() > deadline:
                    raise SideFailure(f"{self.kind}: no QMP socket {self.qmp_path} after "
                                      f"{READY_TIMEOUT:.0f} s: {self.log_tail()}")
                await asyncio.sleep(0.02)
                continue
            client = QMPClient(f"bench-{self.kind}")
            try:
                await asyncio.wait_for(client.connect(self.qmp_path), QMP_TIMEOUT)
            except Exception as exc:  # qemu.qmp's ConnectError, OSError, TimeoutError
                with contextlib.suppress(Exception):
                    await client.disconnect()
                if time.monotonic() > deadline:
                    raise SideFailure(f"{self.kind}: QMP socket {self.qmp_path} did not "
                                      f"accept in {READY_TIMEOUT:.0f} s: {exc}") from exc
                await asyncio.sleep(0.05)
                continue
            self.qmp = client
            return

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await asyncio.wait_for(self.qmp.execute(command, args), QMP_TIMEOUT)
        except TimeoutError:
            raise SideFailure(f"{self.kind}: {command} got no answer in "
                              f"{QMP_TIMEOUT:.0f} s") from None
        except Exception as exc:  # qemu.qmp's ExecuteError and friends
            raise SideFailure(f"{self.kind}: {command} {json.dumps(args)} failed: "
                              f"{exc}") from exc

    async def stop(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 5.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), 5.0)
        try:
            await asyncio.to_thread(self.proc.wait, 10)
        except subprocess.TimeoutExpired:
            # Its own session: the signal reaches it and nothing of ours.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _device_node(kind: str, image: str) -> list[dict[str, Any]]:
    """The nodes that make the exported device ``dev``: the only difference (C2)."""
    if kind == "shmblock":
        return [{"driver": "shmblock", "node-name": "dev", "filename": image}]
    return [{"driver": "file", "node-name": "dev-file", "filename": image},
            {"driver": "raw", "node-name": "dev", "file": "dev-file"}]


async def _setup(server: Server, image: str, nbd_path: str) -> None:
    await server.connect()
    for node in _device_node(server.kind, image):
        await server.execute("blockdev-add", node)
    await server.execute("nbd-server-start",
                         {"addr": {"type": "unix", "data": {"path": nbd_path}}})
    await server.execute("block-export-add", {"type": "nbd", "id": "guest", "node-name": "dev",
                                              "name": "dev", "writable": True})


async def _cell(server: Server, plan: Plan, work: str, nbd_path: str, size: int,
                backup: bool, index: int) -> dict[str, Any]:
    from qemu.qmp import EventListener

    prefix = os.path.join(work, f"{server.kind}-{index}")
    output = prefix + ".json"
    lead = plan.qemu_runtime_s / 4
    target = os.path.join(work, f"{server.kind}-backup.raw")
    if backup:
        # As a QEMU user makes a target: the file first, then nodes on it.
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", target, str(size)],
                       check=True, capture_output=True, timeout=60)
        await server.execute("blockdev-add", {"driver": "file", "node-name": "tgt-file",
                                              "filename": target})
        await server.execute("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                              "file": "tgt-file"})
    meter = CpuMeter()
    # With a backup, fio runs until the backup has ended (then SIGINT: fio stops its jobs
    # and still writes its JSON and logs), so the window is never cut short.
    runtime = plan.qemu_runtime_s + (BACKUP_TIMEOUT if backup else 0.0)
    fio = subprocess.Popen(fio_argv(nbd_path, "dev", runtime, plan.qemu_iodepth,
                                    prefix, output),
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, start_new_session=True)
    fio_started = time.monotonic()
    cell: dict[str, Any] = {"server": server.kind, "backup": backup}
    try:
        # The lead-in counts from fio's job, not from fio's start (which takes a while on
        # a loaded machine: starting, parsing, forking its job).
        cell["fio_start_s"] = await _guest_writing(fio)
        await asyncio.sleep(lead)
        start_ms = time.time() * 1e3
        if backup:
            listener = EventListener(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"))
            server.qmp.register_listener(listener)
            try:
                t0 = time.perf_counter()
                await server.execute("blockdev-backup", {"job-id": "bk", "device": "dev",
                                                         "target": "tgt", "sync": "full"})
                try:
                    event: dict[str, Any] = dict(
                        await asyncio.wait_for(listener.get(), BACKUP_TIMEOUT))
                except TimeoutError:
                    raise SideFailure(f"{server.kind}: the backup did not complete in "
                                      f"{BACKUP_TIMEOUT:.0f} s") from None
                cell["backup_s"] = time.perf_counter() - t0
            finally:
                server.qmp.remove_listener(listener)
            end_ms = time.time() * 1e3
            data: dict[str, Any] = event.get("data") or {}
            if event["event"] != "BLOCK_JOB_COMPLETED" or data.get("error"):
                raise SideFailure(f"{server.kind}: the backup ended with {event['event']}: "
                                  f"{data.get('error', '')}")
            # fio runs at least as long as in the no-backup cell (a short backup must not
            # stop it before it wrote anything), and a little past the backup's end.
            ran = time.monotonic() - fio_started
            await asyncio.sleep(max(TAIL_S, plan.qemu_runtime_s - ran))
            fio.send_signal(signal.SIGINT)
        _, stderr = await asyncio.to_thread(fio.communicate, None,
                                            plan.qemu_runtime_s + 120)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(fio.pid, signal.SIGKILL)
        fio.wait()
        raise
    # Stopped by our SIGINT, fio exits non-zero (128 here) with complete outputs.
    if fio.returncode and not (backup and os.path.exists(output)):
        raise SideFailure(f"fio against {server.kind} exited {fio.returncode}: "
                          f"{stderr.decode(errors='replace').strip()[-400:]}")
    log = prefix + "_clat.1.log"
    if not os.path.exists(log):
        raise SideFailure(f"fio against {server.kind} wrote no completion log (exit "
                          f"{fio.returncode}): {stderr.decode(errors='replace').strip()[-300:]}")
    times, lats = read_completion_log(log)
    run_end_ms = float(times.max()) if times.size else start_ms
    if not backup:
        # The rest of the run after the same lead-in as the backup cell's.
        end_ms = run_end_ms
    cell["outlasted_fio"] = bool(end_ms > run_end_ms)
    # fio starting slower than the lead-in (a loaded machine) would measure a backup
    # with no guest yet: said, not hidden.
    cell["guest_running_at_start"] = bool(times.size and times.min() <= start_ms)
    cell["window"] = window_figures(times, lats, start_ms, min(end_ms, run_end_ms))
    cell["fio"] = _fio_summary(output)
    cell.update(meter.record())
    if backup:
        with contextlib.suppress(SideFailure):
            await server.execute("blockdev-del", {"node-name": "tgt"})
            await server.execute("blockdev-del", {"node-name": "tgt-file"})
        cell["backup_bytes"] = size
    for name in os.listdir(work):
        if name.startswith(f"{server.kind}-{index}") or name == os.path.basename(target):
            os.unlink(os.path.join(work, name))
    return cell


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError), \
                    open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


async def _guest_writing(fio: subprocess.Popen[bytes]) -> float:
    """Wait until fio has forked its job (which then connects and writes at once);
    seconds it took. SideFailure if fio exits or takes longer than READY_TIMEOUT."""
    t0 = time.monotonic()
    while not _children(fio.pid):
        if fio.poll() is not None:
            raise SideFailure(f"fio exited {fio.returncode} before its job started")
        if time.monotonic() - t0 > READY_TIMEOUT:
            raise SideFailure(f"fio did not start its job in {READY_TIMEOUT:.0f} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


async def _run_server(kind: str, plan: Plan, sockets: str, work: str, image: str,
                      note: Note) -> list[dict[str, Any]]:
    qmp_path = os.path.join(sockets, f"{kind}-qmp.sock")
    nbd_path = os.path.join(sockets, f"{kind}-nbd.sock")
    log_path = os.path.join(sockets, f"{kind}.log")
    if kind == "qemu":
        argv = ["qemu-storage-daemon", "--chardev",
                f"socket,id=qmp0,path={qmp_path},server=on,wait=off", "--monitor",
                "chardev=qmp0"]
        env = None
    else:
        # The same package as this process (python -P -m, as the engine's workers are
        # started), not whatever an installed script would import.
        argv, env = python_module("shmblock.cli", ["serve", "--qmp", qmp_path])
    server = Server(kind, argv, env, qmp_path, log_path)
    try:
        await _setup(server, image, nbd_path)
        cells = []
        for i, backup in enumerate((False, True)):
            note(f"qemu side by side: fio → {kind}, {'with' if backup else 'no'} backup")
            cells.append(await _cell(server, plan, work, nbd_path, plan.qemu_size, backup, i))
        return cells
    finally:
        await server.stop()


def run_qemu_side(plan: Plan, target_dir: str, note: Note) -> dict[str, Any]:
    res: dict[str, Any] = {"size": plan.qemu_size, "runtime_s": plan.qemu_runtime_s,
                           "iodepth": plan.qemu_iodepth, "workload": "fio nbd randwrite 4k",
                           "servers": {}, "notes": [], "failures": []}
    missing = [t for t in ("fio", "qemu-storage-daemon", "qemu-img") if not shutil.which(t)]
    if missing:
        res["notes"].append(f"{', '.join(missing)} not installed (Debian: fio, "
                            "qemu-system-common, qemu-utils): the section was skipped")
        return res
    if importlib.util.find_spec("qemu.qmp") is None:
        res["notes"].append("the qemu.qmp library is not installed (pip install "
                            "'shmblock[bench]'): the section was skipped")
        return res
    kinds = ["qemu"]
    if importlib.util.find_spec("shmblock.serve") is None:
        res["notes"].append("shmblock.serve is not importable (`shmblock-run serve` is not "
                            "in this build): the shmblock side was skipped")
    else:
        kinds.append("shmblock")
    # Sockets have a 108-byte path limit: a short private directory in /tmp for them and
    # the logs, the images where the other sections write.
    sockets = tempfile.mkdtemp(prefix="sbq-", dir="/tmp")
    work = tempfile.mkdtemp(prefix="qemu-side-", dir=target_dir)
    try:
        for kind in kinds:
            image = os.path.join(work, f"{kind}-image.raw")
            make_device_file(image, plan.qemu_size, plan.seed)
            try:
                res["servers"][kind] = asyncio.run(
                    _run_server(kind, plan, sockets, work, image, note))
            except SideFailure as exc:
                res["failures"].append(str(exc))
            except Exception as exc:
                # One server's fault must not cost the other server's figures.
                res["failures"].append(f"{kind}: {type(exc).__name__}: {exc}")
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(image)
                shutil.rmtree(image + ".bitmaps", ignore_errors=True)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    for kind, cells in res["servers"].items():
        for c in cells:
            what = f"{kind}, {'with' if c['backup'] else 'no'} backup"
            if not c["guest_running_at_start"]:
                res["notes"].append(f"{what}: fio had completed nothing before the window "
                                    "began (it started slowly): the window's figures "
                                    "include its start")
            if c["outlasted_fio"]:
                res["notes"].append(f"{what}: the window outlasted fio's run; cut at its end")
    res["summary"] = summarize(res["servers"])
    return res


def summarize(servers: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per server: IOPS retained during the backup, backup time; and the ratios."""
    out: dict[str, Any] = {}
    for kind, cells in servers.items():
        off = next((c for c in cells if not c["backup"]), None)
        on = next((c for c in cells if c["backup"]), None)
        if off is None or on is None:
            continue
        base = off["window"]["iops"]
        out[kind] = {"iops_off": base, "iops_backup": on["window"]["iops"],
                     "retained": on["window"]["iops"] / base if base else None,
                     "backup_s": on.get("backup_s")}
    q, s = out.get("qemu"), out.get("shmblock")
    if q and s:
        out["ratio_retained"] = (s["retained"] / q["retained"]
                                 if s["retained"] is not None and q["retained"] else None)
        out["ratio_backup_time"] = (s["backup_s"] / q["backup_s"]
                                    if s["backup_s"] and q["backup_s"] else None)
    return out
