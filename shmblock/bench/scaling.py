"""Scaling with device size: full-backup time, the engine's own memory, freeze time.

Each size runs in a child process of its own (``python -m shmblock.bench.scaling``),
which is a clean supervisor: its memory is the engine's, not the benchmark's, and all of
it — device included — is gone when it exits, before the next size starts. The child:

1. creates the device and fills it (half random, half zero), no writers;
2. starts a full backup to a raw file and, while it runs, samples every 10 ms the
   resident memory of itself (the supervisor) and of the backup worker, *excluding* the
   shared device: ``RssAnon + RssFile`` from ``/proc/PID/status`` (resident minus
   ``RssShmem``); and once, before the snapshot, ``psutil``'s USS (pages no other
   process maps) when psutil is installed;
3. starts writers (random 4 KiB) in steps up to the largest count and, at each count,
   measures the freeze at snapshot start many times: the quiesce of every writer
   (:meth:`Engine.freeze`) plus the cost of initialising the maps at that size, measured
   on a scratch map of the same size; and a few real snapshot starts (``sync=none`` jobs,
   :attr:`JobResult.freeze_s`) as a cross-check;
4. with the writers still running, one more full backup with ``verify=True``: the
   point-in-time check of the size, untimed; its freeze and its verification copy are
   reported apart (``verification``), never in the freeze figures above. A size whose
   verification copy does not fit in memory (a 16 GiB device needs 16 GiB more) says so
   instead (``verification.skipped``);
5. prints one JSON object on stdout.

The parent runs the sizes one after the other, each only when the device fits in
/dev/shm and in available memory; a largest size that does not fit (16 GiB on a smaller
machine) is replaced by 8 GiB, with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import numpy as np

from shmblock.bench.content import fill
from shmblock.bench.options import Plan
from shmblock.device import SHM_DIR, shm_free_bytes
from shmblock.engine import Engine
from shmblock.run import python_module
from shmblock.verify import NotEnoughMemoryError, check_capture_memory, mem_available

SAMPLE_EVERY = 0.01
CHILD_TIMEOUT = 1800.0


def proc_memory(pid: int) -> dict[str, int]:
    """Resident-set counters of a process, in bytes (from /proc/PID/status)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def uss(pid: int) -> int | None:
    """Unique set size (psutil), or None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    with contextlib.suppress(Exception):
        return int(psutil.Process(pid).memory_full_info().uss)
    return None


class MemorySampler:
    """Peak private resident memory (RSS minus shared memory) of some processes."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.peak: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mem-sampler", daemon=True)

    def watch(self, role: str, pid: int) -> None:
        self.pids[role] = pid
        self.sample_once()

    def sample_once(self) -> None:
        for role, pid in list(self.pids.items()):
            m = proc_memory(pid)
            if not m:
                continue
            own = m.get("RssAnon", 0) + m.get("RssFile", 0)
            p = self.peak.setdefault(role, {"private_rss": 0, "anon": 0, "rss": 0,
                                            "shmem": 0})
            p["private_rss"] = max(p["private_rss"], own)
            p["anon"] = max(p["anon"], m.get("RssAnon", 0))
            p["rss"] = max(p["rss"], m.get("VmRSS", 0))
            p["shmem"] = max(p["shmem"], m.get("RssShmem", 0))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.sample_once()

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample_once()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return float(np.percentile(np.asarray(values), q))


