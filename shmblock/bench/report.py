"""Turning a benchmark run into ratios, goals, JSON, Markdown and PNG plots.

Ratios are computed only between numbers measured in the same run; a peer that was
skipped has no ratio (``None``), never a made-up one. Each goal of issues 4 and 8 is one
row: what was measured, the goal, whether it was met, and whether the section it comes
from ran while other processes used more than a small share of the CPUs (``under_load``,
shown as "⚠ under load": the figure says as much about the other load as about
shmblock).
"""

from __future__ import annotations

import json
import os
from typing import Any

from shmblock.bench.bound import FORMULA as BOUND_FORMULA
from shmblock.bench.bound import cpu_share_bound
from shmblock.bench.load import UNDER_LOAD_SHARE
from shmblock.paths import write_file_atomic

GB = 1e9
MiB = 1 << 20


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def ratios(res: dict[str, Any]) -> dict[str, float | None]:
    peers = res.get("peers") or {}
    limits = res.get("limits") or {}
    raw = _get(peers, "engine", "raw", "bytes_per_s")
    qcow2 = _get(peers, "engine", "qcow2", "bytes_per_s")
    return {
        "engine_raw_vs_qemu_img_raw": _ratio(raw, _get(peers, "qemu_img_convert", "raw",
                                                       "bytes_per_s")),
        "engine_raw_vs_qemu_img_raw_net": _ratio(raw, _get(peers, "qemu_img_convert", "raw",
                                                           "net_bytes_per_s")),
        "engine_qcow2_vs_qemu_img_qcow2": _ratio(qcow2, _get(
            peers, "qemu_img_convert", "qcow2", "bytes_per_s")),
        "engine_qcow2_vs_qemu_img_qcow2_net": _ratio(qcow2, _get(
            peers, "qemu_img_convert", "qcow2", "net_bytes_per_s")),
        "engine_raw_vs_qemu_backup_job": _ratio(raw, _get(peers, "qemu_backup_job",
                                                          "bytes_per_s")),
        "engine_raw_end_to_end_vs_qemu_img_raw": _ratio(
            _get(peers, "engine", "raw", "end_to_end_bytes_per_s"),
            _get(peers, "qemu_img_convert", "raw", "bytes_per_s")),
        "engine_raw_vs_page_cache_write": _ratio(raw, _get(limits, "page_cache_write",
                                                           "bytes_per_s")),
        "engine_raw_vs_memcpy": _ratio(raw, _get(limits, "memcpy", "bytes_per_s")),
        # Bytes actually written (the zeros are skipped) against the ceiling for them.
        "engine_raw_data_rate_vs_page_cache_write_from_shm": _ratio(
            _data_rate(peers, "raw"), _get(limits, "page_cache_write_from_shm",
                                           "bytes_per_s")),
        "qemu_img_raw_vs_page_cache_write": _ratio(
            _get(peers, "qemu_img_convert", "raw", "bytes_per_s"),
            _get(limits, "page_cache_write", "bytes_per_s")),
        **_incremental_ratios(res),
        # Time, not throughput: below 1 the restore is the faster.
        "restore_time_vs_qemu_img_convert_writeback": _get(res, "restore", "ratio"),
    }


def _incremental_ratios(res: dict[str, Any]) -> dict[str, float | None]:
    """Each incremental's job time over the full backup's, same format, same run."""
    out: dict[str, float | None] = {}
    for v in _get(res, "incremental", "variants") or []:
        for fmt in ("qcow2", "raw"):
            out[f"incremental_{v['variant']}_{fmt}_time_vs_full"] = v[fmt]["ratio_job"]
    return out


def _data_rate(peers: dict[str, Any], fmt: str) -> float | None:
    job = _get(peers, "engine", fmt, "job_s")
    data = _get(peers, "content", "data_bytes")
    return data / job if job and data else None


def _cells(res: dict[str, Any]) -> list[dict[str, Any]]:
    cells: list[dict[str, Any]] = res.get("scenarios") or []
    return cells


def _find(cells: list[dict[str, Any]], workload: str, writers: int,
          target: str) -> dict[str, Any] | None:
    for c in cells:
        if c["workload"] == workload and c["writers"] == writers and c["target"] == target:
            return c
    return None


