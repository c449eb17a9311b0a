"""Protocol messages over POSIX message queues: sizing, timeouts, malformed input."""

from __future__ import annotations

import time
from collections.abc import Iterator

import posix_ipc
import pytest

import protocol
from protocol import Message
from protocol.messages import MAX_TEXT_CHARS
from shmblock import transport as T
from shmblock.errors import QueueClosed, QueueTimeout, TransportError
from shmblock.names import RunNames
from shmblock.transport import Queue, unlink_queue
from tests.helpers import run_names
from tests.test_protocol import MAXIMAL

RECEIVE_SETS = {
    "supervisor": T.SUPERVISOR_RECEIVES,
    "backup": T.BACKUP_RECEIVES,
    "writer-control": T.WRITER_CONTROL_RECEIVES,
    "writer-reply": T.WRITER_REPLY_RECEIVES,
}

#: RLIMIT_MSGQUEUE's default for an unprivileged user (mq_overview(7)).
DEFAULT_QUEUE_BYTES = 800 * 1024
#: What the kernel charges per message slot besides the message itself: a struct
#: msg_msg (48 bytes on x86-64) and a share of the priority tree; ~100 is generous.
SLOT_OVERHEAD = 100


@pytest.fixture
def names() -> RunNames:
    return run_names()


@pytest.fixture
def queue(names: RunNames) -> Iterator[Queue]:
    with Queue.create(names.backup_queue("dev0"), T.BACKUP_RECEIVES) as q:
        yield q


@pytest.fixture
def reader(queue: Queue) -> Iterator[Queue]:
    q = Queue.attach(queue.name)
    try:
        yield q
    finally:
        q.close()


def raw_send(name: str, data: bytes) -> None:
    mq = posix_ipc.MessageQueue(name)
    try:
        mq.send(data, timeout=1.0)
    finally:
        mq.close()


# -- sizing ------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", sorted(RECEIVE_SETS))
def test_queue_message_size_fits_every_kind(endpoint: str) -> None:
    kinds = RECEIVE_SETS[endpoint]
    size = T.queue_message_size(kinds)
    for kind in kinds:
        assert size >= protocol.max_encoded_size(kind), kind.__name__
    assert size == max(protocol.max_encoded_size(k) for k in kinds)
    assert size <= protocol.MAX_MESSAGE_SIZE  # the unprivileged msgsize_max


@pytest.mark.parametrize("endpoint", sorted(RECEIVE_SETS))
def test_the_largest_message_of_each_kind_goes_through(names: RunNames, endpoint: str) -> None:
    kinds = RECEIVE_SETS[endpoint]
    largest = [m for m in MAXIMAL if type(m) in kinds]
    assert {type(m) for m in largest} == set(kinds)
    with Queue.create(names.base + "-" + endpoint, kinds) as q:
        assert q.max_message_size == T.queue_message_size(kinds)
        for msg in largest:
            q.send(msg, timeout=1.0)
            assert q.receive(1.0) == msg


def test_receive_sets_cover_what_each_endpoint_is_sent() -> None:
    # The protocol's table: who sends what to whom (protocol/messages.py).
    assert protocol.CopyRequest in T.BACKUP_RECEIVES
    assert protocol.Staged in T.BACKUP_RECEIVES
    assert protocol.CopyDone in T.WRITER_REPLY_RECEIVES
    assert protocol.Freeze in T.WRITER_CONTROL_RECEIVES
    assert protocol.Thaw in T.WRITER_CONTROL_RECEIVES
    assert protocol.Frozen in T.SUPERVISOR_RECEIVES
    assert protocol.JobFailed in T.SUPERVISOR_RECEIVES
    every = set().union(*RECEIVE_SETS.values())
    assert every == set(protocol.MESSAGE_TYPES.values())


# -- create / attach / close ---------------------------------------------------------------


