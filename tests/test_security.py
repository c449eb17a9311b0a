"""Files and processes that are not ours (issue 7, items 2, 6, 7, 8).

* the run registry: where it lives, who may own and write it, records that lie;
* ``cleanup``: it kills, unlinks and deletes only what a dead run of ours provably made;
* outputs that collide with the device's file or with each other, across processes;
* workers that must not import code from the caller's working directory.

Tests run as root here; a "second local user" is uid 65534 (nobody): files and
directories are given to it with ``os.chown``, processes run as it after ``os.setuid``
in the child. Where that needs root, the test is skipped otherwise.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

from shmblock.cleanup import cleanup
from shmblock.engine import Engine
from shmblock.errors import JobError, UsageError
from shmblock.job import Outcome
from shmblock.names import RegistryError, RunNames, list_records, process_start
from shmblock.names import registry_dir as current_registry_dir
from tests.procs import pid_gone, run_cli, start_cli, wait_until

MiB = 1 << 20
NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")


@pytest.fixture
def registry(shm_prefix: str) -> Path:
    """The test's registry directory (SHMBLOCK_RUN_DIR), created 0700."""
    path = Path(os.environ["SHMBLOCK_RUN_DIR"])
    path.mkdir(mode=0o700, exist_ok=True)
    return path


@pytest.fixture
def decoys() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start processes that cleanup must (or must not) kill; they are reaped after."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str, user: int | None = None) -> subprocess.Popen[bytes]:
        # A second user cannot run our venv's interpreter (under /root): the system's.
        python = sys.executable if user is None else "/usr/bin/python3"
        proc = subprocess.Popen([python, "-c", "import time; time.sleep(60)", *argv],
                                user=user)
        started.append(proc)
        # Until exec, /proc/<pid>/cmdline is still ours (pytest's).
        wait_until(lambda: b"time.sleep(60)" in Path(f"/proc/{proc.pid}/cmdline").read_bytes(),
                   5.0, what="the decoy to start")
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def dead_record(prefix: str, run: str, **fields: Any) -> dict[str, Any]:
    """A valid record of a dead run: its supervisor pid is ours, with the wrong start."""
    data: dict[str, Any] = json.loads(json.dumps({
        "run_id": run, "prefix": prefix, "pid": os.getpid(), "started": time.time() - 60,
        "pid_start": 1, "boot": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        "segments": [], "queues": [], "files": [], "children": []}))
    data.update(fields)
    return data


def write_record(registry: Path, data: dict[str, Any], name: str | None = None) -> Path:
    path = registry / (name or f"{data['prefix']}-{data['run_id']}.json")
    path.write_text(json.dumps(data))
    return path


def child_entry(proc: subprocess.Popen[bytes], start: int | None = None) -> dict[str, Any]:
    argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    return {"pid": proc.pid, "start": start if start is not None else process_start(proc.pid),
            "argv": [a.decode() for a in argv if a]}


def part_entry(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "dev": st.st_dev, "ino": st.st_ino}


# -- where the registry lives, and who may own it -----------------------------------------


def test_registry_lives_in_xdg_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           shm_prefix: str) -> None:
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    monkeypatch.delenv("SHMBLOCK_RUN_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert current_registry_dir() == runtime / "shmblock"
    with Engine() as engine:
        st = os.lstat(runtime / "shmblock")
        assert st.st_mode & 0o777 == 0o700
        assert (runtime / "shmblock" / engine.record.file_name).is_file()
    assert list((runtime / "shmblock").iterdir()) == []


def test_an_xdg_runtime_dir_that_is_not_ours_is_not_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o777)
    os.chmod(runtime, 0o777)  # writable by anyone: not a private runtime directory
    monkeypatch.delenv("SHMBLOCK_RUN_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert current_registry_dir() == Path(f"/tmp/shmblock-{os.getuid()}")


@root_only
def test_a_registry_owned_by_another_user_is_refused(registry: Path) -> None:
    os.chown(registry, NOBODY, NOBODY)  # planted by the second user, mode 0700
    with pytest.raises(RegistryError, match=f"belongs to uid {NOBODY}, not to you"), \
            Engine():
        pass
    with pytest.raises(RegistryError, match=f"belongs to uid {NOBODY}"):
        cleanup()
    out = run_cli("cleanup", timeout=60)
    assert out.returncode == 1 and f"belongs to uid {NOBODY}" in out.stderr, out
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o1777])
def test_a_group_or_other_writable_registry_is_refused(registry: Path, mode: int) -> None:
    os.chmod(registry, mode)
    with pytest.raises(RegistryError, match="writable by others"), Engine():
        pass
    with pytest.raises(RegistryError, match="writable by others"):
        cleanup()