#: which section each goal's figures come from (by the goal's first words)
GOAL_SECTIONS = (("idle full backup", "peers"), ("first-touch", "scenarios"),
                 ("request → snapshot", "latency"), ("whole-process", "process"),
                 ("zipf", "scenarios"), ("freeze", "scaling"), ("engine memory", "scaling"),
                 ("incremental", "incremental"))


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per goal of issues 4 and 8: measured, goal, met (True/False/None = not
    measured), under_load (None when the section did not run)."""
    rows = _goal_rows(res)
    load = res.get("foreign_load") or {}
    for g in rows:
        section = next(sec for start, sec in GOAL_SECTIONS if g["goal"].startswith(start))
        g["under_load"] = (load.get(section) or {}).get("under_load")
    return rows


def _goal_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    r = res.get("ratios") or {}
    rows: list[dict[str, Any]] = []

    def row(goal: str, measured: str, met: bool | None, detail: str = "") -> None:
        rows.append({"goal": goal, "measured": measured, "met": met, "detail": detail})

    for fmt in ("raw", "qcow2"):
        key = f"engine_{fmt}_vs_qemu_img_{fmt}"
        v = r.get(key)
        row(f"idle full backup ≥ 1.0× qemu-img convert ({fmt})",
            "not measured" if v is None else f"{v:.2f}×", None if v is None else v >= 1.0,
            f"net of qemu-img start-up: {r.get(key + '_net') or 0:.2f}×")
    v = r.get("engine_raw_vs_qemu_backup_job")
    row("idle full backup ≥ 3× QEMU's backup job (raw → raw)",
        "not measured" if v is None else f"{v:.2f}×", None if v is None else v >= 3.0)
    cells = _cells(res)
    for fmt in ("raw", "qcow2"):
        c = _find(cells, "first-touch", 4, fmt)
        if c is None:
            row(f"first-touch, 4 writers, backup to {fmt}: ≥ 50,000 guest writes/s",
                "not measured", None)
            continue
        cbw = c["cbw_saves"] + c["cbw_requests"]
        cbw_rate = cbw / c["window_s"] if c["window_s"] else 0.0
        row(f"first-touch, 4 writers, backup to {fmt}: ≥ 50,000 guest writes/s",
            f"{c['guest_ops_per_s']:,.0f}/s", c["guest_ops_per_s"] >= 50_000,
            f"{cbw:,} copy-before-writes in the {c['window_s'] * 1e3:.0f} ms job "
            f"({cbw_rate:,.0f}/s; {c['cbw_requests']:,} of them waited for the worker)")
    cores = (res.get("machine") or {}).get("cpu_count")
    for fmt in ("raw", "qcow2"):
        shares = []
        for w in sorted({c["writers"] for c in cells if c["workload"] == "zipf"}):
            off, on = _find(cells, "zipf", w, ""), _find(cells, "zipf", w, fmt)
            if off and on and off["guest_ops_per_s"]:
                share = on["guest_ops_per_s"] / off["guest_ops_per_s"]
                shares.append((w, share, cpu_share_bound(w, cores)))
        goal = f"zipf during backup to {fmt} ≥ 90 % of without, or of the CPU-share bound"
        if not shares:
            row(goal, "not measured", None)
            continue
        # Measured as a fraction of the bound (the bound is 1 where a writer keeps a core).
        worst = min(sh / b for _, sh, b in shares)
        row(goal, f"worst {worst:.0%} of the bound", worst >= 0.9,
            ", ".join(f"{w} writers {sh:.0%} (bound {b:.0%}: {sh / b:.0%} of it)"
                      for w, sh, b in shares) + f"; bound {BOUND_FORMULA}")
    sizes = (res.get("scaling") or {}).get("sizes") or []
    p99 = []
    for s in sizes:
        for f in s.get("freeze", []):
            if f["writers"] == max(x["writers"] for x in s["freeze"]):
                p99.append((s["size"], f["writers"], f["p99_ms"]))
    if p99:
        worst_p99 = max(x[2] for x in p99)
        row(f"freeze p99 < 5 ms with {p99[0][1]} writers, flat in size",
            f"worst {worst_p99:.2f} ms", worst_p99 < 5.0,
            ", ".join(f"{sz // MiB} MiB {v:.2f} ms" for sz, _, v in p99))
    else:
        row("freeze p99 < 5 ms with 8 writers, flat in size", "not measured", None)
    if len(sizes) >= 2:
        first, last = sizes[0], sizes[-1]
        clusters_added = (last["size"] - first["size"]) // (64 << 10)
        parts = []
        worst_per_cluster = 0.0
        for role in ("supervisor", "backup_worker"):
            a = _get(first, "memory_peak", role, "private_rss") or 0
            b = _get(last, "memory_peak", role, "private_rss") or 0
            per = (b - a) / clusters_added if clusters_added else 0.0
            worst_per_cluster = max(worst_per_cluster, per)
            parts.append(f"{role} {a / MiB:.1f} → {b / MiB:.1f} MiB ({per:+.1f} B/cluster)")
        row("engine memory flat in device size (≤ 1 byte per cluster per map)",
            f"{worst_per_cluster:+.1f} B per added cluster", worst_per_cluster <= 10.0,
            "; ".join(parts) + f" from {first['size'] // MiB} MiB to "
            f"{last['size'] // MiB} MiB (10 one-byte maps per cluster)")
    else:
        row("engine memory flat in device size", "not measured", None)
    lat = res.get("latency")
    if lat and lat.get("formats"):
        worst_lat = max(f["request_p99_ms"] for f in lat["formats"].values())
        row(f"request → snapshot p99 < {lat['goal_p99_ms']:g} ms",
            f"worst p99 {worst_lat:.1f} ms", worst_lat < lat["goal_p99_ms"],
            f"{lat.get('goal_model', 'per-job')} worker: " + ", ".join(
                f"{fmt}: p50 {f['request_p50_ms']:.1f} ms, p99 {f['request_p99_ms']:.1f} ms "
                f"over {len(f['runs_request_ms'])} jobs" for fmt, f in lat["formats"].items()))
    else:
        row("request → snapshot p99 < 20 ms", "not measured", None)
    proc = res.get("process") or {}
    for fmt in ("raw", "qcow2"):
        f = _get(proc, "formats", fmt)
        goal = f"whole-process idle backup ≤ 1.0× qemu-img convert's time ({fmt})"
        if not f or f.get("ratio") is None:
            row(goal, "not measured", None)
            continue
        row(goal, f"{f['ratio']:.2f}×", f["ratio"] <= 1.0,
            f"shmblock-run run {f['shmblock_s']:.3f} s, qemu-img convert {f['qemu_img_s']:.3f} s "
            f"(median of {len(f['shmblock_runs'])}, {proc.get('size', 0) / 2**30:g} GiB)")
    inc = res.get("incremental")
    goal = "incremental of 1 % dirty ≤ 5 % of a full backup's time"
    if inc and inc.get("variants"):
        parts, worst = [], 0.0
        for v in inc["variants"]:
            for fmt in ("qcow2", "raw"):
                r = v[fmt]["ratio_job"] or 0.0
                worst = max(worst, r)
                parts.append(f"{v['variant']} → {fmt} {r:.1%} ({v[fmt]['job_s'] * 1e3:.0f} ms "
                             f"of {inc['full'][fmt]['job_s'] * 1e3:.0f} ms)")
        row(goal, f"worst {worst:.1%}", worst <= inc["goal_ratio"],
            f"{inc['size'] / 2**30:g} GiB device, {inc['dirty_share']:.0%} dirty, job "
            "time; " + ", ".join(parts))
    else:
        row(goal, "not measured", None)
    return rows


# -- output files ----------------------------------------------------------------------------


def write_json(path: str, res: dict[str, Any]) -> None:
    """Write the results JSON by a private temporary name and a rename (never through a
    symlink or over a non-regular file: :func:`shmblock.paths.write_file_atomic`)."""
    write_file_atomic(path, (json.dumps(res, indent=2, sort_keys=False) + "\n").encode())


def _gbs(v: float | None) -> str:
    return "—" if v is None else f"{v / GB:.2f} GB/s"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _status(met: bool | None, under_load: bool | None = None) -> str:
    text = {True: "met", False: "**short**", None: "not measured"}[met]
    return text + (" ⚠ under load" if under_load else "")


def headline(res: dict[str, Any]) -> str:
    """The goals table with the command that produced it (for README files)."""
    lines = [f"Command: `{res['command']}` — {res['machine']['cpu_count']} CPUs "
             f"({res['machine']['cpu_model']}), {res['machine']['memory_bytes'] / 2**30:.0f} "
             f"GiB RAM, Linux {res['machine']['kernel']}, Python {res['machine']['python']}, "
             f"{res['started']}.", "",
             "| goal | measured | status | detail |", "|---|---|---|---|"]
    for g in res.get("goals", []):
        lines.append(f"| {g['goal']} | {g['measured']} | "
                     f"{_status(g['met'], g.get('under_load'))} | {g['detail']} |")
    qs = _get(res, "qemu", "summary") or {}
    if "ratio_retained" in qs:
        lines += ["", f"fio over NBD beside qemu-storage-daemon ({_get(res, 'qemu', 'workload')}"
                  f"): guest IOPS retained during a full backup, shmblock "
                  f"{_n(qs['shmblock']['retained'], '.0%')}, QEMU "
                  f"{_n(qs['qemu']['retained'], '.0%')} (shmblock ÷ QEMU "
                  f"{_x(qs['ratio_retained'])}); backup time shmblock ÷ QEMU "
                  f"{_x(qs['ratio_backup_time'])}."]
    rs = res.get("restore") or {}
    if rs.get("ratio") is not None:
        q = rs["qemu_img_convert"]
        lines += ["", f"Restore of a three-link qcow2 chain of {rs['size'] / 2**30:g} GiB to "
                  f"raw in {rs['directory_fs']}, both fsynced: `restore()` "
                  f"{rs['restore']['wall_s']:.3f} s, `qemu-img convert -t writeback` "
                  f"{q['wall_s']:.3f} s: {rs['ratio']:.2f}× its time"
                  + (" ⚠ under load" if rs["restore"]["under_load"] or q["under_load"]
                     else "") + "."]
    peers = res.get("peers") or {}
    lim = res.get("limits") or {}
    size = _get(peers, "content", "size")
    if size:
        lines += ["", f"Idle full backup of {size / 2**30:g} GiB (half random, half zero), "
                  "same bytes, same run:", "",
                  "| copier | throughput | engine raw is |", "|---|---|---|"]
        raw = _get(peers, "engine", "raw", "bytes_per_s")
        data_rate = _data_rate(peers, "raw")
        for label, v in (
            ("shmblock → raw (job)", raw),
            ("shmblock → qcow2 (job)", _get(peers, "engine", "qcow2", "bytes_per_s")),
            ("qemu-img convert -O raw", _get(peers, "qemu_img_convert", "raw",
                                             "bytes_per_s")),
            ("qemu-img convert -O qcow2", _get(peers, "qemu_img_convert", "qcow2",
                                               "bytes_per_s")),
            ("QEMU backup job (qemu-storage-daemon)", _get(peers, "qemu_backup_job",
                                                          "bytes_per_s")),
        ):
            lines.append(f"| {label} | {_gbs(v)} | {_x(_ratio(raw, v))} |")
        if data_rate:
            lines.append(f"| shmblock → raw, bytes written per second (zeros are skipped) "
                         f"| {_gbs(data_rate)} | — |")
        for label, v in (
            ("limit: page-cache write, 1 MiB chunks", _get(lim, "page_cache_write",
                                                           "bytes_per_s")),
            ("limit: page-cache write from a /dev/shm mapping", _get(
                lim, "page_cache_write_from_shm", "bytes_per_s")),
            ("limit: shared-memory memcpy, 1 core", _get(lim, "memcpy", "bytes_per_s")),
        ):
            lines.append(f"| {label} | {_gbs(v)} | {_x(_ratio(data_rate, v))} of it "
                         "(bytes written) |")
    return "\n".join(lines) + "\n"


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = ["# shmblock benchmark results", "",
           f"* command: `{res['command']}`",
           f"* started {res['started']}, took {res['duration_s']:.0f} s; git "
           f"{res.get('git_commit') or 'unknown'}",
           f"* machine: {m['cpu_count']} × {m['cpu_model']}, "
           f"{m['memory_bytes'] / 2**30:.1f} GiB RAM, /dev/shm {m['shm_bytes'] / 2**30:.1f} "
           f"GiB, Linux {m['kernel']}, {m['python_implementation']} {m['python']}",
           "* packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v),
           "* tools: " + ", ".join(v for v in m["tools"].values() if v),
           f"* targets written to {res['target_dir_kind']}"
           + ("" if m["target_dir_fs"] in res["target_dir_kind"] else f" ({m['target_dir_fs']})")
           + "; "
           f"load average at start {res['load_start']}, at end {res['load_end']}",
           ]
    load = res.get("foreign_load") or {}
    if load:
        out.append("* CPU used by other processes on this shared machine while each section "
                   "ran (cores of " + str(m["cpu_count"]) + "; ⚠ more than "
                   f"{UNDER_LOAD_SHARE:.0%} of the CPUs: figures taken under load): " + ", ".join(
                       f"{k} {v['cpu_cores']:.2f}" + (" ⚠" if v.get("under_load") else "")
                       + (f" ({v['seconds']:.0f} s)" if "seconds" in v else "")
                       for k, v in load.items()))
    out += ["", "## Headline", "", headline(res)]
    notes = list(res.get("notes", []))
    notes += (res.get("peers") or {}).get("notes", [])
    notes += (res.get("scaling") or {}).get("notes", [])
    # Side by side.
    peers = res.get("peers")
    if peers:
        out += ["## Side by side with QEMU", "",
                "| what | median time | throughput | how |", "|---|---|---|---|"]
        for fmt in ("raw", "qcow2"):
            e = _get(peers, "engine", fmt)
            if e:
                out.append(f"| shmblock → {fmt}, job | {e['job_s']:.3f} s | "
                           f"{_gbs(e['bytes_per_s'])} | snapshot → conclusion |")
                out.append(f"| shmblock → {fmt}, end to end | {e['end_to_end_s']:.3f} s | "
                           f"{_gbs(e['end_to_end_bytes_per_s'])} | + worker start, target "
                           "open |")
        for fmt in ("raw", "qcow2"):
            q = _get(peers, "qemu_img_convert", fmt)
            if q:
                out.append(f"| `{q['command']}` | {q['wall_s']:.3f} s | "
                           f"{_gbs(q['bytes_per_s'])} | wall; net of {q['fixed_cost_s'] * 1e3:.0f}"
                           f" ms start-up: {_gbs(q['net_bytes_per_s'])} |")
        qb = peers.get("qemu_backup_job")
        if qb:
            out.append(f"| QEMU backup job | {qb['job_s']:.3f} s | {_gbs(qb['bytes_per_s'])} "
                       "| blockdev-backup → BLOCK_JOB_COMPLETED |")
        out += ["", "Ratios (same run):", ""]
        out += [f"* {k}: {_x(v)}" for k, v in (res.get("ratios") or {}).items()]
        out.append("")
    lim = res.get("limits")
    if lim:
        out += ["## Machine limits (measured by this run)", ""]
        out.append(f"* shared-memory copy: {_gbs(lim['memcpy']['bytes_per_s'])} "
                   f"({lim['memcpy']['how']})")
        out.append(f"* page-cache write: {_gbs(lim['page_cache_write']['bytes_per_s'])} "
                   f"({lim['page_cache_write']['how']})")
        if "page_cache_write_from_shm" in lim:
            d = lim["page_cache_write_from_shm"]
            out.append(f"* page-cache write from shared memory: {_gbs(d['bytes_per_s'])} "
                       f"({d['how']})")
        sp = lim["sparse_random_64k"]
        out.append(f"* random 64 KiB writes into a sparse file: {sp['writes_per_s']:,.0f}/s "
                   f"({sp['how']})")
        if "scaling_dir_page_cache_write" in lim:
            d = lim["scaling_dir_page_cache_write"]
            out.append(f"* page-cache write in the scaling directory: "
                       f"{_gbs(d['bytes_per_s'])} ({d['how']})")
        out.append("")
    cells = _cells(res)
    if cells:
        out += ["## Scenario matrix", "",
                f"Device {cells[0]['device_size'] / 2**20:.0f} MiB, 4 KiB guest writes. "
                "*off*: no job, a fixed window; *raw*/*qcow2*: the window is the backup job, "
                "snapshot to conclusion. Latency and longest stall are for the window only.",
                "", "| workload | writers | backup | guest ops/s | MB/s | p50 µs | p99 µs | "
                "p99.9 µs | longest stall ms | CBW wait share | CBW saves / requests | "
                "freeze ms | backup s | backup MB/s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in cells:
            b = c["target"] or "off"
            backup = "" if not c["backup"] else (
                f"{c['freeze_ms']:.2f} | {c['backup_s']:.3f} | {c['backup_mb_per_s']:,.0f}")
            if c["backup"] and c["backup_outcome"] != "completed":
                backup = f"— | {c['backup_outcome']}: {c['backup_error']} | —"
            if not c["backup"]:
                backup = "— | — | —"
            out.append(
                f"| {c['workload']} | {c['writers']} | {b} | {c['guest_ops_per_s']:,.0f} | "
                f"{c['guest_mb_per_s']:,.0f} | {c['p50_us']:.1f} | {c['p99_us']:.1f} | "
                f"{c['p999_us']:.0f} | {c['max_stall_ms']:.1f} | {c['cbw_wait_share']:.0%} | "
                f"{c['cbw_saves']:,} / {c['cbw_requests']:,} | {backup} |")
        out += ["", "![guest throughput](throughput.png)", "",
                "![guest latency](latency.png)", ""]
    sc = res.get("scaling")
    if sc and sc.get("sizes"):
        out += ["## Scaling with device size", "",
                f"Full backup of an idle device (half random, half zero) to a raw file in "
                f"{sc['target_kind']}; engine memory is resident memory less the shared "
                "device (RssAnon + RssFile), peak while the backup ran.", "",
                "| size | backup s | GB/s | supervisor MiB | backup worker MiB | "
                "supervisor USS MiB | worker USS MiB |", "|---|---|---|---|---|---|---|"]
        for s in sc["sizes"]:
            mem = s["memory_peak"]
            u = s.get("uss_before_snapshot") or {}
            out.append(
                f"| {s['size'] / 2**20:.0f} MiB | {s['backup']['duration_s']:.2f} | "
                f"{s['backup']['bytes_per_s'] / GB:.2f} | "
                f"{mem['supervisor']['private_rss'] / MiB:.1f} | "
                f"{mem['backup_worker']['private_rss'] / MiB:.1f} | "
                f"{(u.get('supervisor') or 0) / MiB:.1f} | "
                f"{(u.get('backup_worker') or 0) / MiB:.1f} |")
        out += ["", "Freeze at snapshot start (quiesce every writer + map initialisation; "
                "p50 / p99 / max over the samples, and real `sync=none` snapshot starts):",
                "", "| size | writers | samples | p50 ms | p99 ms | max ms | real snapshot "
                "ms |", "|---|---|---|---|---|---|---|"]
        for s in sc["sizes"]:
            for f in s["freeze"]:
                real = ", ".join(f"{x:.2f}" for x in f["real_snapshot_ms"])
                out.append(f"| {s['size'] / 2**20:.0f} MiB | {f['writers']} | "
                           f"{f['samples']} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | "
                           f"{f['max_ms']:.2f} | {real} |")
        out += ["", "Point-in-time check per size (one more full backup with `verify=True` "
                "while the writers run; its freeze and its verification copy, apart from the "
                "figures above): " + ", ".join(
                    f"{sz['size'] / 2**20:.0f} MiB "
                    + (f"skipped ({sz['verification']['skipped']})"
                       if (sz.get("verification") or {}).get("skipped")
                       else _verified(sz.get("verification")))
                    for sz in sc["sizes"]), ""]
        out += ["", "![scaling](scaling.png)", ""]
    out += _retention_markdown(res) + _latency_markdown(res) + _process_markdown(res)
    out += _speed_markdown(res) + _qemu_markdown(res)
    out += _incremental_markdown(res) + _restore_markdown(res)
    for key in ("latency", "process", "speed", "qemu"):
        notes += (res.get(key) or {}).get("notes", [])
    if res.get("tainted"):
        notes.append(f"⚠ {len(res['tainted'])} figure(s) taken while other processes used "
                     f"more than {UNDER_LOAD_SHARE:.0%} of the CPUs (under load: they say "
                     "as much about the other load as about shmblock): "
                     + ", ".join(res["tainted"]))
    notes += (res.get("incremental") or {}).get("notes", [])
    notes += (res.get("restore") or {}).get("notes", [])
    notes += [f"FAILED: {f}" for f in res.get("failures", [])]
    if notes:
        out += ["## Notes", ""] + [f"* {n}" for n in notes] + [""]
    return "\n".join(out)


def _n(v: float | None, fmt: str = ".1f", unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{fmt}}{unit}"


def _buffer(b: dict[str, Any] | None) -> str:
    """A job's copy-before-write buffer occupancy (C1), "n/a" from an engine without it."""
    if not b:
        return "n/a"
    cap = b.get("capacity_bytes") or 0
    return (f"peak {(b.get('peak_bytes') or 0) / MiB:.1f} of {cap / MiB:.0f} MiB, full "
            f"{b.get('full_seconds') or 0:.2f} s, {b.get('saves') or 0:,} saves, "
            f"{b.get('fallbacks') or 0:,} fallbacks")


