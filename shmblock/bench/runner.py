"""``shmblock-run bench``: run the sections of a plan and write the results.

Sections, in order: machine limits, the QEMU comparison (idle copies), request →
snapshot latency, whole-process runs against ``qemu-img convert``, the scenario matrix,
guest retention against ``--speed``, scaling, incremental backups against full ones,
restore of a chain against ``qemu-img convert``, and fio over NBD beside
qemu-storage-daemon. Each section, and each cell inside it, records the CPU other
processes used while it ran, and is marked *under load* when they used more than a small
share (:mod:`shmblock.bench.load`). Results with such figures are not written into the
repository's ``bench/results/`` unless ``--allow-load`` says so: they go to a directory
of their own and the exit code is 3 (:data:`EXIT_LOADED`). A section whose backup fails
or does not verify leaves a line in ``failures`` and makes the exit code 1; a section that
raises is recorded as failed and the others still run.
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
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from shmblock.bench import machine, report
from shmblock.bench.load import UNDER_LOAD_SHARE, CpuMeter, loadavg, tainted
from shmblock.bench.options import Plan, plan_from_args
from shmblock.device import SHM_DIR, shm_free_bytes
from shmblock.errors import ShmblockError
from shmblock.paths import write_file_atomic

EXIT_OK, EXIT_FAILED, EXIT_LOADED = 0, 1, 3
#: seconds of the look at the machine's load before a run meant for bench/results/
PREFLIGHT_S = 2.0
#: where published results live, relative to the repository's root
PUBLISHED = os.path.join("bench", "results")


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def published_dir() -> str:
    """The repository's ``bench/results`` (a function, so a test can point it elsewhere)."""
    return os.path.join(_repo_root(), PUBLISHED)


def is_published_dir(path: str) -> bool:
    """Whether ``path`` is the repository's ``bench/results`` (or a directory in it)."""
    published = os.path.realpath(published_dir())
    real = os.path.realpath(path)
    return real == published or real.startswith(published + os.sep)


