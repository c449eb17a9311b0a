"""``shmblock-run bitmap …`` and ``shmblock-run run --sync incremental``, as a user runs
them: real processes, exit codes 0/1/2, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from shmblock.bitmaps import inspect
from tests.procs import QEMU_IMG, needs_qemu_img, run_cli, start_cli, wait_until
from tests.test_cli import assert_one_line_error

MiB = 1 << 20


def listed(disk: Path) -> dict[str, dict[str, object]]:
    proc = run_cli("bitmap", "list", disk, "--json")
    assert proc.returncode == 0, proc.stderr
    return {b["name"]: b for b in json.loads(proc.stdout)["bitmaps"]}


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    return path


def test_every_bitmap_action(disk: Path) -> None:
    assert listed(disk) == {}
    assert run_cli("bitmap", "list", disk).stdout.strip().endswith("no bitmaps")
    for args in (("add", disk, "a"), ("add", disk, "coarse", "--granularity", "256K"),
                 ("add", disk, "off", "--disabled"), ("disable", disk, "a"),
                 ("enable", disk, "a"), ("merge", disk, "a", "coarse", "off"),
                 ("clear", disk, "coarse"), ("remove", disk, "off")):
        proc = run_cli("bitmap", *args)
        assert proc.returncode == 0 and not proc.stderr, (args, proc.stderr)
    found = listed(disk)
    assert sorted(found) == ["a", "coarse"]
    assert found["coarse"]["granularity"] == 256 * 1024
    assert found["a"]["enabled"] is True and found["a"]["count"] == 0
    assert found["a"]["status"] == "consistent"
    table = run_cli("bitmap", "list", disk).stdout
    assert "coarse" in table and "256.0 KiB" in table


@pytest.mark.parametrize(("args", "words"), [
    (("add", "{disk}", "a"), ["already has a bitmap named 'a'"]),
    (("add", "{disk}", "b", "--granularity", "3K"), ["granularity", "power of two"]),
    (("add", "{disk}", "b", "--granularity", "huge"), ["granularity"]),
    (("add", "{disk}", "bad/name"), ["bad/name", "must be 1-32"]),
    (("clear", "{disk}", "zz"), ["no bitmap named 'zz'"]),
    (("remove", "{disk}", "zz"), ["no bitmap named 'zz'"]),
    (("merge", "{disk}", "a", "zz"), ["no bitmap named 'zz'"]),
    (("merge", "{disk}", "a"), ["SOURCE"]),
    (("enable", "{missing}", "a"), ["missing.raw", "No such file"]),
    (("list", "{dir}"), ["not a regular file"]),
    (("frob", "{disk}"), ["invalid choice: 'frob'"]),
    (("add", "{disk}", "c", "--cluster-size", "32K"), ["--cluster-size only applies"]),
])
def test_bitmap_usage_errors_exit_2(disk: Path, args: tuple[str, ...],
                                    words: list[str]) -> None:
    assert run_cli("bitmap", "add", disk, "a").returncode == 0
    values = {"disk": str(disk), "missing": str(disk.parent / "missing.raw"),
              "dir": str(disk.parent)}
    proc = run_cli("bitmap", *(a.format(**values) for a in args))
    assert_one_line_error(proc, 2, *words)
    assert sorted(listed(disk)) == ["a"]


def test_a_change_is_refused_while_a_run_has_the_file_open(disk: Path,
                                                           tmp_path: Path) -> None:
    assert run_cli("bitmap", "add", disk, "a").returncode == 0
    run = start_cli("run", "--device-file", disk, "--writers", "1", "--rate", "20",
                    "--duration", "30", "--backup-at", "0", "--target", tmp_path / "b.raw",
                    "--quiet")
    try:
        wait_until(lambda: inspect(disk).state == "open", 30.0, what="the run opens it")
        proc = run_cli("bitmap", "clear", disk, "a")
        assert_one_line_error(proc, 1, "open by run", f"pid {run.pid}")
        # Reading needs no ownership: the bitmap a live run records is in use.
        assert listed(disk)["a"]["status"] == "in-use"
    finally:
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=60)
    assert inspect(disk).state == "clean"


def test_run_bitmap_usage_errors_exit_2(disk: Path, tmp_path: Path) -> None:
    assert run_cli("bitmap", "add", disk, "a").returncode == 0
    target = str(tmp_path / "i.qcow2")
    for args, words in (
        (("--sync", "incremental", "--bitmap", "a"), ["--bitmap needs --device-file"]),
        (("--device-file", disk, "--sync", "incremental"), ["needs a bitmap"]),
        (("--device-file", disk, "--sync", "incremental", "--bitmap", "nope"),
         ["no bitmap named 'nope'"]),
        (("--device-file", disk, "--sync", "full", "--bitmap", "a"),
         ["needs a bitmap mode"]),
        (("--device-file", disk, "--bitmap-mode", "never"), ["without a bitmap"]),
        (("--device-file", disk, "--sync", "incremental", "--bitmap", "a",
          "--bitmap-mode", "always"), ["use sync=bitmap"]),
        (("--device-file", disk, "--sync", "bitmap", "--bitmap", "a", "--bitmap-mode",
          "sometimes"), ["invalid choice: 'sometimes'"]),
        (("--device-file", disk, "--backing-format", "qcow2"), ["needs --backing-file"]),
    ):
        proc = run_cli("run", *args, "--target", target, "--writers", "0")
        assert_one_line_error(proc, 2, *words)
    proc = run_cli("run", "--device-file", disk, "--sync", "incremental", "--bitmap", "a",
                   "--writers", "0", "--target", tmp_path / "i.raw", "--backing-file",
                   "full.qcow2")
    assert_one_line_error(proc, 2, "only a qcow2 target can name a backing file")
    assert not list(tmp_path.glob("i.*"))


def test_an_incremental_from_an_inconsistent_bitmap_exits_1(disk: Path,
                                                            tmp_path: Path) -> None:
    assert run_cli("bitmap", "add", disk, "a").returncode == 0
    os.truncate(disk, 8 * MiB)  # the image grew: the bitmap no longer describes it
    proc = run_cli("run", "--device-file", disk, "--sync", "incremental", "--bitmap", "a",
                   "--writers", "0", "--target", tmp_path / "i.raw")
    assert_one_line_error(proc, 1, "bitmap 'a'", "inconsistent", "geometry mismatch")
    assert not (tmp_path / "i.raw").exists() and not (tmp_path / "i.raw.part").exists()
    found = listed(disk)["a"]
    assert found["status"] == "inconsistent" and "geometry" in str(found["reason"])
    # Now even the pre-check in the CLI knows, and says so the same way.
    proc = run_cli("run", "--device-file", disk, "--sync", "incremental", "--bitmap", "a",
                   "--writers", "0", "--target", tmp_path / "i.raw")
    assert_one_line_error(proc, 1, "inconsistent", "geometry mismatch")
    assert run_cli("bitmap", "clear", disk, "a").returncode == 1
    assert run_cli("bitmap", "remove", disk, "a").returncode == 0


@needs_qemu_img
def test_full_then_two_incrementals_then_restore(disk: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's regime: each link read through its chain is its snapshot, and the
    restore of the last link is the last snapshot."""
    assert QEMU_IMG is not None
    monkeypatch.chdir(tmp_path)  # relative backing file names, as a user types them
    assert run_cli("bitmap", "add", disk, "daily").returncode == 0
    links = [("full.qcow2", ["--sync", "full", "--bitmap", "daily", "--bitmap-mode",
                             "on-success", "--prefill", "0.5"]),
             ("inc1.qcow2", ["--sync", "incremental", "--bitmap", "daily",
                             "--backing-file", "full.qcow2"]),
             ("inc2.qcow2", ["--sync", "incremental", "--bitmap", "daily",
                             "--backing-file", "inc1.qcow2"])]
    sizes = []
    for i, (target, extra) in enumerate(links):
        proc = run_cli("run", "--device-file", disk, "--writers", "1", "--rate", "100",
                       "--duration", "1", "--backup-at", "0.5", "--target", target,
                       "--reference-image", f"ref{i}.raw", "--json", f"run{i}.json", *extra,
                       "--quiet", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads((tmp_path / f"run{i}.json").read_text())
        assert summary["backup"]["verified"] is True
        sizes.append(summary["backup"]["bytes_total"])
    assert sizes[1] < sizes[0] and sizes[2] < sizes[0], "incrementals copy only dirty data"
    for i, (target, _) in enumerate(links):
        for cmd in (["check", target], ["compare", f"ref{i}.raw", target]):
            proc = subprocess.run([QEMU_IMG, *cmd], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=60, check=False)
            assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_cli("restore", "inc2.qcow2", "restored.raw", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    same = subprocess.run([QEMU_IMG, "compare", "ref2.raw", "restored.raw"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert same.returncode == 0, same.stdout


def test_a_restore_into_a_device_file_marks_its_recording_bitmaps_all_dirty(
        disk: Path, tmp_path: Path) -> None:
    """A restore replaces the contents behind the write path: the next incremental from
    the file's bitmaps must copy everything, never miss what the restore changed."""
    backup = tmp_path / "backup.raw"
    backup.write_bytes(os.urandom(64 * 1024) * 64)  # the device's size, 4 MiB
    for args in (("add", disk, "rec"), ("add", disk, "past"), ("disable", disk, "past")):
        assert run_cli("bitmap", *args).returncode == 0
    proc = run_cli("restore", backup, disk, "--force")
    assert proc.returncode == 0, proc.stderr
    found = listed(disk)
    assert found["rec"]["count"] == 4 * MiB, "the recording bitmap did not see the restore"
    assert found["past"]["count"] == 0, "a disabled bitmap describes a past interval"


def test_size_defaults_to_the_device_files_or_256m_also_for_several_devices(
        disk: Path, tmp_path: Path) -> None:
    proc = run_cli("run", "--device-file", disk, "--writers", "0", "--target",
                   tmp_path / "one.raw", "--json", tmp_path / "one.json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "one.json").read_text())["device_size"] == 4 * MiB
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("run", "--devices", "2", "--writers", "0", "--format", "raw",
                   "--target-dir", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (out / "dev0.raw").stat().st_size == 256 * MiB
