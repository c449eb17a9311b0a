"""``shmblock-run bitmap``: the persistent dirty bitmaps of a device file, offline.

    shmblock-run bitmap add DEVICE_FILE NAME [--granularity 128K] [--disabled]
    shmblock-run bitmap remove|clear|enable|disable DEVICE_FILE NAME
    shmblock-run bitmap merge DEVICE_FILE TARGET SOURCE [SOURCE ...]
    shmblock-run bitmap list DEVICE_FILE [--json]

QEMU's ``block-dirty-bitmap-*`` commands for an image no VM is running on (what
``qemu-img bitmap`` does for qcow2). Every change opens the store beside the file
(``<file>.bitmaps/``) as its owner — recovering it first if its last run died — and
stores it cleanly before returning. A run that has the file open owns the bitmaps: a
change is then refused (exit 1) and must go through that run's API
(:class:`~shmblock.device_handle.DeviceHandle`); ``list`` reads without owning, so it
works at any time (a bitmap a live run records shows as ``in-use``).

Exit codes: 0 done; 1 refused by the store's state (open by a live run, inconsistent
bitmap); 2 bad usage (unknown file or bitmap, a name taken, a bad granularity).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from typing import Any

from shmblock.bitmaps import PersistentBitmapFile, inspect, store_dir
from shmblock.bitmaps.store import validate_granularity, validate_name
from shmblock.errors import UsageError
from shmblock.units import format_size

ACTIONS = ("add", "remove", "clear", "enable", "disable", "merge", "list")


def add_arguments(p: argparse.ArgumentParser, size_arg: Any) -> None:
    """The ``bitmap`` subcommand's own subcommands (``size_arg`` parses sizes)."""
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    sub.required = True
    add = sub.add_parser("add", help="define an empty bitmap that records every write")
    _file_and_name(add)
    add.add_argument("--granularity", type=size_arg("granularity"), default=None,
                     help="bytes per bit, a power of two from the cluster size (the "
                     "default) to 2G")
    add.add_argument("--cluster-size", type=size_arg("cluster size"), default=None,
                     help="the device's cluster size, for a file that has no bitmaps yet "
                     "(default 64K; must be what the runs use)")
    add.add_argument("--disabled", action="store_true",
                     help="add it not recording (enable it later)")
    for action, what in (("remove", "forget a bitmap (also an inconsistent one)"),
                         ("clear", "reset every bit"),
                         ("enable", "record writes again"),
                         ("disable", "stop recording; the bits stay as they are")):
        _file_and_name(sub.add_parser(action, help=what))
    merge = sub.add_parser("merge", help="OR source bitmaps into a target bitmap")
    merge.add_argument("device_file", metavar="DEVICE_FILE")
    merge.add_argument("name", metavar="TARGET")
    merge.add_argument("sources", metavar="SOURCE", nargs="+")
    lst = sub.add_parser("list", help="every bitmap with its dirty bytes and state")
    lst.add_argument("device_file", metavar="DEVICE_FILE")
    lst.add_argument("--json", action="store_true", help="print the list as JSON")


def _file_and_name(p: argparse.ArgumentParser) -> None:
    p.add_argument("device_file", metavar="DEVICE_FILE",
                   help="the raw image a run maps with --device-file")
    p.add_argument("name", metavar="NAME")


def _check_device_file(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UsageError(f"device file {path!r}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"device file {path!r} is not a regular file")


def cmd_bitmap(args: argparse.Namespace) -> int:
    path = args.device_file
    _check_device_file(path)
    if args.action == "list":
        return _list(path, args.json)
    validate_name(args.name)
    sources: list[str] = getattr(args, "sources", [])
    for name in sources:
        validate_name(name)
    has_store = (store_dir(path) / "maps").exists()
    if args.action != "add" and not has_store:
        raise UsageError(f"device file {path!r} has no bitmaps (no {store_dir(path)}/)")
    cluster_size = getattr(args, "cluster_size", None)
    if cluster_size is not None and has_store:
        raise UsageError("--cluster-size only applies to a file that has no bitmaps yet")
    # Owner: BitmapBusy (exit 1) while a live run has the file open.
    with PersistentBitmapFile.open(path, cluster_size=cluster_size, run_id="cli") as store:
        names = store.names()
        if args.action == "add":
            if args.name in names:
                raise UsageError(f"device file {path!r} already has a bitmap named "
                                 f"{args.name!r}")
            granularity = args.granularity or store.shape.cluster_size
            validate_granularity(granularity, store.shape.cluster_size)
            store.add(args.name, granularity, enabled=not args.disabled)
        else:
            for name in [args.name, *sources]:
                if name not in names:
                    raise UsageError(f"device file {path!r} has no bitmap named {name!r}")
            if args.action == "merge":
                store.merge(args.name, sources)
            else:
                getattr(store, args.action)(args.name)
    return 0


def _list(path: str, as_json: bool) -> int:
    if not (store_dir(path) / "maps").exists():
        info = None
        bitmaps: list[dict[str, Any]] = []
    else:
        info = inspect(path)
        bitmaps = [{"name": b.name, "granularity": b.granularity, "count": b.count,
                    "enabled": b.enabled, "status": b.status, "reason": b.reason,
                    "generation": b.generation}
                   for b in info.bitmaps]
    if as_json:
        print(json.dumps({"device_file": path, "state": info.state if info else "none",
                          "run_id": info.run_id if info else "", "bitmaps": bitmaps},
                         indent=2))
        return 0
    if not bitmaps:
        print(f"{path}: no bitmaps")
        return 0
    if info is not None and info.state == "open":
        print(f"{path}: open by run {info.run_id} (pid {info.owner_pid}); counts as "
              "recorded so far")
    elif info is not None and info.state == "unclean":
        print(f"{path}: its last run ({info.run_id}) died; the next open recovers the "
              "bitmaps")
    print(f"{'name':<24} {'granularity':>11} {'dirty':>10}  {'recording':<9}  status")
    for b in bitmaps:
        status = b["status"] + (f": {b['reason']}" if b["reason"] else "")
        print(f"{b['name']:<24} {format_size(b['granularity']):>11} "
              f"{format_size(b['count']):>10}  {'yes' if b['enabled'] else 'no':<9}  "
              f"{status}")
    sys.stdout.flush()
    return 0
