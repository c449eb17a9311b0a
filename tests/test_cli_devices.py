"""``shmblock-run run`` with several devices: one transaction of backups (issue 8 §4).

A real process with real arguments: every device's backup taken at one instant and
verified; a grouped run whose one target fills up fails as a group (exit 1); mismatched
counts and options that name one file exit 2 with one line naming what is wrong.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import small_tmpfs
from tests.procs import run_cli


def assert_usage_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def test_three_devices_in_one_grouped_transaction(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    proc = run_cli("run", "--devices", "3", "--size", "16M", "--writers", "1",
                   "--duration", "1.5", "--backup-at", "0.5", "--target-dir", "out",
                   "--completion-mode", "grouped", "--json", "s.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3 devices, one transaction (completion-mode grouped)" in proc.stdout
    assert proc.stdout.count("completed, verified") == 3, proc.stdout
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["ok"] and summary["completion_mode"] == "grouped"
    assert [b["device"] for b in summary["backups"]] == ["dev0", "dev1", "dev2"]
    assert all(b["verified"] for b in summary["backups"])
    assert {w["device"] for w in summary["writer_stats"]} == {"dev0", "dev1", "dev2"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["dev0.qcow2", "dev1.qcow2", "dev2.qcow2"]


def test_named_devices_with_a_target_each(tmp_path: Path) -> None:
    proc = run_cli("run", "--device", "a:8M", "--device", "b", "--size", "4M",
                   "--writers", "1", "--duration", "1", "--target", "a.raw",
                   "--target", "b.qcow2", "--json", "s.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["completion_mode"] == "individual"
    assert summary["devices"] == [{"name": "a", "size": 8 << 20},
                                  {"name": "b", "size": 4 << 20}]
    assert (tmp_path / "a.raw").stat().st_size == 8 << 20
    assert [b["format"] for b in summary["backups"]] == ["raw", "qcow2"]


def test_a_grouped_run_whose_target_fills_up_fails_as_a_group(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path, "512k") as small:
        proc = run_cli("run", "--device", "a:4M", "--device", "b:4M", "--device", "c:4M",
                       "--prefill", "1", "--writers", "0", "--speed", "640K",
                       "--format", "raw", "--target", "a.raw", "--target", small / "b.raw",
                       "--target", "c.raw", "--completion-mode", "grouped",
                       "--json", "s.json", cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        summary = json.loads((tmp_path / "s.json").read_text())
        outcomes = [b["outcome"] for b in summary["backups"]]
        assert outcomes == ["cancelled", "failed", "cancelled"], outcomes
        assert "No space left on device" in summary["backups"][1]["error"]
        assert "3 of 3 backups did not succeed" in proc.stderr
        assert not any(p.suffix in (".raw", ".part") for p in tmp_path.iterdir())
        assert list(small.iterdir()) == []


@pytest.mark.parametrize(("args", "words"), [
    (["--devices", "3", "--target", "a.raw", "--target", "b.raw"],
     ["3 device(s) but 2 --target", "--target-dir"]),
    (["--completion-mode", "grouped", "--target", "a.raw", "--target", "b.raw"],
     ["1 device(s) but 2 --target"]),
    (["--device", "a", "--device", "a", "--target", "x", "--target", "y"],
     ["--device a is given twice"]),
    (["--device", "a:8X", "--target", "x.raw"], ["--device 'a:8X'", "invalid size"]),
    (["--device", "a/b", "--target", "x.raw"], ["--device 'a/b'", "name"]),
    (["--device", "a", "--devices", "2", "--target-dir", "."], ["--device and --devices"]),
    (["--devices", "0", "--target-dir", "."], ["--devices 0"]),
    (["--devices", "2", "--target", "a.raw", "--target-dir", "."],
     ["--target and --target-dir"]),
    (["--devices", "2", "--target-dir", "nowhere"], ["--target-dir nowhere", "directory"]),
    (["--devices", "2", "--target-dir", ".", "--reference-image", "r.raw"],
     ["--reference-image", "several devices"]),
    (["--devices", "2", "--target-dir", ".", "--device-file", "d.raw"],
     ["--device-file", "several devices"]),
    (["--devices", "2", "--target", "same.raw", "--target", "same.raw"], ["same.raw"]),
    (["--devices", "2", "--target-dir", ".", "--completion-mode", "some"],
     ["--completion-mode", "some"]),
])
def test_bad_device_options_exit_2_before_anything_runs(
        tmp_path: Path, args: list[str], words: list[str]) -> None:
    proc = run_cli("run", "--size", "4M", "--duration", "1", *args, cwd=tmp_path)
    assert_usage_error(proc, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["runs"])
