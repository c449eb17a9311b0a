"""``shmblock-run bench``: run the sections of a plan and write the results.

Sections, in order: machine limits, the QEMU comparison, the scenario matrix, scaling,
incremental backups against full ones, restore of a chain against ``qemu-img convert``.
Each records the CPU other processes used while it ran, and is marked *under load* when
they used more than a small share (:mod:`shmblock.bench.load`). A section whose backup
fails or does not verify leaves a line in ``failures`` and makes the exit code 1.
Progress is a rich bar on a terminal (stderr) and nothing otherwise. Everything a
section creates lives in temporary directories removed at the end, and every engine is
closed by its ``with`` block, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from shmblock.bench import machine, report
from shmblock.bench.load import CpuMeter, loadavg, under_load
from shmblock.bench.options import Plan, plan_from_args
from shmblock.device import SHM_DIR, shm_free_bytes
from shmblock.errors import ShmblockError
from shmblock.paths import write_file_atomic

EXIT_OK, EXIT_FAILED = 0, 1


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        # safe.directory: the benchmark may run as another user than the checkout's owner.
        git = ["git", "-c", f"safe.directory={root}", "-C", root]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run([*git, "status", "--porcelain", "--",
                                "shmblock", "workers", "protocol"],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + (" (engine files modified)" if dirty.stdout.strip() else "")


class Reporter:
    """Progress: a rich bar on a terminal, silence otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self._bar: Any = None
        self._task: Any = None

    @contextlib.contextmanager
    def running(self) -> Iterator[Reporter]:
        if not self.enabled:
            yield self
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            self._bar = bar
            self._task = bar.add_task("bench", total=self.total)
            yield self

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)


