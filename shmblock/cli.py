"""``shmblock-run``: a thin command line over :class:`shmblock.engine.Engine`.

    shmblock-run                   a short demonstration (verified backup of a busy device)
    shmblock-run run [options]     writers + a backup taken mid-run, with a summary
    shmblock-run cleanup           remove what crashed runs left behind
    shmblock-run restore SRC DEST  write a backup into a device file and verify it
    shmblock-run bitmap ACTION …   the persistent dirty bitmaps of a device file
    shmblock-run bench [--quick]   benchmarks beside QEMU and the machine's limits

Exit codes: 0 success, 1 failed job or verification, 2 bad usage, 130 interrupted.
Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any, NoReturn

from shmblock import paths
from shmblock.cleanup import cleanup
from shmblock.engine import BackupJob, Engine
from shmblock.errors import BitmapInconsistent, ShmblockError, StateError, UsageError
from shmblock.guest import WORKLOADS
from shmblock.job import JobResult
from shmblock.layout import CBW_MODES, ON_CBW_ERROR
from shmblock.options import MAX_SPEED, BackupOptions
from shmblock.snapshot import BITMAP_MODES, SYNC_MODES
from shmblock.stats import WriterStats
from shmblock.targets import FORMATS, TargetSpec
from shmblock.units import format_rate, format_size, parse_size

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def size_arg(what: str, maximum: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            value = parse_size(text, what)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(
                f"{what} {text!r} is too large (at most {maximum})")
        return value
    parse.__name__ = what
    return parse


MAX_NUMBER = 1e9  # seconds or ops per second: above this a number is a typo, and inf
# or 1e300 would end in an OverflowError (time.sleep, the microsecond control words)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    if not value <= MAX_NUMBER:
        raise argparse.ArgumentTypeError(f"{text!r} is too large (at most {MAX_NUMBER:g})")
    return value


def nonzero_float(text: str) -> float:
    value = positive_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def add_run_options(p: argparse.ArgumentParser) -> None:
    dev = p.add_argument_group("device")
    dev.add_argument("--size", type=size_arg("size"), default=None,
                     help="device size, like 256M or 1G (default: the size of an "
                     "existing --device-file, else 256M)")
    dev.add_argument("--cluster-size", type=size_arg("cluster size"), default=64 * 1024,
                     help="cluster size, a power of two from 4K to 2M (default 64K)")
    dev.add_argument("--prefill", type=positive_float, default=0.0, metavar="FRACTION",
                     help="before anything else, write random data to this fraction of "
                     "the clusters (0 to 1; default 0: the device starts zeroed)")
    dev.add_argument("--device-file", metavar="PATH",
                     help="back the device with this raw image file instead of /dev/shm")
    wr = p.add_argument_group("guest writers")
    wr.add_argument("--writers", type=int, default=2, help="writer processes (default 2)")
    wr.add_argument("--workload", choices=WORKLOADS, default="random")
    wr.add_argument("--block-size", type=size_arg("block size"), default=4096,
                    help="guest I/O size (default 4K)")
    # Not 0: a writer process takes 0 to mean "until told", and the run would then
    # wait out its 30 s grace period for writers that never stop on their own.
    wr.add_argument("--duration", type=nonzero_float, default=3.0,
                    help="seconds the writers run (default 3)")
    wr.add_argument("--rate", type=positive_float, default=0.0,
                    help="ops per second per writer, 0 = as fast as possible")
    wr.add_argument("--seed", type=int, default=1)
    bk = p.add_argument_group("backup")
    bk.add_argument("--backup-at", type=positive_float, default=None,
                    help="seconds after the writers start to take the snapshot, at most "
                    "--duration (default 1, or half of a shorter --duration); the backup "
                    "worker and the target are made ready before the writers start")
    bk.add_argument("--target", action="append",
                    help="backup destination (required): a file, "
                    "nbd://host[:port]/export or nbd+unix:///export?socket=PATH; with "
                    "several devices, once per device in their order")
    bk.add_argument("--format", choices=FORMATS,
                    help="target format (default: from the target name)")
    bk.add_argument("--sync", choices=SYNC_MODES, default="full",
                    help="what the backup copies (default full); incremental and bitmap "
                    "copy the clusters of --bitmap")
    bk.add_argument("--bitmap", metavar="NAME",
                    help="the dirty bitmap of --device-file the backup copies (sync "
                    "incremental, bitmap) or resets (full, top); see `shmblock-run bitmap`")
    bk.add_argument("--bitmap-mode", choices=BITMAP_MODES,
                    help="what the bitmap holds afterwards: on-success (the default for "
                    "incremental) clears it if the job completes, always clears what was "
                    "copied, never leaves it")
    bk.add_argument("--backing-file", metavar="PATH",
                    help="qcow2 target only: the previous backup of the chain (an "
                    "incremental reads through it)")
    bk.add_argument("--backing-format", choices=("raw", "qcow2"),
                    help="format of --backing-file (default: probed by readers)")
    bk.add_argument("--speed", type=size_arg("speed", MAX_SPEED), default=0,
                    help="background copy limit in bytes per second, 0 = unlimited")
    bk.add_argument("--cbw-mode", choices=CBW_MODES, default="stage",
                    help="stage: writers save old data into the shared copy-before-write "
                    "buffer (fast); request: writers ask the backup worker and wait")
    bk.add_argument("--cbw-buffer", type=size_arg("cbw buffer"), default=None, metavar="SIZE",
                    help="copy-before-write buffer this job may use (default: all the "
                    "device has, 1/8 of it within 64 clusters..256M); 0 = request path only")
    bk.add_argument("--cbw-timeout", type=positive_float, default=5.0,
                    help="seconds a guest write waits for copy-before-write (default 5)")
    bk.add_argument("--on-cbw-error", choices=ON_CBW_ERROR, default="break-guest-write")
    bk.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="compare the backup with digests taken at the snapshot (default on)")
    bk.add_argument("--reference-image", metavar="PATH",
                    help="also write a plain raw image of the device at the snapshot instant")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write a machine-readable summary here")
    out.add_argument("--quiet", action="store_true", help="no progress, no summary")


#: Subcommands whose arguments come from modules that ``run`` does not need (the
#: repository client, QMP, the benchmarks): imported only when one of them, or the
#: whole help, is asked for. Importing them all cost ``run`` ~25-45 ms per start.
LAZY_COMMANDS = ("backups", "bitmap", "serve", "bench")


def build_parser(command: str | None = None) -> ArgumentParser:
    """The whole parser; with ``command`` (the first argument, when it names a
    subcommand outside LAZY_COMMANDS) the lazy subcommands get no arguments: they
    are only listed, and argparse never looks into them."""
    full = command is None or command in LAZY_COMMANDS
    p = ArgumentParser(prog="shmblock-run", description="Live point-in-time backups of "
                       "shared-memory block devices. With no command: a short demo.")
    sub = p.add_subparsers(dest="command", parser_class=ArgumentParser)
    run = sub.add_parser("run", help="run writers and take a backup mid-run")
    add_run_options(run)
    from shmblock.cli_devices import add_arguments as add_device_arguments
    add_device_arguments(run)
    demo = sub.add_parser("demo", help="the demonstration run (the default)")
    demo.add_argument("--json", metavar="PATH")
    cl = sub.add_parser("cleanup", help="remove shared memory, queues and partial files "
                        "left by crashed runs")
    cl.add_argument("--dry-run", action="store_true", help="only list what would go")
    cl.add_argument("--json", action="store_true", help="print the report as JSON")
    rs = sub.add_parser("restore", help="write a backup (raw, qcow2 chain, NBD export) "
                        "into a device file and verify it")
    rs.add_argument("source", metavar="SOURCE", help="the backup: a raw or qcow2 image "
                    "(its backing chain is followed), nbd://host[:port]/export or "
                    "nbd+unix:///export?socket=PATH")
    rs.add_argument("dest", metavar="DEST", help="the device file to write (a raw image "
                    "that --device-file can map)")
    rs.add_argument("--format", choices=("raw", "qcow2", "nbd", "repo"),
                    help="source format (default: nbd for a URI, else probed)")
    rs.add_argument("--backup", metavar="ID", help="SOURCE is a repository (s3://bucket/"
                    "prefix): restore its backup ID (see `shmblock-run backups list`)")
    rs.add_argument("--force", action="store_true",
                    help="replace an existing DEST (of the backup's size)")
    rs.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="re-read both and compare them cluster by cluster (default on)")
    rs.add_argument("--json", action="store_true", help="print the result as JSON")
    backups = sub.add_parser(
        "backups", help="list, show, verify, prune or gc the backups of a repository "
        "(s3://bucket/prefix)")
    bitmap = sub.add_parser(
        "bitmap", help="add, remove, clear, enable, disable, merge or list the persistent "
        "dirty bitmaps of a device file no run has open")
    serve = sub.add_parser(
        "serve", help="a QMP control socket (and NBD server): QEMU's clients drive backups")
    bench = sub.add_parser(
        "bench", help="benchmarks under contention, beside QEMU and the machine's limits")
    if not full:
        return p
    from shmblock.cli_backups import add_arguments as add_backups_arguments
    add_backups_arguments(backups)
    from shmblock.cli_bitmap import add_arguments as add_bitmap_arguments
    add_bitmap_arguments(bitmap, size_arg)
    from shmblock.serve.cli import add_arguments as add_serve_arguments
    add_serve_arguments(serve)
    from shmblock.bench.options import add_arguments as add_bench_arguments
    add_bench_arguments(bench)
    return p


# -- progress -------------------------------------------------------------------------


@contextlib.contextmanager
def progress_display(enabled: bool) -> Iterator[Any]:
    """A rich progress bar on a terminal; nothing otherwise."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True,
                  console=Console(stderr=True)) as bar:
        yield bar


