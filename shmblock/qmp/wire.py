"""QMP on the wire, without I/O: bytes in, requests out; replies and events to bytes.

Theory of operation (QEMU's ``docs/interop/qmp-spec.rst``):

* The server speaks first: one greeting ``{"QMP": {"version": ..., "capabilities":
  [...]}}``. The connection is then in *capabilities negotiation* mode, where only
  ``qmp_capabilities`` is accepted (anything else: ``CommandNotFound``); after a
  successful ``qmp_capabilities`` it is in *command* mode, where ``qmp_capabilities``
  is refused in turn. This module keeps that mode (:attr:`QmpConnection.negotiated`);
  the dispatcher sets it.
* The client sends JSON objects one after the other, with or without whitespace or
  newlines between them (``qemu.qmp`` sends none): like QEMU's JSON streamer,
  :class:`QmpConnection` splits the byte stream at the closing brace that returns to
  nesting level 0, outside strings. Each object must be ``{"execute": NAME,
  "arguments": {...}, "id": ANY}``; anything else is answered with QEMU's
  ``GenericError`` wording ("QMP input must be a JSON object", "QMP input lacks member
  'execute'", "QMP input member 'x' is unexpected", "JSON parse error, ...") and the
  connection goes on with the next object: malformed input never kills it.
* Bounds, checked before anything is parsed: one JSON value is at most
  :data:`MAX_MESSAGE` bytes (QEMU's lexer stops at 64 MiB; a control channel needs far
  less) and nests at most :data:`MAX_DEPTH` levels (QEMU: 1024). A value over the size
  bound is answered with a ``GenericError`` and the rest of it is skipped up to where
  its nesting closes, so the stream stays in step; the server may also close such a
  connection (it does after :data:`MAX_ERRORS` protocol errors in a row).
* The server writes one JSON object per line, ended with CRLF: replies ``{"return":
  ..., "id": ...}`` or ``{"error": {"class", "desc"}, "id": ...}`` (the ``id`` echoed
  exactly when the request had one) and events ``{"event", "data", "timestamp":
  {"seconds", "microseconds"}}``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

#: Largest JSON value a client may send, in bytes.
MAX_MESSAGE = 1 << 20
#: Deepest nesting of arrays and objects a client may send.
MAX_DEPTH = 64
#: Protocol errors in a row (no valid command between) after which a server hangs up.
MAX_ERRORS = 100

#: QEMU's error classes (qapi/error.json ``QapiErrorClass``).
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_FOUND = "DeviceNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"

_WS = b" \t\r\n"
_STRUCT = b"{}[]\""
_STRING_STOP = re.compile(rb'["\\]')
_NEST_STOP = re.compile(rb'["{}\[\]]')


class QmpError(Exception):
    """A command's error reply: an error class and a description (QEMU's ``Error``)."""

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


@dataclass(frozen=True, slots=True)
class Request:
    """One well-formed ``execute``: name, arguments, and the id (``has_id`` False: none)."""

    command: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False


@dataclass(frozen=True, slots=True)
class BadInput:
    """Input that is no request; answered with ``error`` (GenericError) and the id if
    one could be read."""

    error: QmpError
    id: Any = None
    has_id: bool = False


Incoming = Request | BadInput


def encode(obj: dict[str, Any]) -> bytes:
    """One server message: compact JSON (ASCII-only, as QEMU) and CRLF."""
    return json.dumps(obj, separators=(", ", ": "), ensure_ascii=True).encode() + b"\r\n"


def greeting(version: tuple[int, int, int], package: str,
             capabilities: list[str] | None = None) -> bytes:
    """The greeting: ``{"QMP": {"version": {"qemu": ..., "package": ...}, ...}}``."""
    major, minor, micro = version
    return encode({"QMP": {"version": {"qemu": {"major": major, "minor": minor,
                                                "micro": micro}, "package": package},
                           "capabilities": list(capabilities or [])}})


def reply(request: Request | BadInput, value: Any) -> bytes:
    """A success reply (``{"return": value}``) echoing the request's id."""
    msg: dict[str, Any] = {"return": value}
    if request.has_id:
        msg["id"] = request.id
    return encode(msg)


def error_reply(request: Request | BadInput | None, error: QmpError) -> bytes:
    """An error reply echoing the request's id, if any."""
    msg: dict[str, Any] = {"error": {"class": error.error_class, "desc": error.desc}}
    if request is not None and request.has_id:
        msg["id"] = request.id
    return encode(msg)


def event(name: str, data: dict[str, Any] | None, when: float | None = None) -> bytes:
    """An event with its wall-clock timestamp (seconds and microseconds)."""
    t = time.time() if when is None else when
    seconds = int(t)
    msg: dict[str, Any] = {"event": name}
    if data is not None:
        msg["data"] = data
    msg["timestamp"] = {"seconds": seconds, "microseconds": int((t - seconds) * 1e6)}
    return encode(msg)


