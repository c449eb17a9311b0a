"""The verification copy: refused up front when it would not fit in memory, and timed.

The copy is a second, pre-faulted copy of the whole device, taken inside the freeze. On
a machine without room for it the run must stop before anything starts, with an error
that says how to go on (``--no-verify``), not be OOM-killed in the middle of a backup.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shmblock import verify
from shmblock.cli import main
from shmblock.device import Geometry
from shmblock.engine import Engine
from shmblock.errors import UsageError
from shmblock.verify import (
    CAPTURE_MARGIN_BYTES,
    NotEnoughMemoryError,
    SnapshotCapture,
    capture_memory_needed,
    check_capture_memory,
    mem_available,
)
from tests.helpers import CS, new_device

MiB = 1 << 20


def test_mem_available_reads_meminfo(tmp_path: Path) -> None:
    info = tmp_path / "meminfo"
    no_cgroup = {"proc_cgroup": str(tmp_path / "no-cgroup")}
    info.write_text("MemTotal:       24000000 kB\nMemFree:          100 kB\n"
                    "MemAvailable:    1234567 kB\nBuffers:  1 kB\n")
    assert mem_available(str(info), **no_cgroup) == 1234567 * 1024
    info.write_text("MemTotal:       24000000 kB\n")  # kernels before 3.14
    assert mem_available(str(info), **no_cgroup) is None
    info.write_text("MemAvailable:    lots kB\n")
    assert mem_available(str(info), **no_cgroup) is None
    assert mem_available(str(tmp_path / "missing"), **no_cgroup) is None
    assert (mem_available() or 0) > 0  # this machine's real files


def test_mem_available_is_capped_by_cgroup_limits(tmp_path: Path) -> None:
    """A container (or systemd slice) is OOM-killed at its own memory.max: the smallest
    headroom from our cgroup up to the root counts, not the machine's free memory."""
    info = tmp_path / "meminfo"
    info.write_text(f"MemAvailable: {20 << 20} kB\n")  # 20 GiB
    proc = tmp_path / "cgroup"
    proc.write_text("0::/slice/job\n")
    root = tmp_path / "sys"
    for path, limit, current in [("slice/job", "max", 1 << 30),
                                 ("slice", str(6 << 30), 2 << 30)]:
        (root / path).mkdir(parents=True, exist_ok=True)
        (root / path / "memory.max").write_text(limit + "\n")
        (root / path / "memory.current").write_text(f"{current}\n")
    args = (str(info), str(proc), str(root))
    assert mem_available(*args) == 4 << 30  # the slice's 6 GiB less its 2 GiB in use
    (root / "slice/job/memory.max").write_text(f"{(1 << 30) + (1 << 20)}\n")
    assert mem_available(*args) == 1 << 20  # the tighter limit of our own cgroup
    for path in ("slice", "slice/job"):
        (root / path / "memory.max").write_text("max\n")
    assert mem_available(*args) == 20 << 30  # no limit anywhere: MemAvailable
    proc.write_text("12:memory:/x\n")  # cgroup v1 only: not read
    assert mem_available(*args) == 20 << 30


def test_check_refuses_a_copy_that_does_not_fit() -> None:
    size = 12 << 30
    need = capture_memory_needed(size)
    assert need >= size + CAPTURE_MARGIN_BYTES
    check_capture_memory(size, lambda: need)  # exactly enough
    check_capture_memory(size, lambda: None)  # unknown: not refused
    with pytest.raises(NotEnoughMemoryError, match="--no-verify") as info:
        check_capture_memory(size, lambda: need - 1)
    assert isinstance(info.value, UsageError)
    assert "12288 MiB" in str(info.value) and "MemAvailable" in str(info.value)
    assert "memory.max" in str(info.value)


def test_snapshot_capture_checks_memory_and_times_the_copy() -> None:
    geo = Geometry(64 * CS, cluster_size=CS, max_writers=1, buffer_slots=1)
    with new_device(geo) as dev:
        with pytest.raises(NotEnoughMemoryError):
            SnapshotCapture(dev, available=lambda: geo.size)
        dev.data[:] = np.arange(dev.size, dtype=np.uint64).astype(np.uint8)
        capture = SnapshotCapture(dev, available=lambda: 1 << 40)
        assert capture.copy_s == 0.0
        capture.capture()
        assert capture.copy_s > 0.0
        assert capture._copy is not None and np.array_equal(capture._copy, dev.data)
        capture.finish_async()
        capture.join()
        assert len(capture.digests) == 64


def test_engine_refuses_before_the_backup_worker_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "mem_available", lambda: 8 * MiB)
    with Engine() as engine:
        dev = engine.create_device(4 * MiB)
        for kwargs in ({"verify": True}, {"reference_image": str(tmp_path / "r.raw")}):
            with pytest.raises(NotEnoughMemoryError, match="--no-verify"):
                engine.create_backup(dev, str(tmp_path / "b.raw"), **kwargs)
        assert engine.jobs == {}, "no worker may start for a backup that cannot be verified"
        job = engine.backup(dev, str(tmp_path / "b.raw"))  # no verification: no copy
        assert job.wait(60.0).outcome.value == "completed"


def test_cli_exits_2_naming_no_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(verify, "mem_available", lambda: 8 * MiB)
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--size", "4M", "--writers", "0", "--target", "b.raw"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--no-verify" in err and "Traceback" not in err
    assert not (tmp_path / "b.raw").exists()
    assert main(["run", "--size", "4M", "--writers", "0", "--target", "b.raw",
                 "--no-verify"]) == 0