def follow(job: BackupJob, bar: Any) -> JobResult:
    """Wait for a job, updating the progress bar while it runs."""
    if bar is None:
        return job.wait()
    task = bar.add_task(f"backup {job.sync} → {job.spec.target}", total=None)
    while not job.tracker.wait(0.1):
        done, total = job.progress
        bar.update(task, completed=done, total=total or None)
    done, total = job.progress
    bar.update(task, completed=done, total=total or done)
    return job.wait()


def sleep_showing(seconds: float, what: str, bar: Any) -> None:
    if seconds <= 0:
        return
    if bar is None:
        time.sleep(seconds)
        return
    task = bar.add_task(what, total=seconds)
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))
        bar.update(task, completed=seconds - max(left - 0.1, 0))
    bar.remove_task(task)


# -- the run ----------------------------------------------------------------------------


@dataclass
class RunSummary:
    run_id: str
    device_size: int
    cluster_size: int
    writers: int
    workload: str
    block_size: int
    duration_s: float
    backup: dict[str, Any]
    writer_stats: list[dict[str, Any]]
    guest_ops_per_s: float
    guest_mb_per_s: float
    latency_us: dict[str, float]

    @property
    def ok(self) -> bool:
        return bool(self.backup.get("ok"))


def backup_dict(result: JobResult) -> dict[str, Any]:
    d = asdict(result)
    d["outcome"] = result.outcome.value
    d["status"] = result.outcome.value
    d["ok"] = result.ok
    d["throughput_bytes_per_s"] = result.throughput
    # What the writers waited, without and with the verification copy (taken inside
    # the freeze, and growing with the device).
    d["freeze_ms"] = result.freeze_s * 1e3
    d["verify_copy_ms"] = result.verify_copy_s * 1e3
    d["freeze_with_copy_ms"] = (result.freeze_s + result.verify_copy_s) * 1e3
    return d


