"""Known mutants of the core, and the tests that must kill each one, every time.

Mutation testing by hand found bugs the suite let through (issue 7): a verification
that read only the first 8 MiB, a publish without its fsync, a final drain left out, and
two races caught only by chance. Each such bug is written down here as a *mutant* — a
one-place change to the source — with the tests that must fail when it is applied. Run
this before calling a change to the write path, the copier, verification or the
targets done::

    .venv/bin/python tests/mutants.py              # every mutant, once
    .venv/bin/python tests/mutants.py --repeat 3 finish-no-drain

It never touches the working tree: the tracked files (as they are on disk, uncommitted
edits included) are copied to a temporary directory, each mutant is applied there, and
pytest runs in that copy (workers started by the engine import from the copy too,
because the engine puts its own package root on their path). A mutant whose text no
longer appears in the source is reported as *stale*: update its entry with the code.
The run first checks that the killing tests pass on the unmutated copy, else a "kill"
would mean nothing. Exit status: 0 when every mutant was killed every time.

This is a script, not a test module (pytest does not collect it): a full run applies
each mutant and runs its tests, a few minutes in all, and belongs before a commit to the
core, not in every CI run. ``mutmut`` can search for new mutants; this file keeps the
ones that mattered.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    """A one-place change to ``path``: ``old`` (which must occur once) becomes ``new``."""

    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


MUTANTS: dict[str, Mutant] = {
    "verify-first-8mib": Mutant(
        "shmblock/verify.py",
        "        for start in range(0, capture.size, READ_CHUNK):",
        "        for start in range(0, min(capture.size, 8 << 20), READ_CHUNK):",
        ("tests/test_target_raw.py", "tests/test_target_qcow2.py", "-k",
         "one_wrong_byte_near_the_end"),
        "verification reads only the first 8 MiB of the backup"),
    "publish-no-fsync": Mutant(
        "shmblock/paths.py",
        "    os.fsync(fd)\n    os.rename(part_path, path)",
        "    os.rename(part_path, path)",
        ("tests/test_paths.py", "-k", "fsyncs_the_file_before_the_rename"),
        "a .part is published without the fsync before the rename"),
    "finish-no-drain": Mutant(
        "shmblock/copier.py",
        "            self.stop_copy_before_write()\n        self.drain_staging(service=False)\n",
        "            self.stop_copy_before_write()\n",
        ("tests/test_stateful.py", "-k", "finish_drains_what_writers_staged"),
        "the worker's finish() loses its final staging drain"),
    "background-read-before-claim": Mutant(
        "shmblock/copier.py",
        "        if not self.claims.try_claim(c0, c1 - c0):\n            return 0\n"
        "        saved = 0\n        try:\n            marked = nc[c0:c1] != 0\n",
        "        marked = nc[c0:c1] != 0\n"
        "        if not self.claims.try_claim(c0, c1 - c0):\n            return 0\n"
        "        saved = 0\n        try:\n",
        ("tests/test_interleavings.py", "-k", "every_line_of_a_background_chunk"),
        "background copy reads needs_copy before it takes the claim"),
    "clear-before-store": Mutant(
        "shmblock/guest.py",
        "                saved = self._buffer.save(c, deadline)\n"
        "                if saved:\n"
        "                    nc[c] = 0\n",
        "                nc[c] = 0\n"
        "                saved = self._buffer.save(c, deadline)\n"
        "                if saved:\n",
        ("tests/test_interleavings.py", "-k", "worker_at_every_line_of_a_stage_mode_save"),
        "a writer clears needs_copy before its saved data is stored in the buffer"),
    "publish-before-data": Mutant(
        "shmblock/cbw_buffer.py",
        "        self._staging[slot] = self.device.data[cluster * cs : (cluster + 1) * cs]\n"
        "        self._cluster[slot] = cluster\n"
        "        self._state[slot] = L.SLOT_FULL\n",
        "        self._state[slot] = L.SLOT_FULL\n"
        "        self._staging[slot] = self.device.data[cluster * cs : (cluster + 1) * cs]\n"
        "        self._cluster[slot] = cluster\n",
        ("tests/test_interleavings.py", "-k", "drain_at_every_line_of_a_stage_mode_save"),
        "a writer marks its buffer slot FULL before the slot holds the data"),
    "reclaim-live-writer": Mutant(
        "shmblock/cbw_buffer.py",
        "        if w == own or not claims.try_claim(ALIVE_BASE + w):\n",
        "        if w == own:\n",
        ("tests/test_cbw_buffer.py", "-k", "offset_order or killed_while_holding"),
        "buffer slots reserved by a live writer are freed as if it were dead"),
    "reclaim-reads-states-twice": Mutant(
        "shmblock/cbw_buffer.py",
        "    holders = [m for m in np.unique(seen[seen >= L.SLOT_HELD]).tolist()"
        " if m >= L.SLOT_HELD]\n",
        "    holders = np.unique(state[state >= L.SLOT_HELD]).tolist()\n",
        ("tests/test_cbw_buffer.py", "-k", "reclaim_never"),
        "reclaiming reads the slot states twice: a slot published in between looks FULL-"
        "marked and every FULL slot is freed undrained"),
    "drain-unsorted": Mutant(
        "shmblock/copier.py",
        '        order = np.argsort(clusters, kind="stable")\n',
        "        order = np.arange(clusters.size)\n",
        ("tests/test_cbw_buffer.py", "-k", "offset_order or saved_twice or gather_size"),
        "the buffer is drained in slot order, not cluster order (no coalescing)"),
    "none-finish-without-stop": Mutant(
        "shmblock/copier.py",
        "        if not background:\n            self.stop_copy_before_write()\n",
        "",
        ("tests/test_interleavings.py", "-k", "sync_none_completes"),
        "sync=none ends without stopping copy-before-write first (a late stage is lost)"),
    "serve-without-claim": Mutant(
        "shmblock/copier.py",
        "        if not self.claims.try_claim(cluster, c1 - cluster):\n"
        "            return Served.BUSY\n        nc = self._nc\n        try:",
        "        nc = self._nc\n        if True:",
        ("tests/test_stateful.py", "-k", "stale_request_served_after"),
        "a copy request is served without the cluster's claim"),
    "serve-ignores-job": Mutant(
        "shmblock/copier.py",
        "        if job == 0 or job != self.job_seq or int(ctl[L.CTL_JOB_SEQ]) != job:\n"
        "            return Served.STALE",
        "        if False:\n            return Served.STALE",
        ("tests/test_stateful.py", "-k", "left_over_from_an_earlier_job"),
        "a copy request of another job is served"),
    "freeze-no-in-write-wait": Mutant(
        "shmblock/freeze.py",
        "            while busy := in_a_write(h, writers):",
        "            while busy := in_a_write(h, writers)[:0]:",
        ("tests/test_freeze_fence.py", "-k", "storms or inside_a_write_holds"),
        "the freeze does not wait for writers that are in a write"),
}


def copy_tree(dest: Path) -> None:
    """Copy the tracked files, as they are on disk, to ``dest``."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(tree: Path, tests: tuple[str, ...]) -> bool:
    """True when the tests pass in ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        timeout=900, check=False)
    return proc.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per mutant")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, m in MUTANTS.items():
            print(f"{name:30} {m.why}")
        return 0
    unknown = [n for n in args.names if n not in MUTANTS]
    if unknown or args.repeat < 1:
        parser.error(f"unknown mutant(s): {', '.join(unknown)}" if unknown
                     else "--repeat must be at least 1")
    chosen = args.names or list(MUTANTS)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="shmblock-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        for name in chosen:
            m = MUTANTS[name]
            source = (tree / m.path).read_text()
            if source.count(m.old) != 1:
                print(f"STALE     {name}: its text is not in {m.path} exactly once")
                failures += 1
                continue
            if not run_tests(tree, m.tests):
                print(f"BASELINE  {name}: its tests fail without the mutant")
                failures += 1
                continue
            (tree / m.path).write_text(source.replace(m.old, m.new))
            try:
                survived = sum(run_tests(tree, m.tests) for _ in range(args.repeat))
            finally:
                (tree / m.path).write_text(source)
            verdict = "killed" if survived == 0 else f"SURVIVED {survived}/{args.repeat}"
            print(f"{verdict:9} {name}: {m.why}")
            failures += survived > 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
