"""Micro-benchmarks of the engine's hot paths (pytest-benchmark).

    .venv/bin/pytest bench -p no:cacheprovider --benchmark-only

Each group compares the engine's way with the alternatives it was chosen over, on the
same data. Where a first touch matters (a target's fresh file pages, a cluster that
still needs copying), every round gets fresh state: a new offset of a large sparse
target, a cluster marked again in ``needs_copy``; set-up is never timed.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import protocol
from shmblock import layout as L
from shmblock.claims import Claims
from shmblock.copier import Copier, nonzero_clusters
from shmblock.device import Device
from shmblock.guest import GuestIO
from shmblock.names import RunNames
from shmblock.stats import W_CBW_SAVES
from shmblock.targets.base import Target
from shmblock.targets.nbd import NbdTarget
from shmblock.targets.qcow2 import Qcow2Target
from shmblock.targets.raw import RawTarget
from shmblock.transport import WRITER_REPLY_RECEIVES, Queue

CS = 64 << 10
MIB = 1 << 20
TARGET_SIZE = 4 << 30
U8 = npt.NDArray[np.uint8]

# -- protocol ---------------------------------------------------------------------------------

MESSAGES: dict[str, protocol.Message] = {
    "CopyRequest": protocol.CopyRequest(writer=3, seq=123456, cluster=987654, count=1),
    "CopyDone": protocol.CopyDone(seq=123456, cluster=987654, count=1, ok=True, error=""),
    "JobProgress": protocol.JobProgress(job="job1", done=1 << 30, total=16 << 30),
}


@pytest.mark.benchmark(group="protocol-encode")
@pytest.mark.parametrize("kind", list(MESSAGES))
def test_encode(benchmark: Any, kind: str) -> None:
    msg = MESSAGES[kind]
    data = benchmark(protocol.encode, msg)
    assert protocol.decode(data) == msg


@pytest.mark.benchmark(group="protocol-decode")
@pytest.mark.parametrize("kind", list(MESSAGES))
def test_decode(benchmark: Any, kind: str) -> None:
    data = protocol.encode(MESSAGES[kind])
    assert benchmark(protocol.decode, data) == MESSAGES[kind]


# -- finding the next cluster to copy ------------------------------------------------------


def next_by_chunks(nc: U8, cursor: int, chunk: int = 16) -> int:
    """The engine's way (Copier.copy_next_chunk): skip chunks with nothing marked."""
    n = nc.size
    while cursor < n and not nc[cursor : cursor + chunk].any():
        cursor += chunk
    return cursor


def next_by_argmax(nc: U8, cursor: int) -> int:
    rest = nc[cursor:]
    i = int(rest.argmax())
    return cursor + i if rest[i] else nc.size


def next_by_flatnonzero(nc: U8, cursor: int) -> int:
    hits = np.flatnonzero(nc[cursor:])
    return cursor + int(hits[0]) if hits.size else nc.size


def next_by_words(nc: U8, cursor: int, chunk: int = 4096) -> int:
    """Skip 4096-cluster blocks as uint64 words, then look inside the block."""
    n = nc.size
    while cursor < n:
        block = nc[cursor : cursor + chunk]
        if block.size % 8 == 0 and not block.view(np.uint64).any():
            cursor += chunk
            continue
        hits = np.flatnonzero(block)
        if hits.size:
            return cursor + int(hits[0])
        cursor += chunk
    return n


FINDERS: dict[str, Callable[[U8, int], int]] = {
    "chunks-of-16 (engine)": next_by_chunks,
    "argmax": next_by_argmax,
    "flatnonzero": next_by_flatnonzero,
    "uint64-blocks": next_by_words,
}


