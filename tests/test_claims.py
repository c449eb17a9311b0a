"""Per-cluster claims: OFD byte-range locks that exclude within a process and die with it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from shmblock.claims import Claims
from shmblock.device import Device, Geometry
from shmblock.errors import CopyBeforeWriteError, DeviceError
from tests.helpers import CS, new_device, run_names

GEO = Geometry(64 * CS, cluster_size=CS, max_writers=1, buffer_slots=1)


@pytest.fixture
def device() -> Iterator[Device]:
    with new_device(GEO) as dev:
        yield dev


@pytest.fixture
def pair(device: Device) -> Iterator[tuple[Claims, Claims]]:
    a, b = Claims(device.meta_name), Claims(device.meta_name)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_two_handles_in_one_process_exclude_each_other(pair: tuple[Claims, Claims]) -> None:
    a, b = pair
    assert a.try_claim(5)
    assert not b.try_claim(5)
    assert b.try_claim(6)  # a neighbour is free
    assert not a.try_claim(6)
    # re-claiming what you hold is fine (it is your own lock)
    assert a.try_claim(5)
    a.release(5)
    assert b.try_claim(5)
    assert not a.try_claim(5)


@pytest.mark.parametrize(
    ("held", "wanted", "conflict"),
    [
        ((4, 4), (0, 4), False),  # [4,8) vs [0,4): touching, no overlap
        ((4, 4), (8, 4), False),  # [4,8) vs [8,12)
        ((4, 4), (7, 1), True),  # last cluster
        ((4, 4), (4, 1), True),  # first cluster
        ((4, 4), (0, 5), True),  # overlaps the first
        ((4, 4), (7, 10), True),  # overlaps the last
        ((4, 4), (0, 64), True),  # covers it
        ((0, 64), (63, 1), True),
        ((10, 1), (0, 10), False),
        ((10, 1), (11, 53), False),
    ],
)
def test_range_overlap(pair: tuple[Claims, Claims], held: tuple[int, int],
                       wanted: tuple[int, int], conflict: bool) -> None:
    a, b = pair
    assert a.try_claim(*held)
    assert b.try_claim(*wanted) is not conflict
    if not conflict:
        # and the other way round: b's claim now blocks a
        assert not a.try_claim(*wanted)


def test_partial_release_splits_a_range(pair: tuple[Claims, Claims]) -> None:
    a, b = pair
    assert a.try_claim(0, 8)
    a.release(3, 2)  # [3,5) free, [0,3) and [5,8) still held
    assert b.try_claim(3, 2)
    assert not b.try_claim(2)
    assert not b.try_claim(5)
    b.release(3, 2)
    a.release(0, 8)
    assert b.try_claim(0, 8)


def test_a_failed_range_claim_takes_nothing(pair: tuple[Claims, Claims]) -> None:
    a, b = pair
    assert a.try_claim(7)
    assert not b.try_claim(0, 16)
    # nothing of [0,16) except 7 is held by anyone
    a.release(7)
    assert a.try_claim(0, 7)
    assert a.try_claim(8, 8)


def test_claims_beyond_the_segment_work(pair: tuple[Claims, Claims]) -> None:
    """Lock bytes need not lie inside the file: clusters far past its size still lock."""
    a, b = pair
    far = 1 << 40
    assert a.try_claim(far, 3)
    assert not b.try_claim(far + 2)


def test_claim_with_deadline_times_out(pair: tuple[Claims, Claims]) -> None:
    a, b = pair
    assert a.try_claim(3)
    t0 = time.monotonic()
    with pytest.raises(CopyBeforeWriteError, match="cluster 3 stayed claimed"):
        b.claim(3, 1, t0 + 0.05)
    elapsed = time.monotonic() - t0
    assert 0.045 <= elapsed < 2.0
    # a deadline already passed fails at once, but a free cluster is still taken
    with pytest.raises(CopyBeforeWriteError):
        b.claim(3, 1, time.monotonic() - 1)
    b.claim(4, 1, time.monotonic() - 1)
    assert not a.try_claim(4)


def test_claim_waits_for_a_release(pair: tuple[Claims, Claims]) -> None:
    a, b = pair
    assert a.try_claim(9)
    timer = threading.Timer(0.05, a.release, args=(9,))
    timer.start()
    try:
        t0 = time.monotonic()
        b.claim(9, 1, t0 + 10.0)
        assert 0.04 <= time.monotonic() - t0 < 5.0
    finally:
        timer.join()
    assert not a.try_claim(9)


def test_close_releases_everything_and_is_idempotent(device: Device) -> None:
    a, b = Claims(device.meta_name), Claims(device.meta_name)
    try:
        assert a.try_claim(0, 10)
        assert not b.try_claim(5)
        a.close()
        a.close()
        assert b.try_claim(0, 10)
        with pytest.raises(DeviceError, match="closed"):
            a.try_claim(0)
        with pytest.raises(DeviceError, match="closed"):
            a.release(0)
    finally:
        a.close()
        b.close()


def test_context_manager(device: Device) -> None:
    with Claims(device.meta_name) as a:
        assert a.try_claim(1)
    with Claims(device.meta_name) as b:
        assert b.try_claim(1)


def test_no_device() -> None:
    names = run_names()
    with pytest.raises(DeviceError, match="no device"):
        Claims(names.meta("missing"))


CHILD = """
import sys, time
from shmblock.claims import Claims
c = Claims(sys.argv[1])
assert c.try_claim(int(sys.argv[2]), int(sys.argv[3]))
print("held", flush=True)
time.sleep(60)
"""


def test_claim_of_a_killed_process_is_released(device: Device) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, device.meta_name, "10", "4"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"
        with Claims(device.meta_name) as mine:
            for c in range(10, 14):
                assert not mine.try_claim(c), c
            assert mine.try_claim(14)
            child.kill()  # SIGKILL: no Python cleanup runs in the child
            assert child.wait(timeout=10) == -9
            assert mine.try_claim(10, 4)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()


def test_claims_of_two_devices_are_independent() -> None:
    names = run_names()
    with new_device(GEO, "a", names=names) as da, new_device(GEO, "b", names=names) as db, \
            Claims(da.meta_name) as ca, Claims(db.meta_name) as cb:
        assert ca.try_claim(0)
        assert cb.try_claim(0)


def test_a_second_attach_excludes_too(device: Device) -> None:
    other = Device.attach(device.meta_name)
    try:
        with Claims(other.meta_name) as a, Claims(device.meta_name) as b:
            assert a.try_claim(2)
            assert not b.try_claim(2)
    finally:
        other.close()
