"""The messages that shmblock's processes send each other, one frozen dataclass apiece.

Theory of operation
===================

Three kinds of process talk over POSIX message queues: the *supervisor*, one *writer*
per simulated guest, and one *backup worker*. Every message is one instance of a class
below; each class validates its fields when it is built, so a message that exists is a
message that may be sent (and one decoded from the wire has passed the same checks).

=====  ==================  =====================  =========================================
code   message             from → to              meaning
=====  ==================  =====================  =========================================
 1     ``Freeze``          supervisor → writer    stop writing after the write in flight,
                                                  answer ``Frozen``, wait for ``Thaw``
 2     ``Frozen``          writer → supervisor    no write in flight; waiting
 3     ``Thaw``            supervisor → writer    resume writing
 4     ``CopyRequest``     writer → worker        save clusters [cluster, cluster+count) to
                                                  the target before I overwrite them
 5     ``CopyDone``        worker → writer        answer to ``CopyRequest`` ``seq``
 6     ``Staged``          writer → worker        doorbell: I put old contents in my
                                                  staging slots, drain them
 7     ``Ready``           any → supervisor       process started and attached
 8     ``JobStart``        supervisor → worker    maps are initialised, start copying
 9     ``JobProgress``     worker → supervisor    bytes done / bytes to do
10     ``JobCompleted``    worker → supervisor    target committed
11     ``JobFailed``       worker → supervisor    the job failed (one-line reason)
12     ``JobCancelled``    worker → supervisor    the job stopped on request
13     ``Pause``           supervisor → worker    stop background copying (copy-before-
                                                  write is still served)
14     ``Resume``          supervisor → worker    resume background copying
15     ``Cancel``          supervisor → worker    stop the job; answer ``JobCancelled``
16     ``SetSpeed``        supervisor → worker    change the rate limit
17     ``Complete``        supervisor → worker    sync=none: finish the job successfully now
18     ``Shutdown``        supervisor → any       exit cleanly
19     ``WriterDone``      writer → supervisor    the writer's workload ended
=====  ==================  =====================  =========================================

A snapshot is taken by sending ``Freeze(epoch)`` to every writer and waiting for all the
``Frozen(epoch, writer)`` answers; the supervisor then initialises the maps, sends
``JobStart`` to the worker and ``Thaw(epoch)`` to the writers. From then on a writer about
to overwrite a cluster the job still needs sends ``CopyRequest`` (or stages the old data
itself and rings ``Staged``) and the worker answers ``CopyDone`` with the same ``seq``.
The job ends with exactly one of ``JobCompleted``, ``JobFailed`` or ``JobCancelled``.
Every ``Job*`` message from the worker, and every ``Frozen`` from a writer, carries the
sender's ``token``, a secret only the supervisor and that process know: any process of
the user can write to the supervisor's queue, but only the worker can report the job's
progress or end it, and only the writer can say it is frozen. The job's control
messages (``JobStart``, ``Pause``, ``Resume``, ``Cancel``, ``SetSpeed``, ``Complete``)
carry the job's token the other way, and ``Freeze``, ``Thaw`` and ``Shutdown`` the
writer's: only the supervisor can steer a job or a writer (a forged ``Thaw`` would let
a writer write in the middle of a snapshot).

Field rules
===========

Each field's type is an ``Annotated`` alias whose metadata is its rule (for example
``WriterIndex = Annotated[int, IntRange(0, 4095)]``); the rules are read once, when the
module is imported, into each class's ``_spec``, which both the constructor and the
codec use. Ints must be exactly ``int`` (``True`` is not a count), bools exactly
``bool``, strings exactly ``str``. Free text (``error``, ``reason``) is at most
:data:`MAX_TEXT_CHARS` characters and must be encodable as UTF-8; use
:func:`short_error` to turn arbitrary exception text into a valid value. Two rules
span fields: ``cluster + count`` may not pass 2**63, and ``ok=True`` goes with
``error=""`` and ``target_error=False``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Annotated, ClassVar, Final, TypeAlias, TypeVar, get_args, get_type_hints

from .errors import LocalProtocolError

__all__ = [
    "MAX_TEXT_CHARS",
    "Cancel",
    "Complete",
    "CopyDone",
    "CopyRequest",
    "Freeze",
    "Frozen",
    "JobCancelled",
    "JobCompleted",
    "JobFailed",
    "JobProgress",
    "JobStart",
    "Message",
    "Pause",
    "Ready",
    "Resume",
    "SetSpeed",
    "Shutdown",
    "Staged",
    "Thaw",
    "WriterDone",
    "short_error",
]

#: Longest ``error`` / ``reason`` text, in characters (up to 4 UTF-8 bytes each).
MAX_TEXT_CHARS: Final = 1024

_U63_MAX: Final = 2**63 - 1


# --- Field rules ---------------------------------------------------------------------


class Rule:
    """What one field accepts. ``check`` is on the hot path of decode: keep it cheap."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what  # for error messages: "an int in [0, 4095]"

    def check(self, value: object) -> bool:
        raise NotImplementedError