def backup_options(args: argparse.Namespace) -> BackupOptions:
    """The run's backup options, validated before anything runs (UsageError: exit 2)."""
    options = BackupOptions(
        TargetSpec.parse(args.target, args.format, args.backing_file, args.backing_format),
        sync=args.sync, speed=args.speed, cbw_mode=args.cbw_mode,
        cbw_timeout=args.cbw_timeout, on_cbw_error=args.on_cbw_error, verify=args.verify,
        reference_image=args.reference_image, bitmap=args.bitmap,
        bitmap_mode=args.bitmap_mode, cbw_buffer=args.cbw_buffer)
    check_run_bitmap(args)
    return options


def check_run_bitmap(args: argparse.Namespace) -> None:
    """--bitmap names a usable bitmap of --device-file, checked before anything runs."""
    if args.backing_format and not args.backing_file:
        raise UsageError("--backing-format needs --backing-file")
    if args.bitmap is None:
        return
    if not args.device_file:
        raise UsageError("--bitmap needs --device-file: a device in shared memory starts "
                         "with no bitmaps (add one with `shmblock-run bitmap add`)")
    from shmblock.bitmaps import inspect, store_dir

    found = {} if not (store_dir(args.device_file) / "maps").exists() else \
        {b.name: b for b in inspect(args.device_file).bitmaps}
    if args.bitmap not in found:
        raise UsageError(f"device file {args.device_file!r} has no bitmap named "
                         f"{args.bitmap!r} (add one with `shmblock-run bitmap add`)")
    if found[args.bitmap].status == "inconsistent":
        raise BitmapInconsistent(
            f"bitmap {args.bitmap!r} of {args.device_file} is inconsistent "
            f"({found[args.bitmap].reason}): an incremental backup from it could miss "
            "writes; take a full backup and remove or re-add the bitmap",
            args.bitmap, found[args.bitmap].reason)