@pytest.mark.benchmark(group="next-cluster: 16 GiB map, next marked one at 3/4")
@pytest.mark.parametrize("how", list(FINDERS))
def test_next_cluster_far(benchmark: Any, how: str) -> None:
    """The worst case for the engine's loop: a long cleared stretch (sync=top, or
    clusters that copy-before-write saved ahead of the cursor)."""
    nc = np.zeros((16 << 30) // CS, dtype=np.uint8)
    want = nc.size * 3 // 4 + 5
    nc[want] = 1
    found = benchmark(FINDERS[how], nc, 0)
    # The engine's loop stops at the start of the 16-cluster chunk holding it.
    assert found == (want // 16 * 16 if how.startswith("chunks") else want)


@pytest.mark.benchmark(group="next-cluster: dense map (full backup), next one at +1")
@pytest.mark.parametrize("how", list(FINDERS))
def test_next_cluster_near(benchmark: Any, how: str) -> None:
    nc = np.ones((16 << 30) // CS, dtype=np.uint8)
    nc[:1000] = 0
    assert benchmark(FINDERS[how], nc, 1000) == 1000


# -- all-zero cluster detection ---------------------------------------------------------------


def zero_engine(data: U8) -> npt.NDArray[np.bool_]:
    return nonzero_clusters(data, CS)


def zero_any(data: U8) -> npt.NDArray[np.bool_]:
    words = data.view(np.uint64).reshape(-1, CS // 8)
    return np.asarray(words.any(axis=1), dtype=np.bool_)


def zero_count_nonzero_axis(data: U8) -> npt.NDArray[np.bool_]:
    words = data.view(np.uint64).reshape(-1, CS // 8)
    return np.asarray(np.count_nonzero(words, axis=1) != 0, dtype=np.bool_)


def zero_count_nonzero_loop(data: U8) -> npt.NDArray[np.bool_]:
    words = data.view(np.uint64).reshape(-1, CS // 8)
    return np.array([np.count_nonzero(w) != 0 for w in words], dtype=np.bool_)


def zero_max_axis(data: U8) -> npt.NDArray[np.bool_]:
    words = data.view(np.uint64).reshape(-1, CS // 8)
    return np.asarray(words.max(axis=1) != 0, dtype=np.bool_)


ZERO_CHECKS: dict[str, Callable[[U8], npt.NDArray[np.bool_]]] = {
    "nonzero_clusters (engine)": zero_engine,
    "words.any(axis=1)": zero_any,
    "count_nonzero(axis=1)": zero_count_nonzero_axis,
    "count_nonzero per cluster": zero_count_nonzero_loop,
    "words.max(axis=1)": zero_max_axis,
}


@pytest.mark.benchmark(group="zero-check: one 64 KiB cluster (copy-before-write)")
@pytest.mark.parametrize("how", ["any", "max", "count_nonzero"])
def test_zero_detection_one_cluster(benchmark: Any, how: str) -> None:
    words = np.frombuffer(np.random.default_rng(4).bytes(CS), dtype=np.uint64)
    check: Callable[[], bool] = {
        "any": lambda: bool(words.any()),
        "max": lambda: bool(words.max() != 0),
        "count_nonzero": lambda: bool(np.count_nonzero(words)),
    }[how]
    assert benchmark(check)


@pytest.fixture(scope="module", params=["zeros", "random", "mixed"])
def zero_check_data(request: pytest.FixtureRequest) -> tuple[str, U8]:
    """1 MiB (16 clusters, the engine's copy chunk) of zeros, random data, or half each."""
    rng = np.random.default_rng(1)
    if request.param == "zeros":
        data = np.zeros(MIB, dtype=np.uint8)
    elif request.param == "random":
        data = np.frombuffer(rng.bytes(MIB), dtype=np.uint8).copy()
    else:
        data = np.zeros(MIB, dtype=np.uint8)
        data[: MIB // 2] = np.frombuffer(rng.bytes(MIB // 2), dtype=np.uint8)
    return request.param, data


@pytest.mark.parametrize("how", list(ZERO_CHECKS))
def test_zero_detection(benchmark: Any, how: str, zero_check_data: tuple[str, U8]) -> None:
    kind, data = zero_check_data
    benchmark.group = f"zero-check: 1 MiB of {kind}"
    expected = ZERO_CHECKS["count_nonzero per cluster"](data)
    assert np.array_equal(benchmark(ZERO_CHECKS[how], data), expected)


# -- copying a cluster run from the shared mapping to a target -------------------------------


def _open(kind: str, directory: str, nbd_uri: str | None) -> Target:
    if kind == "raw":
        return RawTarget(os.path.join(directory, "micro.raw"), TARGET_SIZE, CS)
    if kind == "qcow2":
        return Qcow2Target(os.path.join(directory, "micro.qcow2"), TARGET_SIZE, CS)
    assert nbd_uri is not None
    return NbdTarget(nbd_uri, TARGET_SIZE, CS, timeout=30.0)


@pytest.fixture(params=["raw", "qcow2", "nbd"])
def target(request: pytest.FixtureRequest, shm_dir: str) -> Iterator[Target]:
    """A fresh 4 GiB target (raw and qcow2 in /dev/shm, NBD: nbdkit memory, Unix socket)."""
    uri = request.getfixturevalue("nbdkit_uri") if request.param == "nbd" else None
    t = _open(request.param, shm_dir, uri)
    try:
        yield t
    finally:
        t.abort()
        t.close()


@pytest.mark.parametrize("run", [1, 16], ids=["64KiB", "1MiB"])
def test_copy_run_to_target(benchmark: Any, device: Device, target: Target, run: int) -> None:
    """One target write of ``run`` clusters straight from the shared mapping, each round at
    a fresh offset (first touch of the target's pages, as in a backup). NBD writes are
    pipelined; the round includes waiting for the reply (``commit``), so it is the
    synchronous cost."""
    benchmark.group = f"copy run of {run * CS // 1024} KiB from the device"
    view = device.data_view()
    src = view[: run * CS]  # random data (the first MiB of the device)
    offsets = itertools.count(0, run * CS)
    is_nbd = target.kind == "nbd"

    def setup() -> tuple[tuple[int], dict[str, Any]]:
        return (next(offsets) % TARGET_SIZE,), {}

    def write(offset: int) -> None:
        target.write(offset, src)
        if is_nbd:
            target.commit()

    rounds = min(TARGET_SIZE // (run * CS), 2000 if run == 1 else 400)
    benchmark.pedantic(write, setup=setup, rounds=rounds, warmup_rounds=5)
    src.release()
    view.release()


@pytest.mark.benchmark(group="background copy step: 1 MiB chunk → raw")
@pytest.mark.parametrize("content", ["random", "zeros"])
def test_copy_next_chunk_raw(benchmark: Any, device: Device, shm_dir: str,
                             content: str) -> None:
    """Copier.copy_next_chunk: claim 16 clusters, zero check, write the runs, clear the
    map, release. Each round re-marks one chunk of the device, at a fresh target offset."""
    target = RawTarget(os.path.join(shm_dir, "chunk.raw"), device.size, CS)
    claims = Claims(device.meta_name)
    copier = Copier(device, target, claims)
    # Even MiBs of the device hold random data, odd ones zeros.
    first = 0 if content == "random" else 16
    chunks = itertools.count(first, 32)
    try:
        def setup() -> tuple[tuple[()], dict[str, Any]]:
            c0 = next(chunks) % device.clusters
            device.needs_copy[:] = 0
            device.needs_copy[c0 : c0 + 16] = 1
            copier.cursor = c0
            return (), {}

        def step() -> None:
            assert copier.copy_next_chunk() == 16

        benchmark.pedantic(step, setup=setup, rounds=device.size // (32 * CS), warmup_rounds=2)
    finally:
        device.needs_copy[:] = 0
        copier.close()
        claims.close()
        target.abort()
        target.close()


# -- the guest write path ---------------------------------------------------------------------


@pytest.fixture
def guest(device: Device) -> Iterator[GuestIO]:
    names = RunNames.new()
    io = GuestIO(device, 0, names.backup_queue("bench"))
    device.ctl[L.CTL_CBW_MODE] = 0  # stage
    device.ctl[L.CTL_WORKER_IDLE] = 0  # no doorbell: no worker to ring
    device.ctl[L.CTL_CBW_TIMEOUT_US] = 5_000_000
    try:
        yield io
    finally:
        device.needs_copy[:] = 0
        device.slot_state[:] = L.SLOT_FREE
        io.close()


@pytest.mark.benchmark(group="guest write 4 KiB")
def test_guest_write_fast_path(benchmark: Any, device: Device, guest: GuestIO) -> None:
    """needs_copy is 0: a map lookup, the allocation store, the copy, the accounting."""
    buf = np.frombuffer(np.random.default_rng(2).bytes(4096), dtype=np.uint8)
    offsets = itertools.cycle(range(0, device.size, 4096 * 17))

    def write() -> None:
        guest.write(next(offsets), buf.data)

    benchmark(write)


@pytest.mark.benchmark(group="guest write 4 KiB")
def test_guest_write_cbw_stage(benchmark: Any, device: Device, guest: GuestIO) -> None:
    """needs_copy is 1 (fresh per round): claim, copy the old 64 KiB into a staging slot,
    clear the map, release, write. The slot is freed again between rounds, as the
    backup worker would."""
    buf = np.frombuffer(np.random.default_rng(3).bytes(4096), dtype=np.uint8)
    clusters = itertools.cycle(range(0, device.clusters, 7))

    def setup() -> tuple[tuple[int], dict[str, Any]]:
        c = next(clusters)
        device.slot_state[:] = L.SLOT_FREE
        device.needs_copy[c] = 1
        return (c,), {}

    def write(c: int) -> None:
        guest.write(c * CS + 4096, buf.data)

    benchmark.pedantic(write, setup=setup, rounds=3000, warmup_rounds=10)
    guest.flush_stats()
    assert device.stats[0][W_CBW_SAVES] > 0


@pytest.mark.benchmark(group="guest write 4 KiB")
def test_guest_write_cbw_claim_only(benchmark: Any, device: Device) -> None:
    """The two fcntl calls of a claim and its release, alone (part of every CBW)."""
    claims = Claims(device.meta_name)
    clusters = itertools.cycle(range(device.clusters))

    def claim_release() -> None:
        c = next(clusters)
        claims.claim(c, 1, float("inf"))
        claims.release(c, 1)

    try:
        benchmark(claim_release)
    finally:
        claims.close()


# -- a copy request's round trip between processes ------------------------------------------

ECHO = textwrap.dedent("""
    import sys
    import protocol
    from shmblock.transport import Queue
    inbox, outbox = Queue.attach(sys.argv[1]), Queue.attach(sys.argv[2])
    while True:
        msg = inbox.receive(30.0)
        if msg is None or isinstance(msg, protocol.Shutdown):
            break
        outbox.send(protocol.CopyDone(seq=msg.seq, cluster=msg.cluster, count=msg.count,
                                      ok=True, error=""), timeout=5.0)
""")


@pytest.mark.benchmark(group="copy request round trip (two processes, POSIX queues)")
def test_copy_request_round_trip(benchmark: Any, prefix: str) -> None:
    """CopyRequest → CopyDone through a second process that answers at once: the floor
    of the request path of copy-before-write, without the copy itself."""
    names = RunNames.new()
    with Queue.create(f"{names.base}-ping", (protocol.CopyRequest, protocol.Shutdown)) as ping, \
            Queue.create(f"{names.base}-pong", WRITER_REPLY_RECEIVES) as pong:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": root}
        echo = subprocess.Popen([sys.executable, "-c", ECHO, ping.name, pong.name], env=env)
        try:
            seqs = itertools.count(1)

            def round_trip() -> None:
                seq = next(seqs)
                ping.send(protocol.CopyRequest(writer=0, seq=seq, cluster=seq % 1000,
                                               count=1), timeout=5.0)
                reply = pong.receive(5.0)
                assert isinstance(reply, protocol.CopyDone) and reply.seq == seq

            benchmark(round_trip)
        finally:
            ping.send(protocol.Shutdown(reason="done"), timeout=5.0)
            echo.wait(10)


# -- the backup worker's side of copy-before-write ------------------------------------------


@pytest.fixture
def raw_copier(device: Device, shm_dir: str) -> Iterator[Copier]:
    """A copier of the bench device to a fresh raw target in /dev/shm."""
    target = RawTarget(os.path.join(shm_dir, "cbw.raw"), device.size, CS)
    claims = Claims(device.meta_name)
    copier = Copier(device, target, claims)
    device.ctl[L.CTL_JOB_SEQ] += 1  # requests carry their job: serve_request checks it
    copier.begin()
    try:
        yield copier
    finally:
        device.needs_copy[:] = 0
        device.slot_state[:] = L.SLOT_FREE
        copier.close()
        claims.close()
        target.abort()
        target.close()


@pytest.mark.benchmark(group="worker: save one cluster for copy-before-write → raw")
def test_serve_request(benchmark: Any, device: Device, raw_copier: Copier) -> None:
    """Copier.serve_request(c, 1, job): what the worker does for a writer's CopyRequest
    (claim, re-check, save, release), a fresh data cluster each round."""
    clusters = itertools.cycle(range(0, device.clusters, 32))  # even MiBs: random data

    def setup() -> tuple[tuple[int, int, int], dict[str, Any]]:
        c = next(clusters)
        device.needs_copy[c] = 1
        return (c, 1, raw_copier.job_seq), {}

    benchmark.pedantic(raw_copier.serve_request, setup=setup, rounds=device.clusters // 32,
                       warmup_rounds=2)


@pytest.mark.benchmark(group="worker: save one cluster for copy-before-write → raw")
def test_drain_one_staging_slot(benchmark: Any, device: Device, raw_copier: Copier) -> None:
    """Copier.drain_staging with one FULL slot (random data), a fresh cluster each round."""
    clusters = itertools.cycle(range(0, device.clusters, 32))
    device.staging[0] = device.data[:CS]

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        device.slot_cluster[0] = next(clusters)
        device.slot_state[0] = L.SLOT_FULL
        return (), {}

    def drain() -> None:
        assert raw_copier.drain_staging() == 1

    benchmark.pedantic(drain, setup=setup, rounds=device.clusters // 32, warmup_rounds=2)


@pytest.mark.benchmark(group="worker: save one cluster for copy-before-write → raw")
def test_bare_pwrite_of_one_cluster(benchmark: Any, device: Device, shm_dir: str) -> None:
    """The floor: one 64 KiB os.pwrite from the mapping at a fresh offset of a sparse file."""
    fd = os.open(os.path.join(shm_dir, "bare.raw"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    view = device.data_view()
    src = view[:CS]
    offsets = itertools.cycle(range(0, device.size, 32 * CS))
    try:
        os.ftruncate(fd, device.size)

        def setup() -> tuple[tuple[int], dict[str, Any]]:
            return (next(offsets),), {}

        def write(off: int) -> None:
            os.pwrite(fd, src, off)

        benchmark.pedantic(write, setup=setup, rounds=device.clusters // 32, warmup_rounds=2)
    finally:
        src.release()
        view.release()
        os.close(fd)