def _verified(v: dict[str, Any] | None) -> str:
    if not v:
        return "—"
    if v.get("verified") is None:
        return "skipped"
    return ("ok" if v["verified"] else "**FAILED**") + (
        f" (freeze {v['freeze_ms']:.2f} ms + copy {v['verify_copy_ms']:.0f} ms)"
        if "freeze_ms" in v else "")


def _retention_markdown(res: dict[str, Any]) -> list[str]:
    cells = _cells(res)
    cores = (res.get("machine") or {}).get("cpu_count")
    rows = []
    for c in cells:
        off = _find(cells, c["workload"], c["writers"], "")
        if not c["backup"] or not off or not off["guest_ops_per_s"]:
            continue
        share = c["guest_ops_per_s"] / off["guest_ops_per_s"]
        bound = cpu_share_bound(c["writers"], cores)
        load = c.get("load")
        rows.append(f"| {c['workload']} | {c['writers']} | {c['target']} | {share:.0%} | "
                    f"{bound:.0%} | {share / bound:.0%} | {_buffer(c.get('cbw_buffer'))} | "
                    f"{_verified(c.get('verification'))} | "
                    f"{_load(load) if load else '—'} |")
    if not rows:
        return []
    return ["## Guest retention against the CPU-share bound", "",
            "Retention: guest ops/s during the backup ÷ without, same writers. Bound: with N "
            f"CPU-bound writers on C = {cores} cores and a busy backup worker, a fair "
            "scheduler gives each writer min(1, C/N) of a core without a backup and "
            "min(1, (C − min(u, C/(N+1)))/N) with one (u = 1: the worker copies flat out), "
            f"so retention ≤ {BOUND_FORMULA}: 1 while N < C (a writer keeps a core and one "
            "is left for the worker), N/(N+1) for N ≥ C (4 writers: 80 %). "
            "`shmblock/bench/bound.py` derives it. The buffer column is the copy-before-write "
            "buffer's occupancy (n/a: an engine without the bounded buffer); verified: the "
            "untimed verified backup of the same group (its freeze and verification copy "
            "apart); others' CPU: cores other processes used during the cell (⚠ under load).",
            "", "| workload | writers | target | retention | bound | of bound | CBW buffer | "
            "verified | others' CPU |", "|---|---|---|---|---|---|---|---|---|", *rows, ""]