def check_output_paths(args: argparse.Namespace, spec: TargetSpec) -> None:
    """Refuse output paths that cannot be written, before anything runs (exit code 2).

    Otherwise a whole run happens first, and a missing directory for the reference image
    or the summary only shows at the end, as a failed verification or a bare OSError.
    Outputs must be regular files (or new), must not exist as ``.part`` already, and no
    two of target, reference image, summary and device file may be one file
    (:mod:`shmblock.paths`); a device file must be able to back the device.
    """
    files: list[tuple[str, str]] = []
    if spec.file is not None:
        files += paths.with_parts("--target", spec.file)
    if args.reference_image:
        paths.check_output("--reference-image", args.reference_image)
        files += paths.with_parts("--reference-image", args.reference_image)
    if args.json:
        paths.check_output("--json", args.json)
        files.append(("--json", args.json))
    if args.device_file:
        paths.check_device_file(args.device_file, args.size)
        files.append(("--device-file", args.device_file))
    paths.check_distinct(files)
    for option, path in (("--target", spec.file),
                         ("--reference-image", args.reference_image)):
        if path:
            paths.check_no_part(option, path)


#: With a --backup-at further away than this, the worker is started this long before the
#: snapshot instead of before the writers (a worker waits at most 60 s for JobStart).
PREPARE_AHEAD = 20.0
#: Slack of a snapshot instant (sleep granularity, the freeze itself) still "on time".
ON_TIME = 0.25


def default_size(args: argparse.Namespace) -> None:
    """--size not given: an existing device file's size (an incremental regime reopens
    it), else 256M."""
    if args.size is None:
        existing = 0
        if args.device_file:
            with contextlib.suppress(OSError):
                existing = os.stat(args.device_file).st_size
        args.size = existing or parse_size("256M")


