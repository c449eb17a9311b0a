"""The qcow2 target: conformance suite plus format checks by QEMU's own tools.

Read-back goes around our code (``qemu-img convert`` to raw), and every committed image
must pass ``qemu-img check`` with no leaks and no corruptions.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import pytest

from shmblock.errors import TargetError, TargetIOError, TargetUnreachable
from shmblock.targets import TargetSpec, open_target
from shmblock.targets import base as base_module
from shmblock.targets.base import Target
from shmblock.targets.qcow2 import Qcow2Target
from shmblock.targets.qcow2_format import (
    Qcow2FormatError,
    Qcow2Header,
    Qcow2Reader,
    build_header_cluster,
    plan_refcounts,
)
from tests.target_conformance import CLUSTER, SIZE, FileTargetTests, TargetTests, pattern

QEMU_IMG = shutil.which("qemu-img")
_NO_QEMU_IMG = pytest.mark.skipif(
    QEMU_IMG is None, reason="qemu-img is not installed (apt install qemu-utils)"
)
F = TypeVar("F", bound=Callable[..., object] | type)


def needs_qemu_img(obj: F) -> F:
    """Mark a test (or class) external, skipped with a reason when qemu-img is missing."""
    marked: F = pytest.mark.external(_NO_QEMU_IMG(obj))
    return marked

ROOT = Path(__file__).resolve().parent.parent


def qemu_img(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG is not None
    proc = subprocess.run(
        [QEMU_IMG, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    if ok:
        assert proc.returncode == 0, f"qemu-img {args}: {proc.stdout}{proc.stderr}"
    return proc


def qemu_check(path: Path) -> None:
    """qemu-img check passes: exit 0, no corruptions, no leaks."""
    report = json.loads(qemu_img("check", "--output=json", path).stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("leaks", 0) == 0, report
    assert report["check-errors"] == 0, report


def qemu_map(path: Path) -> list[dict[str, Any]]:
    extents: list[dict[str, Any]] = json.loads(qemu_img("map", "--output=json", path).stdout)
    return extents


def count_tables(image: Path) -> tuple[int, int]:
    """(L2 tables, refcount blocks) in use, read straight from the file."""
    header = Qcow2Header.unpack(image.read_bytes()[:4096])
    with image.open("rb") as f:
        f.seek(header.l1_table_offset)
        l1 = np.frombuffer(f.read(header.l1_size * 8), dtype=">u8")
        f.seek(header.refcount_table_offset)
        reftable = np.frombuffer(
            f.read(header.refcount_table_clusters * header.cluster_size), dtype=">u8"
        )
    return int(np.count_nonzero(l1)), int(np.count_nonzero(reftable))


def convert_to_raw(image: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "out.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", image, out)
    data = out.read_bytes()
    out.unlink()
    return data


@needs_qemu_img
class TestQcow2Target(TargetTests):
    def make_target(self, tmp_path: Path, size: int, cluster_size: int) -> Target:
        return Qcow2Target(str(tmp_path / "backup.qcow2"), size, cluster_size)

    def read_back(self, target: Target, tmp_path: Path) -> bytes:
        image = tmp_path / "backup.qcow2"
        qemu_check(image)
        return convert_to_raw(image, tmp_path)

    def published(self, target: Target, tmp_path: Path) -> bool:
        return (tmp_path / "backup.qcow2").exists() or (tmp_path / "backup.qcow2.part").exists()


class TestQcow2File(FileTargetTests):
    format = "qcow2"
    name = "backup.qcow2"

    def open_file(self, path: str, size: int, cluster_size: int) -> Target:
        return Qcow2Target(path, size, cluster_size)


# -- layout, holes and zero clusters -----------------------------------------------------


@needs_qemu_img
def test_holes_and_zero_clusters(tmp_path: Path) -> None:
    image = tmp_path / "b.qcow2"
    target = Qcow2Target(str(image), SIZE, CLUSTER)
    expected = bytearray(SIZE)
    for c in (3, 1, 20, 21):
        target.write(c * CLUSTER, pattern(c))
        expected[c * CLUSTER : (c + 1) * CLUSTER] = pattern(c)
    target.write_zeroes(8 * CLUSTER, 4 * CLUSTER)
    target.write_zeroes(30 * CLUSTER, CLUSTER)
    target.commit()
    target.close()
    qemu_check(image)

    kinds: dict[int, str] = {}
    for extent in qemu_map(image):
        for c in range(extent["start"] // CLUSTER, (extent["start"] + extent["length"]) // CLUSTER):
            if extent["data"]:
                kinds[c] = "data"
            elif extent["zero"] and extent["present"]:
                kinds[c] = "zero"
            else:
                assert extent["zero"] and not extent["present"]
                kinds[c] = "hole"
    assert {c for c, k in kinds.items() if k == "data"} == {1, 3, 20, 21}
    assert {c for c, k in kinds.items() if k == "zero"} == {8, 9, 10, 11, 30}
    assert len(kinds) == SIZE // CLUSTER

    raw = tmp_path / "expected.raw"
    raw.write_bytes(expected)
    assert "identical" in qemu_img("compare", "-f", "qcow2", "-F", "raw", image, raw).stdout
    # Header, 4 data clusters, 1 L2 table, 1 L1 table, 1 refcount block, 1 refcount table.
    assert image.stat().st_size == 9 * CLUSTER


class Layout(NamedTuple):
    cluster_size: int
    size: int
    sample: int  # clusters written
    l2_tables: int  # expected in the image
    refblocks: int


@pytest.mark.parametrize(
    "layout",
    [
        Layout(4096, 64 << 20, 3000, 32, 2),  # 512 entries per L2 table, 2048 per refblock
        Layout(64 << 10, 1 << 30, 300, 2, 1),  # 8192 entries per L2 table
        Layout(2 << 20, 1 << 40, 12, 2, 1),  # 262144 entries per L2 table: 1 TiB virtual
    ],
    ids=["4K", "64K", "2M"],
)
@needs_qemu_img
def test_cluster_sizes_and_multiple_tables(tmp_path: Path, layout: Layout) -> None:
    cluster_size, size, sample, l2_tables, refblocks = layout
    clusters = size // cluster_size
    rng = np.random.default_rng(cluster_size)
    chosen = np.sort(rng.choice(clusters, sample, replace=False))
    chosen[-1] = clusters - 1  # the very last cluster, in the last L2 table
    data = {int(c): rng.integers(1, 256, cluster_size, dtype=np.uint8).tobytes() for c in chosen}
    image = tmp_path / "b.qcow2"
    target = Qcow2Target(str(image), size, cluster_size)
    for c in rng.permutation(chosen):  # out of order, as copy-before-write saves arrive
        target.write(int(c) * cluster_size, data[int(c)])
    target.commit()
    qemu_check(image)
    info = json.loads(qemu_img("info", "--output=json", image).stdout)
    assert info["cluster-size"] == cluster_size
    assert info["virtual-size"] == size
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert count_tables(image) == (l2_tables, refblocks)

    mapped = {
        c
        for e in qemu_map(image)
        if e["data"]
        for c in range(e["start"] // cluster_size, (e["start"] + e["length"]) // cluster_size)
    }
    assert mapped == set(data)

    out = tmp_path / "out.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", image, out)
    with out.open("rb") as f:
        for c, payload in data.items():
            f.seek(c * cluster_size)
            assert f.read(cluster_size) == payload
    with Qcow2Reader(str(image)) as reader:
        for c in list(data)[:50]:
            assert reader.read(c * cluster_size, cluster_size) == data[c]
        assert reader.read(0, cluster_size) == data.get(0, bytes(cluster_size))
    some = next(iter(data))
    assert target.read(some * cluster_size, cluster_size) == data[some]
    target.close()


@needs_qemu_img
def test_rewrite_and_zero_over_data_do_not_leak(tmp_path: Path) -> None:
    image = tmp_path / "b.qcow2"
    target = Qcow2Target(str(image), SIZE, CLUSTER)
    target.write(0, pattern(0) + pattern(1) + pattern(2))
    target.write(CLUSTER, pattern(9))  # same guest cluster again: in place
    target.write(0, pattern(7) + pattern(8))  # again, as a run
    target.write_zeroes(2 * CLUSTER, CLUSTER)  # data then zero: keeps its host cluster
    target.write_zeroes(5 * CLUSTER, CLUSTER)
    target.write(5 * CLUSTER, pattern(5))  # zero then data: a fresh cluster
    target.write_zeroes(2 * CLUSTER, CLUSTER)
    target.commit()
    qemu_check(image)
    data = convert_to_raw(image, tmp_path)
    assert data[: 2 * CLUSTER] == pattern(7) + pattern(8)
    assert data[2 * CLUSTER : 5 * CLUSTER] == bytes(3 * CLUSTER)
    assert data[5 * CLUSTER : 6 * CLUSTER] == pattern(5)
    assert target.read(0, 6 * CLUSTER) == data[: 6 * CLUSTER]
    target.close()


def test_read_before_commit_uses_memory_tables(tmp_path: Path) -> None:
    target = Qcow2Target(str(tmp_path / "b.qcow2"), SIZE, CLUSTER)
    target.write(4 * CLUSTER, pattern(4) + pattern(5))
    target.write_zeroes(6 * CLUSTER, CLUSTER)
    # Unaligned ranges spanning data, zero and unallocated clusters.
    got = target.read(4 * CLUSTER + 100, 3 * CLUSTER)
    assert got == (pattern(4) + pattern(5) + bytes(2 * CLUSTER))[100 : 100 + 3 * CLUSTER]
    target.abort()
    assert not (tmp_path / "b.qcow2.part").exists()


def test_capability_flags(tmp_path: Path) -> None:
    plain = Qcow2Target(str(tmp_path / "a.qcow2"), SIZE, CLUSTER)
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(SIZE))
    thin = Qcow2Target(str(tmp_path / "t.qcow2"), SIZE, CLUSTER, backing_file="base.raw")
    assert (plain.kind, plain.starts_zeroed, plain.punches_zeroes) == ("qcow2", True, True)
    assert (thin.starts_zeroed, thin.punches_zeroes) == (False, True)
    assert plain.describe() == str(tmp_path / "a.qcow2")
    plain.abort()
    thin.abort()


def test_open_target_builds_qcow2(tmp_path: Path) -> None:
    spec = TargetSpec.parse(str(tmp_path / "x.qcow2"))
    target = open_target(spec, SIZE, CLUSTER)
    assert isinstance(target, Qcow2Target)
    target.abort()


# -- backing chains ----------------------------------------------------------------------


@needs_qemu_img
@pytest.mark.parametrize("base_kind", ["ours", "raw", "qemu-compressed", "qemu-v2"])
def test_backing_chain(tmp_path: Path, base_kind: str) -> None:
    base_data = b"".join(pattern(100 + c) for c in range(SIZE // CLUSTER))
    raw_base = tmp_path / "base.raw"
    raw_base.write_bytes(base_data)
    if base_kind == "ours":
        base_name, base_fmt = "base.qcow2", "qcow2"
        base = Qcow2Target(str(tmp_path / base_name), SIZE, CLUSTER)
        base.write(0, base_data)
        base.commit()
        base.close()
    elif base_kind == "raw":
        base_name, base_fmt = "base.raw", "raw"
    else:
        base_name, base_fmt = "base.qcow2", "qcow2"
        opts = ["-c"] if base_kind == "qemu-compressed" else ["-o", "compat=0.10"]
        qemu_img("convert", "-f", "raw", "-O", "qcow2", *opts, raw_base, tmp_path / base_name)

    thin_path = tmp_path / "thin.qcow2"
    thin = Qcow2Target(
        str(thin_path), SIZE, CLUSTER, backing_file=base_name, backing_format=base_fmt
    )
    expected = bytearray(base_data)
    for c in (2, 3, 17):
        thin.write(c * CLUSTER, pattern(c))
        expected[c * CLUSTER : (c + 1) * CLUSTER] = pattern(c)
    thin.write_zeroes(4 * CLUSTER, 2 * CLUSTER)  # over clusters that hold data in the base
    expected[4 * CLUSTER : 6 * CLUSTER] = bytes(2 * CLUSTER)
    assert thin.read(0, SIZE) == bytes(expected)  # before commit: memory tables + base
    thin.commit()
    qemu_check(thin_path)

    exp_path = tmp_path / "expected.raw"
    exp_path.write_bytes(expected)
    compare = qemu_img("compare", "-f", "qcow2", "-F", "raw", thin_path, exp_path)
    assert "identical" in compare.stdout
    chain = json.loads(qemu_img("info", "--backing-chain", "--output=json", thin_path).stdout)
    assert len(chain) == 2
    assert chain[0]["backing-filename"] == base_name
    assert chain[0]["backing-filename-format"] == base_fmt
    assert chain[0]["full-backing-filename"] == str(tmp_path / base_name)
    assert chain[1]["format"] == base_fmt

    assert thin.read(0, SIZE) == bytes(expected)  # after commit: parsed from the file
    with Qcow2Reader(str(thin_path)) as reader:
        assert (reader.backing_file, reader.backing_format) == (base_name, base_fmt)
        assert reader.backing_path == str(tmp_path / base_name)
        assert reader.read(0, SIZE) == bytes(expected)
        window = expected[CLUSTER + 7 : 4 * CLUSTER + 7]
        assert reader.read(CLUSTER + 7, 3 * CLUSTER) == bytes(window)
    thin.close()


@needs_qemu_img
def test_backing_file_shorter_than_image(tmp_path: Path) -> None:
    # Past the end of a shorter backing file, unallocated clusters read as zeros.
    (tmp_path / "short.raw").write_bytes(pattern(50) * 4)
    image = tmp_path / "t.qcow2"
    thin = Qcow2Target(str(image), SIZE, CLUSTER, backing_file="short.raw", backing_format="raw")
    thin.write(6 * CLUSTER, pattern(6))
    thin.commit()
    qemu_check(image)
    expected = pattern(50) * 4 + bytes(2 * CLUSTER) + pattern(6) + bytes(SIZE - 7 * CLUSTER)
    assert convert_to_raw(image, tmp_path) == expected
    assert thin.read(0, SIZE) == expected
    thin.close()


def test_backing_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(TargetUnreachable, match=r"backing file 'nope\.qcow2' does not exist"):
        Qcow2Target(str(tmp_path / "t.qcow2"), SIZE, CLUSTER, backing_file="nope.qcow2")
    with pytest.raises(TargetError, match="without a backing file"):
        Qcow2Target(str(tmp_path / "t.qcow2"), SIZE, CLUSTER, backing_format="qcow2")
    assert not list(tmp_path.iterdir())


def test_backing_name_must_fit_in_first_cluster(tmp_path: Path) -> None:
    name = "/".join(["d" * 200, "d" * 200, "base.raw"])  # 410 bytes; 512-byte clusters
    (tmp_path / name).parent.mkdir(parents=True)
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(TargetError, match="does not fit in the first 512-byte cluster"):
        Qcow2Target(str(tmp_path / "t.qcow2"), 512 * 8, 512, backing_file=name)
    long_name = "x/" * 600
    with pytest.raises(TargetError, match="at most 1023"):
        build_header_cluster(Qcow2Header(cluster_bits=16, size=CLUSTER), long_name, None)


# -- interrupted runs --------------------------------------------------------------------

KILLED_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from shmblock.targets.qcow2 import Qcow2Target
    t = Qcow2Target(sys.argv[1], 32 * 65536, 65536)
    t.write(3 * 65536, os.urandom(4 * 65536))
    t.write_zeroes(0, 65536)
    print("written", flush=True)
    time.sleep(60)
    """
)


