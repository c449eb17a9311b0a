"""Output-file rules (shmblock.paths): publishing order, collisions, device files, --json.

Unit tests, no processes: the multi-process and second-user cases are in
tests/test_security.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shmblock import paths
from shmblock.errors import UsageError
from shmblock.targets import TargetSpec, is_nbd_uri
from shmblock.targets.base import publish_part

# -- publishing: fsync(file) before rename(2), fsync(directory) after ------------------


def test_publish_fsyncs_the_file_before_the_rename_and_the_directory_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mutation guard: publishing a .part without the fsync before the rename (or
    without the directory fsync after it) must fail this test."""
    part, final = tmp_path / "b.raw.part", tmp_path / "b.raw"
    fd = paths.create_part(str(part))
    os.write(fd, b"data")
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(f: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(f).st_mode) else \
            ("file" if os.fstat(f).st_ino == os.fstat(fd).st_ino else "other")
        events.append(f"fsync {kind}")
        real_fsync(f)

    def rename(src: str, dst: str) -> None:
        events.append(f"rename {os.path.basename(src)} -> {os.path.basename(dst)}")
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    publish_part(fd, str(part), str(final), "raw")
    os.close(fd)
    assert events == ["fsync file", "rename b.raw.part -> b.raw", "fsync dir"]
    assert final.read_bytes() == b"data" and not part.exists()


def test_create_part_is_exclusive_private_and_never_follows_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "x.part"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        paths.create_part(str(link))
    assert victim.read_bytes() == b"precious"
    fd = paths.create_part(str(tmp_path / "y.part"))
    os.close(fd)
    assert stat.S_IMODE(os.stat(tmp_path / "y.part").st_mode) == 0o600
    with pytest.raises(FileExistsError):
        paths.create_part(str(tmp_path / "y.part"))


# -- collisions -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same path", "dot-dot", "symlink", "hard link"])
def test_check_distinct_sees_one_file_under_two_names(tmp_path: Path, how: str) -> None:
    device = tmp_path / "disk.img"
    device.write_bytes(b"\0" * 4096)
    (tmp_path / "sub").mkdir()
    other = {"same path": device, "dot-dot": tmp_path / "sub" / ".." / "disk.img",
             "symlink": tmp_path / "link.img", "hard link": tmp_path / "hard.img"}[how]
    if how == "symlink":
        other.symlink_to(device)
    elif how == "hard link":
        os.link(device, other)
    with pytest.raises(UsageError, match=r"target '.*' and --device-file '.*' are the same"):
        paths.check_distinct([("--device-file", str(device)), ("target", str(other))])


def test_check_distinct_includes_the_part_names(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"reference image .* target's partial file"):
        paths.check_distinct([*paths.with_parts("target", str(tmp_path / "b.raw")),
                              *paths.with_parts("reference image",
                                                str(tmp_path / "b.raw.part"))])
    paths.check_distinct([*paths.with_parts("target", str(tmp_path / "b.raw")),
                          *paths.with_parts("reference image", str(tmp_path / "r.raw"))])


# -- output and device files ---------------------------------------------------------------


def test_check_output_refuses_non_regular_files(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "f")
    (tmp_path / "l").symlink_to(tmp_path / "nowhere")
    for name, what in (("d", "a directory"), ("f", "a FIFO"), ("l", "a symbolic link")):
        with pytest.raises(UsageError, match=f"--json '.*{name}' exists and is {what}"):
            paths.check_output("--json", str(tmp_path / name))
    paths.check_output("--json", str(tmp_path / "new.json"))
    with pytest.raises(UsageError, match=r"directory .* does not exist"):
        paths.check_output("--json", str(tmp_path / "missing" / "s.json"))


def test_bad_device_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "small").write_bytes(b"x" * 100)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = {"dir": "is a directory", "fifo": "is a FIFO", "small": "has 100 bytes",
             "dangling": "is a symbolic link to a missing file"}
    for name, why in cases.items():
        with pytest.raises(UsageError, match=f"device file '.*/{name}' {why}"):
            paths.check_device_file(str(tmp_path / name), 1 << 20)
    paths.check_device_file(str(tmp_path / "new.img"), 1 << 20)  # created by the run
    (tmp_path / "empty").touch()
    paths.check_device_file(str(tmp_path / "empty"), 1 << 20)  # sized by the run


def test_write_file_atomic_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    # The old summary writer opened "<path>.tmp" with O_TRUNC, through any symlink.
    (tmp_path / "s.json.tmp").symlink_to(victim)
    paths.write_file_atomic(str(tmp_path / "s.json"), b"{}\n")
    assert (tmp_path / "s.json").read_text() == "{}\n"
    assert victim.read_text() == "precious"
    (tmp_path / "t.json").symlink_to(victim)
    with pytest.raises(UsageError, match="symbolic link"):
        paths.write_file_atomic(str(tmp_path / "t.json"), b"{}\n")
    assert victim.read_text() == "precious"
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["s.json", "s.json.tmp", "t.json", "victim"]


# -- removing .part files -------------------------------------------------------------------


def test_remove_part_needs_the_recorded_inode(tmp_path: Path) -> None:
    part = tmp_path / "b.raw.part"
    part.write_bytes(b"someone else's")
    st = part.stat()
    assert not paths.remove_part(str(part), (st.st_dev, st.st_ino + 1), 0.0)
    assert part.exists()
    assert paths.remove_part(str(part), (st.st_dev, st.st_ino), 0.0)
    assert not part.exists()


def test_remove_part_without_inode_spares_open_and_old_files(tmp_path: Path) -> None:
    part = tmp_path / "b.raw.part"
    part.write_bytes(b"x")
    with open(part, "rb"):  # a live job holds it
        assert not paths.remove_part(str(part), None, 0.0)
    assert not paths.remove_part(str(part), None, part.stat().st_ctime + 10)  # older
    assert part.exists()
    assert paths.remove_part(str(part), None, 0.0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file of another user")
def test_remove_part_spares_another_users_file(tmp_path: Path) -> None:
    part = tmp_path / "b.raw.part"
    part.write_bytes(b"theirs")
    os.chown(part, 65534, 65534)
    st = part.stat()
    assert not paths.remove_part(str(part), (st.st_dev, st.st_ino), 0.0)
    assert part.exists()


# -- NBD URIs are URIs in any case -----------------------------------------------------------


@pytest.mark.parametrize("uri", ["NBD://localhost/x", "Nbd://h:10809/e",
                                 "NBD+UNIX:///e?socket=/tmp/s"])
def test_nbd_scheme_is_case_insensitive(uri: str) -> None:
    assert is_nbd_uri(uri)
    assert TargetSpec.parse(uri).format == "nbd"