def _pick_target_dir(plan: Plan) -> tuple[str, str]:
    """A temporary directory for backups: /dev/shm when it fits, else /var/tmp."""
    if plan.target_dir:
        return tempfile.mkdtemp(prefix="shmblock-bench-", dir=plan.target_dir), plan.target_dir
    # Device + its backup + a qemu-img output at a time, with room to spare.
    sizes = [plan.scenario_size, plan.peer_size, plan.limits_size]
    if "incremental" in plan.sections:
        # Device, two full backups (half of it is data), a reference image, a spare.
        sizes.append(plan.inc_size)
    need = 3 * max(sizes) + (512 << 20)
    if shm_free_bytes() >= need:
        return tempfile.mkdtemp(prefix="shmblock-bench-", dir=SHM_DIR), f"{SHM_DIR} (tmpfs)"
    return tempfile.mkdtemp(prefix="shmblock-bench-", dir="/var/tmp"), "/var/tmp"


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``shmblock-run bench`` options."""
    plan = plan_from_args(args)
    out_dir = os.path.abspath(args.output)
    os.makedirs(out_dir, exist_ok=True)
    groups = len(plan.workloads) * len(plan.writers)
    total = (("limits" in plan.sections) + ("peers" in plan.sections)
             + groups * ("scenarios" in plan.sections)
             + len(plan.scaling_sizes) * ("scaling" in plan.sections)
             + ("incremental" in plan.sections) + ("restore" in plan.sections)
             + ("repo" in plan.sections))
    reporter = Reporter(total, sys.stderr.isatty() and not args.json)
    started = time.monotonic()
    res: dict[str, Any] = {
        "schema": 1,
        "command": shlex.join(["shmblock-run", *getattr(args, "argv", [])]),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "load_start": loadavg(),
        "plan": plan.to_json(),
        "notes": [],
    }
    target_dir, target_kind = _pick_target_dir(plan)
    scaling_dir = tempfile.mkdtemp(prefix="shmblock-bench-scaling-",
                                   dir=plan.scaling_dir or "/var/tmp")
    res["target_dir_kind"] = target_kind
    res["machine"] = machine.describe(target_dir)
    try:
        with reporter.running() as rep:
            _sections(plan, res, target_dir, scaling_dir, rep)
    finally:
        shutil.rmtree(target_dir, ignore_errors=True)
        shutil.rmtree(scaling_dir, ignore_errors=True)
    res["load_end"] = loadavg()
    res["duration_s"] = time.monotonic() - started
    if "scaling" in res:
        res["scaling"]["target_kind"] = (
            f"{plan.scaling_dir or '/var/tmp'} ({machine.fs_type(plan.scaling_dir or '/var/tmp')})")
    res["ratios"] = report.ratios(res)
    res["goals"] = report.goals(res)
    try:
        res["plots"] = [os.path.basename(p) for p in report.plots(res, out_dir)]
    except ImportError:
        res["plots"] = []
        res["notes"].append("matplotlib is not installed (pip install 'shmblock[bench]'): "
                            "no plots")
    report.write_json(os.path.join(out_dir, "results.json"), res)
    write_file_atomic(os.path.join(out_dir, "results.md"), report.markdown(res).encode())
    if args.json:
        with open(os.path.join(out_dir, "results.json")) as f:
            sys.stdout.write(f.read())
    else:
        print(report.headline(res))
        print(f"results: {out_dir}/results.json, results.md"
              + "".join(f", {p}" for p in res["plots"]))
    failed = [c for c in res.get("scenarios", [])
              if c["backup"] and c["backup_outcome"] != "completed"]
    for c in failed:
        print(f"shmblock-run bench: backup in {c['workload']} × {c['writers']} → {c['target']} "
              f"{c['backup_outcome']}: {c['backup_error']}", file=sys.stderr)
    for problem in res["failures"]:
        print(f"shmblock-run bench: {problem}", file=sys.stderr)
    return EXIT_FAILED if failed or res["failures"] else EXIT_OK


def _sections(plan: Plan, res: dict[str, Any], target_dir: str, scaling_dir: str,
              rep: Reporter) -> None:
    res["foreign_load"] = {}
    res["failures"] = []
    for section in plan.sections:
        meter = CpuMeter()
        t0 = time.monotonic()
        _section(section, plan, res, target_dir, scaling_dir, rep)
        cores = meter.foreign_cores()
        res["foreign_load"][section] = {"cpu_cores": cores, "under_load": under_load(cores),
                                        "seconds": time.monotonic() - t0,
                                        "loadavg_after": loadavg()}


def _section(section: str, plan: Plan, res: dict[str, Any], target_dir: str,
             scaling_dir: str, rep: Reporter) -> None:
    note: Callable[[str], None] = rep.note
    if section == "limits":
        note("machine limits: memcpy, page-cache writes")
        res["limits"] = machine.measure_limits(target_dir, plan.limits_size, plan.memcpy_size)
        if "scaling" in plan.sections:
            res["limits"]["scaling_dir_page_cache_write"] = machine.page_cache_write(
                scaling_dir, plan.limits_size, repeats=1)
        rep.step()
    if section == "peers":
        from shmblock.bench.peers import run_peers

        res["peers"] = run_peers(plan, target_dir, note)
        rep.step()
    if section == "scenarios":
        from shmblock.bench.scenarios import run_matrix

        res["scenarios"] = [c.to_json() for c in run_matrix(plan, target_dir, note, rep.step)]
    if section == "scaling":
        from shmblock.bench.scaling import run_scaling

        res["scaling"] = run_scaling(plan, scaling_dir, note, rep.step)
    if section == "incremental":
        from shmblock.bench.incremental import BenchFailure, run_incremental

        try:
            res["incremental"] = run_incremental(plan, target_dir, note)
        except (BenchFailure, ShmblockError, OSError) as exc:
            # No figures rather than figures of a failed job; the other sections still run.
            res["failures"].append(f"incremental section: {exc}")
        else:
            if not res["incremental"]["verification"]["ok"]:
                res["failures"].append("incremental section: the chain did not verify: "
                                       f"{res['incremental']['verification']}")
        rep.step()
    if section == "repo":
        from shmblock.bench.repo import RepoBenchFailure, run_repo

        try:
            res["repo"] = run_repo(plan, target_dir, note)
        except (RepoBenchFailure, ShmblockError, OSError, subprocess.SubprocessError) as exc:
            res["failures"].append(f"repo section: {exc}")
        rep.step()
    if section == "restore":
        from shmblock.bench.incremental import BenchFailure
        from shmblock.bench.restore import run_restore

        # On a disk file system: fsync on tmpfs is free, and durability is half the work.
        where = plan.scaling_dir or "/var/tmp"
        try:
            res["restore"] = run_restore(plan, scaling_dir, f"{where} "
                                         f"({machine.fs_type(where)})", note)
        except (BenchFailure, ShmblockError, OSError) as exc:
            res["failures"].append(f"restore section: {exc}")
        else:
            if not res["restore"]["verified_restore"]["ok"]:
                res["failures"].append("restore section: the restore did not verify: "
                                       f"{res['restore']['verified_restore']}")
        rep.step()
