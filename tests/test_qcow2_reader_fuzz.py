"""Fuzzing the qcow2 reader: whatever the bytes of an image, it reads or refuses cleanly.

Verification reads every qcow2 backup back through :class:`Qcow2Reader`, so the reader
must never be the thing that breaks: a corrupt or hostile image (a mutated header, L1,
L2 or refcount table, integer fields at their extremes) gives either the right data or
a :class:`TargetError` — never ``OverflowError``, ``ValueError``, ``MemoryError``, a hang,
or an allocation the size of a forged table field.

The images are real: made by our writer (with raw and qcow2 backing files, and 512-byte
clusters for many tables) and by ``qemu-img convert`` / ``create`` + ``qemu-io`` (plain,
compressed, version 2, with a backing file). Mutations are applied in place to a working
copy next to the original (so relative backing names still resolve) and undone after
each check, so a campaign of hundreds of mutants costs a few seconds.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmblock.device import Geometry
from shmblock.errors import TargetError, VerificationError
from shmblock.targets import TargetSpec
from shmblock.targets.qcow2 import Qcow2Target
from shmblock.targets.qcow2_format import (
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Qcow2Header,
    Qcow2Reader,
    RawReader,
    open_image,
)
from shmblock.verify import SnapshotCapture, verify_target
from tests.helpers import CS, new_device

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
KiB, MiB = 1 << 10, 1 << 20

pytestmark = pytest.mark.timeout(120)

# 8-byte values a forged field likes: just past and at the ends of the signed and unsigned
# ranges (what OverflowError comes from), "negative" numbers stored unsigned, and values
# that survive the reader's masks and alignment checks.
U64_EXTREMES = [1 << 63, (1 << 64) - 1, (1 << 63) - 1, (1 << 64) - 512, (1 << 64) - 65536,
                1 << 62, (1 << 56) - 512, 1 << 40, 1 << 32, 512]
U32_EXTREMES = [1 << 31, (1 << 32) - 1, (1 << 32) - 512, 1 << 16, 0]
# L1/L2 entries: flags with host offsets at the ends of the 56-bit field, and compressed
# descriptors whose offset and sector-count bits are all ones.
ENTRY_EXTREMES = [
    *U64_EXTREMES,
    OFLAG_COPIED | OFFSET_MASK,
    OFLAG_COPIED | (1 << 55),
    OFLAG_COMPRESSED | ((1 << 62) - 1),
    OFLAG_COMPRESSED | OFLAG_COPIED | ((1 << 62) - 1),
    OFLAG_COMPRESSED | ((1 << 61) - 1),
    OFLAG_COMPRESSED | 511,
    OFLAG_ZERO | OFFSET_MASK,
    OFLAG_COMPRESSED | OFLAG_ZERO,
]

# (offset, width) of every fixed header field ("Header" in qcow2.txt).
HEADER_FIELDS = {
    "version": (4, 4), "backing_file_offset": (8, 8), "backing_file_size": (16, 4),
    "cluster_bits": (20, 4), "size": (24, 8), "crypt_method": (32, 4), "l1_size": (36, 4),
    "l1_table_offset": (40, 8), "refcount_table_offset": (48, 8),
    "refcount_table_clusters": (56, 4), "nb_snapshots": (60, 4), "snapshots_offset": (64, 8),
    "incompatible_features": (72, 8), "compatible_features": (80, 8),
    "autoclear_features": (88, 8), "refcount_order": (96, 4), "header_length": (100, 4),
}
# Fields the reader has no business looking at: any value must leave the data as it was.
IGNORED_FIELDS = {"refcount_table_offset", "refcount_table_clusters", "nb_snapshots",
                  "snapshots_offset", "compatible_features", "autoclear_features",
                  "refcount_order"}


@dataclass
class Image:
    """A pristine image, its guest contents, and where its metadata lives in the file."""

    name: str
    path: Path
    raw: bytes  # the file's bytes
    expected: bytes  # the guest contents through the whole chain
    regions: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.path.with_name("mut-" + self.path.name)


def _u64(data: bytes, offset: int) -> int:
    return int(struct.unpack_from(">Q", data, offset)[0])


def _regions(raw: bytes) -> dict[str, list[tuple[int, int]]]:
    """Header, header extensions, L1, L2 tables, refcount table and blocks, data."""
    h = Qcow2Header.unpack(raw)
    cs = h.cluster_size
    regions: dict[str, list[tuple[int, int]]] = {
        "header": [(0, h.header_length)],
        "extensions": [(h.header_length, min(cs, len(raw)) - h.header_length)],
        "l1": [(h.l1_table_offset, h.l1_size * 8)],
    }
    l2 = []
    data = []
    for i in range(h.l1_size):
        where = _u64(raw, h.l1_table_offset + 8 * i) & OFFSET_MASK
        if where:
            l2.append((where, cs))
            for j in range(cs // 8):
                entry = _u64(raw, where + 8 * j)
                if entry & OFFSET_MASK and not entry & OFLAG_COMPRESSED:
                    data.append((entry & OFFSET_MASK, cs))
    regions["l2"] = l2
    regions["data"] = data[:8]
    rt = h.refcount_table_offset
    regions["refcount"] = [(rt, h.refcount_table_clusters * cs)]
    for i in range(h.refcount_table_clusters * cs // 8):
        where = _u64(raw, rt + 8 * i) & OFFSET_MASK
        if where:
            regions["refcount"].append((where, cs))
    return {k: [(a, n) for a, n in v if n > 0 and a + n <= len(raw)] for k, v in regions.items()
            if v}


def _guest_bytes(cluster: int, cluster_size: int, seed: int) -> bytes:
    rng = np.random.default_rng(cluster * 7919 + seed)
    return rng.integers(0, 256, cluster_size, dtype=np.uint8).tobytes()


def _run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=60)


def _ours(directory: Path, name: str, size: int, cs: int, clusters: list[int], seed: int,
          backing: tuple[str, str] | None = None) -> None:
    target = Qcow2Target(str(directory / name), size, cs,
                         backing_file=backing[0] if backing else None,
                         backing_format=backing[1] if backing else None)
    for c in clusters:
        target.write(c * cs, _guest_bytes(c, cs, seed))
    target.write_zeroes(1 * cs, cs)  # a zero cluster (over backing data, when there is any)
    target.commit()
    target.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Image]:
    d = tmp_path_factory.mktemp("qcow2-fuzz")
    size = 1 * MiB
    base = bytearray(size)
    for c in (0, 1, 3, 9, 15):
        base[c * 64 * KiB : (c + 1) * 64 * KiB] = _guest_bytes(c, 64 * KiB, 1)
    (d / "base.raw").write_bytes(base)
    _ours(d, "ours-raw-backed.qcow2", size, 64 * KiB, [2, 3, 11], 2, ("base.raw", "raw"))
    _ours(d, "ours-512.qcow2", 256 * KiB, 512, [0, 5, 6, 7, 70, 130, 400, 511], 3)
    _ours(d, "ours-chain.qcow2", size, 64 * KiB, [4, 12], 4,
          ("ours-raw-backed.qcow2", "qcow2"))
    names = ["ours-raw-backed.qcow2", "ours-512.qcow2", "ours-chain.qcow2"]
    if QEMU_IMG is not None:
        small = ["-o", "cluster_size=4096"]
        _run(QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", *small, d / "base.raw",
             d / "qemu.qcow2")
        _run(QEMU_IMG, "convert", "-c", "-f", "raw", "-O", "qcow2", *small, d / "base.raw",
             d / "qemu-compressed.qcow2")
        _run(QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", "-o",
             "compat=0.10,cluster_size=4096", d / "base.raw", d / "qemu-v2.qcow2")
        names += ["qemu.qcow2", "qemu-compressed.qcow2", "qemu-v2.qcow2"]
        if QEMU_IO is not None:
            thin = d / "qemu-thin.qcow2"
            _run(QEMU_IMG, "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b",
                 "qemu-compressed.qcow2", "-F", "qcow2", thin, str(size))
            _run(QEMU_IO, "-f", "qcow2", "-c", "write -P 0x5a 4k 12k",
                 "-c", "write -z 64k 64k", "-c", "write -P 0xa5 200k 4k", thin)
            names.append(thin.name)
    images = []
    for name in names:
        path = d / name
        with Qcow2Reader(str(path)) as reader:
            expected = reader.read(0, reader.size)
        if QEMU_IMG is not None:  # the pristine reading is right: QEMU agrees
            _run(QEMU_IMG, "convert", "-O", "raw", path, d / "check.raw")
            assert (d / "check.raw").read_bytes() == expected, name
        raw = path.read_bytes()
        images.append(Image(name, path, raw, expected, _regions(raw)))
    return images


@pytest.fixture()
def image_files(corpus: list[Image]) -> Iterator[list[Image]]:
    for img in corpus:
        img.work.write_bytes(img.raw)
    yield corpus
    for img in corpus:
        img.work.unlink(missing_ok=True)


def read_or_refuse(path: Path, expected_size: int) -> bytes | None:
    """The property: the image's data, or None for a clean TargetError. Any other
    exception propagates and fails the test."""
    try:
        with Qcow2Reader(str(path)) as reader:
            got = reader.read(0, min(reader.size, expected_size))
            # Reads near the end of a forged size and far beyond the real one.
            for offset in {reader.size - 4096, reader.size - 4097, reader.size // 2}:
                if offset >= 0:
                    reader.read(offset, min(4096, reader.size - offset))
            return got
    except TargetError:
        return None


class Mutator:
    """Writes bytes into the working copy and restores them afterwards."""

    def __init__(self, img: Image) -> None:
        self.img = img
        self.fd = os.open(img.work, os.O_RDWR)
        self.saved: list[tuple[int, bytes]] = []

    def put(self, offset: int, value: bytes) -> None:
        self.saved.append((offset, os.pread(self.fd, len(value), offset)))
        os.pwrite(self.fd, value, offset)

    def restore(self) -> None:
        for offset, old in reversed(self.saved):
            os.pwrite(self.fd, old, offset)
        self.saved.clear()

    def close(self) -> None:
        self.restore()
        os.close(self.fd)

    def check(self, what: str, must_read: bool = False) -> bytes | None:
        try:
            got = read_or_refuse(self.img.work, len(self.img.expected))
        except BaseException as exc:
            raise AssertionError(f"{self.img.name}, {what}: {type(exc).__name__}: {exc}") from exc
        finally:
            self.restore()
        if must_read:
            assert got == self.img.expected, f"{self.img.name}, {what}: wrong data"
        return got


def _pack(value: int, width: int) -> bytes:
    return value.to_bytes(width, "big")


def test_every_header_field_at_its_extremes(image_files: list[Image]) -> None:
    for img in image_files:
        m = Mutator(img)
        try:
            for name, (offset, width) in HEADER_FIELDS.items():
                for value in U64_EXTREMES if width == 8 else U32_EXTREMES:
                    m.put(offset, _pack(value & ((1 << 8 * width) - 1), width))
                    m.check(f"{name}={value:#x}", must_read=name in IGNORED_FIELDS)
        finally:
            m.close()


def test_table_entries_at_their_extremes(image_files: list[Image]) -> None:
    for img in image_files:
        m = Mutator(img)
        try:
            entries = [("l1", a) for a, n in img.regions["l1"] for a in range(a, a + n, 8)][:6]
            for a, n in img.regions.get("l2", [])[:3]:
                raw = img.raw[a : a + n]
                used = [a + i for i in range(0, n, 8) if raw[i : i + 8] != bytes(8)][:4]
                entries += [("l2", u) for u in used] + [("l2", a + n - 8)]
            for region, offset in entries:
                for value in ENTRY_EXTREMES:
                    m.put(offset, _pack(value, 8))
                    m.check(f"{region} entry at {offset}={value:#x}")
            for a, n in img.regions.get("refcount", []):
                for value in (U64_EXTREMES[0], U64_EXTREMES[1]):
                    m.put(a, _pack(value, 8))
                    m.put(a + n - 8, _pack(value, 8))
                    m.check(f"refcount at {a}={value:#x}", must_read=True)
        finally:
            m.close()


@st.composite
def mutations(draw: st.DrawFn, img: Image) -> list[tuple[str, int, bytes]]:
    """1-4 mutations of one image: a byte flip, or an 8- or 4-byte field set to an
    extreme, somewhere in a metadata region (or data)."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        region = draw(st.sampled_from(sorted(img.regions)))
        start, length = draw(st.sampled_from(img.regions[region]))
        pos = start + draw(st.integers(0, length - 1))
        kind = draw(st.sampled_from(["flip", "u64", "u32"]))
        if kind == "flip":
            value = bytes([img.raw[pos] ^ draw(st.integers(1, 255))])
        elif kind == "u64":
            pos = max(start, pos - pos % 8)
            value = _pack(draw(st.sampled_from(ENTRY_EXTREMES)), 8)
        else:
            pos = max(start, pos - pos % 4)
            value = _pack(draw(st.sampled_from(U32_EXTREMES)), 4)
        out.append((region, pos, value[: len(img.raw) - pos]))
    return out