def test_create_attach_send_receive(queue: Queue, reader: Queue) -> None:
    assert queue.owner and not reader.owner
    sent: list[Message] = [
        protocol.CopyRequest(writer=3, seq=1, cluster=12, count=1),
        protocol.Staged(writer=1),
        protocol.JobStart(job="job1", sync="full", speed=0),
        protocol.Cancel(job="job1"),
    ]
    for msg in sent:
        queue.send(msg, timeout=1.0)
    assert [reader.receive(1.0) for _ in sent] == sent
    assert reader.receive(0.0) is None
    assert reader.rejected == 0


def test_exclusive_create(queue: Queue, names: RunNames) -> None:
    queue.send(protocol.Staged(writer=0), timeout=1.0)
    with pytest.raises(TransportError, match="already exists"):
        Queue.create(queue.name, T.BACKUP_RECEIVES)
    assert queue.receive(1.0) == protocol.Staged(writer=0)  # untouched


def test_attach_missing(names: RunNames) -> None:
    with pytest.raises(TransportError, match="no message queue"):
        Queue.attach(names.supervisor_queue)


def test_create_with_a_bad_name_is_a_transport_error(names: RunNames) -> None:
    with pytest.raises(TransportError, match="cannot create message queue"):
        Queue.create(names.base + "/sub", T.BACKUP_RECEIVES)


def test_closed_queue(names: RunNames) -> None:
    q = Queue.create(names.supervisor_queue, T.SUPERVISOR_RECEIVES)
    try:
        q.close()
        q.close()  # idempotent
        with pytest.raises(QueueClosed):
            q.send(protocol.Ready(role="writer", ident=0, pid=1), timeout=0.1)
        with pytest.raises(QueueClosed):
            q.receive(0.0)
        with pytest.raises(QueueClosed):
            q.try_send(protocol.Ready(role="writer", ident=0, pid=1))
    finally:
        q.unlink()
    assert not unlink_queue(names.supervisor_queue)  # already gone


def test_unlinked_queue_still_works_for_open_handles(queue: Queue, reader: Queue) -> None:
    queue.unlink()
    with pytest.raises(TransportError):
        Queue.attach(queue.name)
    queue.send(protocol.Staged(writer=2), timeout=1.0)
    assert reader.receive(1.0) == protocol.Staged(writer=2)


# -- timeouts -----------------------------------------------------------------------------


def test_receive_timeout_returns_none(queue: Queue) -> None:
    t0 = time.monotonic()
    assert queue.receive(0.05) is None
    elapsed = time.monotonic() - t0
    assert 0.045 <= elapsed < 1.0
    t0 = time.monotonic()
    assert queue.receive(0.0) is None
    assert time.monotonic() - t0 < 0.5


def fill(queue: Queue) -> int:
    n = 0
    while queue.try_send(protocol.Staged(writer=n % 4096)):
        n += 1
        assert n <= 1000, "the queue never filled"
    return n


def test_send_to_a_full_queue_times_out(queue: Queue, reader: Queue) -> None:
    n = fill(queue)
    assert n == T.MAX_MESSAGES
    t0 = time.monotonic()
    with pytest.raises(QueueTimeout, match="stayed full") as info:
        queue.send(protocol.Staged(writer=0), timeout=0.05)
    assert 0.045 <= time.monotonic() - t0 < 1.0
    assert isinstance(info.value, TimeoutError)
    assert queue.name in str(info.value)
    assert not queue.try_send(protocol.Staged(writer=0))
    # a negative timeout is "do not wait", not an error from posix_ipc
    with pytest.raises(QueueTimeout):
        queue.send(protocol.Staged(writer=0), timeout=-1.0)
    # making room lets the next send through; order is kept
    assert reader.receive(0.0) == protocol.Staged(writer=0)
    queue.send(protocol.Staged(writer=999), timeout=0.05)
    got = reader.drain()
    assert got == [protocol.Staged(writer=i) for i in range(1, n)] + [protocol.Staged(writer=999)]


# -- malformed input ------------------------------------------------------------------------