def _latency_markdown(res: dict[str, Any]) -> list[str]:
    lat = res.get("latency")
    if not lat or not lat.get("formats"):
        return []
    out = ["## Request → snapshot instant", "",
           f"`create_backup` + `start` on an idle {lat['size'] / MiB:.0f} MiB device, "
           f"{lat['jobs']} jobs per format; request = create + start (start returns once the "
           "snapshot is taken and the writers thawed). Worker: a backup process per job, or "
           "one per device started with it (`Engine(prestart_backup_worker=True)`), when "
           "the engine has that. Goal p99 < "
           f"{lat['goal_p99_ms']:g} ms, read on the {lat.get('goal_model', 'per-job')} "
           "model.", "",
           "| worker | target | request p50 ms | request p99 ms | max ms | create p50 / p99 ms "
           "| start p50 / p99 ms | verified | others' CPU |", "|---" * 9 + "|"]
    models = lat.get("models") or {"per-job": lat["formats"]}
    for model, fmt, f in ((m, fmt, f) for m, fs in models.items() for fmt, f in fs.items()):
        out.append(f"| {model} | {fmt} | {f['request_p50_ms']:.1f} | {f['request_p99_ms']:.1f} | "
                   f"{f['request_max_ms']:.1f} | {f['create_p50_ms']:.1f} / "
                   f"{f['create_p99_ms']:.1f} | {f['start_p50_ms']:.2f} / "
                   f"{f['start_p99_ms']:.2f} | {_verified(f.get('verification'))} | "
                   f"{_load(f)} |")
    return [*out, ""]