@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_mutations_read_or_refuse(image_files: list[Image], data: st.DataObject) -> None:
    img = data.draw(st.sampled_from(image_files))
    muts = data.draw(mutations(img))
    m = Mutator(img)
    try:
        for _, pos, value in muts:
            m.put(pos, value)
        only_refcounts = all(region == "refcount" for region, _, _ in muts)
        m.check(f"mutations {muts!r:.300}", must_read=only_refcounts)
    finally:
        m.close()


def test_forged_l1_size_allocates_nothing_like_it(tmp_path: Path) -> None:
    """An L1 table as large as QEMU allows (32 MiB) in a small file is refused before the
    reader reads (allocates) it."""
    image = tmp_path / "a.qcow2"
    _ours(tmp_path, "a.qcow2", 1 * MiB, 512, [3], 5)
    raw = bytearray(image.read_bytes())
    entries = (32 * MiB) // 8
    struct.pack_into(">I", raw, 36, entries)
    struct.pack_into(">Q", raw, 24, entries * 64 * 512)  # a size that needs all of them
    image.write_bytes(raw)
    tracemalloc.start()
    try:
        with pytest.raises(TargetError, match="L1"):
            Qcow2Reader(str(image))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"refusing a forged L1 table allocated {peak} bytes"


def _with_backing_name(tmp_path: Path, name: bytes) -> Path:
    _ours(tmp_path, "t.qcow2", 1 * MiB, 64 * KiB, [2], 6, ("placeholder", "raw"))
    image = tmp_path / "t.qcow2"
    raw = bytearray(image.read_bytes())
    h = Qcow2Header.unpack(bytes(raw))
    raw[h.backing_file_offset : h.backing_file_offset + len(name)] = name
    struct.pack_into(">I", raw, 16, len(name))
    # Point it at a raw image by probing, not by the backing-format extension.
    raw[h.header_length : h.header_length + 8] = bytes(8)
    image.write_bytes(raw)
    return image