@needs_qemu_img
def test_killed_run_leaves_an_image_qemu_refuses(tmp_path: Path) -> None:
    image = tmp_path / "backup.qcow2"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(image)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "written"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    part = tmp_path / "backup.qcow2.part"
    assert not image.exists()
    assert part.stat().st_size == 5 * CLUSTER  # placeholder header + 4 data clusters

    info = qemu_img("info", part, ok=False)
    assert info.returncode == 1
    assert "Image does not contain a reference count table" in info.stderr
    for args in (["check"], ["check", "-r", "all"]):
        check = qemu_img(*args, part, ok=False)
        assert check.returncode == 1
        assert "L1 table is too small" in check.stderr
    convert = qemu_img("convert", "-O", "raw", part, tmp_path / "out.raw", ok=False)
    assert convert.returncode != 0
    with pytest.raises(Qcow2FormatError, match="marked corrupt"):
        Qcow2Reader(str(part))


def test_closed_without_commit_leaves_only_part(tmp_path: Path) -> None:
    target = Qcow2Target(str(tmp_path / "b.qcow2"), SIZE, CLUSTER)
    target.write(0, pattern(0))
    target.close()  # no commit, no abort: what a crash leaves
    assert [p.name for p in tmp_path.iterdir()] == ["b.qcow2.part"]
    header = Qcow2Header.unpack((tmp_path / "b.qcow2.part").read_bytes()[:CLUSTER])
    assert header.incompatible_features == 0x3  # dirty and corrupt
    assert (header.l1_size, header.refcount_table_clusters) == (0, 0)
    with pytest.raises(TargetIOError, match="closed"):
        target.write(CLUSTER, pattern(1))


