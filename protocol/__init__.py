"""shmblock's message protocol, apart from any I/O: messages in, bytes out, and back.

Theory of operation
===================

The supervisor, the guest writers and the backup worker talk over POSIX message queues,
one message per queue message of at most :data:`MAX_MESSAGE_SIZE` bytes. This package
only turns messages into bytes (:func:`encode`) and bytes into messages (:func:`decode`);
the transport that moves them lives elsewhere. It imports msgpack and the standard
library, nothing else.

Who sends what, to whom (codes are the wire type codes; see ``protocol.messages``)::

    supervisor → writer     Freeze(1) Thaw(3)
    writer → supervisor     Frozen(2) WriterDone(19)
    writer → worker         CopyRequest(4) Staged(6)
    worker → writer         CopyDone(5)
    any → supervisor        Ready(7)
    supervisor → worker     JobStart(8) Pause(13) Resume(14) Cancel(15) SetSpeed(16)
                            Complete(17)
    worker → supervisor     JobProgress(9) JobCompleted(10) JobFailed(11) JobCancelled(12)
                            JobError(20)
    supervisor → any        Shutdown(18)

The Job* messages and Frozen carry the sender's ``token``, a secret the supervisor gave
that worker alone: the supervisor takes a job's outcome, or a writer's Frozen, only from
the process it spawned for it.

Building an invalid message raises :class:`LocalProtocolError`; decoding bad bytes
raises :class:`RemoteProtocolError` (log it, count it, carry on). A message is one flat
array of at most :data:`MAX_MESSAGE_SIZE` bytes; a nested element is refused.
"""

from __future__ import annotations

from .codec import (
    MAX_MESSAGE_SIZE,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    decode,
    encode,
    max_encoded_size,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .messages import (
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
    Message,
    Pause,
    Ready,
    Resume,
    SetSpeed,
    Shutdown,
    Staged,
    Thaw,
    WriterDone,
    short_error,
)

__all__ = [
    "MAX_MESSAGE_SIZE",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "Cancel",
    "Complete",
    "CopyDone",
    "CopyRequest",
    "Freeze",
    "Frozen",
    "JobCancelled",
    "JobCompleted",
    "JobError",
    "JobFailed",
    "JobProgress",
    "JobStart",
    "LocalProtocolError",
    "Message",
    "Pause",
    "ProtocolError",
    "Ready",
    "RemoteProtocolError",
    "Resume",
    "SetSpeed",
    "Shutdown",
    "Staged",
    "Thaw",
    "WriterDone",
    "decode",
    "encode",
    "max_encoded_size",
    "short_error",
]
