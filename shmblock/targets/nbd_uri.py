"""NBD URIs: where an NBD export lives, per the NBD URI standard (doc/uri.md, NBD project).

Pure parsing, no sockets. Two forms are understood::

    nbd://host[:port][/export]          TCP; port defaults to 10809 (IANA), IPv6 as [::1]
    nbd+unix:///[export]?socket=PATH    Unix domain socket; ``socket`` is required

The export name is the path without its leading ``/``, percent-decoded
(uri.md "NBD URI export name": ``nbd://h`` and ``nbd://h/`` both name the empty,
default export; ``nbd://h//disk`` names ``/disk``).

Rejected with :class:`NbdUriError` (a :class:`~shmblock.errors.TargetError` that is also a
:class:`~shmblock.errors.UsageError`, so the CLI exits with code 2):

* ``nbds://`` and ``nbds+unix://``, and the ``tls-*`` query parameters: TLS is not
  supported, and uri.md ("Clients which do not support TLS") asks for an error;
* other schemes, a missing ``//`` authority part, user info, fragments, bad ports,
  malformed IPv6 literals, bad percent escapes, export names that are not UTF-8, contain
  NUL or exceed 4096 bytes (proto.md "Conventions");
* query parameters we do not understand ("SHOULD be diagnosed by the parser"), except
  the experimental ``x-*`` ones, which are ignored.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from shmblock.errors import TargetError, UsageError

DEFAULT_PORT = 10809
#: proto.md "Conventions": strings MUST be no longer than 4096 bytes.
MAX_EXPORT_NAME_BYTES = 4096

TCP_SCHEME = "nbd"
UNIX_SCHEME = "nbd+unix"
TLS_SCHEMES = frozenset({"nbds", "nbds+unix"})

_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_FORMS = "nbd://host[:port]/export or nbd+unix:///export?socket=PATH"


class NbdUriError(TargetError, UsageError):
    """An NBD URI that is malformed or asks for something unsupported (TLS)."""


@dataclass(frozen=True, slots=True)
class NbdAddress:
    """A parsed NBD URI: how to reach the server, and which export to ask for."""

    transport: Literal["tcp", "unix"]
    host: str | None
    port: int | None
    socket_path: str | None
    export: str

    def __post_init__(self) -> None:
        if self.transport == "tcp":
            if not self.host or self.port is None or self.socket_path is not None:
                raise ValueError("a tcp NbdAddress needs host and port and no socket_path")
        elif self.transport == "unix":
            if not self.socket_path or self.host is not None or self.port is not None:
                raise ValueError("a unix NbdAddress needs socket_path and no host or port")
        else:
            raise ValueError(f"unknown NBD transport {self.transport!r}")

    def endpoint(self) -> str:
        """The socket address in words, for messages: ``[::1]:10809``, ``unix socket /s``."""
        if self.transport == "unix":
            return f"unix socket {self.socket_path!r}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def _fail(uri: str, why: str) -> NbdUriError:
    return NbdUriError(f"bad NBD URI {uri!r}: {why}")


def _decode(uri: str, text: str, what: str) -> str:
    """Percent-decode one URI component strictly (RFC 3986 section 2.1, UTF-8)."""
    if _BAD_PERCENT.search(text):
        raise _fail(uri, f"malformed percent escape in the {what}")
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError as exc:
        raise _fail(uri, f"the {what} is not valid UTF-8 once percent-decoded") from exc


def _parse_query(uri: str, query: str) -> dict[str, str]:
    # Plain RFC 3986 query: '&'-separated key=value, '+' is a literal plus (a socket
    # path may contain one), unlike HTML form encoding, so no parse_qsl here.
    params: dict[str, str] = {}
    if not query:
        return params
    for item in query.split("&"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = _decode(uri, key, "query")
        if not sep:
            raise _fail(uri, f"query parameter {key!r} has no value")
        if key in params:
            raise _fail(uri, f"query parameter {key!r} is given twice")
        params[key] = _decode(uri, value, "query")
    return params


def _check_query(uri: str, params: dict[str, str], allowed: set[str]) -> None:
    for key in params:
        if key.startswith("tls-"):
            raise NbdUriError(
                f"NBD URI {uri!r} asks for TLS ({key}=): TLS is not supported by shmblock"
            )
        if key.startswith("x-") or key in allowed:
            continue
        if key == "socket":
            raise _fail(uri, "socket= is only valid with nbd+unix:// URIs")
        raise _fail(uri, f"unknown query parameter {key!r}")


def _export_name(uri: str, path: str) -> str:
    # uri.md: the path except for the leading '/' is the export name.
    name = _decode(uri, path[1:] if path.startswith("/") else path, "export name")
    if "\0" in name:
        raise _fail(uri, "the export name contains a NUL character")
    if len(name.encode()) > MAX_EXPORT_NAME_BYTES:
        raise _fail(uri, f"the export name is longer than {MAX_EXPORT_NAME_BYTES} bytes")
    return name


def _tcp_host(uri: str, netloc: str) -> tuple[str, int]:
    if "@" in netloc:
        raise _fail(uri, "user info (user@) is only used for TLS, which is not supported")
    if netloc.startswith("["):
        literal, bracket, rest = netloc[1:].partition("]")
        if not bracket:
            raise _fail(uri, "unterminated IPv6 literal '['")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError as exc:
            raise _fail(uri, f"{literal!r} is not an IPv6 address") from exc
        host = literal
        if rest and not rest.startswith(":"):
            raise _fail(uri, f"unexpected {rest!r} after the IPv6 address")
        port_text = rest[1:] if rest else ""
    else:
        if netloc.count(":") > 1 or "[" in netloc or "]" in netloc or "%" in netloc:
            raise _fail(uri, f"malformed host {netloc!r} (write IPv6 addresses as [::1])")
        host, _, port_text = netloc.partition(":")
        if not host:
            raise _fail(uri, "nbd:// needs a host name or address")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _fail(uri, f"port {port_text!r} is not a number between 1 and 65535")
    return host, int(port_text)


def parse_nbd_uri(uri: str) -> NbdAddress:
    """Parse an NBD URI into an :class:`NbdAddress`; raises :class:`NbdUriError`."""
    scheme, colon, rest = uri.partition(":")
    if not colon or not scheme:
        raise NbdUriError(f"{uri!r} is not an NBD URI (expected {_FORMS})")
    scheme = scheme.lower()  # RFC 3986 section 3.1: schemes are case-insensitive
    if scheme in TLS_SCHEMES:
        raise NbdUriError(
            f"NBD URI {uri!r} asks for TLS ({scheme}://): TLS is not supported by shmblock; "
            f"use nbd:// or nbd+unix:// on a trusted network"
        )
    if scheme not in (TCP_SCHEME, UNIX_SCHEME):
        raise NbdUriError(f"unknown URI scheme {scheme!r} in {uri!r} (expected {_FORMS})")
    if not rest.startswith("//"):
        raise _fail(uri, f"expected {scheme}:// (for a Unix socket: {UNIX_SCHEME}:///export)")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in uri):
        raise _fail(uri, "URIs cannot contain spaces or control characters (percent-encode)")
    authority_and_path, _, query = rest[2:].partition("?")
    query, hash_sign, _ = query.partition("#")
    netloc, slash, path = authority_and_path.partition("/")
    if "#" in authority_and_path or hash_sign:
        raise _fail(uri, "fragments (#...) are not allowed")
    export = _export_name(uri, slash + path)
    params = _parse_query(uri, query)

    if scheme == TCP_SCHEME:
        _check_query(uri, params, allowed=set())
        host, port = _tcp_host(uri, netloc)
        _cross_check(uri)
        return NbdAddress("tcp", host, port, None, export)

    # uri.md: the authority SHOULD NOT be used for Unix sockets; we refuse it rather than
    # silently ignore a host the user may think is being contacted.
    if netloc:
        raise _fail(uri, f"nbd+unix:// takes no host (got {netloc!r}); use {UNIX_SCHEME}:///")
    _check_query(uri, params, allowed={"socket"})
    socket_path = params.get("socket")
    if socket_path is None:
        raise _fail(uri, "nbd+unix:// needs a socket=PATH query parameter")
    if not socket_path:
        raise _fail(uri, "the socket= query parameter is empty")
    _cross_check(uri)
    return NbdAddress("unix", None, None, socket_path, export)


def _cross_check(uri: str) -> None:
    # After our own, more specific checks: the standard library must agree it is a URI.
    try:
        urlsplit(uri)
    except ValueError as exc:
        raise _fail(uri, str(exc)) from exc


__all__ = ["DEFAULT_PORT", "NbdAddress", "NbdUriError", "parse_nbd_uri"]