def test_commit_publishes_by_rename(tmp_path: Path) -> None:
    target = Qcow2Target(str(tmp_path / "b.qcow2"), SIZE, CLUSTER)
    target.write(0, pattern(0))
    assert not (tmp_path / "b.qcow2").exists()
    target.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["b.qcow2"]
    header = Qcow2Header.unpack((tmp_path / "b.qcow2").read_bytes()[:CLUSTER])
    assert header.incompatible_features == 0
    with pytest.raises(TargetError, match="already committed"):
        target.write(CLUSTER, pattern(1))
    target.abort()  # after commit: keeps the backup
    target.close()
    assert (tmp_path / "b.qcow2").exists()


# -- bad inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("cluster_size", [0, 256, 1000, 3 * 4096, 4 << 20, -512])
def test_bad_cluster_size(tmp_path: Path, cluster_size: int) -> None:
    with pytest.raises(TargetError, match="power of two from 512 bytes to 2 MiB"):
        Qcow2Target(str(tmp_path / "b.qcow2"), 1 << 20, cluster_size)
    assert not list(tmp_path.iterdir())


def test_unaligned_and_out_of_range(tmp_path: Path) -> None:
    target = Qcow2Target(str(tmp_path / "b.qcow2"), SIZE, CLUSTER)
    with pytest.raises(TargetError, match="whole 65536-byte clusters"):
        target.write(100, pattern(0))
    with pytest.raises(TargetError, match="whole 65536-byte clusters"):
        target.write(0, pattern(0)[:-1])
    with pytest.raises(TargetError, match="whole 65536-byte clusters"):
        target.write_zeroes(CLUSTER, 512)
    with pytest.raises(TargetError, match="outside the target"):
        target.write(SIZE - CLUSTER, pattern(0) + pattern(1))
    with pytest.raises(TargetError, match="outside the target"):
        target.write_zeroes(-CLUSTER, CLUSTER)
    with pytest.raises(TargetError, match="outside the target"):
        target.read(SIZE, 1)
    target.abort()