def _process_markdown(res: dict[str, Any]) -> list[str]:
    pr = res.get("process")
    if not pr or not pr.get("formats"):
        return []
    out = ["## Whole process: `shmblock-run run` against `qemu-img convert`", "",
           f"An idle {pr['size'] / 2**30:g} GiB device file (half random, half holes), "
           f"each command timed from start to exit, median of {pr['repeats']}, alternating "
           "which goes first. Goal ≤ 1.0× qemu-img's time. The default `shmblock-run run` "
           "(with its verification) is timed once apart.", "",
           "| target | shmblock-run run s | qemu-img convert s | ratio | with --verify s | "
           "others' CPU |", "|---|---|---|---|---|---|"]
    for fmt, f in pr["formats"].items():
        out.append(f"| {fmt} | {f['shmblock_s']:.3f} | {f['qemu_img_s']:.3f} | "
                   f"{_x(f['ratio'])} | {f['verified_run']['wall_s']:.3f} | {_load(f)} |")
    out += ["", "Commands: " + "; ".join(
        f"`{f['shmblock_command']}`, `{f['qemu_img_command']}`"
        for f in pr["formats"].values()), ""]
    return out


def _speed_markdown(res: dict[str, Any]) -> list[str]:
    sp = res.get("speed")
    if not sp or not sp.get("groups"):
        return []
    out = ["## Guest retention against `--speed`", "",
           f"Device {sp['size'] / MiB:.0f} MiB, full backups to raw at each speed, the same "
           "writers throughout. Bound (busy worker): the CPU-share bound with u = 1; "
           "bound (measured worker): with u = the worker's measured CPU over the job. Of "
           "bound: retention ÷ the measured-worker bound (the busy one when the worker's CPU "
           "could not be read).", "",
           "| workload | writers | speed | backup s | guest ops/s | retention | worker cores | "
           "bound (busy) | bound (measured) | of bound | p99 µs | longest stall ms | "
           "CBW buffer | others' CPU |", "|---" * 14 + "|"]
    for g in sp["groups"]:
        out.append(f"| {g['workload']} | {g['writers']} | off | — | "
                   f"{g['off']['guest_ops_per_s']:,.0f} | 100% | — | — | — | — | "
                   f"{g['off']['p99_us']:.1f} | — | — | {_load(g['off'])} |")
        for c in g["cells"]:
            speed = "unlimited" if not c["speed"] else f"{c['speed'] / MiB:.0f} MiB/s"
            out.append(
                f"| {g['workload']} | {g['writers']} | {speed} | {c['backup_s']:.2f} | "
                f"{c['guest_ops_per_s']:,.0f} | {_n(c['retention'], '.0%')} | "
                f"{_n(c['worker_cores'], '.2f')} | {c['bound_busy_worker']:.0%} | "
                f"{_n(c['bound_measured_worker'], '.0%')} | {_n(c['of_bound'], '.0%')} | "
                f"{c['p99_us']:.1f} | {c['max_stall_ms']:.1f} | {_buffer(c['cbw_buffer'])} | "
                f"{_load(c)} |")
    out += ["", "Verified (one untimed backup per group): " + ", ".join(
        f"{g['workload']} × {g['writers']} {_verified(g['verification'])}"
        for g in sp["groups"]), ""]
    return out


