"""``shmblock-run run`` with several devices: writers on each, one transaction of backups.

    shmblock-run run --devices 3 --target-dir backups/ --completion-mode grouped
    shmblock-run run --device a:64M --device b:128M --target a.qcow2 --target b.raw

Devices: ``--device NAME[:SIZE]`` once per device (SIZE defaults to ``--size``), or
``--devices N`` for ``dev0`` … ``dev{N-1}`` of ``--size`` each (neither: one device,
``dev0``). Targets: ``--target``
once per device, in the order of the devices, or ``--target-dir DIR`` for
``DIR/NAME.qcow2`` (``.raw`` with ``--format raw``). ``--writers`` and the workload
options apply to every device (each device's writers get their own seed). At
``--backup-at`` one transaction (:mod:`shmblock.transaction`) takes every device's
snapshot at one instant; ``--completion-mode grouped`` cancels every job when one fails.
Options that name one file (``--device-file``, ``--reference-image``) are refused with
several devices. Mismatched counts and unknown combinations exit 2 before anything runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from shmblock import paths
from shmblock.cli import (
    EXIT_FAILED,
    EXIT_OK,
    backup_dict,
    check_run_options,
    progress_display,
    sleep_showing,
    writer_dict,
)
from shmblock.engine import Engine
from shmblock.errors import UsageError
from shmblock.names import NAME_RE
from shmblock.options import BackupOptions
from shmblock.stats import WriterStats
from shmblock.targets import TargetSpec
from shmblock.transaction import COMPLETION_MODES, Backup
from shmblock.units import format_size, parse_size

#: Devices one run may have (each has its own writers and backup worker).
MAX_DEVICES = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The run subcommand's options for several devices."""
    g = p.add_argument_group(
        "several devices (one transaction)",
        "writers on every device; every device's backup taken at one instant")
    g.add_argument("--device", action="append", metavar="NAME[:SIZE]", dest="device_specs",
                   help="a device of this name (and size, default --size); repeat it, "
                   "once per device")
    g.add_argument("--devices", type=int, metavar="N",
                   help=f"N devices dev0 … dev(N-1) of --size (1 to {MAX_DEVICES})")
    g.add_argument("--target-dir", metavar="DIR",
                   help="write each device's backup to DIR/NAME.qcow2 (.raw with --format "
                   "raw) instead of one --target per device")
    g.add_argument("--completion-mode", choices=COMPLETION_MODES, default=None,
                   help="individual (default): each job ends on its own; grouped: a job "
                   "that fails cancels the others and every bitmap stays as it was")


def wanted(args: argparse.Namespace) -> bool:
    """Whether the run is a transaction: any option of this group was given."""
    return bool(args.device_specs or args.devices is not None or args.target_dir
                or args.completion_mode)


def single_target(args: argparse.Namespace) -> None:
    """The one-device run: ``args.target`` (a list, the option repeats) becomes one.

    The last one wins, as for any option given twice (and as before ``--target`` could
    repeat): a script that overrides a default ``--target`` keeps working.
    """
    args.target = args.target[-1] if args.target else None


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    size: int


def device_specs(args: argparse.Namespace) -> list[DeviceSpec]:
    """The devices of the run (UsageError: exit 2)."""
    if args.device_specs and args.devices is not None:
        raise UsageError("--device and --devices both given: use one of them")
    if args.devices is not None:
        if not 1 <= args.devices <= MAX_DEVICES:
            raise UsageError(f"--devices {args.devices}: expected 1 to {MAX_DEVICES}")
        return [DeviceSpec(f"dev{i}", args.size) for i in range(args.devices)]
    if not args.device_specs:
        return [DeviceSpec("dev0", args.size)]  # one device, in a transaction
    specs: list[DeviceSpec] = []
    for text in args.device_specs:
        name, sep, size_text = text.partition(":")
        if not NAME_RE.match(name):
            raise UsageError(f"--device {text!r}: the name must be 1-32 of [A-Za-z0-9_.-]")
        try:
            size = parse_size(size_text) if sep else args.size
        except ValueError as exc:
            raise UsageError(f"--device {text!r}: {exc}") from exc
        if any(s.name == name for s in specs):
            raise UsageError(f"--device {name} is given twice: device names must differ")
        specs.append(DeviceSpec(name, size))
    if len(specs) > MAX_DEVICES:
        raise UsageError(f"{len(specs)} devices: at most {MAX_DEVICES}")
    return specs


def targets(args: argparse.Namespace, specs: list[DeviceSpec]) -> list[str]:
    """One target per device, in the devices' order (UsageError: exit 2)."""
    given = args.target or []
    if args.target_dir:
        if given:
            raise UsageError("--target and --target-dir both given: use one of them")
        if not os.path.isdir(args.target_dir):
            raise UsageError(f"--target-dir {args.target_dir}: not a directory")
        ext = "raw" if args.format == "raw" else "qcow2"
        return [os.path.join(args.target_dir, f"{s.name}.{ext}") for s in specs]
    if len(given) != len(specs):
        raise UsageError(f"{len(specs)} device(s) but {len(given)} --target: give one "
                         "--target per device, in the order of the devices, or "
                         "--target-dir DIR")
    return list(given)


def check_options(args: argparse.Namespace) -> None:
    for option, value in (("--device-file", args.device_file),
                          ("--reference-image", args.reference_image)):
        if value:
            raise UsageError(f"{option} names one file: it cannot be used with several "
                             "devices")
    if args.format == "nbd" and args.target_dir:
        raise UsageError("--target-dir writes files: --format nbd needs one --target per "
                         "device")