def check_run_options(args: argparse.Namespace) -> None:
    """Refuse inconsistent options before anything runs (UsageError: exit code 2)."""
    if not 0 <= args.writers <= 64:
        raise UsageError(f"--writers {args.writers}: expected 0 to 64")
    if args.target is None:
        raise UsageError("--target is required")
    if args.prefill > 1:
        raise UsageError(f"--prefill {args.prefill:g}: expected a fraction from 0 to 1")
    default_size(args)
    if args.backup_at is None:
        args.backup_at = min(1.0, args.duration / 2)
    if args.backup_at > args.duration:
        raise UsageError(f"--backup-at {args.backup_at:g} is after the writers stop "
                         f"(--duration {args.duration:g}): the snapshot would miss them")


def execute(args: argparse.Namespace, bar: Any) -> RunSummary:
    check_run_options(args)
    options = backup_options(args)
    check_output_paths(args, options.spec)
    # One backup worker per device, started with it: its start-up overlaps the
    # device's set-up instead of following it (shmblock.backup_workers).
    with Engine(prestart_backup_worker=True) as engine:
        dev = engine.create_device(args.size, args.cluster_size, backing_file=args.device_file,
                                   max_writers=max(args.writers, 1))
        if args.prefill:
            dev.fill(args.prefill, seed=args.seed)

        def prepare() -> BackupJob:
            # Worker start, target open/connect, verification buffers: the slow parts,
            # done before the snapshot instant (and, normally, before the writers start).
            return engine.create_backup(dev, options)

        job = prepare() if args.backup_at <= PREPARE_AHEAD else None
        t0 = time.monotonic()
        if args.writers:
            engine.start_writers(dev, args.writers, workload=args.workload,
                                 block_size=args.block_size, duration=args.duration,
                                 rate=args.rate, seed=args.seed)
        # --backup-at counts from here, when every writer is running: process start-up
        # (most of a second each on a busy machine) is not time the writers wrote.
        started = time.monotonic()
        if job is None:
            sleep_showing(started + args.backup_at - PREPARE_AHEAD - time.monotonic(),
                          "writers running", bar)
            job = prepare()
        sleep_showing(started + args.backup_at - time.monotonic() if args.writers else 0,
                      "writers running", bar)
        snapshot_at_s = time.monotonic() - started
        try:
            job.start()
        except StateError:
            # Its worker died before the snapshot: the job's result says how.
            if not job.tracker.concluded:
                raise
        timing = {"backup_at_s": args.backup_at, "snapshot_at_s": snapshot_at_s,
                  "writers_start_s": started - t0,
                  "backup_at_honoured": not args.writers
                  or snapshot_at_s <= args.backup_at + ON_TIME}
        if not timing["backup_at_honoured"]:
            print(f"shmblock-run: warning: --backup-at {args.backup_at:g} could not be "
                  f"honoured: preparing the backup took too long, so the snapshot was "
                  f"taken {snapshot_at_s:.2f} s after the writers started", file=sys.stderr)
        if args.sync == "none":
            # CBW-only job: it lasts as long as the writers do, then completes.
            engine.wait_writers(args.duration + 30)
            job.complete()
        result = follow(job, bar)
        engine.wait_writers(max(args.duration - (time.monotonic() - started), 0) + 30)
        elapsed = time.monotonic() - started
        stats = engine.writer_stats(dev)
        status = {w.ident: w.status for w in engine.writers if w.device is dev}
        p50, p99, p999 = engine.latency_percentiles(dev)
    total_ops = sum(s.ops for s in stats)
    total_bytes = sum(s.bytes for s in stats)
    span = max((s.elapsed_s for s in stats), default=0.0) or elapsed
    return RunSummary(
        run_id=engine.names.run_id, device_size=args.size, cluster_size=args.cluster_size,
        writers=args.writers, workload=args.workload, block_size=args.block_size,
        duration_s=elapsed, backup={**backup_dict(result), **timing},
        writer_stats=[writer_dict(s, status.get(s.writer, "unknown")) for s in stats],
        guest_ops_per_s=total_ops / span if span else 0.0,
        guest_mb_per_s=total_bytes / span / 1e6 if span else 0.0,
        latency_us={"p50": p50, "p99": p99, "p99.9": p999})