def test_a_registry_that_is_a_symlink_is_refused(tmp_path: Path, shm_prefix: str) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, os.environ["SHMBLOCK_RUN_DIR"])
    with pytest.raises(RegistryError, match="not a directory"), Engine():
        pass
    assert list(real.iterdir()) == []


def test_a_record_that_is_a_symlink_is_not_followed(tmp_path: Path, registry: Path,
                                                    shm_prefix: str) -> None:
    victim = tmp_path / "victim.part"
    victim.write_bytes(b"precious")
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(dead_record(shm_prefix, "0badcafe",
                                                files=[part_entry(victim)])))
    (registry / f"{shm_prefix}-0badcafe.json").symlink_to(elsewhere)
    report = cleanup()
    assert victim.read_bytes() == b"precious"
    assert report.files == [] and len(report.skipped) == 1, report
    (registry / f"{shm_prefix}-0badcafe.json").unlink()


def test_engine_records_are_private_and_complete(tmp_path: Path, registry: Path) -> None:
    """Every .part — the target's and the reference image's — is recorded with its inode,
    and every child with its start time and command line."""
    with Engine() as engine:
        dev = engine.create_device(4 * MiB)
        engine.start_writers(dev, 1, duration=0.3)
        job = engine.backup(dev, str(tmp_path / "b.raw"), reference_image=str(tmp_path / "r.raw"))
        assert job.wait(30).outcome is Outcome.COMPLETED
        path = registry / engine.record.file_name
        assert path.stat().st_mode & 0o777 == 0o600
        [record] = list_records()
        parts = {p.path: p for p in record.files}
        assert set(parts) == {str(tmp_path / "b.raw.part"), str(tmp_path / "r.raw.part")}
        assert all(p.identity is not None for p in parts.values()), parts
        assert len(record.children) == 2
        for child in record.children:
            assert child.start > 0 and "-P" in child.argv and record.run_id in child.argv
    assert (tmp_path / "b.raw").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "r.raw").stat().st_mode & 0o777 == 0o600


def test_an_engine_refuses_a_run_id_cleanup_could_not_recognise() -> None:
    for bad in ("", "x", "0BADCAFE", "0badcafe0", "../../x"):
        with pytest.raises(UsageError, match="run id"):
            Engine(run_id=bad)
    assert list_records() == []


# -- records that lie ----------------------------------------------------------------------


MUTATIONS: dict[str, Callable[[dict[str, Any]], object]] = {
    "empty run id": lambda d: d.update(run_id=""),
    "run id of another file": lambda d: d.update(run_id="11111111"),
    "run id with a regex": lambda d: d.update(run_id=".*"),
    "another prefix": lambda d: d.update(prefix=d["prefix"] + "x"),
    "pid is a string": lambda d: d.update(pid=str(d["pid"])),
    "pid is a bool": lambda d: d.update(pid=True),
    "child pid is a string": lambda d: d["children"][0].update(pid=str(d["children"][0]["pid"])),
    "file that is not a .part": lambda d: d["files"].append(
        {"path": d["files"][0]["path"].removesuffix(".part"), "dev": 0, "ino": 0}),
    "relative .part": lambda d: d["files"].append({"path": "x.part", "dev": 0, "ino": 0}),
    "dot-dot .part": lambda d: d["files"].append(
        {"path": "/tmp/../tmp/x.part", "dev": 0, "ino": 0}),
    "segment of another run": lambda d: d["segments"].append(f"/{d['prefix']}-11111111-x-meta"),
    "queue of another prefix": lambda d: d["queues"].append(f"/other-{d['run_id']}-sup"),
    "queue with a slash": lambda d: d["queues"].append(f"/{d['prefix']}-{d['run_id']}-a/b"),
    "unknown field": lambda d: d.update(extra=1),
    "missing field": lambda d: d.pop("boot"),
    "no fields": lambda d: [d.pop(k) for k in list(d)],
}


