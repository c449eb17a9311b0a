"""``shmblock-run``, driven as a user would: a real process, real arguments, real files.

The contract (DESIGN.md "The user-facing contract"): no arguments runs a verified demo;
``run`` writes the backup, a reference image and a JSON summary; exit codes 0 / 1 / 2;
errors are one line on stderr, never a traceback; progress only on a terminal; every
worker process names its role in ps. Nothing is left behind, whatever happens (the
autouse fixture checks /dev/shm, the mqueue file system and the run registry).
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shmblock import cli
from shmblock.names import list_records
from tests.procs import SHMBLOCK_RUN, children, cmdline, run_cli, start_cli, wait_until

ESC = "\x1b["


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int,
                          *words: str) -> None:
    """Exit ``code``, nothing on stdout, one line on stderr naming ``words``."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {proc.stderr!r}"
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert ESC not in proc.stdout + proc.stderr


def test_no_arguments_runs_a_verified_demo(tmp_path: Path) -> None:
    proc = run_cli(cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "shmblock demo" in proc.stdout
    assert "completed" in proc.stdout
    assert "verify   ok" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert ESC not in proc.stdout + proc.stderr, "progress codes on a non-terminal"
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "runs"])  # the demo cleans up


def test_run_writes_backup_reference_and_summary(tmp_path: Path) -> None:
    proc = run_cli("run", "--size", "64M", "--writers", "2", "--backup-at", "0.5",
                   "--duration", "1.5", "--format", "raw", "--target", "b.raw",
                   "--reference-image", "r.raw", "--json", "s.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ESC not in proc.stdout + proc.stderr, "progress codes on a non-terminal"
    assert "verify   ok" in proc.stdout
    same = subprocess.run(["cmp", "r.raw", "b.raw"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)
    assert same.returncode == 0 and same.stdout == "" and same.stderr == ""
    assert (tmp_path / "b.raw").stat().st_size == 64 << 20
    assert not (tmp_path / "b.raw.part").exists()

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["ok"] is True
    assert summary["device_size"] == 64 << 20 and summary["writers"] == 2
    backup = summary["backup"]
    assert backup["status"] == "completed" and backup["outcome"] == "completed"
    assert backup["verified"] is True and backup["verify_error"] == ""
    assert backup["bytes_total"] == 64 << 20
    assert 0 < backup["bytes_written"] <= 64 << 20
    assert backup["duration_s"] > 0
    assert backup["throughput_bytes_per_s"] > 0
    assert backup["cbw_clusters"] > 0, "the writers were running during the backup"
    assert 0 < backup["freeze_ms"] < 1000
    # The verification copy is taken inside the freeze but reported apart.
    assert backup["verify_copy_ms"] > 0
    assert backup["freeze_with_copy_ms"] == pytest.approx(
        backup["freeze_ms"] + backup["verify_copy_ms"])
    assert "ms verification copy" in proc.stdout
    # Worker and target were ready before the writers started: the snapshot is taken
    # when asked, counted from the writers' start.
    assert backup["backup_at_s"] == 0.5 and backup["backup_at_honoured"] is True
    assert 0.5 <= backup["snapshot_at_s"] <= 0.5 + cli.ON_TIME
    assert "could not be honoured" not in proc.stderr
    assert backup["target"] == "b.raw" and backup["format"] == "raw"
    assert backup["sync"] == "full"
    assert len(summary["writer_stats"]) == 2
    for ws in summary["writer_stats"]:
        assert ws["ops"] > 0 and ws["ops_per_s"] > 0
        assert 0 < ws["p50_us"] <= ws["p99_us"] <= ws["p999_us"]
        assert ws["status"] == "ok"
    assert set(summary["latency_us"]) == {"p50", "p99", "p99.9"}
    assert summary["guest_ops_per_s"] > 0


def test_every_worker_shows_its_role_in_ps(tmp_path: Path) -> None:
    proc = start_cli("run", "--size", "32M", "--writers", "2", "--duration", "3",
                     "--backup-at", "1", "--speed", "16M", "--target", "b.raw", "--quiet",
                     cwd=tmp_path)
    titles: dict[int, str] = {}
    try:
        def all_seen() -> bool:
            for pid in children(proc.pid):
                title = cmdline(pid)
                if title:
                    titles[pid] = title
            return sum(t.startswith("shmblock: ") for t in titles.values()) >= 3

        wait_until(all_seen, 30.0, interval=0.01, what="three titled workers")
        records = list_records()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert len(records) == 1
    run = records[0].run_id
    seen = sorted(titles.values())
    assert f"shmblock: backup-worker run={run} job=job1" in seen, seen
    assert f"shmblock: guest-writer 0 run={run}" in seen, seen
    assert f"shmblock: guest-writer 1 run={run}" in seen, seen


def test_progress_is_shown_on_a_terminal(tmp_path: Path) -> None:
    """The other half of 'quiet when not a TTY': on a terminal there is a progress bar."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([SHMBLOCK_RUN, "run", "--size", "32M", "--writers", "1",
                             "--duration", "1.5", "--backup-at", "0.5", "--speed", "32M",
                             "--target", "b.raw"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        proc.wait(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out.decode(errors="replace")
    text = out.decode(errors="replace")
    assert ESC in text, "no progress display on a terminal"
    assert "verify   ok" in text


# -- bad usage: exit 2, one line ------------------------------------------------------------

BASE = ["--size", "16M", "--writers", "1", "--duration", "0.2", "--backup-at", "0.1",
        "--target", "t.raw"]

BAD_OPTIONS = [
    (["--size", "12Q"], ["--size", "12Q"]),
    (["--size", "0"], ["size", "0"]),
    (["--cluster-size", "3000"], ["cluster size", "3000"]),
    (["--writers", "-1"], ["--writers", "-1"]),
    (["--workload", "nope"], ["--workload", "nope"]),
    (["--format", "vhd"], ["--format", "vhd"]),
    (["--target", "/nonexistent/dir/x.raw"], ["/nonexistent/dir"]),
    (["--block-size", "3000"], ["block size", "3000"]),
    (["--duration", "-1"], ["--duration"]),
    (["--duration", "0"], ["--duration", "0"]),
    (["--backup-at", "inf"], ["--backup-at", "inf"]),
    (["--cbw-timeout", "1e300"], ["--cbw-timeout", "1e300"]),
    (["--seed", "-1"], ["seed", "-1"]),
    (["--sync", "sideways"], ["--sync", "sideways"]),
    (["--reference-image", "/nonexistent/dir/r.raw"], ["--reference-image", "/nonexistent/dir"]),
    (["--json", "/nonexistent/dir/s.json"], ["--json", "/nonexistent/dir"]),
    # Used to fail after the freeze, with a traceback (no message can carry it).
    (["--speed", "99999999T"], ["--speed", "99999999T", "too large"]),
    (["--backup-at", "0.5"], ["--backup-at 0.5", "--duration 0.2"]),
    (["--prefill", "1.5"], ["--prefill", "1.5"]),
]


@pytest.mark.parametrize(("bad", "words"), BAD_OPTIONS,
                         ids=[" ".join(b) for b, _ in BAD_OPTIONS])
def test_a_bad_option_exits_2_with_one_line(tmp_path: Path, bad: list[str],
                                            words: list[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli("run", *BASE, *bad, cwd=work, timeout=60)
    assert_one_line_error(proc, 2, *words)
    assert list(work.iterdir()) == []


def test_missing_target_exits_2(tmp_path: Path) -> None:
    proc = run_cli("run", "--size", "16M", "--duration", "0.2", cwd=tmp_path, timeout=60)
    assert_one_line_error(proc, 2, "--target")


def test_help_promises_no_default_target(tmp_path: Path) -> None:
    proc = run_cli("run", "--help", cwd=tmp_path, timeout=60)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "destination (required)" in text
    assert "temporary" not in text


def test_a_writer_killed_with_sigkill_is_reported(tmp_path: Path) -> None:
    proc = start_cli("run", "--size", "32M", "--writers", "2", "--duration", "4",
                     "--backup-at", "2", "--rate", "2000", "--target", "b.raw",
                     "--json", "s.json", cwd=tmp_path)
    try:
        victim: list[int] = []

        def writer_1_running() -> bool:
            victim[:] = [pid for pid in children(proc.pid)
                         if cmdline(pid).startswith("shmblock: guest-writer 1 ")]
            return bool(victim)

        wait_until(writer_1_running, 30.0, what="guest writer 1")
        time.sleep(1.0)  # its title is set before it attaches and says Ready
        assert cmdline(victim[0]).startswith("shmblock: guest-writer 1 ")  # still ours
        os.kill(victim[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "writer 1: killed by signal 9" in out, out
    stats = json.loads((tmp_path / "s.json").read_text())["writer_stats"]
    assert [ws["status"] for ws in stats] == ["ok", "killed by signal 9"]


def test_refused_guest_writes_are_one_line_on_stderr(tmp_path: Path) -> None:
    """Thousands of refused guest writes (a copy-before-write timeout nobody can meet):
    each process says so once, and the counts are in the summary."""
    proc = run_cli("run", "--size", "32M", "--writers", "2", "--duration", "1.5",
                   "--backup-at", "0.3", "--cbw-mode", "request", "--cbw-timeout", "0.00001",
                   "--speed", "1M", "--target", "b.raw", "--json", "s.json", cwd=tmp_path)
    stats = json.loads((tmp_path / "s.json").read_text())["writer_stats"]
    refused = sum(ws["errors"] for ws in stats)
    assert refused > 100, "the scenario did not make writes fail"
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    # At most one line per kind of problem and process (two writers, the worker).
    assert len(lines) <= 6, proc.stderr
    assert sum("write at" in line for line in lines) <= 2, proc.stderr


def test_unknown_subcommand_exits_2(tmp_path: Path) -> None:
    proc = run_cli("frobnicate", cwd=tmp_path, timeout=60)
    assert_one_line_error(proc, 2, "frobnicate")


# -- the run cannot happen: exit 1, one line, nothing left ---------------------------------------


@pytest.mark.parametrize(("target", "words"), [
    ("nbd://127.0.0.1:1/x", ["nbd://127.0.0.1:1/x", "connection refused"]),
    ("/sys/x.raw", ["/sys/x.raw", "Permission denied"]),
])
def test_unreachable_target_exits_1(tmp_path: Path, target: str, words: list[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    t0 = time.monotonic()
    proc = run_cli("run", *BASE, "--target", target, cwd=work, timeout=120)
    assert_one_line_error(proc, 1, *words)
    assert time.monotonic() - t0 < 60
    assert list(work.iterdir()) == []
    assert not Path(target + ".part").exists()


def test_a_device_larger_than_dev_shm_exits_with_no_space(tmp_path: Path) -> None:
    proc = run_cli("run", *BASE, "--size", "100T", cwd=tmp_path, timeout=60)
    assert_one_line_error(proc, 1, "/dev/shm", "free", "smaller --size")


def test_a_late_snapshot_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """When preparing the backup takes longer than --backup-at leaves, the run says so
    (stderr and JSON) instead of being silently late. In-process: a slow target open
    is simulated by delaying create_backup, and the preparation is forced after the
    writers' start (as for a --backup-at further away than PREPARE_AHEAD)."""
    from shmblock.engine import Engine

    real = Engine.create_backup

    def slow(self: Engine, *args: Any, **kwargs: Any) -> Any:
        time.sleep(1.0)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "create_backup", slow)
    monkeypatch.setattr(cli, "PREPARE_AHEAD", 0.0)
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args([
        "run", "--size", "16M", "--writers", "1", "--duration", "3", "--backup-at", "0.2",
        "--target", "b.raw", "--json", "s.json", "--quiet"])
    assert cli.cmd_run(args) == 0
    err = capsys.readouterr().err
    assert "--backup-at 0.2 could not be honoured" in err, err
    assert len(err.strip().splitlines()) == 1, err
    backup = json.loads((tmp_path / "s.json").read_text())["backup"]
    assert backup["backup_at_honoured"] is False
    assert backup["snapshot_at_s"] >= 1.0


def test_a_signal_inside_thread_start_is_taken_a_moment_later() -> None:
    """Raising from a signal handler inside ``Thread.start`` breaks CPython's thread
    bookkeeping (the new thread dies with a KeyError traceback, seen once under
    SIGTERM as the digest thread started): the CLI takes such a signal 10 ms later."""
    import threading
    import types

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    inside_start = types.SimpleNamespace(f_code=threading.Thread.start.__code__)
    try:
        cli._on_signal(signal.SIGTERM, inside_start)  # type: ignore[arg-type]
        with pytest.raises(cli.Interrupted, match="SIGTERM"):
            time.sleep(5.0)  # the deferred signal interrupts this sleep
        with pytest.raises(cli.Interrupted, match="SIGINT"):  # elsewhere: at once
            cli._on_signal(signal.SIGINT, None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in saved.items():
            signal.signal(s, handler)


# -- what `run` imports ---------------------------------------------------------------------


def test_run_does_not_import_the_other_commands_modules() -> None:
    """`run`'s parser leaves the repository, QMP and bench modules alone (each start
    paid for importing them); the full parser, and each of those commands, has them."""
    code = (
        "import sys\n"
        "from shmblock import cli\n"
        "lazy = ('shmblock.cli_backups', 'shmblock.serve.cli', 'shmblock.bench.options',"
        " 'shmblock.cli_bitmap')\n"
        "cli.build_parser('run').parse_args(['run', '--writers', '0'])\n"
        "print(sorted(m for m in lazy if m in sys.modules))\n"
        "cli.build_parser('serve')\n"
        "print(sorted(m for m in lazy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    assert out[0] == "[]"
    assert out[1] == str(sorted(["shmblock.cli_backups", "shmblock.serve.cli",
                                 "shmblock.bench.options", "shmblock.cli_bitmap"]))


@pytest.mark.parametrize("command", ["serve", "bench", "backups", "bitmap"])
def test_lazy_commands_still_parse_their_arguments(command: str) -> None:
    p = cli.build_parser(command)
    with pytest.raises(SystemExit) as exc:
        p.parse_args([command, "--no-such-option"])
    assert exc.value.code == 2
    # and the one-word help lists every command
    help_text = cli.build_parser("run").format_help()
    for name in ("run", "restore", "cleanup", *cli.LAZY_COMMANDS):
        assert name in help_text