def writer_dict(s: WriterStats, status: str) -> dict[str, Any]:
    d = asdict(s)
    d["ops_per_s"] = s.ops_per_s
    d["status"] = status  # "ok", "killed by signal 9", "exit code 1: …"
    return d


def print_summary(s: RunSummary, out: Any = sys.stdout) -> None:
    b = s.backup
    w = out.write
    w(f"shmblock run {s.run_id}: {format_size(s.device_size)} device, "
      f"{format_size(s.cluster_size)} clusters, {s.writers} writer(s) "
      f"({s.workload}, {format_size(s.block_size)} blocks), {s.duration_s:.1f} s\n")
    w(f"backup   sync={b['sync']} → {b['target']} ({b['format']}): {b['outcome']}")
    if b["outcome"] == "completed":
        w(f" in {b['duration_s']:.2f} s, {format_rate(b['throughput_bytes_per_s'])}\n")
        copy = f" + {b['verify_copy_ms']:.1f} ms verification copy" \
            if b["verify_copy_ms"] else ""
        w(f"         {b['clusters_copied']} clusters saved, {b['cbw_clusters']} by "
          f"copy-before-write, {format_size(b['bytes_written'])} of data written, "
          f"freeze {b['freeze_ms']:.1f} ms{copy}\n")
        if b.get("cbw_buffer"):
            cb = b["cbw_buffer"]
            w(f"         cbw buffer {format_size(cb['capacity_bytes'])}: peak "
              f"{format_size(cb['peak_bytes'])}, full {cb['full_seconds']:.3f} s, "
              f"{cb['saves']} saves, {cb['fallbacks']} to the worker when full\n")
    else:
        w(f": {b['error']}\n")
    if b["verified"] is True:
        w("verify   ok: the backup matches the device at the snapshot instant\n")
    elif b["verified"] is False:
        w(f"verify   FAILED: {b['verify_error']}\n")
    if s.writer_stats:
        w(f"writers  {s.guest_ops_per_s:,.0f} ops/s, {s.guest_mb_per_s:,.1f} MB/s; latency "
          f"p50 {s.latency_us['p50']:.1f} µs, p99 {s.latency_us['p99']:.1f} µs, "
          f"p99.9 {s.latency_us['p99.9']:.1f} µs\n")
        w("         writer     ops/s   cbw saves  cbw requests  cbw wait  max stall  errors\n")
        for ws in s.writer_stats:
            w(f"         {ws['writer']:>6} {ws['ops_per_s']:>9,.0f} {ws['cbw_saves']:>11} "
              f"{ws['cbw_requests']:>13} {ws['cbw_wait_s']:>8.3f}s "
              f"{ws['max_stall_s'] * 1e3:>8.2f}ms {ws['errors']:>7}\n")
        for ws in s.writer_stats:
            if ws["status"] != "ok":
                w(f"         writer {ws['writer']}: {ws['status']}\n")


