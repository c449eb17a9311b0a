"""Side by side with QEMU: the same content copied by the engine and by QEMU's tools.

The content is one device filled by :func:`shmblock.bench.content.fill`. The engine takes
a full backup of it with no writers (raw and qcow2 targets); QEMU reads the very same
bytes from the device's shared-memory segment:

* ``qemu-img convert -f raw -O raw|qcow2 /dev/shm/<segment> OUT`` — the process's wall
  time, and that time less the fixed cost of a convert of a 64 KiB image (start-up,
  opening, closing), measured in the same run;
* QEMU's own backup job: ``qemu-storage-daemon`` with the segment as a read-only raw
  node and a fresh raw file as the target, driven over QMP on a Unix socket in a temporary
  directory; ``blockdev-backup sync=full`` timed from the command to the
  ``BLOCK_JOB_COMPLETED`` event.

Outputs go to the same directory as the engine's. Each measurement is repeated and the
median kept. A tool that is not installed is skipped with a note saying so; its numbers
are then absent, never guessed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

from shmblock.bench.common import median, remove_file
from shmblock.bench.content import fill
from shmblock.bench.options import Plan
from shmblock.device import SHM_DIR
from shmblock.engine import DeviceHandle, Engine

QMP_TIMEOUT = 600.0
Note = Callable[[str], None]




# -- the engine ---------------------------------------------------------------------------


def engine_backups(engine: Engine, dev: DeviceHandle, fmt: str, out_dir: str,
                   repeats: int) -> dict[str, Any]:
    """Idle full backups of ``dev`` to ``fmt``: job time and end-to-end time."""
    job_s, e2e_s = [], []
    outcome = "completed"
    for i in range(repeats):
        path = os.path.join(out_dir, f"engine-{i}.{fmt}")
        t0 = time.perf_counter()
        job = engine.create_backup(dev, path, format=fmt)
        job.start()
        result = job.wait(QMP_TIMEOUT)
        e2e_s.append(time.perf_counter() - t0)
        job_s.append(result.duration_s)
        if not result.ok:
            outcome = f"{result.outcome.value}: {result.error}"
        remove_file(path)
    median_job = median(job_s)
    e2e = median(e2e_s)
    return {
        "format": fmt, "outcome": outcome, "runs_job_s": job_s, "runs_end_to_end_s": e2e_s,
        "job_s": median_job, "end_to_end_s": e2e,
        "bytes_per_s": dev.size / median_job if median_job else 0.0,
        "end_to_end_bytes_per_s": dev.size / e2e if e2e else 0.0,
        "how": "Engine.backup of the idle device, sync=full: job time from the snapshot "
               "to the conclusion (including the target's fsync and rename); end-to-end "
               "adds starting the backup worker and opening the target",
    }


# -- qemu-img convert -------------------------------------------------------------------------


def _run_timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[:300]}")
    return elapsed


def qemu_img_convert(src: str, size: int, fmt: str, out_dir: str,
                     repeats: int) -> dict[str, Any]:
    tiny = os.path.join(out_dir, "tiny.raw")
    with open(tiny, "wb") as f:
        f.truncate(64 << 10)
    overhead = []
    for _ in range(3):
        out = os.path.join(out_dir, f"tiny-out.{fmt}")
        overhead.append(_run_timed(["qemu-img", "convert", "-f", "raw", "-O", fmt, tiny, out]))
        remove_file(out)
    remove_file(tiny)
    runs = []
    argv: list[str] = []
    for i in range(repeats):
        out = os.path.join(out_dir, f"qemu-img-{i}.{fmt}")
        argv = ["qemu-img", "convert", "-f", "raw", "-O", fmt, src, out]
        runs.append(_run_timed(argv))
        remove_file(out)
    wall = median(runs)
    fixed = min(overhead)
    net = max(wall - fixed, 1e-9)
    return {
        "format": fmt, "command": " ".join(argv).replace(out_dir, "$OUT"),
        "runs_s": runs, "wall_s": wall, "fixed_cost_s": fixed, "net_s": net,
        "bytes_per_s": size / wall, "net_bytes_per_s": size / net,
        "how": "wall time of the qemu-img process (median); net subtracts the wall time of "
               "converting a 64 KiB image (start-up and teardown)",
    }


# -- QEMU's backup job over QMP ---------------------------------------------------------------


class Qmp:
    """A minimal QMP client: one command at a time, events kept as they arrive."""

    def __init__(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.file = self.sock.makefile("rw", encoding="utf-8")
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise RuntimeError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def send(self, command: str, **arguments: Any) -> None:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()

    def reply(self) -> Any:
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise RuntimeError(f"QMP error: {msg['error']}")
            else:
                return msg.get("return")

    def execute(self, command: str, **arguments: Any) -> Any:
        self.send(command, **arguments)
        return self.reply()

    def wait_event(self, name: str) -> dict[str, Any]:
        for i, msg in enumerate(self.events):
            if msg["event"] == name:
                return self.events.pop(i)
        while True:
            msg = self._read()
            if msg.get("event") == name:
                return msg
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def qemu_backup_job(src: str, size: int, out_dir: str, repeats: int) -> dict[str, Any]:
    runs = []
    argv: list[str] = []
    for i in range(repeats):
        with tempfile.TemporaryDirectory(prefix="shmblock-qsd-") as tmp:
            sock = os.path.join(tmp, "qmp.sock")
            dst = os.path.join(out_dir, f"qemu-backup-{i}.raw")
            with open(dst, "wb") as f:
                f.truncate(size)
            src_node = {"driver": "raw", "node-name": "src", "read-only": True,
                        "file": {"driver": "file", "filename": src}}
            dst_node = {"driver": "raw", "node-name": "dst",
                        "file": {"driver": "file", "filename": dst}}
            argv = ["qemu-storage-daemon", "--blockdev", json.dumps(src_node),
                    "--blockdev", json.dumps(dst_node),
                    "--chardev", f"socket,path={sock},server=on,wait=off,id=qmp0",
                    "--monitor", "chardev=qmp0"]
            log_path = os.path.join(tmp, "qsd.log")
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            qmp: Qmp | None = None
            try:
                try:
                    qmp = Qmp(sock, 10.0)
                except OSError as exc:
                    with open(log_path, errors="replace") as f:
                        raise RuntimeError(f"qemu-storage-daemon did not start: {exc}: "
                                           f"{f.read()[-300:]}") from exc
                qmp.sock.settimeout(QMP_TIMEOUT)
                t0 = time.perf_counter()
                qmp.execute("blockdev-backup", **{"job-id": "bk", "device": "src",
                                                  "target": "dst", "sync": "full"})
                done = qmp.wait_event("BLOCK_JOB_COMPLETED")
                runs.append(time.perf_counter() - t0)
                if done.get("data", {}).get("error"):
                    raise RuntimeError(f"QEMU's backup job failed: {done['data']['error']}")
                with contextlib.suppress(RuntimeError, OSError):
                    qmp.execute("quit")
            finally:
                if qmp is not None:
                    qmp.close()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                remove_file(dst)
    job = median(runs)
    shown = [a.replace(out_dir, "$OUT").replace(src, "$SRC") for a in argv]
    return {
        "command": " ".join(shown[:5]) + " --chardev socket,path=$TMP/qmp.sock,... "
                   "--monitor ...; QMP blockdev-backup sync=full job-id=bk src→dst",
        "runs_s": runs, "job_s": job, "bytes_per_s": size / job if job else 0.0,
        "how": "qemu-storage-daemon, raw (read-only, the device's /dev/shm segment) to raw "
               "(a fresh file), time from sending blockdev-backup to BLOCK_JOB_COMPLETED",
    }


# -- all of it --------------------------------------------------------------------------------


def run_peers(plan: Plan, out_dir: str, note: Note) -> dict[str, Any]:
    res: dict[str, Any] = {"notes": []}
    with Engine() as engine:
        dev = engine.create_device(plan.peer_size, max_writers=1)
        note("filling the comparison device")
        content = fill(dev, plan.seed)
        res["content"] = {"size": content.size, "data_bytes": content.data_bytes,
                          "zero_bytes": content.zero_bytes,
                          "data_extents": content.data_extents,
                          "layout": "alternating random-data and never-written (zero) "
                                    "extents of 1-32 clusters"}
        src = os.path.join(SHM_DIR, dev.device.data_name.lstrip("/"))
        engine_res: dict[str, Any] = {}
        for fmt in ("raw", "qcow2"):
            note(f"engine: idle full backup to {fmt}")
            engine_res[fmt] = engine_backups(engine, dev, fmt, out_dir, plan.peer_repeats)
        res["engine"] = engine_res
        if shutil.which("qemu-img"):
            convert: dict[str, Any] = {}
            for fmt in ("raw", "qcow2"):
                note(f"qemu-img convert -O {fmt}")
                try:
                    convert[fmt] = qemu_img_convert(src, dev.size, fmt, out_dir,
                                                    plan.peer_repeats)
                except (RuntimeError, OSError) as exc:
                    res["notes"].append(f"qemu-img convert -O {fmt} failed: {exc}")
            res["qemu_img_convert"] = convert
        else:
            res["notes"].append("qemu-img is not installed (Debian: qemu-utils): the "
                                "qemu-img convert comparison was skipped")
        if shutil.which("qemu-storage-daemon"):
            note("QEMU backup job (qemu-storage-daemon blockdev-backup)")
            try:
                res["qemu_backup_job"] = qemu_backup_job(src, dev.size, out_dir,
                                                         plan.peer_repeats)
            except (RuntimeError, OSError) as exc:
                res["notes"].append(f"QEMU's backup job could not be measured: {exc}")
        else:
            res["notes"].append("qemu-storage-daemon is not installed (Debian: "
                                "qemu-system-common): the QEMU backup job comparison was "
                                "skipped")
    return res
