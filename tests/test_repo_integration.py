"""The repository with real processes: ``shmblock-run`` backups of live devices into a
repository, restores compared with the reference images, several hosts backing up at
once while prune and gc run. On a directory repository (``file://``) here; the same
tests run against a real Ceph RADOS Gateway in ``tests/test_repo_ceph.py``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.procs import run_cli

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


@dataclass
class Repo:
    url: str
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


@pytest.fixture
def file_repo(tmp_path: Path) -> Repo:
    root = tmp_path / "repo"
    root.mkdir()
    return Repo(f"file://{root}")


def compare(a: Path, b: Path) -> None:
    same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert same.returncode == 0, same.stdout + same.stderr


def backups(repo: Repo, *extra: str) -> list[dict[str, object]]:
    proc = run_cli("backups", "list", repo.url, "--json", *extra, env=repo.env)
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, object]] = json.loads(proc.stdout)
    return rows


def full_then_incremental_of_a_live_device(repo: Repo, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(32 << 20)
    assert run_cli("bitmap", "add", disk, "b0", cwd=tmp_path).returncode == 0
    refs = []
    for i, sync in enumerate(("full", "incremental", "incremental")):
        ref = tmp_path / f"ref{i}.raw"
        args: list[str | Path] = [
                "run", "--device-file", disk, "--duration", "1.5", "--rate", "400",
                "--writers", "2", "--target", f"{repo.url}?chunk-size=1M", "--sync", sync,
                "--bitmap", "b0", "--reference-image", ref, "--verify", "--seed", str(i)]
        if i == 0:
            args += ["--prefill", "0.4", "--bitmap-mode", "on-success"]
        proc = run_cli(*args, cwd=tmp_path, env=repo.env, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "verify   ok" in proc.stdout
        refs.append(ref)
    rows = backups(repo)
    assert [r["sync"] for r in rows] == ["full", "incremental", "incremental"]
    assert rows[1]["parent"] == rows[0]["id"] and rows[2]["parent"] == rows[1]["id"]
    stats = [r["stats"] for r in rows]
    assert all(isinstance(s, dict) for s in stats)
    # The incrementals read only what changed (writers at 400 ops/s for ~1 s touch far
    # fewer than all 512 clusters) and upload only changed chunks.
    for s in stats[1:]:
        assert isinstance(s, dict) and s["received_bytes"] < 32 << 20
    for i, (row, ref) in enumerate(zip(rows, refs, strict=True)):
        out = tmp_path / f"out{i}.raw"
        how = ("--backup", str(row["id"])) if i == 0 else ()
        src = repo.url if i == 0 else f"{repo.url}/{row['id']}"
        proc = run_cli("restore", src, out, *how, env=repo.env, timeout=240)
        assert proc.returncode == 0, proc.stderr
        compare(out, ref)
    proc = run_cli("backups", "verify", repo.url, "--json", env=repo.env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["ok"] is True


def test_full_and_incrementals_of_a_live_device_restore_equal(file_repo: Repo,
                                                               tmp_path: Path) -> None:
    full_then_incremental_of_a_live_device(file_repo, tmp_path)


def hosts_rounds_prune_gc(repo: Repo, tmp_path: Path, rounds: int = 5) -> None:
    """Done means (scaled): two hosts (engines in their own processes), three devices
    each, ``rounds`` rounds (full, then incremental) into one repository, prune and gc
    running meanwhile; every retained backup restores equal to its reference."""
    hosts = []
    try:
        for host in ("hostA", "hostB"):
            hosts.append(subprocess.Popen(
                [sys.executable, "-m", "tests.repo_host", repo.url, host, str(rounds),
                 str(tmp_path)], cwd=Path(__file__).parent.parent, env=repo.env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 600
        gcs = 0
        while any(h.poll() is None for h in hosts) and time.monotonic() < deadline:
            prune = run_cli("backups", "prune", repo.url, "--keep-last", "2", env=repo.env)
            assert prune.returncode == 0, prune.stderr
            gc = run_cli("backups", "gc", repo.url, "--json", env=repo.env)
            assert gc.returncode == 0, gc.stderr
            gcs += 1
        for h in hosts:
            out, err = h.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert h.returncode == 0, out + err
    finally:
        for h in hosts:
            if h.poll() is None:
                h.kill()
            with contextlib.suppress(subprocess.SubprocessError, ValueError):
                h.communicate(timeout=30)  # reaps it and closes its pipes
    assert gcs >= 1
    prune = run_cli("backups", "prune", repo.url, "--keep-last", "2", env=repo.env)
    assert prune.returncode == 0, prune.stderr
    gc = run_cli("backups", "gc", repo.url, "--json", env=repo.env)
    assert gc.returncode == 0 and not json.loads(gc.stdout)["postponed"], gc.stdout
    refs: dict[str, str] = {}
    for host in ("hostA", "hostB"):
        refs.update(json.loads((tmp_path / f"{host}.json").read_text()))
    rows = backups(repo)
    assert len(rows) == 2 * 3 * 2  # prune kept the last two of every device
    uploaded = [r["stats"]["uploaded_bytes"] for r in rows]  # type: ignore[index]
    assert min(uploaded) < 8 << 20  # incrementals upload a part of the device
    for row in rows:
        restored = tmp_path / "restored.raw"
        proc = run_cli("restore", f"{repo.url}/{row['id']}", restored, "--force",
                       env=repo.env, timeout=240)
        assert proc.returncode == 0, proc.stderr
        compare(restored, Path(refs[str(row["id"])]))
    proc = run_cli("backups", "verify", repo.url, "--json", env=repo.env, timeout=240)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"], proc.stdout


def test_two_hosts_three_devices_rounds_with_prune_and_gc(file_repo: Repo,
                                                          tmp_path: Path) -> None:
    hosts_rounds_prune_gc(file_repo, tmp_path, rounds=3)


def test_a_corrupt_chunk_is_named_by_verify_and_refused_by_restore(file_repo: Repo,
                                                                   tmp_path: Path) -> None:
    proc = run_cli("run", "--size", "8M", "--prefill", "0.5", "--duration", "0.5",
                   "--writers", "1", "--target", f"{file_repo.url}?chunk-size=1M",
                   "--reference-image", tmp_path / "ref.raw", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (row,) = backups(file_repo)
    root = Path(file_repo.url[len("file://"):])
    show = json.loads(run_cli("backups", "show", f"{file_repo.url}/{row['id']}",
                              "--json").stdout)
    digest = next(d for d in show["chunks"] if d)
    offset = show["chunks"].index(digest) * show["chunk_size"]
    chunk = root / "chunks" / digest[:2] / digest
    data = bytearray(chunk.read_bytes())
    data[7] ^= 0xFF
    chunk.write_bytes(bytes(data))
    proc = run_cli("backups", "verify", file_repo.url)
    assert proc.returncode == 1
    assert f"corrupt chunk {digest} of backup {row['id']}" in proc.stdout
    assert f"at offset {offset}" in proc.stdout
    proc = run_cli("restore", f"{file_repo.url}/{row['id']}", tmp_path / "out.raw")
    assert proc.returncode == 1 and "is corrupt" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.raw").exists() and not (tmp_path / "out.raw.part").exists()


def test_bad_repository_usage_is_one_clear_line(file_repo: Repo, tmp_path: Path) -> None:
    proc = run_cli("run", "--size", "8M", "--duration", "0.3", "--target",
                   f"{file_repo.url}?bogus=1", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown option(s) bogus" in proc.stderr, proc.stderr
    proc = run_cli("run", "--size", "8M", "--duration", "0.3", "--target", file_repo.url,
                   "--sync", "none", cwd=tmp_path)
    assert proc.returncode != 0 and "sync=none cannot go to a repository" in proc.stderr
    proc = run_cli("backups", "prune", file_repo.url)
    assert proc.returncode == 2 and "retention policy" in proc.stderr
    proc = run_cli("restore", file_repo.url, tmp_path / "x.raw")
    assert proc.returncode == 2 and "--backup ID" in proc.stderr, proc.stderr


def test_backups_cli_json_and_restore_into_a_live_device(file_repo: Repo,
                                                         tmp_path: Path) -> None:
    from shmblock import cli
    from shmblock.engine import Engine
    from shmblock.job import Outcome
    from shmblock.restore import restore_to_device

    with Engine() as engine:
        dev = engine.create_device(8 << 20, 64 << 10, name="vm1")
        dev.fill(0.5, seed=3)
        ids = []
        for _ in range(3):
            result = engine.backup(dev, f"{file_repo.url}?chunk-size=1M").wait(120.0)
            assert result.outcome is Outcome.COMPLETED, result.error
            ids.append(result.target.split("?", 1)[0].rsplit("/", 1)[1])
        expected = dev.read(0, 8 << 20)
        dev.write(0, b"\xff" * (64 << 10))
        restored = restore_to_device(dev, f"{file_repo.url}/{ids[0]}")
        assert restored.verified is True
        assert dev.read(0, 8 << 20) == expected
    rows = backups(file_repo, "--device", "vm1")
    assert [r["id"] for r in rows] == ids and rows[1]["stats"]["uploaded_chunks"] == 0  # type: ignore[index]
    assert backups(file_repo, "--device", "other") == []
    proc = run_cli("backups", "prune", file_repo.url, "--keep-last", "1", "--dry-run", "--json")
    assert json.loads(proc.stdout) == {"dry_run": True, "removed": [
        {"device": "vm1", "id": i} for i in ids[:2]]}
    assert len(backups(file_repo)) == 3
    assert cli.main(["backups", "prune", file_repo.url, "--keep-within", "1h"]) == 0
    assert len(backups(file_repo)) == 3  # all are newer than an hour
    proc = run_cli("backups", "gc", file_repo.url, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["deleted"] == 0, proc.stdout
    proc = run_cli("backups", "gc", file_repo.url, "--wait", "-1")
    assert proc.returncode == 2 and "--wait" in proc.stderr
    proc = run_cli("backups", "show", file_repo.url)
    assert proc.returncode == 2 and "show needs a backup" in proc.stderr