def _qemu_markdown(res: dict[str, Any]) -> list[str]:
    q = res.get("qemu")
    if not q or not q.get("servers"):
        return []
    out = ["## The same guest over NBD: shmblock beside qemu-storage-daemon", "",
           f"{q['workload']}, iodepth {q['iodepth']}, against a {q['size'] / 2**30:g} GiB "
           "image of the same content exported over NBD (Unix socket); *backup*: a full "
           "backup to a raw file started over QMP with `blockdev-backup`, the window is the "
           "backup's (command → BLOCK_JOB_COMPLETED); *none*: the rest of a run without, "
           "after the same lead-in. Figures from fio's per-completion log; longest gap: the "
           "longest time without a completion (the longest stall).", "",
           "| server | backup | window s | IOPS | p50 µs | p99 µs | p99.9 µs | max latency ms | "
           "longest gap ms | backup s | others' CPU |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, cells in q["servers"].items():
        for c in cells:
            w = c["window"]
            out.append(f"| {kind} | {'full' if c['backup'] else 'none'} | {w['window_s']:.2f} "
                       f"| {w['iops']:,.0f} | {_n(w['p50_us'])} | {_n(w['p99_us'])} | "
                       f"{_n(w['p999_us'])} | {_n(w['max_latency_ms'], '.1f')} | "
                       f"{w['max_gap_ms']:.0f} | "
                       f"{_n(c.get('backup_s'), '.3f')} | {_load(c)} |")
    s = q.get("summary") or {}
    out += [""]
    for kind in ("qemu", "shmblock"):
        if kind in s:
            out.append(f"* {kind}: IOPS retained during the backup "
                       f"{_n(s[kind]['retained'], '.0%')}, backup "
                       f"{_n(s[kind]['backup_s'], '.3f', ' s')}")
    if "ratio_retained" in s:
        out.append(f"* shmblock ÷ QEMU: IOPS retained {_x(s['ratio_retained'])}, backup "
                   f"time {_x(s['ratio_backup_time'])} (below 1: shmblock's backup is faster)")
    return [*out, ""]


def _load(d: dict[str, Any]) -> str:
    """A figure's other load: the cores others used, flagged when under load."""
    return f"{d['foreign_cores']:.2f}" + (" ⚠" if d["under_load"] else "")


def _ok(v: bool | None) -> str:
    return {True: "ok", False: "**FAILED**", None: "not checked"}[v]


def _incremental_markdown(res: dict[str, Any]) -> list[str]:
    inc = res.get("incremental")
    if not inc or not inc.get("variants"):
        return []
    out = ["## Incremental backups", "",
           f"Idle {inc['size'] / 2**30:g} GiB device (half random, half zero); bitmaps "
           f"added before the full backups; {inc['dirty_share']:.0%} of the clusters written "
           "as a guest before each incremental (`sync=incremental`), to qcow2 with the "
           "previous link as backing file and to raw (dirty clusters at their offsets). "
           f"Median of {inc['repeats']}; job time is snapshot → conclusion, end to end adds "
           "the worker's start and the target's opening. Others' CPU: cores other "
           "processes used meanwhile (worst run; ⚠ under load).", "",
           "| backup | format | job ms | end to end ms | job time ÷ full | end to end ÷ "
           "full | bytes written | file bytes | others' CPU |",
           "|---|---|---|---|---|---|---|---|---|"]
    for fmt in ("qcow2", "raw"):
        f = inc["full"][fmt]
        out.append(f"| full | {fmt} | {f['job_s'] * 1e3:.1f} | {f['end_to_end_s'] * 1e3:.1f} | "
                   f"1 | 1 | {f['bytes_written']:,.0f} | {f['file_bytes']:,.0f} | "
                   f"{_load(f)} |")
    for v in inc["variants"]:
        for fmt in ("qcow2", "raw"):
            s = v[fmt]
            out.append(f"| {v['variant']}, {v['dirty_bytes'] / MiB:.1f} MiB dirty | {fmt} | "
                       f"{s['job_s'] * 1e3:.1f} | {s['end_to_end_s'] * 1e3:.1f} | "
                       f"{s['ratio_job']:.1%} | {s['ratio_end_to_end']:.1%} | "
                       f"{s['bytes_written']:,.0f} | {s['file_bytes']:,.0f} | {_load(s)} |")
    ver = inc["verification"]
    out += ["", f"Verification (one more round, untimed): the {ver.get('links', 0)}-link "
            f"qcow2 chain against the snapshot's reference image: "
            f"{_ok(ver['compare_ok'])} (`qemu-img compare`); `qemu-img check` of every "
            f"link: {_ok(ver['check_ok'])}; the raw incremental against the snapshot's "
            f"digests: {_ok(ver['raw_incremental_verified'])}.", ""]
    return out


def _restore_markdown(res: dict[str, Any]) -> list[str]:
    rs = res.get("restore")
    if not rs or "restore" not in rs:
        return []
    r, q = rs["restore"], rs.get("qemu_img_convert")
    out = ["## Restore of a three-link chain", "",
           f"Chain of a {rs['size'] / 2**30:g} GiB device made by the engine: {rs['chain']}; "
           f"restored to a new raw file in {rs['directory_fs']}, median of {rs['repeats']}, "
           "alternating which copier goes first, `os.sync()` before each. Both make the data "
           "durable before they stop the clock.", "",
           "| copier | wall s | others' CPU | how |", "|---|---|---|---|",
           f"| `restore(top, dest, verify=False)` | {r['wall_s']:.3f} (copy and fsync "
           f"{r['copy_s']:.3f}) | {_load(r)} | {r['how']} |"]
    if q:
        out.append(f"| `{q['command']}` | {q['wall_s']:.3f} | {_load(q)} | {q['how']} |")
    ratio = rs.get("ratio")
    vr = rs["verified_restore"]
    out += ["", f"Restore time ÷ qemu-img convert time: "
            f"{'—' if ratio is None else f'{ratio:.2f}×'} (below 1: the restore is faster).",
            "", f"A verified restore took {vr['wall_s']:.3f} s (copy {vr['copy_s']:.3f} s, "
            f"verification {vr['verify_s']:.3f} s): verified {_ok(vr['verified'])}, against "
            f"the reference image (`qemu-img compare`) {_ok(vr['compare_ok'])}; the chain "
            f"against it {_ok(rs['chain_check']['compare_ok'])}, `qemu-img check` of every "
            f"link {_ok(rs['chain_check']['check_ok'])}.", ""]
    return out


# -- plots ---------------------------------------------------------------------------------


def plots(res: dict[str, Any], out_dir: str) -> list[str]:
    """PNG plots (matplotlib, Agg backend); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    cells = _cells(res)
    workloads = list(dict.fromkeys(c["workload"] for c in cells))
    styles = {"off": ("tab:gray", "o", "no backup"), "raw": ("tab:blue", "s", "backup → raw"),
              "qcow2": ("tab:orange", "^", "backup → qcow2")}
    if cells:
        for name, title in (("throughput", "guest writes/s"), ("latency", "latency µs")):
            fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.6),
                                     squeeze=False)
            for ax, wl in zip(axes[0], workloads, strict=True):
                for key, (color, marker, label) in styles.items():
                    sel = sorted((c for c in cells if c["workload"] == wl
                                  and (c["target"] or "off") == key),
                                 key=lambda c: c["writers"])
                    if not sel:
                        continue
                    xs = [c["writers"] for c in sel]
                    if name == "throughput":
                        ax.plot(xs, [c["guest_ops_per_s"] for c in sel], marker=marker,
                                color=color, label=label)
                    else:
                        ax.plot(xs, [c["p99_us"] for c in sel], marker=marker, color=color,
                                label=f"{label} p99")
                        ax.plot(xs, [c["p50_us"] for c in sel], marker=marker, color=color,
                                linestyle=":", alpha=0.7, label=f"{label} p50")
                ax.set_title(wl)
                ax.set_xlabel("writers")
                ax.set_xscale("log", base=2)
                ax.set_xticks(sorted({c["writers"] for c in cells}))
                ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.set_ylabel(title)
                if name == "latency":
                    ax.set_yscale("log")
                else:
                    ax.set_ylim(bottom=0)
                ax.grid(True, alpha=0.3)
            axes[0][0].legend(fontsize=7)
            fig.suptitle(f"shmblock: {title} vs writers, with and without a backup "
                         f"({cells[0]['device_size'] >> 20} MiB device, 4 KiB writes)",
                         fontsize=9)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{name}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    sizes = (res.get("scaling") or {}).get("sizes") or []
    if sizes:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        gib = [s["size"] / 2**30 for s in sizes]
        axes[0].plot(gib, [s["backup"]["duration_s"] for s in sizes], marker="o")
        axes[0].set_title("full backup time")
        axes[0].set_ylabel("seconds")
        for role, color in (("supervisor", "tab:blue"), ("backup_worker", "tab:orange")):
            axes[1].plot(gib, [s["memory_peak"][role]["private_rss"] / MiB for s in sizes],
                         marker="o", color=color, label=role.replace("_", " "))
        axes[1].set_title("engine memory (RSS less shared device)")
        axes[1].set_ylabel("MiB")
        axes[1].set_ylim(bottom=0)
        axes[1].legend(fontsize=7)
        for s in sizes:
            axes[2].plot([f["writers"] for f in s["freeze"]], [f["p99_ms"] for f in s["freeze"]],
                         marker="o", label=f"{s['size'] >> 20} MiB")
        axes[2].axhline(5.0, color="red", linestyle="--", linewidth=0.8, label="goal 5 ms")
        axes[2].set_title("freeze p99 at snapshot start")
        axes[2].set_xlabel("writers")
        axes[2].set_ylabel("ms")
        axes[2].legend(fontsize=7)
        for ax in axes[:2]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("device size (GiB)")
        for ax in axes:
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, "scaling.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