@pytest.mark.parametrize("mutation", [None, *MUTATIONS], ids=["valid", *MUTATIONS])
def test_a_malformed_record_is_never_acted_on(
        tmp_path: Path, registry: Path, shm_prefix: str, mutation: str | None,
        decoys: Callable[..., subprocess.Popen[bytes]]) -> None:
    """Each field validated: a record with one bad field kills and deletes nothing. The
    unmutated record (the control) does both, so the test can tell."""
    run = "0badcafe"
    decoy = decoys(f"run={run}", "run=")  # the old check: run id in the command line
    part = tmp_path / "b.raw.part"
    part.write_bytes(b"precious")
    data = dead_record(shm_prefix, run, children=[child_entry(decoy)],
                       files=[part_entry(part)])
    if mutation is not None:
        MUTATIONS[mutation](data)
    write_record(registry, data, f"{shm_prefix}-{run}.json")
    report = cleanup()
    if mutation is None:
        assert report.killed == [decoy.pid] and report.files == [str(part)], report
        decoy.wait(10)
        assert not part.exists()
        return
    assert report.killed == [] and report.files == [], report
    assert len(report.skipped) == 1, report
    assert decoy.poll() is None, "a process named by a malformed record was killed"
    assert part.read_bytes() == b"precious"
    (registry / f"{shm_prefix}-{run}.json").unlink()


@pytest.mark.parametrize("content", [b"", b"{", b"[" * 100_000 + b"]" * 100_000,
                                     b" " * (2 << 20), b"\xff\xfe"],
                         ids=["empty", "truncated", "deep", "huge", "not utf-8"])
def test_unreadable_records_are_skipped(registry: Path, shm_prefix: str,
                                        content: bytes) -> None:
    (registry / f"{shm_prefix}-0badcafe.json").write_bytes(content)
    report = cleanup()
    assert report.empty and len(report.skipped) == 1, report
    (registry / f"{shm_prefix}-0badcafe.json").unlink()


def test_cleanup_kills_only_the_processes_the_run_started(
        registry: Path, shm_prefix: str,
        decoys: Callable[..., subprocess.Popen[bytes]]) -> None:
    run = "0badcafe"
    ours = decoys(f"run={run}")
    recycled = decoys(f"run={run}")  # same pid later reused: another start time
    renamed = decoys("--run", run)  # right start time, another command line
    entries = [child_entry(ours), child_entry(recycled, start=(process_start(recycled.pid)
                                                               or 2) - 1),
               {**child_entry(renamed), "argv": ["python", "-m", "workers.guest"]}]
    others: list[subprocess.Popen[bytes]] = []
    if os.geteuid() == 0:
        others.append(decoys(f"run={run}", user=NOBODY))  # a second user's process
        entries.append(child_entry(others[0]))
    write_record(registry, dead_record(shm_prefix, run, children=entries))
    report = cleanup()
    assert report.killed == [ours.pid], report
    ours.wait(10)
    for proc in (recycled, renamed, *others):
        assert proc.poll() is None, f"pid {proc.pid} was not the run's and was killed"


def test_a_live_supervisor_is_recognised_by_its_start_time(
        registry: Path, shm_prefix: str,
        decoys: Callable[..., subprocess.Popen[bytes]]) -> None:
    run = "0badcafe"
    worker = decoys(f"run={run}")
    live = dead_record(shm_prefix, run, pid_start=process_start(os.getpid()),
                       children=[child_entry(worker)])
    write_record(registry, live)
    assert cleanup().empty
    assert worker.poll() is None
    assert list_records()[0].run_id == run
    (registry / f"{shm_prefix}-{run}.json").unlink()


def test_cleanup_deletes_only_part_files_the_run_created(tmp_path: Path, registry: Path,
                                                         shm_prefix: str) -> None:
    ours = tmp_path / "ours.raw.part"
    replaced = tmp_path / "replaced.raw.part"  # another file now has that name
    held = tmp_path / "held.raw.part"  # inode never recorded, and a live job holds it
    for p in (ours, replaced, held):
        p.write_bytes(b"x")
    files = [part_entry(ours), {**part_entry(replaced), "ino": replaced.stat().st_ino + 1},
             {"path": str(held), "dev": 0, "ino": 0}]
    theirs = tmp_path / "theirs.raw.part"
    if os.geteuid() == 0:
        theirs.write_bytes(b"x")
        os.chown(theirs, NOBODY, NOBODY)
        files.append(part_entry(theirs))
    write_record(registry, dead_record(shm_prefix, "0badcafe", files=files))
    with open(held, "rb"):
        report = cleanup()
    assert report.files == [str(ours)], report
    assert not ours.exists() and replaced.exists() and held.exists()
    assert theirs.exists() or os.geteuid() != 0


# -- the /dev/shm sweep ----------------------------------------------------------------------


