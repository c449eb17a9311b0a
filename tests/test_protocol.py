"""The message protocol: construction rules, wire form, limits, and golden bytes.

The strategies and limits here are written out again from the protocol's table on
purpose, rather than read from ``protocol.messages``, so that a change to a rule in the
code has to be made twice (here too) to pass.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any, assert_never

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    MAX_MESSAGE_SIZE,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Cancel,
    Complete,
    CopyDone,
    CopyRequest,
    Freeze,
    Frozen,
    JobCancelled,
    JobCompleted,
    JobError,
    JobFailed,
    JobProgress,
    JobStart,
    LocalProtocolError,
    Message,
    Pause,
    ProtocolError,
    Ready,
    RemoteProtocolError,
    Resume,
    SetSpeed,
    Shutdown,
    Staged,
    Thaw,
    WriterDone,
    decode,
    encode,
    max_encoded_size,
    short_error,
)

U63_MAX = 2**63 - 1
MAX_TEXT = 1024
ROOT = Path(__file__).resolve().parent.parent

# --- Strategies: valid instances of every message, from the table in the brief -------

u63 = st.integers(0, U63_MAX)
writers = st.integers(0, 4095)
pids = st.integers(1, 2**31 - 1)
jobs = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True).filter(str.isascii)
texts = st.text(max_size=MAX_TEXT)  # Hypothesis leaves out surrogates by default
tokens = st.from_regex(r"[0-9a-f]{0,64}", fullmatch=True)


@st.composite
def cluster_ranges(draw: st.DrawFn) -> tuple[int, int]:
    count = draw(st.integers(1, 2**31))
    cluster = draw(st.integers(0, 2**63 - count))
    return cluster, count


@st.composite
def outcomes(draw: st.DrawFn) -> tuple[bool, str]:
    ok = draw(st.booleans())
    return ok, "" if ok else draw(texts)


def _copy_request(writer: int, seq: int, rng: tuple[int, int], job: int) -> CopyRequest:
    return CopyRequest(writer, seq, *rng, job)


def _copy_done(seq: int, rng: tuple[int, int], outcome: tuple[bool, str],
               target_error: bool) -> CopyDone:
    return CopyDone(seq, *rng, *outcome, target_error=target_error and not outcome[0])


def _writer_done(writer: int, outcome: tuple[bool, str]) -> WriterDone:
    return WriterDone(writer, *outcome)


STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    Freeze: st.builds(Freeze, u63, tokens),
    Frozen: st.builds(Frozen, u63, writers, tokens),
    Thaw: st.builds(Thaw, u63, tokens),
    CopyRequest: st.builds(_copy_request, writers, u63, cluster_ranges(), u63),
    CopyDone: st.builds(_copy_done, u63, cluster_ranges(), outcomes(), st.booleans()),
    Staged: st.builds(Staged, writers),
    Ready: st.builds(Ready, st.sampled_from(["writer", "backup"]), u63, pids),
    JobStart: st.builds(
        JobStart, jobs, st.sampled_from(["full", "top", "none", "incremental"]), u63, tokens
    ),
    JobProgress: st.builds(JobProgress, jobs, u63, u63, tokens),
    JobCompleted: st.builds(JobCompleted, jobs, u63, u63, u63, tokens),
    JobFailed: st.builds(JobFailed, jobs, texts, tokens),
    JobCancelled: st.builds(JobCancelled, jobs, tokens),
    Pause: st.builds(Pause, jobs, tokens),
    Resume: st.builds(Resume, jobs, tokens),
    Cancel: st.builds(Cancel, jobs, tokens),
    SetSpeed: st.builds(SetSpeed, jobs, u63, tokens),
    Complete: st.builds(Complete, jobs, tokens),
    Shutdown: st.builds(Shutdown, texts, tokens),
    WriterDone: st.builds(_writer_done, writers, outcomes()),
    JobError: st.builds(JobError, jobs, st.sampled_from(["read", "write"]),
                        st.sampled_from(["stop", "ignore"]), st.integers(1, 4095), texts,
                        tokens),
}
messages: st.SearchStrategy[Message] = st.one_of(*STRATEGIES.values())

# Every field at the value with the longest encoding: the biggest valid instances.
LONGEST_JOB = "J" * 64
LONGEST_TOKEN = "f" * 64
LONGEST_TEXT = "\U0010ffff" * MAX_TEXT  # 4 UTF-8 bytes a character
BIG_COUNT = 2**31
BIG_CLUSTER = 2**63 - BIG_COUNT  # still 9 bytes on the wire, and cluster + count fits
MAXIMAL: list[Message] = [
    Freeze(U63_MAX, LONGEST_TOKEN),
    Frozen(U63_MAX, 4095, LONGEST_TOKEN),
    Thaw(U63_MAX, LONGEST_TOKEN),
    CopyRequest(4095, U63_MAX, BIG_CLUSTER, BIG_COUNT, U63_MAX),
    CopyDone(U63_MAX, BIG_CLUSTER, BIG_COUNT, False, LONGEST_TEXT, True),
    Staged(4095),
    Ready("backup", U63_MAX, 2**31 - 1),
    JobStart(LONGEST_JOB, "incremental", U63_MAX, LONGEST_TOKEN),
    JobProgress(LONGEST_JOB, U63_MAX, U63_MAX, LONGEST_TOKEN),
    JobCompleted(LONGEST_JOB, U63_MAX, U63_MAX, U63_MAX, LONGEST_TOKEN),
    JobFailed(LONGEST_JOB, LONGEST_TEXT, LONGEST_TOKEN),
    JobCancelled(LONGEST_JOB, LONGEST_TOKEN),
    Pause(LONGEST_JOB, LONGEST_TOKEN),
    Resume(LONGEST_JOB, LONGEST_TOKEN),
    Cancel(LONGEST_JOB, LONGEST_TOKEN),
    SetSpeed(LONGEST_JOB, U63_MAX, LONGEST_TOKEN),
    Complete(LONGEST_JOB, LONGEST_TOKEN),
    Shutdown(LONGEST_TEXT, LONGEST_TOKEN),
    WriterDone(4095, False, LONGEST_TEXT),
    JobError(LONGEST_JOB, "write", "ignore", 4095, LONGEST_TEXT, LONGEST_TOKEN),
]


def wire(*items: Any) -> bytes:
    """Hand-made wire bytes, to say what a misbehaving peer could send."""
    return msgpack.packb(list(items), use_bin_type=True)


# --- The table -----------------------------------------------------------------------


def test_type_codes_are_the_table() -> None:
    expected = {
        1: "Freeze", 2: "Frozen", 3: "Thaw", 4: "CopyRequest", 5: "CopyDone", 6: "Staged",
        7: "Ready", 8: "JobStart", 9: "JobProgress", 10: "JobCompleted", 11: "JobFailed",
        12: "JobCancelled", 13: "Pause", 14: "Resume", 15: "Cancel", 16: "SetSpeed",
        17: "Complete", 18: "Shutdown", 19: "WriterDone", 20: "JobError",
    }  # fmt: skip
    assert {code: cls.__name__ for code, cls in MESSAGE_TYPES.items()} == expected
    assert all(cls.code == code for code, cls in MESSAGE_TYPES.items())
    assert set(STRATEGIES) == set(MESSAGE_TYPES.values())
    assert {type(m) for m in MAXIMAL} == set(MESSAGE_TYPES.values())


def test_field_names_and_order() -> None:
    def names(cls: type[Any]) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    assert names(CopyRequest) == ("writer", "seq", "cluster", "count", "job")
    assert names(CopyDone) == ("seq", "cluster", "count", "ok", "error", "target_error")
    assert names(Ready) == ("role", "ident", "pid")
    assert names(JobStart) == ("job", "sync", "speed", "token")
    assert names(Cancel) == ("job", "token")
    assert names(JobCompleted) == ("job", "bytes_written", "clusters_copied", "cbw_clusters",
                                   "token")
    assert names(JobFailed) == ("job", "error", "token")
    assert names(WriterDone) == ("writer", "ok", "error")
    assert names(JobError) == ("job", "operation", "action", "errno", "error", "token")


def test_errors_are_a_tree_of_value_errors() -> None:
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(LocalProtocolError, ValueError)
    assert issubclass(RemoteProtocolError, ValueError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)


def test_public_names() -> None:
    assert sorted(protocol.__all__) == sorted(set(protocol.__all__))
    for name in protocol.__all__:
        assert hasattr(protocol, name), name
    assert PROTOCOL_VERSION == 1
    assert MAX_MESSAGE_SIZE == 8192


def test_messages_are_frozen_and_slotted() -> None:
    msg = Freeze(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.epoch = 2  # type: ignore[misc]
    assert not hasattr(msg, "__dict__")
    assert hash(msg) == hash(Freeze(1))
    # replace() goes through the constructor, so it validates too.
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(msg, epoch=-1)


def describe(msg: Message) -> str:
    """Not a test: mypy --strict checks that this match covers every message."""
    match msg:
        case Freeze() | Thaw():
            return f"epoch {msg.epoch}"
        case Frozen() | Staged() | WriterDone():
            return f"writer {msg.writer}"
        case CopyRequest() | CopyDone():
            return f"clusters {msg.cluster}+{msg.count}"
        case Ready():
            return msg.role
        case JobStart() | JobProgress() | JobCompleted() | JobFailed() | JobCancelled() \
                | JobError():
            return msg.job
        case Pause() | Resume() | Cancel() | SetSpeed() | Complete():
            return msg.job
        case Shutdown():
            return msg.reason
        case _:
            assert_never(msg)


# --- Round trips and golden bytes ----------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(messages)
def test_round_trip(msg: Message) -> None:
    data = encode(msg)
    assert type(data) is bytes
    assert encode(msg) == data  # deterministic
    assert len(data) <= max_encoded_size(type(msg)) <= MAX_MESSAGE_SIZE
    back = decode(data)
    assert back == msg
    assert type(back) is type(msg)
    assert decode(bytearray(data)) == msg
    assert decode(memoryview(data)) == msg
    assert isinstance(describe(back), str)


@pytest.mark.parametrize("msg", MAXIMAL, ids=lambda m: type(m).__name__)
def test_max_encoded_size_bounds_the_largest_instance(msg: Message) -> None:
    data = encode(msg)
    # The bound is honest (never below a real encoding) and, here, tight.
    assert len(data) == max_encoded_size(type(msg))
    assert decode(data) == msg


def test_max_encoded_size_fits_a_queue_message() -> None:
    for cls in MESSAGE_TYPES.values():
        assert max_encoded_size(cls) <= MAX_MESSAGE_SIZE
    with pytest.raises(LocalProtocolError):
        max_encoded_size(int)  # type: ignore[arg-type]


GOLDEN: list[tuple[Message, str]] = [
    (Freeze(0), "94010100a0"),
    (CopyRequest(3, 123456, 1000, 1, 9), "97010403ce0001e240cd03e80109"),
    (
        CopyDone(7, 2**32, 2**31, False, "EIO", True),
        "98010507cf0000000100000000ce80000000c2a345494fc3",
    ),
    (Ready("backup", 0, 4242), "950107a66261636b757000cd1092"),
    (JobStart("job-1", "full", 0), "960108a56a6f622d31a466756c6c00a0"),
    (JobProgress("b.1", U63_MAX, 300), "960109a3622e31cf7fffffffffffffffcd012ca0"),
    (JobCancelled("j", "0a"), "94010ca16aa23061"),
    (WriterDone(1, True, ""), "95011301c3a0"),
    (JobError("j", "write", "stop", 28, "No space", ""),
     "980114a16aa57772697465a473746f701ca84e6f207370616365a0"),
    (Shutdown("bye"), "940112a3627965a0"),
]


@pytest.mark.parametrize(("msg", "hex_bytes"), GOLDEN, ids=lambda x: type(x).__name__)
def test_golden_bytes(msg: Message, hex_bytes: str) -> None:
    assert encode(msg).hex() == hex_bytes
    assert decode(bytes.fromhex(hex_bytes)) == msg


# --- Construction: LocalProtocolError ------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: Freeze(-1),
        lambda: Freeze(2**63),
        lambda: Freeze(True),
        lambda: Freeze(1.0),  # type: ignore[arg-type]
        lambda: Freeze("1"),  # type: ignore[arg-type]
        lambda: Frozen(0, 4096),
        lambda: Frozen(0, -1),
        lambda: CopyRequest(0, 0, 0, 0),
        lambda: CopyRequest(0, 0, 0, 2**31 + 1),
        lambda: CopyRequest(0, 0, U63_MAX, 2),  # the range would pass 2**63
        lambda: CopyDone(0, 0, 1, 1, ""),  # type: ignore[arg-type]
        lambda: CopyDone(0, 0, 1, True, "an error but ok"),
        lambda: CopyDone(0, 0, 1, True, "", True),  # a target error is not ok
        lambda: CopyRequest(0, 0, 0, 1, -1),
        lambda: Ready("guest", 0, 1),
        lambda: JobCancelled("j", "F" * 32),  # tokens are lowercase hex
        lambda: JobCancelled("j", "0" * 65),
        lambda: JobFailed("j", "e", "not hex"),
        lambda: Ready("writer", 0, 0),
        lambda: Ready("writer", 0, 2**31),
        lambda: JobStart("j", "differential", 0),
        lambda: JobStart("", "full", 0),
        lambda: JobStart("J" * 65, "full", 0),
        lambda: JobStart("a b", "full", 0),
        lambda: JobStart("job\n", "full", 0),
        lambda: JobStart("jöb", "full", 0),
        lambda: JobStart("j/b", "full", 0),
        lambda: JobStart(b"job", "full", 0),  # type: ignore[arg-type]
        lambda: JobFailed("j", "x" * (MAX_TEXT + 1)),
        lambda: JobFailed("j", "bad \udcff file name"),  # a lone surrogate
        lambda: Shutdown(None),  # type: ignore[arg-type]
        lambda: WriterDone(0, 0, ""),  # type: ignore[arg-type]
        lambda: WriterDone(0, True, "oops"),
    ],
)
def test_invalid_fields_raise_local_error(build: Any) -> None:
    with pytest.raises(LocalProtocolError):
        build()


def test_local_error_names_field_and_value() -> None:
    with pytest.raises(LocalProtocolError, match=r"Frozen\.writer.*4096"):
        Frozen(0, 4096)


def test_limits_are_inclusive() -> None:
    assert Freeze(U63_MAX).epoch == U63_MAX
    assert Frozen(0, 4095).writer == 4095
    assert CopyRequest(0, 0, U63_MAX, 1).cluster == U63_MAX
    assert CopyRequest(0, 0, 0, 2**31).count == 2**31
    assert Ready("writer", 0, 1).pid == 1
    assert Ready("writer", 0, 2**31 - 1).pid == 2**31 - 1
    assert JobStart("J" * 64, "none", 0).job == "J" * 64
    assert JobFailed("j", "x" * MAX_TEXT).error == "x" * MAX_TEXT
    assert JobFailed("j", LONGEST_TEXT).error == LONGEST_TEXT
    assert JobProgress("j", 10, 5).done == 10  # done may pass total
    assert CopyDone(0, 0, 1, False, "").error == ""  # a failure without a reason is allowed


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(LocalProtocolError):
        encode("Freeze(1)")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        encode([1, 1, 0])  # type: ignore[arg-type]


def test_encode_refuses_a_tampered_message() -> None:
    msg = Shutdown("ok")
    object.__setattr__(msg, "reason", "\udcff")  # bypasses the constructor's checks
    with pytest.raises(LocalProtocolError):
        encode(msg)
    assert encode(Shutdown("still works")) == wire(1, 18, "still works", "")


# --- short_error ---------------------------------------------------------------------


def test_short_error_collapses_whitespace() -> None:
    assert short_error("  disk\tfull\n\n  on /dev/shm \r\n") == "disk full on /dev/shm"
    assert short_error("") == ""


def test_short_error_truncates_at_the_limit() -> None:
    assert short_error("x" * MAX_TEXT) == "x" * MAX_TEXT
    cut = short_error("x" * (MAX_TEXT + 1))
    assert len(cut) == MAX_TEXT
    assert cut.endswith("…")
    assert cut[:-1] == "x" * (MAX_TEXT - 1)


def test_short_error_escapes_surrogates() -> None:
    assert short_error("no such file: \udcff") == "no such file: \\udcff"


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(exclude_categories=()), max_size=3000))
def test_short_error_always_gives_valid_text(text: str) -> None:
    reason = short_error(text)
    assert "\n" not in reason
    assert reason == short_error(reason)  # idempotent
    msg = JobFailed("job", reason)
    assert decode(encode(msg)) == msg


# --- Decoding garbage: RemoteProtocolError --------------------------------------------


def test_size_limit_is_checked_first() -> None:
    with pytest.raises(RemoteProtocolError, match="8193 bytes"):
        decode(b"\x00" * (MAX_MESSAGE_SIZE + 1))
    # Exactly the limit passes the size check (and then fails as trailing bytes).
    with pytest.raises(RemoteProtocolError) as excinfo:
        decode(b"\x00" * MAX_MESSAGE_SIZE)
    assert "bytes is over" not in str(excinfo.value)
    # A memoryview's size is its bytes, not its items.
    view = memoryview(bytearray(MAX_MESSAGE_SIZE + 4)).cast("I")
    assert len(view) < MAX_MESSAGE_SIZE
    with pytest.raises(RemoteProtocolError, match="over 8192"):
        decode(view)


def test_biggest_valid_message_is_far_below_the_limit() -> None:
    assert max(len(encode(m)) for m in MAXIMAL) < MAX_MESSAGE_SIZE


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x93\x01\x01", id="truncated"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(wire(1, 1, 0, "") + b"\x00", id="trailing-byte"),
        pytest.param(wire(1, 1, 0, "") * 2, id="two-messages"),
        pytest.param(msgpack.packb({}), id="empty-map"),
        pytest.param(msgpack.packb({1: 1, 2: 0}), id="map"),
        pytest.param(msgpack.packb(msgpack.ExtType(1, b"x")), id="ext"),
        pytest.param(msgpack.packb(msgpack.ExtType(1, b"")), id="empty-ext"),
        pytest.param(wire(1, 1, msgpack.ExtType(1, b""), ""), id="ext-field"),
        pytest.param(msgpack.packb(1), id="int"),
        pytest.param(wire(), id="empty-array"),
        pytest.param(wire(1), id="version-only"),
        pytest.param(wire(2, 1, 0), id="version-2"),
        pytest.param(wire(0, 1, 0), id="version-0"),
        pytest.param(wire(True, 1, 0), id="version-true"),
        pytest.param(wire("1", 1, 0), id="version-str"),
        pytest.param(wire(1, 0, 0), id="code-0"),
        pytest.param(wire(1, 20, 0), id="code-20"),
        pytest.param(wire(1, -1, 0), id="code-negative"),
        pytest.param(wire(1, True, 0), id="code-true"),  # True == 1 == Freeze's code
        pytest.param(wire(1, 1.0, 0), id="code-float"),
        pytest.param(wire(1, 1), id="too-few-fields"),
        pytest.param(wire(1, 1, 0, "", ""), id="too-many-fields"),
        pytest.param(wire(1, 1, 2**63, ""), id="int-2**63"),
        pytest.param(wire(1, 1, 2**64 - 1, ""), id="int-2**64-1"),
        pytest.param(wire(1, 1, -1, ""), id="int-negative"),
        pytest.param(wire(1, 1, True, ""), id="bool-for-int"),
        pytest.param(wire(1, 1, 1.0, ""), id="float-for-int"),
        pytest.param(wire(1, 1, None, ""), id="nil-for-int"),
        pytest.param(wire(1, 1, [0], ""), id="array-for-int"),
        pytest.param(wire(1, 19, 0, 1, ""), id="int-for-bool"),
        pytest.param(wire(1, 19, 0, True, "ok but an error"), id="ok-with-error"),
        pytest.param(wire(1, 2, 0, 4096), id="writer-4096"),
        pytest.param(wire(1, 4, 0, 0, 0, 0), id="count-0"),
        pytest.param(wire(1, 4, 0, 0, U63_MAX, 2), id="range-past-2**63"),
        pytest.param(wire(1, 7, "guest", 0, 1), id="bad-role"),
        pytest.param(wire(1, 7, "writer", 0, 0), id="pid-0"),
        pytest.param(wire(1, 12, "", ""), id="empty-job"),
        pytest.param(wire(1, 12, "J" * 65, ""), id="job-65"),
        pytest.param(wire(1, 12, "a b", ""), id="job-space"),
        pytest.param(wire(1, 12, b"job", ""), id="bin-for-str"),
        pytest.param(wire(1, 18, "x" * (MAX_TEXT + 1), ""), id="text-1025"),
        pytest.param(wire(1, 18, "x" * 4097, ""), id="str-over-max-str-len"),
        pytest.param(b"\x93\x01\x12\xa1\xff", id="invalid-utf8"),
        pytest.param(b"\x93\x01\x12\xda\xff\xff", id="huge-declared-str"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="huge-declared-array"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="huge-declared-map"),
        pytest.param(b"\xc6\xff\xff\xff\xff", id="huge-declared-bin"),
        pytest.param(b"\x91" * 8000, id="deep-nesting"),
        pytest.param(wire(1, 1, [[[[[0]]]]], ""), id="nested-field"),
    ],
)
def test_garbage_raises_remote_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(data)


def test_limits_on_the_wire_are_inclusive() -> None:
    assert decode(wire(1, 1, U63_MAX, "")) == Freeze(U63_MAX)
    assert decode(wire(1, 18, "x" * MAX_TEXT, "")) == Shutdown("x" * MAX_TEXT)
    assert decode(wire(1, 18, LONGEST_TEXT, "")) == Shutdown(LONGEST_TEXT)
    assert decode(wire(1, 12, "J" * 64, "")) == JobCancelled("J" * 64)
    assert decode(wire(1, 12, "J", "f" * 64)) == JobCancelled("J", "f" * 64)


def test_non_canonical_int_encoding_is_accepted() -> None:
    # uint 64 holding 5: valid msgpack, so the value counts, not the form.
    assert decode(bytes.fromhex("940101cf0000000000000005a0")) == Freeze(5)


def test_remote_error_keeps_its_cause() -> None:
    with pytest.raises(RemoteProtocolError) as excinfo:
        decode(wire(1, 1, 0, "") + b"\x00")
    assert isinstance(excinfo.value.__cause__, msgpack.ExtraData)
    with pytest.raises(RemoteProtocolError) as excinfo:
        decode(wire(1, 1, -1, ""))
    assert isinstance(excinfo.value.__cause__, LocalProtocolError)


def test_decode_of_a_non_buffer_is_still_a_remote_error() -> None:
    with pytest.raises(RemoteProtocolError):
        decode("93010100")  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError):
        decode(None)  # type: ignore[arg-type]


# --- Dependencies --------------------------------------------------------------------

_IMPORT_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
before = set(sys.modules)
import protocol
new = {name.partition(".")[0] for name in set(sys.modules) - before}
assert "numpy" not in sys.modules, "numpy"
assert "posix_ipc" not in sys.modules, "posix_ipc"
# msgpack's compiled extension registers Cython's runtime modules.
cython = {name for name in new if name.startswith("_cython_") or name == "cython_runtime"}
foreign = new - set(sys.stdlib_module_names) - {"msgpack", "protocol"} - cython
assert not foreign, sorted(foreign)
"""


def test_protocol_imports_only_msgpack_and_the_standard_library() -> None:
    # -I: no user site, no PYTHON* variables, no current directory on sys.path.
    result = subprocess.run(
        [sys.executable, "-I", "-c", _IMPORT_CHECK, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_encode_from_many_threads() -> None:
    # encode keeps one Packer per thread; threads must never see each other's bytes.
    from concurrent.futures import ThreadPoolExecutor

    def work(writer: int) -> bool:
        msgs = [CopyRequest(writer, seq, seq * 7, 1 + seq % 5) for seq in range(2000)]
        return all(decode(encode(m)) == m for m in msgs)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(work, range(8)))
