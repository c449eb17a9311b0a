"""Restore (shmblock.restore, ``shmblock-run restore``): raw, qcow2, chains, NBD, live devices.

The backups are made by QEMU's own tools (``qemu-img create -b … -F qcow2`` and
``qemu-io -c "write -P …"``), and every restored file is judged by ``qemu-img compare``
against the source, so neither side of a check is our own code alone.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from shmblock.engine import Engine
from shmblock.errors import NoSpaceError, UsageError, VerificationError
from shmblock.restore import (
    ChainError,
    RestoreError,
    inspect_source,
    restore,
    restore_to_device,
)
from tests.nbd_servers import require_binary, server_group
from tests.procs import run_cli

MiB = 1 << 20
SIZE = 8 * MiB

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img and qemu-io are needed to make and judge the backups")


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                          timeout=60, check=False)


def create(path: Path, size: int = SIZE, backing: Path | None = None,
           backing_fmt: str = "qcow2", *extra: str) -> Path:
    args: list[str | Path] = ["create", "-q", "-f", "qcow2", *extra]
    if backing is not None:
        args += ["-b", backing.name if backing.parent == path.parent else backing,
                 "-F", backing_fmt]
    args += [path, str(size)]
    proc = qemu_img(*args)
    assert proc.returncode == 0, proc.stderr
    return path


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    proc = subprocess.run([*argv, str(image)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def compare(a: Path, fmt_a: str, b: Path | str, fmt_b: str = "raw") -> None:
    """``qemu-img compare`` says identical, and the virtual sizes are equal (not strict
    mode: that also compares allocation, and a restore leaves zeros as holes)."""
    proc = qemu_img("compare", "-f", fmt_a, "-F", fmt_b, a, b)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sizes = [json.loads(qemu_img("info", "--output=json", "-f", f, p).stdout)["virtual-size"]
             for p, f in ((a, fmt_a), (b, fmt_b))]
    assert sizes[0] == sizes[1], sizes


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """base ← mid ← top, each written by qemu-io; mid zeroes part of base's data and top
    uses another cluster size. Returns top."""
    base = create(tmp_path / "base.qcow2")
    qemu_io(base, "write -P 0x11 0 2M", "write -P 0x12 5M 512K")
    mid = create(tmp_path / "mid.qcow2", backing=base)
    qemu_io(mid, "write -P 0x21 1M 2M", "write -z 5M 256K")
    top = create(tmp_path / "top.qcow2", SIZE, mid, "qcow2", "-o", "cluster_size=128K")
    qemu_io(top, "write -P 0x31 1536K 64K", "write -P 0x32 7M 1M")
    return top


def test_restore_three_link_chain_matches_qemu(chain: Path, tmp_path: Path) -> None:
    dest = tmp_path / "disk.raw"
    result = restore(str(chain), str(dest))
    assert [os.path.basename(link.path) for link in result.chain] == \
        ["top.qcow2", "mid.qcow2", "base.qcow2"]
    assert result.verified is True
    compare(chain, "qcow2", dest)
    st = dest.stat()
    assert st.st_size == SIZE and st.st_mode & 0o777 == 0o600
    # Sparse: unallocated ranges were skipped, zero ranges never written.
    assert result.skipped_bytes > 0
    assert st.st_blocks * 512 < SIZE
    assert not Path(str(dest) + ".part").exists()


def test_restore_raw_and_single_qcow2(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = np.zeros(SIZE, dtype=np.uint8)
    data[MiB : 3 * MiB] = rng.integers(0, 256, 2 * MiB, dtype=np.uint8)
    data[6 * MiB + 4096 : 6 * MiB + 8192] = 7  # one 4K block inside a 64K cluster
    raw = tmp_path / "backup.raw"
    raw.write_bytes(data.tobytes())
    dest = tmp_path / "from-raw.raw"
    result = restore(str(raw), str(dest))
    assert result.format == "raw" and result.verified
    compare(raw, "raw", dest)
    assert dest.read_bytes() == data.tobytes()

    single = create(tmp_path / "one.qcow2")
    qemu_io(single, "write -P 0x5a 64K 3M")
    dest2 = tmp_path / "from-qcow2.raw"
    assert restore(str(single), str(dest2), format="qcow2").format == "qcow2"
    compare(single, "qcow2", dest2)


def test_restore_from_nbd_exports(chain: Path, tmp_path: Path) -> None:
    require_binary("qemu-nbd")
    with server_group(tmp_path) as group:
        # A read-only export of the whole chain (qemu-nbd follows the backing files).
        server = group.qemu_nbd(chain, fmt="qcow2", readonly=True, export="bk")
        dest = tmp_path / "from-nbd.raw"
        result = restore(server.uri, str(dest))
        assert result.format == "nbd" and result.verified is True
        compare(chain, "qcow2", dest)
        assert dest.stat().st_blocks * 512 < SIZE  # zero check kept it sparse


def test_restore_from_nbdkit_over_tcp(tmp_path: Path) -> None:
    require_binary("nbdkit")
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(MiB) + b"\xab" * MiB + bytes(2 * MiB))
    with server_group(tmp_path) as group:
        server = group.nbdkit("file", str(raw), readonly=True, host="127.0.0.1")
        dest = tmp_path / "from-tcp.raw"
        restore(server.uri, str(dest), format="nbd")
    compare(raw, "raw", dest)


def test_cli_restore_chain_json_and_exit_codes(chain: Path, tmp_path: Path) -> None:
    dest = tmp_path / "cli.raw"
    proc = run_cli("restore", chain, dest, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["verified"] is True
    assert report["size"] == SIZE and len(report["chain"]) == 3
    compare(chain, "qcow2", dest)
    # Exists without --force: usage error, one line, the file untouched.
    before = dest.stat()
    proc = run_cli("restore", chain, dest)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert dest.stat().st_ino == before.st_ino
    # With --force: replaced by rename (a new inode), same contents.
    proc = run_cli("restore", chain, dest, "--force", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert "verify   skipped" in proc.stdout
    assert dest.stat().st_ino != before.st_ino
    compare(chain, "qcow2", dest)
    # A bad option value is a usage error too.
    assert run_cli("restore", chain, dest, "--format", "vmdk").returncode == 2


def test_missing_link(chain: Path, tmp_path: Path) -> None:
    (tmp_path / "mid.qcow2").rename(tmp_path / "moved.qcow2")
    with pytest.raises(ChainError, match=r"link 2 of the chain .*top\.qcow2.*mid\.qcow2.* "
                                         "does not exist"):
        restore(str(chain), str(tmp_path / "d.raw"))
    assert not (tmp_path / "d.raw").exists() and not (tmp_path / "d.raw.part").exists()
    proc = run_cli("restore", chain, tmp_path / "d.raw")
    assert proc.returncode == 1 and "mid.qcow2" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_mismatched_size_link(tmp_path: Path) -> None:
    base = create(tmp_path / "small.qcow2", 4 * MiB)
    qemu_io(base, "write -P 1 0 1M")
    top = create(tmp_path / "big.qcow2", SIZE, base)
    with pytest.raises(ChainError, match=r"small\.qcow2.* virtual size of 4194304 bytes"):
        inspect_source(str(top))


def test_loop_in_chain(tmp_path: Path) -> None:
    a = tmp_path / "a.qcow2"
    b = tmp_path / "b.qcow2"
    create(a, SIZE, b, "qcow2", "-u")
    create(b, SIZE, a, "qcow2", "-u")
    with pytest.raises(ChainError, match="has a loop"):
        restore(str(a), str(tmp_path / "d.raw"))
    # A self-loop too.
    c = tmp_path / "c.qcow2"
    create(c, SIZE, c, "qcow2", "-u")
    with pytest.raises(ChainError, match="has a loop"):
        inspect_source(str(c))


def test_backing_format_not_raw_or_qcow2(tmp_path: Path) -> None:
    (tmp_path / "base.vmdk").write_bytes(bytes(4096))
    top = create(tmp_path / "t.qcow2", SIZE, tmp_path / "base.vmdk", "vmdk", "-u")
    with pytest.raises(ChainError, match=r"'vmdk'.*only raw and qcow2"):
        inspect_source(str(top))


def test_backing_declared_raw_but_qcow2(chain: Path, tmp_path: Path) -> None:
    top = create(tmp_path / "t.qcow2", SIZE, tmp_path / "mid.qcow2", "raw", "-u")
    with pytest.raises(ChainError, match="declared raw but is a qcow2 image"):
        inspect_source(str(top))


def test_corrupt_image_is_a_clean_error(chain: Path, tmp_path: Path) -> None:
    mid = tmp_path / "mid.qcow2"
    with mid.open("r+b") as f:
        # l1_table_offset (header byte 40) far past the end of the file.
        f.seek(40)
        f.write(struct.pack(">Q", 1 << 40))
    with pytest.raises(ChainError, match=r"mid\.qcow2.*L1 table"):
        restore(str(chain), str(tmp_path / "d.raw"))
    proc = run_cli("restore", chain, tmp_path / "d.raw")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    not_qcow2 = tmp_path / "garbage.qcow2"
    not_qcow2.write_bytes(b"x" * 4096)
    with pytest.raises(ChainError, match="not a qcow2 image"):
        inspect_source(str(not_qcow2), "qcow2")


def test_destination_rules(chain: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.raw"
    target.write_bytes(b"keep")
    link = tmp_path / "link.raw"
    link.symlink_to(target)
    with pytest.raises(UsageError, match="symbolic link"):
        restore(str(chain), str(link), overwrite=True)
    assert target.read_bytes() == b"keep"
    # Source == destination, by another name (hard link) and for a link of the chain.
    with pytest.raises(UsageError, match="same file"):
        restore(str(chain), str(chain), overwrite=True)
    os.link(tmp_path / "base.qcow2", tmp_path / "hard.raw")
    with pytest.raises(UsageError, match="same file"):
        restore(str(chain), str(tmp_path / "hard.raw"), overwrite=True)
    # An existing file of another size is never replaced.
    wrong = tmp_path / "wrong.raw"
    wrong.write_bytes(bytes(4096))
    with pytest.raises(UsageError, match="4096 bytes"):
        restore(str(chain), str(wrong), overwrite=True)
    # A directory, and a missing directory.
    with pytest.raises(UsageError, match="directory"):
        restore(str(chain), str(tmp_path), overwrite=True)
    with pytest.raises(UsageError, match="does not exist"):
        restore(str(chain), str(tmp_path / "no" / "d.raw"))
    # A raw restore of a qcow2 file would copy its metadata.
    with pytest.raises(UsageError, match="qcow2 image"):
        restore(str(chain), str(tmp_path / "x.raw"), format="raw")
    proc = run_cli("restore", chain, link, "--force")
    assert proc.returncode == 2 and "symbolic link" in proc.stderr


def test_destination_in_use_is_refused(chain: Path, tmp_path: Path) -> None:
    dest = tmp_path / "busy.raw"
    dest.write_bytes(bytes(SIZE))
    with Engine() as engine:
        engine.create_device(SIZE, backing_file=str(dest))
        with pytest.raises(UsageError, match="open or mapped"):
            restore(str(chain), str(dest), overwrite=True)


def test_failed_verification_keeps_the_old_destination(
        chain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "old.raw"
    dest.write_bytes(b"\x99" * SIZE)
    import shmblock.restore as R

    real = R._file_reader

    def corrupting(fd: int, grain: int) -> Callable[[int, int], R.U8Array]:
        read = real(fd, grain)

        def wrapped(offset: int, length: int) -> R.U8Array:
            out = read(offset, length)
            if offset == 0:
                out[12345] ^= 1
            return out
        return wrapped

    monkeypatch.setattr(R, "_file_reader", corrupting)
    with pytest.raises(VerificationError, match="first offsets: 0"):
        restore(str(chain), str(dest), overwrite=True)
    assert dest.read_bytes() == b"\x99" * SIZE
    assert not Path(str(dest) + ".part").exists()


def test_restore_into_live_device(chain: Path, tmp_path: Path) -> None:
    reference = tmp_path / "ref.raw"
    assert qemu_img("convert", "-f", "qcow2", "-O", "raw", chain, reference).returncode == 0
    expected = reference.read_bytes()
    with Engine() as engine:
        dev = engine.create_device(SIZE + MiB)
        dev.fill(0.5, seed=3)  # old contents that the restore must replace or zero
        tail = dev.read(SIZE, MiB)
        result = restore_to_device(dev, str(chain))
        assert result.verified is True and result.tail_bytes_untouched == MiB
        assert dev.read(0, SIZE) == expected
        assert dev.read(SIZE, MiB) == tail
        # Restoring the same backup again writes nothing: every cluster already matches.
        assert restore_to_device(dev, str(chain)).data_bytes == 0
        small = engine.create_device(SIZE // 2, name="small")
        with pytest.raises(UsageError, match="more than device small"):
            restore_to_device(small, str(chain))


def test_restore_into_device_refused_while_writers_run(chain: Path) -> None:
    with Engine() as engine:
        dev = engine.create_device(SIZE)
        engine.start_writers(dev, 1, duration=30)
        with pytest.raises(UsageError, match="writer processes running"):
            restore_to_device(dev, str(chain))


def test_restored_file_backs_a_device(chain: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dev.raw"
    restore(str(chain), str(dest))
    expected = dest.read_bytes()
    with Engine() as engine:
        dev = engine.create_device(SIZE, backing_file=str(dest))
        assert dev.read(0, SIZE) == expected


def test_io_error_is_a_restore_error(tmp_path: Path) -> None:
    with pytest.raises(ChainError, match="does not exist"):
        restore(str(tmp_path / "nothing.qcow2"), str(tmp_path / "d.raw"))
    assert issubclass(ChainError, RestoreError)


def test_fifo_backing_file_without_format_does_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    top = tmp_path / "t.qcow2"
    create(top, SIZE, tmp_path / "pipe", "raw", "-u")
    # No backing format recorded (qemu-img insists on -F nowadays, so the extension is
    # renamed to an unknown type, which readers skip): the format is probed, and the
    # probe must not open the FIFO for reading and wait for a writer forever.
    image = bytearray(top.read_bytes())
    at = image.index(struct.pack(">I", 0xE2792ACA))
    image[at : at + 4] = struct.pack(">I", 0x0BADF00D)
    top.write_bytes(bytes(image))
    with pytest.raises(ChainError, match=r"link 2 of the chain.*pipe.* is a FIFO"):
        inspect_source(str(top))


def test_bad_and_unreachable_nbd_sources(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        restore("nbd://", str(tmp_path / "d.raw"))
    missing = f"nbd+unix:///x?socket={tmp_path / 'no.sock'}"
    with pytest.raises(ChainError, match="cannot read the NBD export"):
        restore(missing, str(tmp_path / "d.raw"), timeout=5)
    assert not (tmp_path / "d.raw").exists()
    proc = run_cli("restore", missing, tmp_path / "d.raw")
    assert proc.returncode == 1 and "no.sock" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "x.raw").write_bytes(bytes(4096))
    assert run_cli("restore", tmp_path / "x.raw", "nbd://localhost/x").returncode == 2


def test_not_enough_space_is_refused_before_writing(
        chain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    def tiny(path: str) -> os.statvfs_result:
        st = real(path)
        fields = list(st)
        fields[4] = 1  # f_bavail: one block free
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "statvfs", tiny)
    with pytest.raises(NoSpaceError, match="MiB free"):
        restore(str(chain), str(tmp_path / "d.raw"))
    assert not (tmp_path / "d.raw.part").exists()
