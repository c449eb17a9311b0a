"""The repository against a real Ceph RADOS Gateway (``tests/ceph.py``): backups of
live devices into ``s3://``, the many-hosts scenario with prune and gc, radosgw killed
mid-backup, a corrupted chunk. Sizes are small: the whole file runs in a few minutes."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from shmblock.engine import Engine
from shmblock.job import Outcome
from shmblock.repo.repository import Repository
from shmblock.repo.url import open_store, parse_repo_url
from tests.ceph import CephCluster, S3Bucket
from tests.procs import run_cli
from tests.test_repo_integration import (
    Repo,
    backups,
    full_then_incremental_of_a_live_device,
    hosts_rounds_prune_gc,
)

pytestmark = [pytest.mark.ceph,
              pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")]


@pytest.fixture
def s3_repo(s3_bucket: S3Bucket) -> Repo:
    return Repo(s3_bucket.url, {**os.environ, **s3_bucket.env})


def test_full_and_incrementals_of_a_live_device_restore_equal(s3_repo: Repo,
                                                               tmp_path: Path) -> None:
    full_then_incremental_of_a_live_device(s3_repo, tmp_path)


def test_two_hosts_three_devices_rounds_with_prune_and_gc(s3_repo: Repo,
                                                          tmp_path: Path) -> None:
    hosts_rounds_prune_gc(s3_repo, tmp_path, rounds=3)


def test_radosgw_killed_mid_backup(s3_repo: Repo, ceph_cluster: CephCluster,
                                   tmp_path: Path) -> None:
    """The job fails naming the repository; the next backup de-duplicates against what
    was uploaded; no manifest refers to a missing chunk."""
    url = f"{s3_repo.url}?chunk-size=256K&deadline=8&threads=2&device=d"
    with Engine() as engine:
        dev = engine.create_device(16 << 20, 64 << 10)
        dev.fill(1.0, seed=5)
        # 2 MB/s: the job runs for about 8 s, radosgw dies in its middle.
        job = engine.backup(dev, url, speed=2_000_000, target_timeout=10.0)
        time.sleep(3.0)
        try:
            ceph_cluster.kill_rgw()
            result = job.wait(180.0)
        finally:
            if not ceph_cluster.rgw_running:
                ceph_cluster.start_rgw()
        assert result.outcome is Outcome.FAILED
        assert "repository" in (result.error or ""), result.error
        parsed = parse_repo_url(s3_repo.url)
        repo = Repository(open_store(parsed), parsed.repo)
        try:
            assert repo.manifest_keys() == []
            uploaded_before = len(list(repo.store.list("chunks/")))
            assert uploaded_before > 0
            again = engine.backup(dev, url)
            r2 = again.wait(180.0)
            assert r2.outcome is Outcome.COMPLETED, r2.error
            (m,) = list(repo.manifests())
            assert m.stats["dedup_chunks"] >= uploaded_before
            assert m.stats["uploaded_chunks"] == 64 - m.stats["dedup_chunks"]
            assert repo.verify([m])[2] == []
            # The second job's lease went; the failed job's could not be deleted while
            # radosgw was down (it expires, and gc ignores it after its grace).
            failed_id = (result.target or "").split("?", 1)[0].rsplit("/", 1)[1]
            assert {o.key for o in repo.store.list("locks/")} <= {
                f"locks/backup-{failed_id}.json"}
        finally:
            repo.store.close()


def test_corrupted_chunk_is_named_by_verify_and_refused_by_restore(
        s3_repo: Repo, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    proc = run_cli("run", "--size", "8M", "--prefill", "0.5", "--duration", "0.5",
                   "--writers", "1", "--target", f"{s3_repo.url}?chunk-size=1M",
                   cwd=tmp_path, env=s3_repo.env)
    assert proc.returncode == 0, proc.stderr
    (row,) = backups(s3_repo)
    show = json.loads(run_cli("backups", "show", f"{s3_repo.url}/{row['id']}", "--json",
                              env=s3_repo.env).stdout)
    digest = next(d for d in show["chunks"] if d)
    client = s3_bucket.s3.client()
    try:
        key = f"{s3_bucket.prefix}chunks/{digest[:2]}/{digest}"
        data = bytearray(client.get_object(Bucket=s3_bucket.bucket, Key=key)["Body"].read())
        data[0] ^= 1
        client.put_object(Bucket=s3_bucket.bucket, Key=key, Body=bytes(data))
    finally:
        client.close()
    proc = run_cli("backups", "verify", s3_repo.url, "--json", env=s3_repo.env)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and not report["ok"]
    assert {(p["backup"], p["digest"], p["problem"]) for p in report["problems"]} == \
        {(row["id"], digest, "corrupt")}
    proc = run_cli("restore", f"{s3_repo.url}/{row['id']}", tmp_path / "out.raw",
                   env=s3_repo.env)
    assert proc.returncode == 1 and "is corrupt" in proc.stderr, proc.stderr


def test_wrong_credentials_and_a_missing_bucket_are_one_clear_line(
        s3_repo: Repo, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    bad_key = {**s3_repo.env, "AWS_SECRET_ACCESS_KEY": "not-the-key"}
    missing = s3_repo.url.replace(s3_bucket.bucket, s3_bucket.bucket + "-missing")
    for env, url, word in ((bad_key, s3_repo.url, "denied"),
                           (s3_repo.env, missing, "bucket")):
        proc = run_cli("backups", "list", url, env=env, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert word in proc.stderr.lower() and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        proc = run_cli("run", "--size", "8M", "--duration", "0.3", "--target",
                       f"{url}?deadline=10", cwd=tmp_path, env=env, timeout=180)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert word in proc.stderr.lower() and "Traceback" not in proc.stderr, proc.stderr
