"""``shmblock-run backups``: the backups of a repository (``s3://bucket/prefix``).

    shmblock-run backups list REPO [--device ID] [--json]
    shmblock-run backups show REPO[/ID] [--backup ID] [--json]
    shmblock-run backups verify REPO [--backup ID | --device ID] [--json]
    shmblock-run backups prune REPO [--device ID] --keep-last N --keep-within 7d [--dry-run]
    shmblock-run backups gc REPO [--wait SECONDS] [--json]

``verify`` re-reads and re-hashes every chunk the manifests name (each distinct chunk
once) and lists missing or corrupt chunks by backup and offset; ``prune`` removes the
manifests a retention policy does not keep (per device); ``gc`` deletes the chunks no
manifest names, safely beside backups running on other hosts (the protocol is in
:mod:`shmblock.repo.repository`). Progress on a terminal only.

Exit codes: 0 done (verify: every chunk good); 1 a problem found or the store failed;
2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from shmblock.errors import UsageError
from shmblock.repo.format import Manifest
from shmblock.repo.repository import Policy, Repository, parse_duration
from shmblock.repo.url import default_host, open_store, parse_repo_url

EXIT_OK, EXIT_FAILED = 0, 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="backups_action", required=True, metavar="ACTION")
    for name, text in (("list", "the backups, oldest first"),
                       ("show", "one backup's manifest"),
                       ("verify", "re-hash every chunk the backups name"),
                       ("prune", "remove the backups a retention policy does not keep"),
                       ("gc", "delete the chunks no backup names")):
        a = sub.add_parser(name, help=text)
        a.add_argument("repo", metavar="REPO", help="s3://bucket/prefix (or file:///dir)")
        a.add_argument("--json", action="store_true", help="print the result as JSON")
        if name in ("list", "verify", "prune"):
            a.add_argument("--device", metavar="ID", help="only this device's backups")
        if name in ("show", "verify"):
            a.add_argument("--backup", metavar="ID", help="this backup only")
        if name == "prune":
            a.add_argument("--keep-last", type=int, metavar="N",
                           help="keep each device's N newest backups")
            a.add_argument("--keep-within", metavar="DURATION",
                           help="keep backups newer than this (90m, 12h, 7d, 2w)")
            a.add_argument("--dry-run", action="store_true", help="only list what would go")
        if name == "gc":
            a.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                           help="wait this long for running backups before postponing "
                           "the sweep (default 0)")


def _open(args: argparse.Namespace) -> tuple[Repository, str | None]:
    url = parse_repo_url(args.repo)
    return Repository(open_store(url), url.repo), url.backup_id


def _selected(repo: Repository, args: argparse.Namespace, backup_id: str | None
              ) -> list[Manifest]:
    bid = getattr(args, "backup", None) or backup_id
    if bid:
        return [repo.find(bid)]
    return list(repo.manifests(getattr(args, "device", None)))


def _progress(enabled: bool) -> Any:
    from shmblock.cli import progress_display
    return progress_display(enabled)


def cmd_backups(args: argparse.Namespace) -> int:
    repo, backup_id = _open(args)
    try:
        return ACTIONS[args.backups_action](repo, args, backup_id)
    finally:
        repo.store.close()


def _list(repo: Repository, args: argparse.Namespace, backup_id: str | None) -> int:
    rows = [m.summary() for m in _selected(repo, args, backup_id)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no backups in {repo.name}")
    for r in rows:
        stats = r["stats"]
        print(f"{r['id']}  {r['device']:<16} {r['sync']:<11} "
              f"{r['size'] / 2**20:9.1f} MiB  uploaded "
              f"{stats.get('uploaded_bytes', 0) / 2**20:8.1f} MiB"
              + (f"  parent {r['parent']}" if r["parent"] else ""))
    return EXIT_OK


def _show(repo: Repository, args: argparse.Namespace, backup_id: str | None) -> int:
    bid = args.backup or backup_id
    if not bid:
        raise UsageError("show needs a backup: REPO/<backup-id> or --backup ID")
    m = repo.find(bid)
    if args.json:
        print(m.encode().decode())
    else:
        for k, v in m.summary().items():
            print(f"{k:>12}: {v}")
    return EXIT_OK


def _verify(repo: Repository, args: argparse.Namespace, backup_id: str | None) -> int:
    manifests = _selected(repo, args, backup_id)
    with _progress(sys.stderr.isatty() and not args.json) as bar:
        task = bar.add_task("verify chunks", total=None) if bar is not None else None

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.update(task, completed=done, total=total)

        backups, chunks, problems = repo.verify(manifests, progress)
    if args.json:
        print(json.dumps({"ok": not problems, "backups": backups, "chunks": chunks,
                          "problems": [p.to_dict() for p in problems]}, indent=2))
    else:
        for p in problems:
            print(f"{p.problem:>8} chunk {p.digest} of backup {p.backup} (device "
                  f"{p.device}) at offset {p.offset}")
        print(f"verified {chunks} chunk(s) of {backups} backup(s): "
              + ("all good" if not problems else f"{len(problems)} problem(s)"))
    return EXIT_OK if not problems else EXIT_FAILED


def _prune(repo: Repository, args: argparse.Namespace, backup_id: str | None) -> int:
    policy = Policy(args.keep_last, parse_duration(args.keep_within)
                    if args.keep_within else None)
    removed = repo.prune(policy, args.device, dry_run=args.dry_run, now=time.time())
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "removed": [
            {"device": d, "id": i} for d, i in removed]}, indent=2))
    else:
        verb = "would remove" if args.dry_run else "removed"
        for d, i in removed:
            print(f"{verb} {i} (device {d})")
        print(f"{verb} {len(removed)} backup(s); run `shmblock-run backups gc` to free "
              "their chunks")
    return EXIT_OK


def _gc(repo: Repository, args: argparse.Namespace, backup_id: str | None) -> int:
    if args.wait < 0:
        raise UsageError("--wait must not be negative")
    result = repo.gc(wait=args.wait, host=default_host())
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"gc: {result.manifests} backup(s), {result.chunks} chunk(s), "
              f"{result.condemned} unreferenced, {result.deleted} deleted "
              f"({result.deleted_bytes / 2**20:.1f} MiB)")
        if result.postponed:
            print(f"gc: sweep postponed: {result.postponed}")
    return EXIT_OK


ACTIONS = {"list": _list, "show": _show, "verify": _verify, "prune": _prune, "gc": _gc}
