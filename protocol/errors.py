"""The errors of the message protocol.

Two kinds, split the way h11 splits them, by *who* broke the protocol::

    ProtocolError                 root; catch this to catch both
     ├── LocalProtocolError       we tried to build or send something invalid (a bug here)
     └── RemoteProtocolError      the bytes the peer sent are garbage (a bug, or a stranger,
                                  over there)

Both are also :class:`ValueError`, so code that only knows the standard types still
catches them. A :class:`RemoteProtocolError` is meant to be logged and counted by the
receiver; it must never kill the receiving process. ``decode`` raises nothing else: every
lower-level failure (msgpack, Unicode, a limit) is wrapped with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Root of the protocol's errors."""


class LocalProtocolError(ProtocolError, ValueError):
    """We tried to build or encode a message that breaks the protocol.

    Raised by a message's constructor when a field is out of range or of the wrong
    type, and by ``encode`` when handed something that is not a message.
    """


class RemoteProtocolError(ProtocolError, ValueError):
    """The bytes received from the peer are not a valid message.

    Raised by ``decode`` for anything wrong with its input: too big, not msgpack,
    truncated, trailing bytes, another protocol version, an unknown type code, the wrong
    number of fields, or a field of the wrong type or out of range.
    """