class IntRange(Rule):
    """An ``int`` (not a ``bool``) in ``[lo, hi]``."""

    __slots__ = ("hi", "lo")

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__(f"an int in [{lo}, {hi}]")
        self.lo = lo
        self.hi = hi

    def check(self, value: object) -> bool:
        return type(value) is int and self.lo <= value <= self.hi


class Flag(Rule):
    """A ``bool`` (not an int)."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__("a bool")

    def check(self, value: object) -> bool:
        return type(value) is bool


class StrRule(Rule):
    """Base of the string rules; ``max_utf8_bytes`` bounds the encoded length."""

    __slots__ = ("max_utf8_bytes",)

    def __init__(self, what: str, max_utf8_bytes: int) -> None:
        super().__init__(what)
        self.max_utf8_bytes = max_utf8_bytes


class Text(StrRule):
    """Free text: a ``str`` of at most ``max_chars`` characters that UTF-8 can encode.

    Lone surrogates (which ``os.fsdecode`` produces for undecodable file names) cannot be
    encoded, so they are refused here rather than failing later inside ``encode``.
    """

    __slots__ = ("max_chars",)

    def __init__(self, max_chars: int) -> None:
        super().__init__(f"a str of at most {max_chars} characters, UTF-8 encodable", 4 * max_chars)
        self.max_chars = max_chars

    def check(self, value: object) -> bool:
        if type(value) is not str or len(value) > self.max_chars:
            return False
        if value.isascii():
            return True
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True


class Token(StrRule):
    """An ASCII identifier: a ``str`` matching ``pattern`` in full."""

    __slots__ = ("_fullmatch",)

    def __init__(self, pattern: str, max_chars: int, what: str) -> None:
        super().__init__(what, max_chars)  # ASCII only, so one byte per character
        self._fullmatch = re.compile(pattern, re.ASCII).fullmatch

    def check(self, value: object) -> bool:
        return type(value) is str and self._fullmatch(value) is not None


class OneOf(StrRule):
    """One of a fixed set of ASCII strings."""

    __slots__ = ("choices",)

    def __init__(self, *choices: str) -> None:
        super().__init__(f"one of {sorted(choices)}", max(len(c) for c in choices))
        self.choices = frozenset(choices)

    def check(self, value: object) -> bool:
        return type(value) is str and value in self.choices


U63 = Annotated[int, IntRange(0, _U63_MAX)]
WriterIndex = Annotated[int, IntRange(0, 4095)]
Pid = Annotated[int, IntRange(1, 2**31 - 1)]
ClusterCount = Annotated[int, IntRange(1, 2**31)]
Bool = Annotated[bool, Flag()]
JobId = Annotated[str, Token(r"[A-Za-z0-9_.-]{1,64}", 64, "1..64 characters of [A-Za-z0-9_.-]")]
ErrorText = Annotated[str, Text(MAX_TEXT_CHARS)]
#: A worker's secret: the supervisor hands it to each worker at spawn (through a pipe,
#: never argv or the environment) and accepts a job's outcome, or a writer's Frozen,
#: only with it.
JobToken = Annotated[str, Token(r"[0-9a-f]{0,64}", 64, "0..64 lowercase hex digits")]
Role = Annotated[str, OneOf("writer", "backup")]
SyncMode = Annotated[str, OneOf("full", "top", "none", "incremental")]


def short_error(text: str) -> str:
    """Make arbitrary text (an exception's ``str``) a valid ``error`` / ``reason`` value.

    Characters UTF-8 cannot encode become backslash escapes, runs of whitespace
    (newlines included) become one space, and text longer than :data:`MAX_TEXT_CHARS`
    is cut to fit, ending in "…".
    """
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    line = " ".join(text.split())
    if len(line) > MAX_TEXT_CHARS:
        line = line[: MAX_TEXT_CHARS - 1] + "…"
    return line


# --- The messages --------------------------------------------------------------------


class _MessageBase:
    """What every message shares: its type code, its field rules, and validation."""

    __slots__ = ()

    code: ClassVar[int]
    #: (field name, rule) in field order, i.e. wire order; filled in by ``_message``.
    _spec: ClassVar[tuple[tuple[str, Rule], ...]]

    def __post_init__(self) -> None:
        for name, rule in self._spec:
            value = getattr(self, name)
            if not rule.check(value):
                raise LocalProtocolError(
                    f"{type(self).__name__}.{name} must be {rule.what}, got {value!r:.80}"
                )
        self._check_across_fields()

    def _check_across_fields(self) -> None:
        """Rules that involve more than one field; raise LocalProtocolError."""


_M = TypeVar("_M", bound=_MessageBase)


def _message(cls: type[_M]) -> type[_M]:
    """Read the field rules out of the ``Annotated`` hints of a message dataclass."""
    hints = get_type_hints(cls, include_extras=True)
    spec: list[tuple[str, Rule]] = []
    for field in fields(cls):  # type: ignore[arg-type]  # cls is a dataclass by now
        rules = [meta for meta in get_args(hints[field.name])[1:] if isinstance(meta, Rule)]
        if len(rules) != 1:
            raise TypeError(f"{cls.__name__}.{field.name} needs exactly one Rule")
        spec.append((field.name, rules[0]))
    cls._spec = tuple(spec)
    return cls


def _check_cluster_range(msg: CopyRequest | CopyDone) -> None:
    # cluster and count are each in range; their sum (the end of the half-open range)
    # must also be, so that cluster + count - 1 is still a valid cluster number.
    if msg.cluster + msg.count > _U63_MAX + 1:
        raise LocalProtocolError(
            f"{type(msg).__name__}: cluster {msg.cluster} + count {msg.count} passes 2**63"
        )


def _check_ok_means_no_error(msg: CopyDone | WriterDone) -> None:
    if msg.ok and msg.error:
        raise LocalProtocolError(
            f"{type(msg).__name__}: ok=True needs error='', got {msg.error!r:.80}"
        )


@_message
@dataclass(frozen=True, slots=True)
class Freeze(_MessageBase):
    """supervisor → writer: stop writing after the write in flight, answer ``Frozen``."""

    code: ClassVar[int] = 1
    epoch: U63
    token: JobToken = ""


@_message
@dataclass(frozen=True, slots=True)
class Frozen(_MessageBase):
    """writer → supervisor: no write in flight; waiting for ``Thaw``."""

    code: ClassVar[int] = 2
    epoch: U63
    writer: WriterIndex
    token: JobToken = ""


@_message
@dataclass(frozen=True, slots=True)
class Thaw(_MessageBase):
    """supervisor → writer: resume writing."""

    code: ClassVar[int] = 3
    epoch: U63
    token: JobToken = ""


@_message
@dataclass(frozen=True, slots=True)
class CopyRequest(_MessageBase):
    """writer → worker: save clusters [cluster, cluster+count) before I overwrite them.

    ``job`` is the device's job number (``CTL_JOB_SEQ``) when the writer asked: a request
    left in the queue by an earlier job is recognised and answered without copying. 0
    (the default) never names a job.
    """

    code: ClassVar[int] = 4
    writer: WriterIndex
    seq: U63
    cluster: U63
    count: ClusterCount
    job: U63 = 0

    def _check_across_fields(self) -> None:
        _check_cluster_range(self)


@_message
@dataclass(frozen=True, slots=True)
class CopyDone(_MessageBase):
    """worker → writer: the answer to ``CopyRequest`` number ``seq``.

    ``ok``: the clusters' snapshot contents are safe (or no job needs them any more), the
    write may go ahead. ``target_error`` (only with ``ok=False``): saving failed because
    the target failed, so the writer counts the refused write as a target error.
    """

    code: ClassVar[int] = 5
    seq: U63
    cluster: U63
    count: ClusterCount
    ok: Bool
    error: ErrorText
    target_error: Bool = False

    def _check_across_fields(self) -> None:
        _check_cluster_range(self)
        _check_ok_means_no_error(self)
        if self.ok and self.target_error:
            raise LocalProtocolError("CopyDone: ok=True cannot carry target_error=True")


@_message
@dataclass(frozen=True, slots=True)
class Staged(_MessageBase):
    """writer → worker: doorbell; my staging slots hold old contents, drain them."""

    code: ClassVar[int] = 6
    writer: WriterIndex


@_message
@dataclass(frozen=True, slots=True)
class Ready(_MessageBase):
    """any worker → supervisor: process started and attached."""

    code: ClassVar[int] = 7
    role: Role
    ident: U63
    pid: Pid


@_message
@dataclass(frozen=True, slots=True)
class JobStart(_MessageBase):
    """supervisor → worker: maps are initialised, start copying.

    ``speed`` is in bytes per second, 0 for unlimited.
    """

    code: ClassVar[int] = 8
    job: JobId
    sync: SyncMode
    speed: U63
    token: JobToken = ""


@_message
@dataclass(frozen=True, slots=True)
class JobProgress(_MessageBase):
    """worker → supervisor: bytes done and bytes to do.

    ``done`` may pass ``total``, and ``total`` may grow (sync=none), so neither is
    checked against the other.
    """

    code: ClassVar[int] = 9
    job: JobId
    done: U63
    total: U63
    token: JobToken = ""


@_message
@dataclass(frozen=True, slots=True)
class JobCompleted(_MessageBase):
    """worker → supervisor: the target is committed."""

    code: ClassVar[int] = 10
    job: JobId
    bytes_written: U63
    clusters_copied: U63
    cbw_clusters: U63
    token: JobToken = ""


@_message
@dataclass(frozen=True, slots=True)
class JobFailed(_MessageBase):
    """worker → supervisor: the job failed; ``error`` is a one-line human reason."""

    code: ClassVar[int] = 11
    job: JobId
    error: ErrorText
    token: JobToken = ""


@_message
@dataclass(frozen=True, slots=True)
class JobCancelled(_MessageBase):
    """worker → supervisor: the job stopped on request."""

    code: ClassVar[int] = 12
    job: JobId
    token: JobToken = ""


@_message
@dataclass(frozen=True, slots=True)
class Pause(_MessageBase):
    """supervisor → worker: stop background copying; copy-before-write is still served."""

    code: ClassVar[int] = 13
    job: JobId
    token: JobToken = ""


@_message
@dataclass(frozen=True, slots=True)
class Resume(_MessageBase):
    """supervisor → worker: resume background copying."""

    code: ClassVar[int] = 14
    job: JobId
    token: JobToken = ""


@_message
@dataclass(frozen=True, slots=True)
class Cancel(_MessageBase):
    """supervisor → worker: stop the job; the worker answers ``JobCancelled``."""

    code: ClassVar[int] = 15
    job: JobId
    token: JobToken = ""


@_message
@dataclass(frozen=True, slots=True)
class SetSpeed(_MessageBase):
    """supervisor → worker: new rate limit in bytes per second, 0 for unlimited."""

    code: ClassVar[int] = 16
    job: JobId
    speed: U63
    token: JobToken = ""


@_message
@dataclass(frozen=True, slots=True)
class Complete(_MessageBase):
    """supervisor → worker: for sync=none, finish the job successfully now."""

    code: ClassVar[int] = 17
    job: JobId
    token: JobToken = ""


@_message
@dataclass(frozen=True, slots=True)
class Shutdown(_MessageBase):
    """supervisor → any: exit cleanly."""

    code: ClassVar[int] = 18
    reason: ErrorText
    token: JobToken = ""


@_message
@dataclass(frozen=True, slots=True)
class WriterDone(_MessageBase):
    """writer → supervisor: the writer's workload ended (``error`` is "" when ``ok``)."""

    code: ClassVar[int] = 19
    writer: WriterIndex
    ok: Bool
    error: ErrorText

    def _check_across_fields(self) -> None:
        _check_ok_means_no_error(self)


@_message
@dataclass(frozen=True, slots=True)
class JobError(_MessageBase):
    """worker → supervisor: a background chunk failed and the job's error policy did
    not fail the job (QEMU's ``BLOCK_JOB_ERROR``): ``action`` ``stop`` (the worker
    paused itself; the chunk is copied again on Resume) or ``ignore`` (copied again at
    once). ``operation`` read (``on-source-error``) or write (``on-target-error``);
    ``errno`` positive."""

    code: ClassVar[int] = 20
    job: JobId
    operation: Annotated[str, OneOf("read", "write")]
    action: Annotated[str, OneOf("stop", "ignore")]
    errno: Annotated[int, IntRange(1, 4095)]
    error: ErrorText
    token: JobToken = ""


Message: TypeAlias = (
    Freeze
    | Frozen
    | Thaw
    | CopyRequest
    | CopyDone
    | Staged
    | Ready
    | JobStart
    | JobProgress
    | JobCompleted
    | JobFailed
    | JobCancelled
    | Pause
    | Resume
    | Cancel
    | SetSpeed
    | Complete
    | Shutdown
    | WriterDone
    | JobError
)
"""Any protocol message; ``match`` on it and mypy checks the cases are exhaustive."""

ALL_MESSAGES: Final[tuple[type[Message], ...]] = (
    Freeze,
    Frozen,
    Thaw,
    CopyRequest,
    CopyDone,
    Staged,
    Ready,
    JobStart,
    JobProgress,
    JobCompleted,
    JobFailed,
    JobCancelled,
    Pause,
    Resume,
    Cancel,
    SetSpeed,
    Complete,
    Shutdown,
    WriterDone,
    JobError,
)
