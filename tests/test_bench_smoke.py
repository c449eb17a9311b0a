"""Smoke test of ``shmblock-run bench --quick``: it runs, and its outputs are well formed.

Benchmarks measure; they do not assert timings. This test only checks that the quick run
finishes, writes JSON, Markdown and PNG plots, that every section is present with the
fields the report promises, and that nothing of the run is left in /dev/shm (the
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
    assert len(set(names)) == len(names) == 9, names
    for g in goals:
        assert g["met"] is None or type(g["met"]) is bool, g
        assert (g["met"] is None) == (g["measured"] == "not measured"), g

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


def test_quick_bench_markdown_has_the_tables(quick_run: QuickRun) -> None:
    out = quick_run.out
    md = (out / "results.md").read_text()
    for heading in ("## Headline", "## Side by side with QEMU", "## Machine limits",
                    "## Scenario matrix", "## Scaling with device size"):
        assert heading in md, heading
    assert "shmblock-run bench --quick" in md