def write_json(path: str, summary: RunSummary) -> None:
    data = asdict(summary)
    data["ok"] = summary.ok
    data["cbw_buffer"] = data["backup"].get("cbw_buffer")  # contract C1: also at the top
    # A private temporary name (never a symlink followed), then a rename: shmblock.paths.
    paths.write_file_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def cmd_run(args: argparse.Namespace) -> int:
    from shmblock import cli_devices
    default_size(args)
    if cli_devices.wanted(args):  # several devices: one transaction of backups
        return cli_devices.cmd_run(args)
    cli_devices.single_target(args)
    interactive = sys.stderr.isatty() and not args.quiet
    with progress_display(interactive) as bar:
        summary = execute(args, bar)
    if not args.quiet:
        print_summary(summary)
    if args.json:
        write_json(args.json, summary)
    if not summary.ok:
        b = summary.backup
        reason = b["error"] or b["verify_error"] or b["outcome"]
        print(f"shmblock-run: backup {b['outcome']}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    parser = build_parser()
    with tempfile.TemporaryDirectory(prefix="shmblock-demo-") as tmp:
        argv = ["run", "--size", "256M", "--writers", "2", "--workload", "random",
                "--duration", "3", "--backup-at", "1", "--target",
                os.path.join(tmp, "demo.qcow2"), "--verify"]
        if args.json:
            argv += ["--json", args.json]
        run_args = parser.parse_args(argv)
        print("shmblock demo: 2 guest writers hammer a 256 MiB shared-memory device; a full\n"
              "backup to a qcow2 image is taken 1 s in, while they keep writing, then checked\n"
              "against digests taken at the snapshot instant.\n")
        return cmd_run(run_args)


def cmd_cleanup(args: argparse.Namespace) -> int:
    report = cleanup(dry_run=args.dry_run)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    elif report.empty:
        print("nothing to clean up")
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb}: {len(report.runs)} dead run(s), {len(report.segments)} shared-memory "
              f"segment(s), {len(report.queues)} queue(s), {len(report.files)} partial "
              f"file(s); killed {len(report.killed)} orphaned worker(s)")
        for item in report.segments + report.queues + report.files:
            print(f"  {item}")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from shmblock.errors import VerificationError
    from shmblock.restore import RestoreResult, restore, summary_lines

    result: RestoreResult | None = None
    with progress_display(sys.stderr.isatty() and not args.json) as bar:
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if bar is not None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase, total=total)
                bar.update(tasks[phase], completed=done)

        if args.backup:
            args.source = args.source.split("?", 1)[0].rstrip("/") + "/" + args.backup
        try:
            result = restore(args.source, args.dest, format=args.format,
                             overwrite=args.force, verify=args.verify, progress=progress)
        except VerificationError as exc:
            if args.json:
                print(json.dumps({"ok": False, "source": args.source, "destination":
                                  args.dest, "verified": False, "error": str(exc)}))
            raise
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print("\n".join(summary_lines(result)))
    return EXIT_OK


class Interrupted(Exception):
    pass


#: A signal that arrived while the main thread was inside ``Thread.start`` (retried).
_deferred_signal: list[int] = []
DEFER_S = 0.01


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if frame is not None and frame.f_code is threading.Thread.start.__code__:
        # Raising here, right after the new thread was launched, makes Thread.start
        # undo its bookkeeping while the thread runs: the thread then dies with a
        # KeyError traceback (CPython's threading, _limbo). Take the signal 10 ms later,
        # from wherever the main thread is then (never inside start twice in a row).
        _deferred_signal[:] = [signum]
        signal.signal(signal.SIGALRM, _on_deferred_signal)
        signal.setitimer(signal.ITIMER_REAL, DEFER_S)
        return
    # One interruption is enough: a second Ctrl-C must not cut the cleanup short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def _on_deferred_signal(_alarm: int, frame: FrameType | None) -> None:
    if _deferred_signal:
        _on_signal(_deferred_signal[0], frame)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "cleanup":
            return cmd_cleanup(args)
        if args.command == "restore":
            return cmd_restore(args)
        if args.command == "backups":
            from shmblock.cli_backups import cmd_backups
            return cmd_backups(args)
        if args.command == "bitmap":
            from shmblock.cli_bitmap import cmd_bitmap
            return cmd_bitmap(args)
        if args.command == "serve":
            from shmblock.serve.cli import cmd_serve
            return cmd_serve(args)
        if args.command == "bench":
            from shmblock.bench.runner import run as run_bench
            args.argv = argv
            return run_bench(args)
        if args.command in (None, "demo"):
            if args.command is None:
                args.json = None
            return cmd_demo(args)
        raise AssertionError(args.command)
    except Interrupted as exc:
        print(f"shmblock-run: interrupted by {exc}; everything the run made was removed",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        print(f"shmblock-run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ShmblockError as exc:
        print(f"shmblock-run: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"shmblock-run: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