@pytest.mark.parametrize("kind", ["directory", "fifo", "nul", "device"])
def test_backing_names_that_are_no_image_are_refused(tmp_path: Path, kind: str) -> None:
    """A forged backing name never hangs (a FIFO), never reads a directory or a device,
    and never reaches os.open with a NUL byte."""
    (tmp_path / "sub").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "placeholder").write_bytes(bytes(1 * MiB))
    name = {"directory": b"sub", "fifo": b"fifo", "nul": b"place\0holder",
            "device": b"/dev/zero"}[kind]
    image = _with_backing_name(tmp_path, name)
    with pytest.raises(TargetError), Qcow2Reader(str(image)) as reader:
        reader.read(0, reader.size)


def test_an_empty_backing_name_is_no_backing_file(tmp_path: Path) -> None:
    """As in QEMU: not the image's own directory opened as a backing file."""
    (tmp_path / "placeholder").write_bytes(bytes(1 * MiB))
    image = _with_backing_name(tmp_path, b"x")
    raw = bytearray(image.read_bytes())
    struct.pack_into(">I", raw, 16, 0)
    image.write_bytes(raw)
    with Qcow2Reader(str(image)) as reader:
        assert reader.backing_file is None
        data = reader.read(0, reader.size)
    expected = bytearray(1 * MiB)
    expected[2 * 64 * KiB : 3 * 64 * KiB] = _guest_bytes(2, 64 * KiB, 6)
    assert data == bytes(expected)
    if QEMU_IMG is not None:
        _run(QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", image, tmp_path / "q.raw")
        assert (tmp_path / "q.raw").read_bytes() == data


def test_raw_reader_refuses_offsets_beyond_any_file(tmp_path: Path) -> None:
    (tmp_path / "r.raw").write_bytes(b"x" * 4096)
    with RawReader(str(tmp_path / "r.raw")) as reader:
        assert reader.read(0, 4) == b"xxxx"
        assert reader.read(1 << 63, 4) == bytes(4)  # past the end: zeros, no OverflowError
        with pytest.raises(TargetError):
            reader.read(-1, 4)
    with pytest.raises(TargetError):
        open_image(str(tmp_path), None)


@pytest.mark.parametrize(("forged", "error"), [
    ([(40, ">Q", 1 << 63)], "cannot open the backup"),  # l1_table_offset
    ([(8, ">Q", (1 << 64) - 512), (16, ">I", 8)], "cannot open the backup"),  # backing name
    ([(None, ">Q", OFLAG_COPIED | (1 << 55))], "cannot read the backup back"),  # L2 entry
])
def test_verification_of_a_forged_backup_is_a_verification_error(
        tmp_path: Path, forged: list[tuple[int | None, str, int]], error: str) -> None:
    """The end-to-end property: verify_target reports a hostile qcow2 backup as a failed
    verification, it does not crash the run with OverflowError."""
    geo = Geometry(16 * CS, cluster_size=CS, max_writers=1, buffer_slots=1)
    path = tmp_path / "b.qcow2"
    with new_device(geo) as dev:
        dev.data[: 4 * CS] = 7
        capture = SnapshotCapture(dev)
        capture.capture()
        capture.finish_async()
        target = Qcow2Target(str(path), geo.size, CS)
        target.write(0, dev.data[: 4 * CS].tobytes())
        target.commit()
        target.close()
    spec = TargetSpec.parse(str(path), "qcow2")
    verify_target(spec, capture)  # the untouched backup verifies
    raw = bytearray(path.read_bytes())
    h = Qcow2Header.unpack(bytes(raw))
    l2_entry_1 = (_u64(bytes(raw), h.l1_table_offset) & OFFSET_MASK) + 8  # holds data
    for field_offset, fmt, value in forged:
        where = l2_entry_1 if field_offset is None else field_offset
        struct.pack_into(fmt, raw, where, value)
    path.write_bytes(raw)
    with pytest.raises(VerificationError, match=error):
        verify_target(spec, capture)
