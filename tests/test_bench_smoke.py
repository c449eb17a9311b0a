"""Smoke test of ``shmblock-run bench --quick``: it runs, and its outputs are well formed.

Benchmarks measure; they do not assert timings. This test only checks that the quick run
finishes, writes JSON, Markdown and PNG plots, that every section is present with the
fields the report promises (every figure positive, every verification done and ok, the
other load recorded and marked), and that nothing of the run is left in /dev/shm (the
autouse leak check of conftest.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from shmblock.bench import load, report, runner
from shmblock.bench.bound import cpu_share_bound
from shmblock.bench.common import BUFFER_FIELDS, buffer_stats
from shmblock.bench.latency import worker_models
from shmblock.bench.load import UNDER_LOAD_SHARE, tainted, under_load
from shmblock.bench.options import Plan, plan_from_args
from shmblock.bench.qemu_side import run_qemu_side, window_figures
from shmblock.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CELL_FIELDS = {"workload", "writers", "backup", "target", "guest_ops_per_s", "guest_mb_per_s",
               "p50_us", "p99_us", "p999_us", "max_stall_ms", "cbw_wait_share", "freeze_ms",
               "backup_s", "backup_mb_per_s", "backup_outcome"}



class QuickRun(NamedTuple):
    code: int
    out: Path
    prefix: str
    run_dir: Path


pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    pytest.importorskip("matplotlib", reason="the bench extra is not installed")
    out = tmp_path_factory.mktemp("bench") / "results"
    scratch = tmp_path_factory.mktemp("scratch")
    # Module-scoped, so it makes its own prefix: the per-test one is not set yet.
    prefix = f"sbtbench{uuid.uuid4().hex[:8]}"
    mp = pytest.MonkeyPatch()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        mp.setenv("SHMBLOCK_PREFIX", prefix)
        mp.setenv("SHMBLOCK_RUN_DIR", str(scratch / "runs"))
        code = main(["bench", "--quick", "--output", str(out),
                     "--scaling-dir", str(scratch)])
    finally:
        mp.undo()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return QuickRun(code, out, prefix, scratch / "runs")


def test_quick_bench_leaves_nothing_behind(quick_run: QuickRun) -> None:
    leftovers = [p.name for p in Path("/dev/shm").iterdir()
                 if p.name.startswith(quick_run.prefix)]
    assert not leftovers
    runs = quick_run.run_dir
    assert not (runs.is_dir() and list(runs.glob("*.json")))


def test_quick_bench_exits_ok(quick_run: QuickRun) -> None:
    results = quick_run.out / "results.json"
    failures = json.loads(results.read_text())["failures"] if results.exists() else "no JSON"
    assert quick_run.code == 0, failures


def test_quick_bench_writes_every_output(quick_run: QuickRun) -> None:
    out = quick_run.out
    for name in ("results.json", "results.md", "throughput.png", "latency.png",
                 "scaling.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC, png.name


def test_quick_bench_json_is_complete(quick_run: QuickRun) -> None:
    out = quick_run.out
    res = json.loads((out / "results.json").read_text())
    assert res["plan"]["quick"] is True
    assert res["command"].startswith("shmblock-run bench --quick")
    machine = res["machine"]
    for key in ("cpu_count", "memory_bytes", "kernel", "python", "packages"):
        assert machine[key], key
    for key in ("memcpy", "page_cache_write", "sparse_random_64k"):
        assert res["limits"][key]["bytes_per_s"] > 0, key

    cells = res["scenarios"]
    plan = res["plan"]
    per_group = 1 + len(plan["targets"])
    assert len(cells) == len(plan["workloads"]) * len(plan["writers"]) * per_group
    # One backup cell per target in every group: the checks of backup cells below run.
    backups = [c for c in cells if c["backup"]]
    assert len(backups) == len(plan["workloads"]) * len(plan["writers"]) * len(plan["targets"])
    assert {c["target"] for c in backups} == set(plan["targets"])
    for cell in cells:
        assert cell.keys() >= CELL_FIELDS
        # Every cell runs writers: a cell that measured no guest op measured nothing.
        assert cell["writers"] >= 1 and cell["guest_ops_per_s"] > 0, cell
        if cell["backup"]:
            assert cell["backup_outcome"] == "completed", cell
            assert cell["backup_s"] > 0 and cell["freeze_ms"] > 0, cell

    peers = res["peers"]
    assert peers["engine"]["raw"]["outcome"] == "completed"
    assert peers["engine"]["qcow2"]["outcome"] == "completed"
    # A peer is either measured or skipped with a note that says why: never invented.
    if shutil.which("qemu-img"):
        assert peers["qemu_img_convert"]["raw"]["bytes_per_s"] > 0
        assert res["ratios"]["engine_raw_vs_qemu_img_raw"] is not None
    else:
        assert any("qemu-img" in n for n in peers["notes"])
        assert res["ratios"]["engine_raw_vs_qemu_img_raw"] is None
    if shutil.which("qemu-storage-daemon"):
        assert peers["qemu_backup_job"]["bytes_per_s"] > 0
    else:
        assert any("qemu-storage-daemon" in n for n in peers["notes"])

    sizes = res["scaling"]["sizes"]
    assert [s["size"] for s in sizes] == plan["scaling_sizes"]
    for s in sizes:
        assert s["backup"]["outcome"] == "completed"
        assert s["memory_peak"]["supervisor"]["private_rss"] > 0
        assert s["memory_peak"]["backup_worker"]["private_rss"] > 0
        assert [f["writers"] for f in s["freeze"]] == plan["freeze_writers"]

    check_goals(res)


def check_goals(res: dict[str, Any]) -> None:
    """Every goal row says what was measured, and its verdict follows from the figures it
    was drawn from (recomputed here from the ratios, the cells and the scaling data)."""
    goals = res["goals"]
    names = [g["goal"] for g in goals]
    assert len(set(names)) == len(names) == 13, names
    for g in goals:
        assert g["met"] is None or type(g["met"]) is bool, g
        assert (g["met"] is None) == (g["measured"] == "not measured"), g
        # Every section ran: every row says whether its figures were taken under load.
        assert type(g["under_load"]) is bool, g

    def goal(prefix: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = [g for g in goals if g["goal"].startswith(prefix)]
        assert len(found) == 1, (prefix, names)
        return found[0]

    ratios = res["ratios"]
    for fmt in ("raw", "qcow2"):
        v = ratios[f"engine_{fmt}_vs_qemu_img_{fmt}"]
        g = goal(f"idle full backup ≥ 1.0× qemu-img convert ({fmt})")
        assert g["met"] == (None if v is None else v >= 1.0), g
        [cell] = [c for c in res["scenarios"]
                  if (c["workload"], c["writers"], c["target"]) == ("first-touch", 4, fmt)]
        g = goal(f"first-touch, 4 writers, backup to {fmt}")
        assert g["met"] == (cell["guest_ops_per_s"] >= 50_000), (g, cell["guest_ops_per_s"])
        assert goal(f"zipf during backup to {fmt}")["met"] is not None
        g = goal(f"whole-process idle backup ≤ 1.0× qemu-img convert's time ({fmt})")
        if shutil.which("qemu-img"):
            r = res["process"]["formats"][fmt]["ratio"]
            assert g["met"] == (r <= 1.0), (g, r)
    worst_lat = max(f["request_p99_ms"] for f in res["latency"]["formats"].values())
    assert goal("request → snapshot p99")["met"] == (worst_lat < 20.0)
    v = ratios["engine_raw_vs_qemu_backup_job"]
    g = goal("idle full backup ≥ 3× QEMU's backup job")
    assert g["met"] == (None if v is None else v >= 3.0), g
    most = max(res["plan"]["freeze_writers"])
    worst = max(f["p99_ms"] for s in res["scaling"]["sizes"] for f in s["freeze"]
                if f["writers"] == most)
    g = goal("freeze p99 < 5 ms")
    assert g["met"] == (worst < 5.0), (g, worst)
    assert goal("engine memory flat in device size")["met"] is not None
    worst_inc = max(v[fmt]["ratio_job"] for v in res["incremental"]["variants"]
                    for fmt in ("qcow2", "raw"))
    g = goal("incremental of 1 % dirty")
    assert g["met"] == (worst_inc <= 0.05), (g, worst_inc)
    assert g["under_load"] == res["foreign_load"]["incremental"]["under_load"], g


def check_load(figure: dict[str, Any]) -> None:
    """A timed figure records the other load, and is marked exactly when it was high."""
    assert figure["foreign_cores"] >= 0, figure
    assert figure["under_load"] == under_load(figure["foreign_cores"]), figure


def test_quick_bench_marks_every_section_load(quick_run: QuickRun) -> None:
    res = json.loads((quick_run.out / "results.json").read_text())
    assert res["failures"] == []
    assert list(res["foreign_load"]) == res["plan"]["sections"]
    assert {"incremental", "restore"} <= set(res["plan"]["sections"])
    for section_load in res["foreign_load"].values():
        assert section_load["under_load"] == under_load(section_load["cpu_cores"]), \
            section_load
        assert section_load["seconds"] > 0, section_load
    # Every cell of the matrix carries its own load record.
    for cell in res["scenarios"]:
        check_load(cell)
    # Not the published directory: written whatever the load, the tainted ones listed.
    assert res["tainted"] == [p for p in tainted(res) if not p.startswith("goals")]


def test_quick_bench_new_sections(quick_run: QuickRun) -> None:
    """Request → snapshot, whole process, speed, qemu: present, verified, load recorded."""
    res = json.loads((quick_run.out / "results.json").read_text())
    plan = res["plan"]
    lat = res["latency"]
    assert list(lat["models"]) == worker_models() and lat["goal_model"] == worker_models()[-1]
    assert lat["formats"] == lat["models"][lat["goal_model"]]
    for fmt, f in ((fmt, f) for m in lat["models"].values() for fmt, f in m.items()):
        assert fmt in ("raw", "qcow2")
        assert len(f["runs_request_ms"]) == plan["latency_jobs"]
        assert 0 < f["request_p50_ms"] <= f["request_p99_ms"] <= f["request_max_ms"], f
        assert f["verification"]["verified"] is True, f
        check_load(f)
    if shutil.which("qemu-img"):
        for fmt in ("raw", "qcow2"):
            f = res["process"]["formats"][fmt]
            assert len(f["shmblock_runs"]) == len(f["qemu_img_runs"]) == plan["process_repeats"]
            assert f["ratio"] == pytest.approx(f["shmblock_s"] / f["qemu_img_s"])
            assert "--no-verify" in f["shmblock_command"]
    groups = res["speed"]["groups"]
    assert len(groups) == len(plan["speed_workloads"]) * len(plan["speed_writers"])
    for g in groups:
        assert [c["speed"] for c in g["cells"]] == plan["speeds"]
        assert g["verification"]["verified"] is True, g
        for c in g["cells"]:
            assert c["outcome"] == "completed" and c["guest_ops_per_s"] > 0, c
            assert c["bound_busy_worker"] == cpu_share_bound(g["writers"], res["machine"]
                                                             ["cpu_count"])
            check_load(c)
    for cell in res["scenarios"]:
        if cell["backup"]:
            assert cell["verification"]["verified"] is True, cell
            assert cell["cbw_buffer"] is None or cell["cbw_buffer"].keys() >= set(
                BUFFER_FIELDS), cell
    for s in res["scaling"]["sizes"]:
        assert s["verification"]["verified"] is True, s
    q = res["qemu"]
    if shutil.which("fio") and shutil.which("qemu-storage-daemon"):
        cells = q["servers"]["qemu"]
        assert [c["backup"] for c in cells] == [False, True]
        assert q["summary"]["qemu"]["backup_s"] > 0
    md = (quick_run.out / "results.md").read_text()
    for heading in ("## Request → snapshot instant", "## Guest retention against `--speed`",
                    "## Guest retention against the CPU-share bound"):
        assert heading in md, heading


def test_quick_bench_incremental_section(quick_run: QuickRun) -> None:
    res = json.loads((quick_run.out / "results.json").read_text())
    inc = res["incremental"]
    plan = res["plan"]
    assert inc["size"] == plan["inc_size"] and inc["dirty_share"] == plan["inc_dirty"]
    dirty_bytes = round(inc["size"] // inc["cluster_size"] * inc["dirty_share"]) \
        * inc["cluster_size"]
    for fmt in ("qcow2", "raw"):
        full = inc["full"][fmt]
        assert len(full["runs"]) == plan["inc_repeats"]
        assert full["job_s"] > 0 and full["end_to_end_s"] >= full["job_s"], full
        # A full backup writes the data, not the zeros.
        assert full["bytes_written"] == inc["content_data_bytes"], full
        check_load(full)
        for run in full["runs"]:
            check_load(run)
    assert [v["variant"] for v in inc["variants"]] == ["scattered", "contiguous"]
    for v in inc["variants"]:
        assert v["dirty_bytes"] == dirty_bytes, v
        for fmt in ("qcow2", "raw"):
            s = v[fmt]
            assert len(s["runs"]) == plan["inc_repeats"]
            assert s["job_s"] > 0 and s["end_to_end_s"] >= s["job_s"], s
            # Only the dirty clusters: the incremental's bytes are the bitmap's.
            assert s["bytes_written"] == dirty_bytes, s
            assert 0 < s["file_bytes"] < inc["full"][fmt]["file_bytes"], s
            assert s["ratio_job"] == pytest.approx(s["job_s"] / inc["full"][fmt]["job_s"])
            assert 0 < s["ratio_job"] < 1, s
            for run in s["runs"]:
                check_load(run)
            assert res["ratios"][f"incremental_{v['variant']}_{fmt}_time_vs_full"] == \
                s["ratio_job"]
    ver = inc["verification"]
    # qemu-img is what reads the chain independently; without it the check is skipped.
    if shutil.which("qemu-img"):
        assert ver["compare_ok"] is True and ver["check_ok"] is True, ver
        # full, one link per variant and repeat, and the verification round's.
        assert ver["links"] == 1 + 2 * plan["inc_repeats"] + 1, ver
        assert all(c["ok"] for c in ver["checks"]), ver
    assert ver["raw_incremental_verified"] is True and ver["ok"] is True, ver


def test_quick_bench_restore_section(quick_run: QuickRun) -> None:
    res = json.loads((quick_run.out / "results.json").read_text())
    rs = res["restore"]
    assert rs["size"] == res["plan"]["restore_size"]
    r = rs["restore"]
    assert len(r["runs"]) == res["plan"]["restore_repeats"]
    assert r["wall_s"] >= r["copy_s"] > 0, r
    assert 0 < r["data_bytes"] <= rs["size"], r
    check_load(r)
    vr = rs["verified_restore"]
    assert vr["verified"] is True and vr["verify_s"] > 0 and vr["ok"] is True, vr
    if shutil.which("qemu-img"):
        q = rs["qemu_img_convert"]
        assert q["wall_s"] > 0 and "-t writeback" in q["command"], q
        check_load(q)
        assert rs["ratio"] == pytest.approx(r["wall_s"] / q["wall_s"])
        assert res["ratios"]["restore_time_vs_qemu_img_convert_writeback"] == rs["ratio"]
        assert vr["compare_ok"] is True, vr
        assert rs["chain_check"]["compare_ok"] is True, rs["chain_check"]
        assert rs["chain_check"]["check_ok"] is True and rs["chain_check"]["links"] == 3
    else:
        assert rs["ratio"] is None
        assert any("qemu-img" in n for n in rs["notes"])


def test_report_marks_figures_taken_under_load() -> None:
    """Goal rows and the Markdown carry the mark of a section others loaded."""
    busy = UNDER_LOAD_SHARE * 4 + 0.1  # above the share on any machine of up to 4 CPUs
    assert under_load(busy, 4) and not under_load(0.0, 4)
    res: dict[str, Any] = {"foreign_load": {
        "peers": {"cpu_cores": busy, "under_load": True},
        "scaling": {"cpu_cores": 0.0, "under_load": False}}}
    rows = {g["goal"]: g for g in report.goals(res)}
    assert rows["idle full backup ≥ 1.0× qemu-img convert (raw)"]["under_load"] is True
    assert rows["freeze p99 < 5 ms with 8 writers, flat in size"]["under_load"] is False
    assert rows["zipf during backup to raw ≥ 90 % of without, or of the CPU-share bound"][
        "under_load"] is None
    res["goals"] = list(rows.values())
    res["command"] = "shmblock-run bench"
    res["started"] = "now"
    res["machine"] = {"cpu_count": 4, "cpu_model": "x", "memory_bytes": 2**30,
                      "kernel": "k", "python": "3"}
    table = report.headline(res)
    [peer_line] = [line for line in table.splitlines()
                   if "qemu-img convert (raw)" in line]
    assert "⚠ under load" in peer_line
    [freeze_line] = [line for line in table.splitlines() if "freeze p99" in line]
    assert "under load" not in freeze_line


def test_bench_refuses_a_section_size_too_small(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = main(["bench", "--quick", "--sections", "incremental", "--inc-size", "1M",
                     "--output", str(tmp_path / "out")])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert code == 2
    err = capsys.readouterr().err
    assert "--inc-size" in err and "Traceback" not in err


def test_quick_bench_markdown_has_the_tables(quick_run: QuickRun) -> None:
    out = quick_run.out
    md = (out / "results.md").read_text()
    for heading in ("## Headline", "## Side by side with QEMU", "## Machine limits",
                    "## Scenario matrix", "## Scaling with device size",
                    "## Incremental backups", "## Restore of a three-link chain"):
        assert heading in md, heading
    assert "shmblock-run bench --quick" in md


# -- the load monitor -------------------------------------------------------------------------

BUSY = ("import sys, time\n"
        "end = time.monotonic() + float(sys.argv[1])\n"
        "while time.monotonic() < end:\n"
        "    pass\n")


def _kill_if_ours(pid: int, marker: str) -> None:
    """SIGKILL ``pid`` only if it is still the busy loop we started (pids are reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if marker.encode() not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass


def _outsider(seconds: float, marker: str) -> int:
    """A busy loop that is not in this process's tree: started by a shell that exits at
    once, so the kernel reparents it away from us (a double fork)."""
    out = subprocess.run(
        ["sh", "-c", f'"$0" -c "$1" {seconds} {marker} >/dev/null 2>&1 & echo $!',
         sys.executable, BUSY], capture_output=True, text=True, timeout=30, check=True)
    return int(out.stdout.strip())


def test_load_meter_counts_a_busy_outsider_and_taints_the_cell() -> None:
    """Other processes' CPU is foreign load: two busy loops outside the bench's tree make
    the cell tainted, and the meter names them."""
    marker = f"sbt-busy-{uuid.uuid4().hex[:8]}"
    pids = []
    try:
        before = load.take()
        meter = load.CpuMeter()
        pids = [_outsider(3.0, marker) for _ in range(2)]
        time.sleep(2.0)
        after = load.take()
        got = meter.load()
        ours = load.tree(after.procs, os.getpid())
        assert not set(pids) & ours, "the busy loops must not be in our process tree"
        busy = sum(after.procs[p].own - (before.procs[p].own if p in before.procs else 0.0)
                   for p in pids if p in after.procs)
        dt = after.taken - before.taken
        assert busy / dt > 0.2, f"the busy loops hardly ran ({busy:.2f} s in {dt:.2f} s)"
        # Their CPU is in the foreign figure (less clock-tick rounding).
        assert got.foreign_cores * got.seconds >= 0.8 * busy - 0.05, (got, busy)
        cpus = os.cpu_count() or 1
        if busy / dt > UNDER_LOAD_SHARE * cpus:
            assert got.under_load and got.to_json()["under_load"] is True, got
        assert got.under_load == under_load(got.foreign_cores)
    finally:
        for pid in pids:
            _kill_if_ours(pid, marker)


def test_load_meter_counts_the_bench_s_own_children_as_its_own() -> None:
    """A busy child of the bench (a worker, qemu-img, fio) is the bench's load, not
    others': live and after it is reaped."""
    meter = load.CpuMeter()
    child = subprocess.Popen([sys.executable, "-c", BUSY, "1.5"])
    try:
        time.sleep(1.0)
        live = meter.load()
        assert child.pid not in [pid for pid, _, _ in live.top], live
        assert live.ours_cores > 0.2, live
    finally:
        child.wait(30)
    reaped = meter.load()
    own = reaped.ours_cores * reaped.seconds
    # The whole child is counted as ours once reaped (in our cutime), nothing lost.
    assert own >= 0.3, reaped
    assert child.pid not in [pid for pid, _, _ in reaped.top], reaped


def test_tainted_lists_figures_taken_under_load() -> None:
    res = {"scenarios": [{"under_load": False, "load": {"under_load": False}},
                         {"under_load": True, "load": {"under_load": True}}],
           "process": {"formats": {"raw": {"under_load": False,
                                           "runs": [{"under_load": True}]}}}}
    assert load.tainted(res) == ["scenarios[1]", "process.formats.raw.runs[0]"]


def _bench(argv: list[str]) -> int:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return main(["bench", *argv])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_bench_refuses_to_publish_figures_taken_under_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Into bench/results/ only figures taken alone, unless --allow-load (then marked)."""
    published = tmp_path / "repo" / "bench" / "results"
    published.mkdir(parents=True)
    monkeypatch.setattr(runner, "published_dir", lambda: str(published))
    monkeypatch.chdir(tmp_path)
    # Every figure counts as taken under load, whatever the machine does meanwhile.
    monkeypatch.setattr(load, "UNDER_LOAD_SHARE", -1.0)
    args = ["--quick", "--sections", "limits", "--output", str(published)]
    assert _bench(args) == runner.EXIT_LOADED
    err = capsys.readouterr().err
    assert "not written into bench/results/" in err and "--allow-load" in err, err
    assert "Traceback" not in err
    assert not list(published.iterdir())
    [kept] = list(tmp_path.glob("bench-results-under-load-*"))
    res = json.loads((kept / "results.json").read_text())
    assert "foreign_load.limits" in res["tainted"]

    assert _bench([*args, "--allow-load"]) == 0
    res = json.loads((published / "results.json").read_text())
    assert res["tainted"] and res["plan"]["allow_load"] is True
    assert "figure(s) taken while other processes used" in \
        (published / "results.md").read_text()


def test_bench_writes_elsewhere_whatever_the_load(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load, "UNDER_LOAD_SHARE", -1.0)
    out = tmp_path / "out"
    assert _bench(["--quick", "--sections", "limits", "--output", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["tainted"]


# -- pieces of the new sections ---------------------------------------------------------------


def test_cpu_share_bound() -> None:
    """A writer keeps a core while N < C; N/(N+1) from N = C on; a lighter worker
    takes less."""
    assert [round(cpu_share_bound(n, 2), 4) for n in (1, 2, 4, 8)] == [1.0, 0.6667, 0.8,
                                                                         0.8889]
    assert cpu_share_bound(4, 2, worker_cores=0.2) == pytest.approx((2 - 0.2) / 4 / 0.5)
    assert cpu_share_bound(4, 2, worker_cores=0.0) == 1.0
    assert cpu_share_bound(1, 1) == pytest.approx(0.5)


def test_buffer_stats_before_and_after_the_buffer() -> None:
    """C1: read from a JobResult attribute or the CLI's JSON; None without a buffer."""
    class Old:
        pass

    class Stats:
        capacity_bytes, peak_bytes, full_seconds, saves, fallbacks = 1 << 20, 1 << 19, 0.5, 7, 1

    class New:
        cbw_buffer = Stats()

    assert buffer_stats(Old()) is None
    got = buffer_stats(New())
    assert got is not None and got["peak_share"] == 0.5 and got["fallbacks"] == 1
    assert buffer_stats({"cbw_buffer": {"capacity_bytes": 4, "peak_bytes": 1,
                                        "full_seconds": 0.0, "saves": 1,
                                        "fallbacks": 0}})["peak_share"] == 0.25  # type: ignore[index]
    assert report._buffer(None) == "n/a"
    assert "1 fallbacks" in report._buffer(got)


def test_window_figures_from_a_completion_log() -> None:
    times = np.array([1000, 1001, 1002, 1050, 1051], dtype=np.int64)
    lats = np.array([100_000, 200_000, 300_000, 48_000_000, 100_000], dtype=np.int64)
    w = window_figures(times, lats, 1000.0, 1100.0)
    assert w["ios"] == 5 and w["iops"] == pytest.approx(50.0)
    assert w["max_gap_ms"] == 49.0  # after the last completion: 49 ms to the window's end
    assert w["max_latency_ms"] == 48.0
    empty = window_figures(times, lats, 2000.0, 2500.0)
    assert empty["ios"] == 0 and empty["max_gap_ms"] == 500.0


@pytest.mark.external
@pytest.mark.skipif(not (shutil.which("fio") and shutil.which("qemu-storage-daemon")
                         and shutil.which("qemu-img")),
                    reason="fio, qemu-storage-daemon and qemu-img are needed")
def test_qemu_side_by_side_on_qemu(tmp_path: Path) -> None:
    """The qemu section for real, tiny: fio over NBD against qemu-storage-daemon, without
    and with a blockdev-backup started over QMP; the shmblock side runs or is skipped with
    a note; nothing is left behind."""
    pytest.importorskip("qemu.qmp")
    plan = Plan(**{**_tiny_plan(), "qemu_size": 16 << 20, "qemu_runtime_s": 1.0})
    before = {p.name for p in Path("/tmp").glob("sbq-*")}
    res = run_qemu_side(plan, str(tmp_path), lambda _: None)
    assert res["failures"] == [], res["failures"]
    cells = res["servers"]["qemu"]
    assert [c["backup"] for c in cells] == [False, True]
    off, on = cells
    assert off["window"]["ios"] > 0 and off["window"]["iops"] > 0, off
    assert off["window"]["p50_us"] <= off["window"]["p99_us"] <= off["window"]["p999_us"]
    # A 16 MiB backup lasts a few tens of ms: the guest may complete nothing in it (then
    # the whole window is its longest stall).
    assert 0 < on["window"]["max_gap_ms"] <= on["window"]["window_s"] * 1e3 + 1, on
    for c in cells:
        assert c["fio"]["error"] == 0 and c["fio"]["ios"] > 0, c
        check_load(c)
    assert cells[1]["backup_s"] > 0
    assert res["summary"]["qemu"]["retained"] is not None
    if "shmblock" in res["servers"]:
        assert res["summary"]["ratio_backup_time"] is not None
    else:
        assert any("shmblock.serve" in n for n in res["notes"]), res["notes"]
    md = report._qemu_markdown({"qemu": res})
    assert any("qemu-storage-daemon" in line for line in md)
    # Nothing left in the work directory; "runs" is the test's run registry (the
    # conftest fixture fails the test if a record is left in it).
    assert [p.name for p in tmp_path.iterdir() if p.name != "runs"] == []
    assert {p.name for p in Path("/tmp").glob("sbq-*")} == before


def _tiny_plan() -> dict[str, Any]:
    args = argparse.Namespace(quick=True, sections=("qemu",), size=None, writers=None,
                              workloads=None, targets=None, peer_size=None,
                              scaling_sizes=None, target_dir=None, scaling_dir=None, seed=1)
    return plan_from_args(args).to_json()