def backups(args: argparse.Namespace, specs: list[DeviceSpec],
            names: list[str]) -> list[BackupOptions]:
    """Each device's validated backup options; outputs checked before anything runs."""
    opts = [BackupOptions(TargetSpec.parse(t, args.format), sync=args.sync,
                          speed=args.speed, cbw_mode=args.cbw_mode,
                          cbw_timeout=args.cbw_timeout, on_cbw_error=args.on_cbw_error,
                          verify=args.verify) for t in names]
    files: list[tuple[str, str]] = []
    for spec, o in zip(specs, opts, strict=True):
        if o.spec.file is not None:
            files += paths.with_parts(f"the target of device {spec.name}", o.spec.file)
    if args.json:
        paths.check_output("--json", args.json)
        files.append(("--json", args.json))
    paths.check_distinct(files)
    for spec, o in zip(specs, opts, strict=True):
        if o.spec.file is not None:
            paths.check_no_part(f"the target of device {spec.name}", o.spec.file)
    return opts


@dataclass
class DevicesSummary:
    run_id: str
    completion_mode: str
    devices: list[dict[str, Any]]
    backups: list[dict[str, Any]]
    snapshot_at_s: float
    writer_stats: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return all(b.get("ok") for b in self.backups)


def execute(args: argparse.Namespace, bar: Any) -> DevicesSummary:
    """Writers on every device, one transaction of their backups at --backup-at."""
    check_options(args)
    specs = device_specs(args)
    names = targets(args, specs)
    # The one-device checks (writers, prefill, --backup-at) with the targets found.
    checked = argparse.Namespace(**{**vars(args), "target": names[0]})
    check_run_options(checked)
    args.backup_at = checked.backup_at
    options = backups(args, specs, names)
    mode = args.completion_mode or "individual"
    # One backup worker per device, started with it: its start-up overlaps the
    # device's set-up instead of following it (shmblock.backup_workers).
    with Engine(prestart_backup_worker=True) as engine:
        devs = []
        for i, spec in enumerate(specs):
            dev = engine.create_device(spec.size, args.cluster_size, name=spec.name,
                                       max_writers=max(args.writers, 1))
            if args.prefill:
                dev.fill(args.prefill, seed=args.seed + i)
            devs.append(dev)
        # Workers started and targets opened before the writers (the slow parts).
        txn = engine.create_transaction(
            [Backup(d, o) for d, o in zip(devs, options, strict=True)], mode)
        if args.writers:
            for i, dev in enumerate(devs):
                engine.start_writers(dev, args.writers, workload=args.workload,
                                     block_size=args.block_size, duration=args.duration,
                                     rate=args.rate, seed=args.seed + 1000 * i)
        started = time.monotonic()
        sleep_showing(started + args.backup_at - time.monotonic() if args.writers else 0,
                      "writers running", bar)
        snapshot_at_s = time.monotonic() - started
        txn.start()
        if args.sync == "none":
            engine.wait_writers(args.duration + 30)
            for job in txn.jobs:
                job.complete()
        results = txn.wait()
        engine.wait_writers(max(args.duration - (time.monotonic() - started), 0) + 30)
        stats: list[tuple[str, WriterStats, str]] = []
        for dev in devs:
            status = {w.ident: w.status for w in engine.writers if w.device is dev}
            stats += [(dev.name, s, status.get(s.writer, "unknown"))
                      for s in engine.writer_stats(dev)]
    return DevicesSummary(
        run_id=engine.names.run_id, completion_mode=mode,
        devices=[{"name": s.name, "size": s.size} for s in specs],
        backups=[{"device": s.name, **backup_dict(r)}
                 for s, r in zip(specs, results, strict=True)],
        snapshot_at_s=snapshot_at_s,
        writer_stats=[{"device": name, **writer_dict(s, status)}
                      for name, s, status in stats])


def print_summary(s: DevicesSummary, out: Any) -> None:
    w = out.write
    w(f"shmblock run {s.run_id}: {len(s.devices)} devices, one transaction "
      f"(completion-mode {s.completion_mode}) taken {s.snapshot_at_s:.2f} s in\n")
    for d, b in zip(s.devices, s.backups, strict=True):
        line = f"{d['name']:>8} {format_size(d['size'])}: sync={b['sync']} → {b['target']}: " \
               f"{b['outcome']}"
        if b["outcome"] != "completed":
            line += f" ({b['error'] or 'cancelled with its group'})"
        elif b["verified"] is True:
            line += ", verified"
        elif b["verified"] is False:
            line += f", verification FAILED: {b['verify_error']}"
        w(line + "\n")
    for d in s.devices:
        rows = [ws for ws in s.writer_stats if ws["device"] == d["name"]]
        if rows:
            bad = [f"writer {ws['writer']}: {ws['status']}" for ws in rows
                   if ws["status"] != "ok"]
            w(f"{d['name']:>8} writers: {len(rows)}, "
              f"{sum(ws['ops_per_s'] for ws in rows):,.0f} ops/s, "
              f"{sum(ws['cbw_saves'] for ws in rows)} copy-before-write saves"
              + (f"; {'; '.join(bad)}" if bad else "") + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    interactive = sys.stderr.isatty() and not args.quiet
    with progress_display(interactive) as bar:
        summary = execute(args, bar)
    if not args.quiet:
        print_summary(summary, sys.stdout)
    if args.json:
        data = asdict(summary)
        data["ok"] = summary.ok
        paths.write_file_atomic(args.json, (json.dumps(data, indent=2) + "\n").encode())
    if not summary.ok:
        bad = [b for b in summary.backups if not b.get("ok")]
        why = "; ".join(f"{b['device']}: {b['error'] or b['verify_error'] or b['outcome']}"
                        for b in bad)
        print(f"shmblock-run: {len(bad)} of {len(summary.backups)} backups did not "
              f"succeed: {why}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
