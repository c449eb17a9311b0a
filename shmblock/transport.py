"""Protocol messages over POSIX message queues, every blocking call with a timeout.

One queue per receiving endpoint, each sized to the largest message it can receive
(:func:`queue_message_size`), so a run of 16 writers fits an unprivileged user's
defaults: at most 10 messages per queue, 8192 bytes per message, and 800 KiB of queues
in all (RLIMIT_MSGQUEUE; the kernel charges each queue its message slots plus about
100 bytes of bookkeeping per message, see mq_overview(7)).

The arithmetic: a message with free text (an error, a reason) can take about 4 KiB,
so a queue of 10 such slots costs about 42 KiB, and with every queue sized like that 8
writers already took 760 KiB (a second run of any size then failed with EMFILE, and 12
writers never started). The supervisor's and the backup worker's queues, which every
writer sends to, keep 10 full-size slots. A writer's own two queues carry small
messages (Freeze, Thaw, Shutdown; CopyDone) and only a few at a time (a Thaw, the next
Freeze and a Shutdown; the answer to the one request it waits for, perhaps a late
answer to one it gave up on), so they get :data:`WRITER_QUEUE_MESSAGES` slots of
:data:`WRITER_QUEUE_BYTES`; :meth:`Queue.send` cuts the free text of a message that
would not fit (:func:`fit`). That is 2 x 42 + 16 x 2 x 2.4 = 161 KiB for 16 writers.

Bytes that do not decode (a buggy or hostile sender) are a
:class:`~protocol.RemoteProtocolError`: counted in :attr:`Queue.rejected`, logged, and
skipped; they never kill the receiver. So is any other exception out of ``decode`` (a
bug there must not let a peer kill every process that receives its bytes).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Any, cast

import posix_ipc

import protocol
from protocol import Message
from shmblock.errors import QueueClosed, QueueTimeout, TransportError

log = logging.getLogger("shmblock.transport")

MAX_MESSAGES = 10  # the unprivileged default of /proc/sys/fs/mq/msg_max
WRITER_QUEUE_MESSAGES = 4  # slots of each writer's control and reply queue (see above)
WRITER_QUEUE_BYTES = 512  # their message size: room for ~470 bytes of error text
TEXT_FIELDS = ("error", "reason")

# What each endpoint receives; its queue is sized to the largest of these.
SUPERVISOR_RECEIVES: tuple[type[Message], ...] = (
    protocol.Frozen, protocol.Ready, protocol.JobProgress, protocol.JobCompleted,
    protocol.JobFailed, protocol.JobCancelled, protocol.WriterDone, protocol.JobError,
)
BACKUP_RECEIVES: tuple[type[Message], ...] = (
    protocol.CopyRequest, protocol.Staged, protocol.JobStart, protocol.Pause,
    protocol.Resume, protocol.Cancel, protocol.SetSpeed, protocol.Complete,
    protocol.Shutdown,
)
WRITER_CONTROL_RECEIVES: tuple[type[Message], ...] = (
    protocol.Freeze, protocol.Thaw, protocol.Shutdown,
)
WRITER_REPLY_RECEIVES: tuple[type[Message], ...] = (protocol.CopyDone,)


def queue_message_size(kinds: Iterable[type[Message]]) -> int:
    """The message size a queue needs to receive any valid message of ``kinds``."""
    return max(protocol.max_encoded_size(k) for k in kinds)


def fit(msg: Message, limit: int) -> bytes:
    """``msg`` encoded in at most ``limit`` bytes, its free text cut to fit if need be.

    Free text (``error``, ``reason``) is the only part of a message that can outgrow a
    small queue; cut text ends in "…". Raises TransportError if even that is too long.
    """
    data = protocol.encode(msg)
    for name in TEXT_FIELDS:
        text = getattr(msg, name, "")
        if len(data) <= limit or not isinstance(text, str) or not text:
            continue
        raw = text.encode()
        keep = max(len(raw) - (len(data) - limit) - len("…".encode()), 0)
        cut = raw[:keep].decode(errors="ignore") + "…"
        msg = dataclasses.replace(cast(Any, msg), **{name: cut})
        data = protocol.encode(msg)
    if len(data) > limit:
        raise TransportError(f"{type(msg).__name__} does not fit in {limit} bytes")
    return data


class Queue:
    """One end of a POSIX message queue carrying protocol messages."""

    def __init__(self, mq: posix_ipc.MessageQueue, name: str, owner: bool) -> None:
        self._mq: posix_ipc.MessageQueue | None = mq
        self.name = name
        self.owner = owner
        self.rejected = 0
        self.max_message_size = int(mq.max_message_size)

    @classmethod
    def create(cls, name: str, kinds: Iterable[type[Message]],
               max_messages: int = MAX_MESSAGES, max_message_size: int | None = None
               ) -> Queue:
        """Create a queue sized for ``kinds`` (exclusive create).

        ``max_message_size`` caps the message size; senders then cut free text to fit.
        """
        size = queue_message_size(kinds)
        if max_message_size is not None:
            size = min(size, max_message_size)
        try:
            mq = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, mode=0o600,
                                        max_messages=max_messages, max_message_size=size)
        except posix_ipc.ExistentialError as exc:
            raise TransportError(f"message queue {name!r} already exists") from exc
        except (posix_ipc.Error, OSError, ValueError) as exc:
            raise TransportError(
                f"cannot create message queue {name!r} ({max_messages} x {size} bytes): "
                f"{exc} (per-user queue memory is limited by RLIMIT_MSGQUEUE; "
                "`shmblock-run cleanup` frees queues left by crashed runs)"
            ) from exc
        return cls(mq, name, owner=True)

    @classmethod
    def attach(cls, name: str) -> Queue:
        """Open an existing queue."""
        try:
            mq = posix_ipc.MessageQueue(name)
        except posix_ipc.ExistentialError as exc:
            raise TransportError(f"no message queue {name!r} (has its run ended?)") from exc
        return cls(mq, name, owner=False)

    def _require(self) -> posix_ipc.MessageQueue:
        if self._mq is None:
            raise QueueClosed(f"queue {self.name!r} is closed")
        return self._mq

    def send(self, msg: Message, timeout: float) -> None:
        """Send ``msg``, waiting at most ``timeout`` seconds for room."""
        data = protocol.encode(msg)
        if len(data) > self.max_message_size:
            data = fit(msg, self.max_message_size)
        try:
            self._require().send(data, timeout=max(timeout, 0.0))
        except posix_ipc.BusyError as exc:
            raise QueueTimeout(
                f"queue {self.name!r} stayed full for {timeout:g} s (is its reader alive?)"
            ) from exc
        except posix_ipc.ExistentialError as exc:
            raise TransportError(f"queue {self.name!r} was removed") from exc

    def try_send(self, msg: Message) -> bool:
        """Send without waiting; False when the queue is full."""
        try:
            self.send(msg, 0.0)
        except QueueTimeout:
            return False
        return True

    def receive(self, timeout: float) -> Message | None:
        """The next valid message, or None if none arrives within ``timeout`` seconds.

        Malformed messages are counted, logged and skipped (they do not end the wait).
        """
        mq = self._require()
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(deadline - time.monotonic(), 0.0)
            try:
                data, _priority = mq.receive(timeout=remaining)
            except posix_ipc.BusyError:
                return None
            except posix_ipc.SignalError:
                # EINTR: a signal handler ran; let it raise if it wants to, else go on.
                continue
            except posix_ipc.ExistentialError as exc:
                raise TransportError(f"queue {self.name!r} was removed") from exc
            try:
                return protocol.decode(data)
            except protocol.RemoteProtocolError as exc:
                self.rejected += 1
                if self.rejected <= 10 or self.rejected % 1000 == 0:
                    log.warning("queue %s: rejected malformed message #%d (%d bytes): %s",
                                self.name, self.rejected, len(data), exc)
            except Exception as exc:
                # decode promises RemoteProtocolError only; should a peer's bytes find a
                # bug in it (as a 1000-deep message once did), the receiving loop must
                # still not die: the bytes are dropped like any malformed message.
                self.rejected += 1
                log.error("queue %s: message #%d (%d bytes) broke the decoder: %s",
                          self.name, self.rejected, len(data), type(exc).__name__)
            # Go on even when the time is up: a message may wait behind the bad one, and
            # a receive with no time left only takes what is already queued.

    def drain(self) -> list[Message]:
        """Every message waiting now, without blocking."""
        out = []
        while (msg := self.receive(0.0)) is not None:
            out.append(msg)
        return out

    def close(self) -> None:
        """Close this handle. Idempotent."""
        if self._mq is not None:
            mq, self._mq = self._mq, None
            mq.close()

    def unlink(self) -> None:
        """Destroy the name (owner only); open handles stay usable until closed."""
        unlink_queue(self.name)

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.owner:
            self.unlink()


def unlink_queue(name: str) -> bool:
    """Remove a queue name; False when it did not exist."""
    try:
        posix_ipc.unlink_message_queue(name)
    except posix_ipc.ExistentialError:
        return False
    return True