class QmpConnection:
    """The server's side of one QMP connection: splits and checks what the client sends.

    Feed bytes with :meth:`receive_data`; it returns the complete requests (and bad
    inputs) in order. Never raises for anything the peer sends.
    """

    def __init__(self) -> None:
        self.negotiated = False
        self.errors_in_row = 0
        self._cur = bytearray()  # the value being read (nothing kept while skipping)
        self._size = 0  # its size so far, skipped bytes included
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._scalar = False  # inside a top-level number, literal or garbage word
        self._skipping = False  # over a bound: read to the value's end, then drop it

    @property
    def too_many_errors(self) -> bool:
        return self.errors_in_row >= MAX_ERRORS

    def receive_data(self, data: bytes) -> list[Incoming]:
        """Split ``data`` (any piece of the stream) into complete inputs, in order."""
        out: list[Incoming] = []
        i, n = 0, len(data)
        while i < n:
            if self._in_string:
                # Jump to the next quote or backslash: strings are most of the bytes.
                if self._escape:
                    self._escape = False
                    j = i + 1
                else:
                    m = _STRING_STOP.search(data, i)
                    if m is None:
                        j = n
                    else:
                        j = m.end()
                        if data[m.start()] == 0x5C:
                            self._escape = True
                        else:
                            self._in_string = False
                self._take(data[i:j], out)
                i = j
                if not self._in_string and self._depth == 0:
                    self._finish(out)
                continue
            c = data[i]
            if self._scalar:
                if c in _WS or c in _STRUCT:
                    self._finish(out)  # and look at c again, at the top level
                    continue
                self._take(data[i:i + 1], out)
                i += 1
                continue
            if self._depth == 0:
                if c in _WS:
                    i += 1
                    continue
                if c in b"}]":
                    out.append(self._bad(f"JSON parse error, stray '{chr(c)}'"))
                    i += 1
                    continue
                if c not in b"{[\"":
                    self._scalar = True
                    continue
            # Inside an aggregate (or starting one): jump to the next character that
            # matters for nesting.
            m = _NEST_STOP.search(data, i)
            j = n if m is None else m.start()
            if j > i:
                self._take(data[i:j], out)
                i = j
                continue
            self._take(data[i:i + 1], out)
            i += 1
            if c == 0x22:
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
                if self._depth > MAX_DEPTH and not self._skipping:
                    out.append(self._bad(f"JSON nesting too deep (at most {MAX_DEPTH} "
                                         "levels)"))
                    self._skipping = True
            else:
                self._depth -= 1
                if self._depth == 0:
                    self._finish(out)
        return out

    def _take(self, piece: bytes, out: list[Incoming]) -> None:
        self._size += len(piece)
        if self._skipping:
            return
        if self._size > MAX_MESSAGE:
            out.append(self._bad(f"JSON value too long (more than {MAX_MESSAGE} bytes)"))
            self._skipping = True
            self._cur = bytearray()
            return
        self._cur += piece

    def _finish(self, out: list[Incoming]) -> None:
        """A value ended: parse it unless it was skipped; back to the top level."""
        if not self._skipping and self._cur:
            out.append(self._parse(bytes(self._cur)))
        self._cur = bytearray()
        self._size = 0
        self._depth = 0
        self._scalar = self._skipping = False

    def _bad(self, desc: str, ident: Any = None, has_id: bool = False) -> BadInput:
        self.errors_in_row += 1
        return BadInput(QmpError(desc), ident, has_id)

    def _parse(self, chunk: bytes) -> Incoming:
        try:
            obj = json.loads(chunk)
        except (ValueError, RecursionError) as exc:
            return self._bad(f"JSON parse error, {_json_reason(exc)}")
        if not isinstance(obj, dict):
            return self._bad("QMP input must be a JSON object")
        has_id = "id" in obj
        ident = obj.get("id")
        for key in obj:
            if key not in ("execute", "arguments", "id", "exec-oob", "control"):
                return self._bad(f"QMP input member '{key}' is unexpected", ident, has_id)
        if "exec-oob" in obj:
            return self._bad("QMP input member 'exec-oob' is unexpected"
                             if "execute" not in obj else
                             "QMP input must not have both 'execute' and 'exec-oob'",
                             ident, has_id)
        if "control" in obj:
            return self._bad("QMP input member 'control' is unexpected", ident, has_id)
        if "execute" not in obj:
            return self._bad("QMP input lacks member 'execute'", ident, has_id)
        if not isinstance(obj["execute"], str):
            return self._bad("QMP input member 'execute' must be a string", ident, has_id)
        args = obj.get("arguments", {})
        if not isinstance(args, dict):
            return self._bad("QMP input member 'arguments' must be an object", ident,
                             has_id)
        self.errors_in_row = 0
        return Request(obj["execute"], args, ident, has_id)


def _json_reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nesting too deep"
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg.lower()
    return "invalid UTF-8 or JSON" if isinstance(exc, UnicodeDecodeError) else str(exc)