def make_segment(name: str, run: str, data_name: str = "") -> None:
    """A segment with a shmblock meta header naming ``run`` (and ``data_name``)."""
    from shmblock import layout as L

    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096)
    with mmap.mmap(shm.fd, 4096) as m:
        L.HEADER_STRUCT.pack_into(m, 0, L.MAGIC, L.VERSION, L.HEADER_SIZE, 4096, 4096, 1, 1,
                                  1, L.MAX_BITMAPS, 0, run.encode(), data_name.encode(), b"")
    shm.close_fd()


def test_the_shm_sweep_takes_only_provably_dead_runs_of_our_prefix(shm_prefix: str) -> None:
    run, other_run = "0badcafe", "12345678"
    dead = RunNames(run, shm_prefix)
    lookalike = RunNames(other_run, f"{shm_prefix}-{run}")  # parses as run 0badcafe
    longer = RunNames(run, shm_prefix + "2")  # a prefix that merely starts with ours
    live_elsewhere = RunNames("feedf00d", shm_prefix)  # alive under another registry
    make_segment(dead.meta("d"), run, dead.data("d"))
    make_segment(dead.data("d"), run)
    make_segment(lookalike.meta("d"), other_run, lookalike.data("d"))
    make_segment(longer.meta("d"), run, longer.data("d"))
    make_segment(live_elsewhere.meta("d"), "feedf00d", live_elsewhere.data("d"))
    keep = [lookalike.meta("d"), longer.meta("d"), live_elsewhere.meta("d")]
    in_use = posix_ipc.SharedMemory(live_elsewhere.meta("d"))
    mapped = mmap.mmap(in_use.fd, 4096)
    in_use.close_fd()
    try:
        report = cleanup()
        assert sorted(report.segments) == sorted([dead.meta("d"), dead.data("d")]), report
        for name in keep:
            assert os.path.exists("/dev/shm" + name), f"{name} was swept"
    finally:
        mapped.close()
        for name in keep:
            posix_ipc.unlink_shared_memory(name)


@root_only
def test_the_shm_sweep_spares_another_users_segments(shm_prefix: str) -> None:
    names = RunNames("0badcafe", shm_prefix)
    make_segment(names.meta("d"), "0badcafe", names.data("d"))
    os.chown("/dev/shm" + names.meta("d"), NOBODY, NOBODY)
    try:
        assert cleanup().segments == []
        assert os.path.exists("/dev/shm" + names.meta("d"))
    finally:
        posix_ipc.unlink_shared_memory(names.meta("d"))


# -- outputs that are the device's own file, or each other ----------------------------------


@pytest.mark.parametrize("how", ["same", "dot-dot", "hard link", "reference image",
                                 "reference image is the target", "reference image is .part",
                                 "target is the device's .part"])
def test_a_backup_onto_its_own_device_file_is_refused(tmp_path: Path, how: str) -> None:
    disk = tmp_path / "disk.img"
    (tmp_path / "sub").mkdir()
    target, reference = str(tmp_path / "b.raw"), None
    device_file = str(disk)
    if how == "same":
        target = str(disk)
    elif how == "dot-dot":
        target = str(tmp_path / "sub" / ".." / "disk.img")
    elif how == "reference image":
        reference = str(disk)
    elif how == "reference image is the target":
        reference = target
    elif how == "reference image is .part":
        reference = target + ".part"
    elif how == "target is the device's .part":
        device_file = target + ".part"
    with Engine() as engine:
        dev = engine.create_device(4 * MiB, backing_file=device_file)
        if how == "hard link":
            os.link(disk, tmp_path / "hard.raw")
            target = str(tmp_path / "hard.raw")
        dev.write(0, b"\1" * 4096)
        before = os.stat(device_file)
        with pytest.raises(UsageError, match=r"are the same file|\.part. already exists"):
            engine.create_backup(dev, target, reference_image=reference)
        assert engine.jobs == {}, "nothing may start"
        after = os.stat(device_file)
        assert (after.st_ino, after.st_nlink) == (before.st_ino, before.st_nlink)
        dev.write(4096, b"\2" * 4096)
    assert Path(device_file).read_bytes()[:8192] == b"\1" * 4096 + b"\2" * 4096
    assert not list(tmp_path.glob("*.part")) or how == "target is the device's .part"