GARBAGE = [
    b"",
    b"\xff",
    b"\x93\x01\x02",  # a msgpack array, but not a message
    b"not msgpack at all",
    protocol.encode(protocol.Staged(writer=1)) + b"\x00",  # trailing byte
]


def test_malformed_messages_are_skipped_and_counted(queue: Queue, reader: Queue) -> None:
    for data in GARBAGE:
        raw_send(queue.name, data)
    queue.send(protocol.Staged(writer=7), timeout=1.0)
    assert reader.receive(1.0) == protocol.Staged(writer=7)
    assert reader.rejected == len(GARBAGE)
    assert reader.receive(0.0) is None


def test_a_decoder_bug_does_not_kill_the_receiver(queue: Queue, reader: Queue,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever decode raises, receive drops those bytes and goes on to the next message
    (a 1000-deep message used to make decode raise RecursionError, out of receive)."""
    real = protocol.decode

    def buggy(data: bytes) -> Message:
        if data == b"\x91\x91\x00":
            raise RecursionError("maximum recursion depth exceeded")
        return real(data)

    monkeypatch.setattr(protocol, "decode", buggy)
    raw_send(queue.name, b"\x91\x91\x00")
    queue.send(protocol.Staged(writer=3), timeout=1.0)
    assert reader.receive(1.0) == protocol.Staged(writer=3)
    assert reader.rejected == 1


def test_a_deeply_nested_message_is_skipped(queue: Queue, reader: Queue) -> None:
    raw_send(queue.name, b"\x91" * 1000 + b"\x00")
    raw_send(queue.name, b"\x92" + b"\x91" * 1000 + b"\x00\x07")
    queue.send(protocol.Staged(writer=4), timeout=1.0)
    assert reader.receive(1.0) == protocol.Staged(writer=4)
    assert reader.rejected == 2


def test_only_garbage_then_timeout(queue: Queue, reader: Queue) -> None:
    raw_send(queue.name, b"\xc1")  # the one byte msgpack never uses
    t0 = time.monotonic()
    assert reader.receive(0.05) is None
    assert 0.045 <= time.monotonic() - t0 < 1.0
    assert reader.rejected == 1


def test_garbage_does_not_hide_a_waiting_message_from_a_poll(queue: Queue,
                                                            reader: Queue) -> None:
    """receive(0.0) and drain() return what is waiting behind a malformed message."""
    raw_send(queue.name, b"\xff")
    queue.send(protocol.Staged(writer=1), timeout=1.0)
    assert reader.receive(0.0) == protocol.Staged(writer=1)
    assert reader.rejected == 1
    raw_send(queue.name, b"\xff")
    raw_send(queue.name, b"\xfe")
    queue.send(protocol.Staged(writer=2), timeout=1.0)
    queue.send(protocol.Staged(writer=3), timeout=1.0)
    assert reader.drain() == [protocol.Staged(writer=2), protocol.Staged(writer=3)]
    assert reader.rejected == 3


# -- the memory a run's queues cost ---------------------------------------------------------


def run_queues(writers: int) -> list[tuple[str, int, int]]:
    """(role, depth, message size) of every queue of a one-device run with ``writers``,
    created the way ``Engine._create_queue`` creates them."""
    def big(kinds: tuple[type[Message], ...]) -> tuple[int, int]:
        return T.MAX_MESSAGES, T.queue_message_size(kinds)

    def small(kinds: tuple[type[Message], ...]) -> tuple[int, int]:
        return T.WRITER_QUEUE_MESSAGES, min(T.queue_message_size(kinds), T.WRITER_QUEUE_BYTES)

    queues = [("supervisor", *big(T.SUPERVISOR_RECEIVES)),
              ("backup", *big(T.BACKUP_RECEIVES)),
              # the engine's own guest I/O (DeviceHandle.write) has a reply queue too
              ("api-reply", *small(T.WRITER_REPLY_RECEIVES))]
    for _ in range(writers):
        queues.append(("writer-control", *small(T.WRITER_CONTROL_RECEIVES)))
        queues.append(("writer-reply", *small(T.WRITER_REPLY_RECEIVES)))
    return queues


def test_a_sixteen_writer_run_fits_the_default_queue_memory() -> None:
    queues = run_queues(16)
    assert len(queues) == 1 + 1 + 1 + 2 * 16
    charge = sum(depth * (size + SLOT_OVERHEAD) for _, depth, size in queues)
    assert charge < DEFAULT_QUEUE_BYTES, (
        f"a 16-writer run needs {charge} bytes of queues, more than the default "
        f"RLIMIT_MSGQUEUE of {DEFAULT_QUEUE_BYTES}")


def test_queue_shapes_within_the_unprivileged_limits() -> None:
    for role, depth, size in run_queues(1):
        assert 1 <= depth <= T.MAX_MESSAGES == 10, role
        assert 1 <= size <= protocol.MAX_MESSAGE_SIZE == 8192, role


def test_what_the_engine_creates_matches_the_arithmetic(names: RunNames) -> None:
    """The queues really get the depth and size run_queues() charges for."""
    with Queue.create(names.writer_control_queue("dev0", 0), T.WRITER_CONTROL_RECEIVES,
                      T.WRITER_QUEUE_MESSAGES, T.WRITER_QUEUE_BYTES) as q:
        mq = posix_ipc.MessageQueue(q.name)
        try:
            assert (mq.max_messages, mq.max_message_size) == (
                T.WRITER_QUEUE_MESSAGES, T.WRITER_QUEUE_BYTES)
        finally:
            mq.close()


# -- small queues: free text cut to fit -------------------------------------------------------


@pytest.fixture
def small_reply(names: RunNames) -> Iterator[Queue]:
    with Queue.create(names.writer_reply_queue("dev0", 0), T.WRITER_REPLY_RECEIVES,
                      T.WRITER_QUEUE_MESSAGES, T.WRITER_QUEUE_BYTES) as q:
        yield q


@pytest.mark.parametrize("text", ["x" * 4000, "é" * 1024, "€" * 1024, "😀" * 1024,
                                  "a" + "😀" * 1000])
def test_long_error_text_is_cut_to_fit_a_small_queue(small_reply: Queue, text: str) -> None:
    text = text[: MAX_TEXT_CHARS]
    msg = protocol.CopyDone(seq=5, cluster=7, count=1, ok=False, error=text)
    small_reply.send(msg, timeout=1.0)
    got = small_reply.receive(1.0)
    assert isinstance(got, protocol.CopyDone)
    assert (got.seq, got.cluster, got.count, got.ok) == (5, 7, 1, False)
    assert got.error.endswith("…")
    assert text.startswith(got.error[:-1])
    # the cut keeps as much as fits (give or take a character and a header byte)
    assert T.WRITER_QUEUE_BYTES - 8 <= len(protocol.encode(got)) <= T.WRITER_QUEUE_BYTES


def test_short_messages_are_not_touched_by_a_small_queue(small_reply: Queue) -> None:
    msg = protocol.CopyDone(seq=1, cluster=2, count=1, ok=False, error="disk full")
    small_reply.send(msg, timeout=1.0)
    assert small_reply.receive(1.0) == msg


@pytest.mark.parametrize("limit", [60, 100, 200, 512])
def test_fit_respects_the_limit(limit: int) -> None:
    msg = protocol.Shutdown(reason="ü" * MAX_TEXT_CHARS)
    data = T.fit(msg, limit)
    assert len(data) <= limit
    back = protocol.decode(data)
    assert isinstance(back, protocol.Shutdown)
    assert back.reason.endswith("…")


def test_fit_of_a_message_without_text_that_is_too_big() -> None:
    msg = protocol.CopyRequest(writer=1, seq=2**62, cluster=2**62, count=1)
    with pytest.raises(TransportError, match="does not fit"):
        T.fit(msg, 8)
