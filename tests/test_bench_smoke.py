"""Smoke test of ``shmblock-run bench --quick``: it runs, and its outputs are well formed.

Benchmarks measure; they do not assert timings. This test only checks that the quick run
finishes, writes JSON, Markdown and PNG plots, that every section is present with the
fields the report promises (every figure positive, every verification done and ok, the
other load recorded and marked), and that nothing of the run is left in /dev/shm (the
autouse leak check of conftest.py).
"""

from __future__ import annotations

import json
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from shmblock.bench import report
from shmblock.bench.load import UNDER_LOAD_SHARE, under_load
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


pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


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
    assert quick_run.code == 0


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
    assert len(set(names)) == len(names) == 10, names
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
    for load in res["foreign_load"].values():
        assert load["under_load"] == under_load(load["cpu_cores"]), load
        assert load["seconds"] > 0, load


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
    assert rows["zipf during backup to raw ≥ 90 % of without"]["under_load"] is None
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