def test_two_jobs_of_one_engine_cannot_share_a_target(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    with Engine() as engine:
        a = engine.create_device(8 * MiB, name="a")
        b = engine.create_device(8 * MiB, name="b")
        first = engine.backup(a, str(tmp_path / "b.raw"), speed=MiB)
        with pytest.raises(UsageError, match="job job1's target"):
            engine.create_backup(b, str(tmp_path / "sub" / ".." / "b.raw"))
        with pytest.raises(UsageError, match="job job1's target"):
            engine.create_backup(b, str(tmp_path / "other.raw"),
                                 reference_image=str(tmp_path / "b.raw"))
        first.set_speed(0)
        assert first.wait(30).outcome is Outcome.COMPLETED


def test_two_processes_cannot_share_a_part_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A shmblock-run writes b.raw; a second engine (this process) asks for the same
    target. Even with the early check out of the way (the race it cannot close), the
    second worker's exclusive create fails, and the second engine removes nothing of the
    first's: the first run completes and verifies."""
    proc = start_cli("run", "--size", "16M", "--prefill", "1", "--writers", "0",
                     "--backup-at", "0.2", "--speed", "4M", "--target", "b.raw",
                     "--quiet", cwd=tmp_path)
    try:
        wait_until((tmp_path / "b.raw.part").exists, 30.0, what="the first run's .part")
        part_inode = (tmp_path / "b.raw.part").stat().st_ino
        monkeypatch.setattr("shmblock.paths.check_no_part", lambda role, path: None)
        with Engine() as engine:
            dev = engine.create_device(16 * MiB)
            with pytest.raises(JobError, match=r"b\.raw\.part' already exists: another "):
                engine.create_backup(dev, str(tmp_path / "b.raw"))
        assert (tmp_path / "b.raw.part").stat().st_ino == part_inode, "ours was removed"
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert (tmp_path / "b.raw").stat().st_ino == part_inode


# -- the command line -------------------------------------------------------------------------


def cli_run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("run", "--size", "4M", "--writers", "0", "--quiet", *extra,
                   cwd=tmp_path, timeout=60)


@pytest.mark.parametrize("kind", ["directory", "fifo", "wrong size"])
def test_a_bad_device_file_is_a_usage_error_naming_it(tmp_path: Path, kind: str) -> None:
    bad = tmp_path / "disk.img"
    if kind == "directory":
        bad.mkdir()
    elif kind == "fifo":
        os.mkfifo(bad)
    else:
        bad.write_bytes(b"\0" * 4096)
    out = cli_run(tmp_path, "--device-file", str(bad), "--target", "b.raw")
    assert out.returncode == 2, out
    assert str(bad) in out.stderr and "Errno" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b.raw").exists() and not (tmp_path / "b.raw.part").exists()


@pytest.mark.parametrize(("options", "roles"), [
    (["--json", "disk.img"], ("--json", "--device-file")),
    (["--target", "disk.img"], ("--target", "--device-file")),
    (["--reference-image", "b.raw"], ("--reference-image", "--target")),
])
def test_cli_outputs_that_collide_are_refused(tmp_path: Path, options: list[str],
                                              roles: tuple[str, str]) -> None:
    (tmp_path / "disk.img").write_bytes(b"\7" * (4 * MiB))
    args = ["--device-file", "disk.img", *options]
    if "--target" not in options:
        args += ["--target", "b.raw"]
    out = cli_run(tmp_path, *args)
    assert out.returncode == 2, out
    assert "same file" in out.stderr and all(r in out.stderr for r in roles), out.stderr
    assert (tmp_path / "disk.img").read_bytes() == b"\7" * (4 * MiB)


def test_a_reference_image_that_is_a_directory_is_refused_up_front(tmp_path: Path) -> None:
    tmp_path = tmp_path / "work"  # not where the registry is
    tmp_path.mkdir()
    (tmp_path / "ref").mkdir()
    out = cli_run(tmp_path, "--target", "b.raw", "--reference-image", "ref")
    assert out.returncode == 2 and "is a directory" in out.stderr, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref"]
    with Engine() as engine:
        dev = engine.create_device(4 * MiB)
        with pytest.raises(UsageError, match="is a directory"):
            engine.create_backup(dev, str(tmp_path / "b.raw"),
                                 reference_image=str(tmp_path / "ref"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref"]


@pytest.mark.parametrize("what", ["target", "json"])
def test_cli_never_replaces_a_symlink_output(tmp_path: Path, what: str) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "out").symlink_to(victim)
    extra = ["--target", "out"] if what == "target" else ["--target", "b.raw", "--json", "out"]
    out = cli_run(tmp_path, *extra)
    assert out.returncode == 2 and "symbolic link" in out.stderr, out
    assert victim.read_bytes() == b"precious" and (tmp_path / "out").is_symlink()


# -- workers never import from the working directory ----------------------------------------


def plant(directory: Path) -> Path:
    """Modules that would run if a worker imported from ``directory``; returns the marker."""
    marker = directory / "PWNED"
    code = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    (directory / "workers").mkdir()
    for name in ("__init__.py", "guest.py", "backup.py", "common.py"):
        (directory / "workers" / name).write_text(code)
    (directory / "numpy.py").write_text(code)
    (directory / "posix_ipc.py").write_text(code)
    return marker


def test_workers_ignore_code_planted_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = plant(tmp_path)
    monkeypatch.chdir(tmp_path)
    # Relative and empty PYTHONPATH entries name the working directory too.
    monkeypatch.setenv("PYTHONPATH", os.pathsep + "." + os.pathsep + "workers")
    with Engine() as engine:
        dev = engine.create_device(4 * MiB)
        engine.start_writers(dev, 1, ops=50)
        assert engine.backup(dev, "b.raw", verify=True).wait(30).verified
        engine.wait_writers(30)
    assert not marker.exists(), marker.read_text()


def test_shmblock_run_ignores_code_planted_in_its_working_directory(tmp_path: Path) -> None:
    marker = plant(tmp_path)
    out = run_cli("run", "--size", "4M", "--writers", "1", "--duration", "0.5",
                  "--backup-at", "0.1", "--target", "b.raw", "--quiet", cwd=tmp_path,
                  timeout=60)
    assert out.returncode == 0, out.stderr
    assert not marker.exists(), marker.read_text()


def test_cleanup_after_sigkill_removes_the_reference_image_part(tmp_path: Path) -> None:
    """The reference image's .part is recorded too: a killed run's is removed by cleanup."""
    proc = start_cli("run", "--size", "32M", "--writers", "1", "--duration", "30",
                     "--rate", "100", "--backup-at", "0.2", "--speed", "1M",
                     "--target", "b.raw", "--reference-image", "ref.raw", cwd=tmp_path)
    try:
        wait_until(lambda: (tmp_path / "b.raw.part").exists() and bool(list_records())
                   and any(p.identity for r in list_records() for p in r.files
                           if p.path.endswith("ref.raw.part")), 30.0,
                   what="both .part files recorded")
        ref_part_seen = (tmp_path / "ref.raw.part").exists() or (tmp_path / "ref.raw").exists()
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert ref_part_seen
    records = list_records()
    assert len(records) == 1
    wait_until(lambda: all(pid_gone(c.pid) for c in records[0].children), 15.0,
               what="orphaned workers to exit")
    out = run_cli("cleanup", cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "b.raw.part").exists()
    assert not (tmp_path / "ref.raw.part").exists()
    assert list_records() == []


def test_bench_scratch_and_result_files_never_follow_a_planted_symlink(tmp_path: Path) -> None:
    """The bench writes scratch files into a --target-dir that may be shared, and its
    results by a temporary name: a symlink planted at either is never written through."""
    from shmblock.bench import machine, report

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    scratch = tmp_path / "pagecache-0.tmp"
    scratch.symlink_to(victim)
    fd = machine._create_scratch(str(scratch))
    try:
        os.write(fd, b"scratch")
    finally:
        os.close(fd)
    assert victim.read_bytes() == b"keep me"
    assert not scratch.is_symlink() and stat.S_IMODE(scratch.stat().st_mode) == 0o600
    results = tmp_path / "results.json"
    results.symlink_to(victim)
    with pytest.raises(UsageError):
        report.write_json(str(results), {"ok": True})
    assert victim.read_bytes() == b"keep me"
    (tmp_path / "stale.json.tmp").symlink_to(victim)  # the old fixed temporary name
    report.write_json(str(tmp_path / "stale.json"), {"ok": True})
    assert victim.read_bytes() == b"keep me"
    assert json.loads((tmp_path / "stale.json").read_text()) == {"ok": True}


def test_bench_children_do_not_import_from_the_working_directory(tmp_path: Path) -> None:
    """The scaling section's child runs with the engine's isolation (python -P)."""
    from shmblock.run import python_module

    argv, env = python_module("shmblock.bench.scaling", ["--help"])
    (tmp_path / "numpy.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert not (tmp_path / "ran").exists(), "a numpy.py in the working directory ran"
