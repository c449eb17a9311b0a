"""What a benchmark run measures: the plan, built from ``shmblock-run bench`` options.

Only argparse and the standard library here, so the CLI can wire the subcommand without
importing numpy, matplotlib or psutil.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from typing import Any

from shmblock.errors import UsageError
from shmblock.units import parse_size

WORKLOAD_CHOICES = ("random", "first-touch", "zipf", "sequential", "mixed")
TARGET_CHOICES = ("raw", "qcow2")
#: smallest device of the incremental and restore sections: 128 clusters of 64 KiB
MIN_SECTION_SIZE = 8 << 20
SECTIONS = ("limits", "peers", "latency", "process", "scenarios", "speed", "scaling",
            "incremental", "restore", "qemu", "repo")


@dataclass
class Plan:
    """Every knob of one benchmark run; recorded in the results as it was."""

    quick: bool
    scenario_size: int
    writers: tuple[int, ...]
    workloads: tuple[str, ...]
    targets: tuple[str, ...]
    block_size: int
    warmup_s: float  # writers run this long before anything is measured
    idle_window_s: float  # the "backup off" measurement window
    settle_s: float  # pause between two backups of one scenario group
    peer_size: int
    peer_repeats: int
    limits_size: int
    memcpy_size: int
    scaling_sizes: tuple[int, ...]
    freeze_writers: tuple[int, ...]
    freeze_samples: int
    sections: tuple[str, ...]
    target_dir: str | None  # None: a temporary directory in /dev/shm when it fits
    scaling_dir: str | None  # None: a temporary directory on the disk (/var/tmp)
    inc_size: int = 4 << 30  # device of the incremental section
    inc_dirty: float = 0.01  # share of its clusters written between two backups
    inc_repeats: int = 3  # timed backups per kind (median kept)
    restore_size: int = 1 << 30  # device whose three-link chain the restore section restores
    restore_repeats: int = 3
    latency_size: int = 64 << 20  # idle device of the request → snapshot section
    latency_jobs: int = 50  # jobs per target format (p50/p99 over them)
    process_size: int = 1 << 30  # device file of the whole-process section
    process_repeats: int = 5  # runs of each command (median kept)
    speed_size: int = 256 << 20  # device of the retention-against---speed section
    speeds: tuple[int, ...] = (64 << 20, 256 << 20, 1 << 30, 0)  # 0: unlimited
    speed_writers: tuple[int, ...] = (1, 4)
    speed_workloads: tuple[str, ...] = ("zipf", "first-touch")
    qemu_size: int = 1 << 30  # image / device of the fio side-by-side section
    qemu_runtime_s: float = 6.0  # fio's time-based run, each cell
    qemu_iodepth: int = 4
    allow_load: bool = False
    seed: int = 1
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(parse_size(part, "size") for part in text.split(",") if part)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers like 1,2,4,8") from None
    if not values or any(v < 1 or v > 64 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each count must be from 1 to 64")
    return values


def _choices(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(part for part in text.split(",") if part)
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a comma-separated list of {', '.join(allowed)}")
        return values
    parse.__name__ = "list"
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``shmblock-run bench``."""
    p.add_argument("--quick", action="store_true",
                   help="small sizes and a reduced matrix: every section in about three "
                   "minutes (what CI runs)")
    p.add_argument("--output", metavar="DIR", default="bench-results",
                   help="directory for results.json, results.md and the PNG plots "
                   "(default ./bench-results)")
    p.add_argument("--sections", type=_choices(SECTIONS), default=SECTIONS,
                   help=f"which parts to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--size", type=_sizes, metavar="SIZE",
                   help="device size of the scenario matrix (default 1G, quick 64M)")
    p.add_argument("--writers", type=_ints, metavar="N,N,...",
                   help="writer counts of the matrix (default 1,4)")
    p.add_argument("--workloads", type=_choices(WORKLOAD_CHOICES), metavar="W,W,...",
                   help="workloads of the matrix (default random,first-touch,zipf)")
    p.add_argument("--targets", type=_choices(TARGET_CHOICES), metavar="T,T,...",
                   help="backup targets of the matrix (default raw,qcow2)")
    p.add_argument("--peer-size", type=_sizes, metavar="SIZE",
                   help="content size for the QEMU comparison (default 1G, quick 64M)")
    p.add_argument("--scaling-sizes", type=_sizes, metavar="SIZE,SIZE,...",
                   help="device sizes of the scaling section (default 256M,1G,2G,16G, "
                   "16G becoming 8G when memory is short; quick 64M,128M)")
    p.add_argument("--inc-size", type=_sizes, metavar="SIZE",
                   help="device size of the incremental section (default 4G, quick 256M)")
    p.add_argument("--restore-size", type=_sizes, metavar="SIZE",
                   help="device size of the restore section's chain (default 1G, quick "
                   "64M)")
    p.add_argument("--target-dir", metavar="DIR",
                   help="where backups, qemu-img outputs and the page-cache test write "
                   "(default: a temporary directory in /dev/shm)")
    p.add_argument("--scaling-dir", metavar="DIR",
                   help="where the scaling section's backups go (default: a temporary "
                   "directory in /var/tmp, since 16 GiB of device and backup do not both "
                   "fit in /dev/shm)")
    p.add_argument("--qemu-size", type=_sizes, metavar="SIZE",
                   help="image size of the fio side-by-side section (default 1G, quick 64M)")
    p.add_argument("--speeds", type=_sizes, metavar="SPEED,...",
                   help="backup speeds of the speed section, 0 = unlimited (default "
                   "64M,256M,1G,0; quick 16M,0)")
    p.add_argument("--allow-load", action="store_true",
                   help="write results into the repository's bench/results/ even when "
                   "other processes used more than 10%% of the CPUs during some figure "
                   "(the report then names the tainted figures)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true",
                   help="print the results JSON on stdout instead of the summary")


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The plan for parsed options (quick or full, then the explicit overrides)."""
    q = bool(args.quick)
    plan = Plan(
        quick=q,
        scenario_size=parse_size("64M" if q else "1G"),
        # Zipf 1 and 4 writers, first-touch 4 are the goals' cells; 2 and 8 cost minutes
        # and are a --writers away.
        writers=(1, 4),
        workloads=("random", "first-touch", "zipf"),
        targets=("raw", "qcow2"),
        block_size=4096,
        warmup_s=0.2 if q else 0.5,
        idle_window_s=0.3 if q else 2.0,
        settle_s=0.1 if q else 0.3,
        peer_size=parse_size("64M" if q else "1G"),
        peer_repeats=1 if q else 3,
        limits_size=parse_size("64M" if q else "1G"),
        memcpy_size=parse_size("32M" if q else "256M"),
        scaling_sizes=tuple(parse_size(s) for s in (("64M", "128M") if q else
                                                     ("256M", "1G", "2G", "16G"))),
        freeze_writers=(1, 2) if q else (1, 2, 4, 8),
        freeze_samples=5 if q else 50,
        sections=tuple(args.sections),
        target_dir=args.target_dir,
        scaling_dir=args.scaling_dir,
        inc_size=parse_size("256M" if q else "4G"),
        inc_repeats=1 if q else 3,
        restore_size=parse_size("64M" if q else "1G"),
        restore_repeats=1 if q else 3,
        latency_size=parse_size("16M" if q else "64M"),
        latency_jobs=10 if q else 50,
        process_size=parse_size("64M" if q else "1G"),
        process_repeats=1 if q else 5,
        speed_size=parse_size("32M" if q else "256M"),
        speeds=(16 << 20, 0) if q else (64 << 20, 256 << 20, 1 << 30, 0),
        speed_writers=(1,) if q else (1, 4),
        qemu_size=parse_size("64M" if q else "1G"),
        qemu_runtime_s=1.5 if q else 6.0,
        allow_load=bool(getattr(args, "allow_load", False)),
        seed=args.seed,
    )
    if args.size:
        plan.scenario_size = args.size[0]
    if args.writers:
        plan.writers = args.writers
    if args.workloads:
        plan.workloads = args.workloads
    if args.targets:
        plan.targets = args.targets
    if args.peer_size:
        plan.peer_size = args.peer_size[0]
    if args.scaling_sizes:
        plan.scaling_sizes = args.scaling_sizes
    # getattr: a Namespace built by hand (tests, older callers) may lack the newer options.
    if getattr(args, "inc_size", None):
        plan.inc_size = args.inc_size[0]
    if getattr(args, "restore_size", None):
        plan.restore_size = args.restore_size[0]
    if getattr(args, "qemu_size", None):
        plan.qemu_size = args.qemu_size[0]
    if getattr(args, "speeds", None):
        plan.speeds = args.speeds
    if plan.qemu_size < (1 << 20) or plan.qemu_size % (64 << 10):
        raise UsageError(f"--qemu-size {plan.qemu_size}: must be a multiple of 64K and at "
                         "least 1M")
    for option, size in (("--inc-size", plan.inc_size), ("--restore-size", plan.restore_size)):
        # 1 % of the clusters must be some clusters, and the chain's links need some too.
        if size < MIN_SECTION_SIZE or size % (64 << 10):
            raise UsageError(f"{option} {size}: must be a multiple of 64K and at least "
                             f"{MIN_SECTION_SIZE >> 20}M")
    return plan
