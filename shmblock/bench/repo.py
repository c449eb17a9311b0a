"""Bench section ``repo``: incremental-forever backups into a repository, next to restic.

A device (half random data, half zeros), a full backup into the repository with a dirty
bitmap, then ``rounds`` incrementals, each after the guest rewrote ``inc_dirty`` of the
clusters. For every backup: seconds, bytes read from the device, bytes uploaded, chunks
de-duplicated; for the repository the dedup ratio (logical non-zero bytes of every
backup over the bytes stored). Beside each backup, ``restic backup`` of the same
snapshot (the reference image, a raw file) into a restic repository at the same place
(the same S3 endpoint, or a local directory), with restic's own ``data_added``.

Where: ``SHMBLOCK_BENCH_REPO=s3://bucket/prefix`` (credentials and endpoint from the
AWS environment; the bucket must exist) or, without it, a ``file://`` repository in the
bench's scratch directory. restic is skipped (noted) when it is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shmblock.bench.content import fill
from shmblock.bench.options import Plan
from shmblock.engine import Engine
from shmblock.job import Outcome
from shmblock.repo.repository import Repository
from shmblock.repo.url import open_store, parse_repo_url

Note = Callable[[str], None]
ROUNDS = 3
MAX_SIZE = 1 << 30  # memstore Ceph keeps every object in memory: stay modest


class RepoBenchFailure(Exception):
    pass


def _restic(args: list[str], env: dict[str, str], timeout: float = 1800) -> dict[str, Any]:
    proc = subprocess.run(["restic", *args, "--json"], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RepoBenchFailure(f"restic {args[0]}: {proc.stderr.strip()[-300:]}")
    summary: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("message_type") in ("summary", None):
            summary = msg
    return summary


def _restic_env(repo_url: str, out_dir: str) -> dict[str, str]:
    env = dict(os.environ, RESTIC_PASSWORD="shmblock-bench")
    parsed = parse_repo_url(repo_url)
    if parsed.scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "https://s3.amazonaws.com")
        env["RESTIC_REPOSITORY"] = f"s3:{endpoint.rstrip('/')}/{parsed.location}-restic"
    else:
        env["RESTIC_REPOSITORY"] = os.path.join(out_dir, "restic")
    return env


def run_repo(plan: Plan, out_dir: str, note: Note) -> dict[str, Any]:
    # The incremental section's device, capped; a quick run (the smoke test) stays tiny.
    size = min(plan.inc_size, 32 << 20 if plan.quick else MAX_SIZE)
    repo_url = os.environ.get("SHMBLOCK_BENCH_REPO") or ""
    if not repo_url:
        os.makedirs(os.path.join(out_dir, "repo"), exist_ok=True)
        repo_url = f"file://{os.path.join(out_dir, 'repo')}"
    parsed = parse_repo_url(repo_url)
    repo = Repository(open_store(parsed), parsed.repo)
    res: dict[str, Any] = {"size": size, "dirty_share": plan.inc_dirty, "repo": parsed.repo,
                           "rounds": [], "notes": []}
    restic = shutil.which("restic") is not None
    renv = _restic_env(repo_url, out_dir)
    if restic:
        subprocess.run(["restic", "init"], env=renv, capture_output=True, timeout=300,
                       check=False)  # exists already: fine, the backups say if not
    else:
        res["notes"].append("restic is not installed: no comparison")
    ref = os.path.join(out_dir, "repo-bench-ref.raw")
    rng = np.random.default_rng(plan.seed + 11)
    try:
        with Engine() as engine:
            dev = engine.create_device(size, max_writers=1)
            note(f"repo: filling {size >> 20} MiB")
            fill(dev, plan.seed)
            dev.add_bitmap("b0")
            cs = dev.cluster_size
            for r in range(ROUNDS + 1):
                if r:
                    n = max(1, int(dev.device.clusters * plan.inc_dirty))
                    for c in rng.choice(dev.device.clusters, n, replace=False):
                        dev.write(int(c) * cs, rng.integers(0, 256, cs, dtype=np.uint8))
                kind = "full" if r == 0 else "incremental"
                note(f"repo: {kind} backup {r}")
                if os.path.exists(ref):
                    os.unlink(ref)  # the engine writes a new reference image every time
                t0 = time.monotonic()
                job = engine.backup(dev, f"{repo_url}?device=bench", sync=kind,
                                    bitmap="b0", reference_image=ref,
                                    bitmap_mode="on-success" if r == 0 else None)
                result = job.wait(3600.0)
                seconds = time.monotonic() - t0
                if result.outcome is not Outcome.COMPLETED:
                    raise RepoBenchFailure(f"{kind} backup {r}: {result.error}")
                backup_id = result.target.split("?", 1)[0].rsplit("/", 1)[1]
                m = repo.find(backup_id)
                row: dict[str, Any] = {"kind": kind, "seconds": seconds,
                                       "read_bytes": m.stats.get("received_bytes", 0),
                                       "uploaded_bytes": m.stats.get("uploaded_bytes", 0),
                                       "dedup_chunks": m.stats.get("dedup_chunks", 0),
                                       "chunks": len(m.chunks)}
                if restic:
                    t0 = time.monotonic()
                    summary = _restic(["backup", ref, "--host", "bench"], renv)
                    row["restic_seconds"] = time.monotonic() - t0
                    row["restic_added_bytes"] = int(summary.get("data_added", 0))
                res["rounds"].append(row)
                note(f"repo: {kind}: {row['uploaded_bytes'] >> 20} MiB uploaded in "
                     f"{seconds:.1f} s")
        logical = sum(m.chunk_length(i) for m in repo.manifests()
                      for i, d in enumerate(m.chunks) if d is not None)
        stored = sum(o.size for o in repo.store.list("chunks/"))
        res["logical_bytes"] = logical
        res["stored_bytes"] = stored
        res["dedup_ratio"] = logical / stored if stored else 0.0
        incs = [row for row in res["rounds"] if row["kind"] == "incremental"]
        if incs:
            res["uploaded_per_incremental"] = sum(r["uploaded_bytes"] for r in incs) / len(incs)
            if restic:
                res["restic_added_per_incremental"] = sum(
                    r["restic_added_bytes"] for r in incs) / len(incs)
    finally:
        if os.path.exists(ref):
            os.unlink(ref)
        repo.store.close()
    return res