def map_init_us(clusters: int, repeats: int = 20) -> float:
    """What initialising needs_copy and counting it costs at this size (best of runs)."""
    scratch = np.zeros(clusters, dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        scratch[:] = 1
        int(np.count_nonzero(scratch))
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def child(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"size": args.size}
    writer_steps = [int(x) for x in args.freeze_writers.split(",")]
    with Engine() as engine:
        t0 = time.perf_counter()
        dev = engine.create_device(args.size, max_writers=max(writer_steps))
        out["create_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        content = fill(dev, args.seed)
        out["fill_s"] = time.perf_counter() - t0
        out["data_bytes"] = content.data_bytes
        target = os.path.join(args.target_dir, f"scaling-{args.size}.raw")
        with MemorySampler() as mem:
            mem.watch("supervisor", os.getpid())
            job = engine.create_backup(dev, target, format="raw")
            mem.watch("backup_worker", job.proc.pid)
            out["uss_before_snapshot"] = {"supervisor": uss(os.getpid()),
                                          "backup_worker": uss(job.proc.pid)}
            job.start()
            result = job.wait(CHILD_TIMEOUT)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        out["backup"] = {"outcome": result.outcome.value, "error": result.error,
                         "duration_s": result.duration_s,
                         "bytes_per_s": result.throughput, "freeze_ms": result.freeze_s * 1e3,
                         "bytes_written": result.bytes_written}
        out["memory_peak"] = mem.peak
        out["map_init_us"] = map_init_us(dev.size // dev.cluster_size)
        freezes = []
        running = 0
        for count in writer_steps:
            if count > running:
                engine.start_writers(dev, count - running, workload="random",
                                     seed=args.seed + running)
                running = count
            time.sleep(0.3)
            quiesce = []
            for _ in range(args.samples):
                t0 = time.perf_counter()
                with engine.freeze([dev]):
                    quiesce.append(time.perf_counter() - t0)
                time.sleep(0.02)
            real = []
            for _ in range(args.real_snapshots):
                path = os.path.join(args.target_dir, f"scaling-none-{args.size}.raw")
                job = engine.create_backup(dev, path, format="raw", sync="none")
                job.start()
                real.append(job.freeze_s)
                time.sleep(0.05)
                job.complete()
                job.wait(60)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            init_ms = out["map_init_us"] / 1e3
            q_ms = [x * 1e3 for x in quiesce]
            total = [x + init_ms for x in q_ms]
            freezes.append({
                "writers": count, "samples": len(total),
                "p50_ms": _pct(total, 50), "p99_ms": _pct(total, 99),
                "max_ms": max(total, default=0.0),
                "quiesce_p50_ms": _pct(q_ms, 50), "quiesce_p99_ms": _pct(q_ms, 99),
                "real_snapshot_ms": [x * 1e3 for x in real],
                "real_snapshot_median_ms": statistics.median(real) * 1e3 if real else None,
            })
        out["freeze"] = freezes
        out["verification"] = _verify(engine, dev, args.target_dir)
        engine.stop_writers()
    return out


def _verify(engine: Engine, dev: Any, target_dir: str) -> dict[str, Any]:
    """One verified full backup while the writers run (see the module docstring)."""
    try:
        check_capture_memory(dev.size)
    except NotEnoughMemoryError as exc:
        return {"verified": None, "skipped": str(exc)}
    path = os.path.join(target_dir, f"scaling-verify-{dev.size}.raw")
    job = engine.create_backup(dev, path, format="raw", verify=True)
    job.start()
    result = job.wait(CHILD_TIMEOUT)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return {"verified": result.verified is True and result.outcome.value == "completed",
            "outcome": result.outcome.value, "error": result.error or result.verify_error,
            "freeze_ms": result.freeze_s * 1e3, "verify_copy_ms": result.verify_copy_s * 1e3,
            "backup_s": result.duration_s}


#: a largest size that does not fit is replaced by this one
FALLBACK_SIZE = 8 << 30


def fits(size: int) -> str:
    """Why a device of ``size`` cannot run here now ("" when it can)."""
    need = size + (256 << 20)
    if shm_free_bytes() < need:
        return f"{SHM_DIR} has {shm_free_bytes() >> 20} MiB free, needs {need >> 20} MiB"
    avail = mem_available()
    # The device's pages, the backup's page cache is reclaimable; a margin for the rest.
    if avail is not None and avail < size + (1 << 30):
        return f"{avail >> 20} MiB of memory available, needs {(size + (1 << 30)) >> 20} MiB"
    return ""


def run_scaling(plan: Plan, scaling_dir: str, note: Callable[[str], None],
                step: Callable[[], None]) -> dict[str, Any]:
    """Run the child for every size, one after the other; collect what they print."""
    res: dict[str, Any] = {"sizes": [], "notes": [], "target_dir": scaling_dir}
    for wanted in plan.scaling_sizes:
        size, why = wanted, fits(wanted)
        if why and size > FALLBACK_SIZE and size == max(plan.scaling_sizes) \
                and not fits(FALLBACK_SIZE):
            res["notes"].append(f"{size >> 30} GiB replaced by {FALLBACK_SIZE >> 30} GiB: "
                                f"{why}")
            size, why = FALLBACK_SIZE, ""
        if why:
            res["notes"].append(f"{size >> 20} MiB skipped: {why}")
            step()
            continue
        note(f"scaling: {size >> 20} MiB device")
        # Isolated from the working directory like the engine's workers (shmblock.run).
        argv, env = python_module("shmblock.bench.scaling", [
            "--size", str(size), "--target-dir", scaling_dir, "--seed", str(plan.seed),
            "--freeze-writers", ",".join(str(w) for w in plan.freeze_writers),
            "--samples", str(plan.freeze_samples),
            "--real-snapshots", "1" if plan.quick else "3"])
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        try:
            stdout, stderr = proc.communicate(timeout=CHILD_TIMEOUT)
        except BaseException:
            # Interrupted or timed out: SIGTERM lets the child's engine remove what it
            # made (its handler raises, the Engine's with-block closes); SIGKILL last.
            proc.terminate()
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise
        if proc.returncode != 0:
            res["notes"].append(f"{size} bytes failed (exit {proc.returncode}): "
                                f"{stderr.strip()[-500:]}")
            res.setdefault("failures", []).append(
                f"{size >> 20} MiB: the child failed (exit {proc.returncode}): "
                f"{stderr.strip()[-300:]}")
        else:
            got = json.loads(stdout.strip().splitlines()[-1])
            ver = got.get("verification") or {}
            if ver.get("verified") is False:
                res.setdefault("failures", []).append(
                    f"{size >> 20} MiB: the verified backup did not verify: {ver}")
            res["sizes"].append(got)
        step()
    return res


class Stopped(Exception):
    """SIGTERM or SIGINT: unwind, so the engine removes everything it made."""


def _stop(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    p = argparse.ArgumentParser(prog="python -m shmblock.bench.scaling")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--target-dir", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--freeze-writers", default="1,2,4,8")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--real-snapshots", type=int, default=3)
    args = p.parse_args(argv)
    try:
        print(json.dumps(child(args)))
    except Stopped as exc:
        print(f"scaling: stopped by {exc}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