def test_unwritable_directory(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        directory = Path("/sys")  # refuses file creation even to root
        if not directory.is_dir():
            pytest.skip("running as root and /sys is absent: no unwritable directory")
    else:
        directory = tmp_path / "ro"
        directory.mkdir(mode=0o555)
    with pytest.raises(TargetUnreachable, match=r"cannot create qcow2 target .*Permission denied"):
        Qcow2Target(str(directory / "b.qcow2"), SIZE, CLUSTER)


def test_missing_directory_and_directory_path(tmp_path: Path) -> None:
    with pytest.raises(TargetUnreachable, match="does not exist"):
        Qcow2Target(str(tmp_path / "nope" / "b.qcow2"), SIZE, CLUSTER)
    with pytest.raises(TargetUnreachable, match="is a directory"):
        Qcow2Target(str(tmp_path), SIZE, CLUSTER)


def test_no_space_when_opening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The placeholder header is the first write. (This test used to plant a symlink to
    # /dev/full at the .part; a .part is now never opened through a symlink.)
    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(TargetIOError, match="No space left on device"):
        Qcow2Target(str(tmp_path / "b.qcow2"), SIZE, CLUSTER)
    assert not (tmp_path / "b.qcow2.part").exists()


def test_no_space_when_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = Qcow2Target(str(tmp_path / "b.qcow2"), SIZE, CLUSTER)

    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(TargetIOError, match=r"b\.qcow2\.part.*No space left on device"):
        target.write(0, pattern(0))
    with pytest.raises(TargetIOError, match="No space left on device"):
        target.commit()
    monkeypatch.undo()
    target.abort()
    assert not list(tmp_path.iterdir())


UNSHARE = shutil.which("unshare")


@pytest.mark.skipif(UNSHARE is None, reason="unshare(1) is not installed")
def test_no_space_on_a_real_full_file_system(tmp_path: Path) -> None:
    # A 1 MiB tmpfs in a private mount namespace: a genuine ENOSPC from the kernel.
    assert UNSHARE is not None
    probe = subprocess.run([UNSHARE, "-rm", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not available to mount a small tmpfs")
    script = textwrap.dedent(
        """
        import os, sys
        from shmblock.errors import TargetIOError
        from shmblock.targets.qcow2 import Qcow2Target
        t = Qcow2Target(sys.argv[1] + "/b.qcow2", 64 << 20, 65536)
        try:
            for c in range(64):
                t.write(c * 65536, b"x" * 65536)
        except TargetIOError as exc:
            print(exc)
            t.abort()
            print(os.listdir(sys.argv[1]))
        """
    )
    mount = tmp_path / "mnt"
    mount.mkdir()
    shell = (
        f"mount -t tmpfs -o size=1m tmpfs {mount} && "
        f'exec {sys.executable} -c "$0" {mount}'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [UNSHARE, "-rm", "sh", "-c", shell, script],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    if "mount:" in proc.stderr:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "No space left on device" in lines[0]
    assert "b.qcow2.part" in lines[0]
    assert lines[1] == "[]"


# -- format details ----------------------------------------------------------------------


def test_header_golden_bytes() -> None:
    header = Qcow2Header(
        cluster_bits=16,
        size=1 << 30,
        l1_size=2,
        l1_table_offset=0x30000,
        refcount_table_offset=0x50000,
        refcount_table_clusters=1,
    )
    assert header.pack().hex() == (
        "514649fb00000003" "0000000000000000" "0000000000000010" "0000000040000000"
        "0000000000000002" "0000000000030000" "0000000000050000" "0000000100000000"
        "0000000000000000" "0000000000000000" "0000000000000000" "0000000000000000"
        "0000000400000070" "0000000000000000"
    )  # fmt: skip
    assert Qcow2Header.unpack(header.pack()) == header
    cluster = build_header_cluster(header, "base.qcow2", "qcow2")
    assert len(cluster) == 1 << 16
    # Backing-format extension, end marker, then the name (not NUL-terminated).
    assert cluster[112:136].hex() == "e2792aca00000005" "71636f7732000000" "0000000000000000"
    parsed = Qcow2Header.unpack(cluster)
    assert (parsed.backing_file_offset, parsed.backing_file_size) == (136, 10)
    assert cluster[136:146] == b"base.qcow2"
    assert cluster[146:].count(0) == len(cluster) - 146


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 << 20])
@pytest.mark.parametrize("clusters_before", [1, 3, 255, 256, 257, 2046, 2047, 2048, 70000])
def test_refcount_plan_covers_itself(cluster_size: int, clusters_before: int) -> None:
    blocks, table = plan_refcounts(clusters_before, cluster_size)
    per_block = cluster_size // 2
    total = clusters_before + blocks + table
    assert blocks * per_block >= total > (blocks - 1) * per_block
    assert table * (cluster_size // 8) >= blocks > (table - 1) * (cluster_size // 8)


def test_reader_rejects_non_qcow2(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an image" * 100)
    with pytest.raises(Qcow2FormatError, match="bad magic"):
        Qcow2Reader(str(junk))
    with pytest.raises(TargetUnreachable, match="No such file"):
        Qcow2Reader(str(tmp_path / "missing.qcow2"))


# -- early writeback ---------------------------------------------------------------------------


@needs_qemu_img
def test_appended_data_starts_writeback_every_so_many_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the raw target does: the data clusters appended during the job are queued for
    writeback as they pile up, so seal's fsync finds little left; the image is valid."""
    calls: list[tuple[int, ...]] = []

    class FakeLibc:
        def sync_file_range(self, *args: int) -> int:
            calls.append(args)
            return 0

    monkeypatch.setattr(base_module, "_libc", FakeLibc())
    monkeypatch.setattr(base_module, "WRITEBACK_EVERY", 4 * CLUSTER)
    path = tmp_path / "b.qcow2"
    target = Qcow2Target(str(path), 32 * CLUSTER, CLUSTER)
    try:
        assert calls == []  # the placeholder header alone is not enough
        for c in range(9):
            target.write(c * CLUSTER, pattern(c))
        assert len(calls) == 2
        assert all(args[1:] == (0, 0, base_module.SYNC_FILE_RANGE_WRITE) for args in calls)
        target.commit()
    finally:
        target.close()
    qemu_img("check", path)
    raw = tmp_path / "b.raw"
    qemu_img("convert", "-O", "raw", path, raw)
    assert raw.read_bytes()[: 9 * CLUSTER] == b"".join(pattern(c) for c in range(9))