def _git_commit() -> str | None:
    root = _repo_root()
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
    # Device file + output (process), image + backup target (qemu), one server at a time.
    sizes += [plan.process_size * ("process" in plan.sections),
              plan.qemu_size * ("qemu" in plan.sections)]
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
    steps = {"scenarios": groups, "scaling": len(plan.scaling_sizes)}
    total = sum(steps.get(s, 1) for s in plan.sections)
    publishing = is_published_dir(out_dir)
    if publishing and not plan.allow_load:
        # A look before minutes of work: the same verdict is taken at the end.
        pre = CpuMeter()
        time.sleep(PREFLIGHT_S)
        now = pre.load()
        if now.under_load:
            print(f"shmblock-run bench: warning: other processes use {now.foreign_cores:.2f} "
                  f"cores right now ({_who(now.to_json())}); figures taken under load are not "
                  f"written into {PUBLISHED}/ without --allow-load", file=sys.stderr)
    reporter = Reporter(total, sys.stderr.isatty() and not args.json)
    started = time.monotonic()
    res: dict[str, Any] = {
        "schema": 2,  # 2: per-cell load, tainted, latency/process/speed/qemu sections
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
    res["tainted"] = tainted(res)
    refused = bool(res["tainted"]) and publishing and not plan.allow_load
    if refused:
        # The run is not lost: it is written in the working directory, under a name that
        # says what it is.
        out_dir = tempfile.mkdtemp(prefix="bench-results-under-load-", dir=os.getcwd())
    json_path = os.path.join(out_dir, "results.json")
    # The figures first: a fault in the report below must never cost the measurements.
    report.write_json(json_path, res)
    res["ratios"] = _reported(res, "ratios", report.ratios, {})
    res["goals"] = _reported(res, "goals", report.goals, [])
    try:
        res["plots"] = [os.path.basename(p) for p in report.plots(res, out_dir)]
    except ImportError:
        res["plots"] = []
        res["notes"].append("matplotlib is not installed (pip install 'shmblock[bench]'): "
                            "no plots")
    except Exception as exc:
        res["plots"] = []
        res["failures"].append(f"report: plots: {type(exc).__name__}: {exc}")
    md = _reported(res, "results.md", report.markdown, "")
    head = _reported(res, "headline", report.headline, "")
    report.write_json(json_path, res)
    write_file_atomic(os.path.join(out_dir, "results.md"), (md or (
        "# shmblock benchmark results\n\nThe report could not be rendered: see "
        "`failures` in results.json.\n")).encode())
    if args.json:
        with open(json_path) as f:
            sys.stdout.write(f.read())
    else:
        print(head)
        print(f"results: {out_dir}/results.json, results.md"
              + "".join(f", {p}" for p in res["plots"]))
    failed = [c for c in res.get("scenarios", [])
              if c["backup"] and c["backup_outcome"] != "completed"]
    for c in failed:
        print(f"shmblock-run bench: backup in {c['workload']} × {c['writers']} → {c['target']} "
              f"{c['backup_outcome']}: {c['backup_error']}", file=sys.stderr)
    for problem in res["failures"]:
        print(f"shmblock-run bench: {problem}", file=sys.stderr)
    if refused:
        print(f"shmblock-run bench: not written into {PUBLISHED}/: other processes used more "
              f"than {UNDER_LOAD_SHARE:.0%} of the CPUs during {len(res['tainted'])} "
              f"figure(s) ({', '.join(res['tainted'][:6])}"
              f"{', ...' if len(res['tainted']) > 6 else ''}); the results are in {out_dir}. "
              "Re-run alone on the machine, or pass --allow-load to publish them marked.",
              file=sys.stderr)
        return EXIT_LOADED
    return EXIT_FAILED if failed or res["failures"] else EXIT_OK


def _reported(res: dict[str, Any], what: str, make: Callable[[dict[str, Any]], Any],
              empty: Any) -> Any:
    """``make(res)``, or ``empty`` and a line in ``failures`` if the report code breaks on
    figures it did not expect (a section that failed half-way)."""
    try:
        return make(res)
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        res["failures"].append(f"report: {what}: {type(exc).__name__}: {exc} "
                               f"({os.path.basename(where.filename)}:{where.lineno})")
        return empty


def _who(load: dict[str, Any]) -> str:
    top = load.get("top") or []
    return ", ".join(f"{t['name']} (pid {t['pid']}) {t['cores']:.2f}" for t in top) or \
        "not one process in particular"


def _sections(plan: Plan, res: dict[str, Any], target_dir: str, scaling_dir: str,
              rep: Reporter) -> None:
    res["foreign_load"] = {}
    res["failures"] = []
    for section in plan.sections:
        meter = CpuMeter()
        t0 = time.monotonic()
        try:
            _section(section, plan, res, target_dir, scaling_dir, rep)
        except Exception as exc:
            # One broken section must not cost the other sections' minutes: its error is a
            # failure of the run (exit 1), the others still run and are written.
            where = traceback.extract_tb(exc.__traceback__)[-1]
            res["failures"].append(f"{section} section: {type(exc).__name__}: {exc} "
                                   f"({os.path.basename(where.filename)}:{where.lineno})")
        load = meter.record()
        res["foreign_load"][section] = {"cpu_cores": load["foreign_cores"], **load,
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
    if section == "latency":
        from shmblock.bench.latency import run_latency

        note("request → snapshot latency")
        res["latency"] = run_latency(plan, target_dir, note)
        for problem in res["latency"].get("failures", []):
            res["failures"].append(f"latency section: {problem}")
        rep.step()
    if section == "process":
        from shmblock.bench.wholeprocess import run_whole_process

        res["process"] = run_whole_process(plan, target_dir, note)
        for problem in res["process"].get("failures", []):
            res["failures"].append(f"process section: {problem}")
        rep.step()
    if section == "speed":
        from shmblock.bench.speed import run_speed

        res["speed"] = run_speed(plan, target_dir, note)
        for problem in res["speed"].get("failures", []):
            res["failures"].append(f"speed section: {problem}")
        rep.step()
    if section == "qemu":
        from shmblock.bench.qemu_side import run_qemu_side

        res["qemu"] = run_qemu_side(plan, target_dir, note)
        for problem in res["qemu"].get("failures", []):
            res["failures"].append(f"qemu section: {problem}")
        rep.step()
    if section == "scenarios":
        from shmblock.bench.scenarios import run_matrix

        res["scenarios"] = [c.to_json() for c in run_matrix(plan, target_dir, note, rep.step)]
        for c in res["scenarios"]:
            ver = c.get("verification")
            if c["backup"] and ver is not None and not ver["verified"]:
                res["failures"].append(f"scenarios: {c['workload']} × {c['writers']} → "
                                       f"{c['target']}: the verified backup did not verify: "
                                       f"{ver}")
    if section == "scaling":
        from shmblock.bench.scaling import run_scaling

        res["scaling"] = run_scaling(plan, scaling_dir, note, rep.step)
        for problem in res["scaling"].get("failures", []):
            res["failures"].append(f"scaling section: {problem}")
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
