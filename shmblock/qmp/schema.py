"""Argument checking from a small schema table, with QEMU's error wording.

Each command's arguments are described like QAPI does it (``qapi/*.json``): a struct is
a dict of member name → type, a name starting with ``*`` is optional; a type is one of
the scalar names (``str``, ``int``, ``bool``, ``number``, ``any``), an :class:`Enum`, a
nested struct (dict), a list ``[T]``, a :class:`Union` (QAPI's flat union: a
discriminator member chooses the extra members) or an :class:`Alternate`. :func:`check`
walks the arguments against it and raises :class:`~shmblock.qmp.wire.QmpError`
(``GenericError``) with the messages of QEMU's QObject input visitor — "Parameter 'x' is
unexpected", "Parameter 'x' is missing", "Invalid parameter type for 'x', expected:
integer", "Parameter 'x' does not accept value 'y'" — naming nested members as QEMU does
(``addr.data.path``, ``actions[0].type``). Commands run only after their arguments pass,
so a bad argument never has a side effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from shmblock.qmp.wire import QmpError

Type = Union[str, "Enum", "FlatUnion", "Alternate", dict[str, Any], list[Any]]


@dataclass(frozen=True)
class Enum:
    values: tuple[str, ...]


@dataclass(frozen=True)
class FlatUnion:
    """A flat union: ``base`` members (the discriminator among them, an Enum) and, per
    discriminator value, the members added."""

    base: dict[str, Any]
    discriminator: str
    branches: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Alternate:
    """QAPI's alternate: a value of any of the given types (chosen by JSON type)."""

    choices: tuple[Any, ...]


_EXPECTED = {"str": "string", "int": "integer", "bool": "boolean", "number": "number"}
INT_MAX = 2**63 - 1
INT_MIN = -(2**63)


def _name(path: str, member: str) -> str:
    return f"{path}.{member}" if path else member


def check(schema: dict[str, Any] | FlatUnion, args: dict[str, Any], path: str = "") -> None:
    """Raise QmpError unless ``args`` fits ``schema`` exactly (no unknown member)."""
    if isinstance(schema, FlatUnion):
        _check_union(schema, args, path)
        return
    _check_struct(schema, args, path)


def _check_struct(schema: dict[str, Any], args: dict[str, Any], path: str,
                  extra: frozenset[str] = frozenset()) -> None:
    known = {k.lstrip("*"): k.startswith("*") for k in schema}
    for key, optional in known.items():
        if key not in args and not optional:
            raise QmpError(f"Parameter '{_name(path, key)}' is missing")
    for key, value in args.items():
        if key not in known:
            if key in extra:
                continue
            raise QmpError(f"Parameter '{_name(path, key)}' is unexpected")
        spec = schema[key] if key in schema else schema["*" + key]
        check_value(spec, value, _name(path, key))


def _check_union(u: FlatUnion, args: dict[str, Any], path: str) -> None:
    disc = args.get(u.discriminator)
    if disc is None:
        raise QmpError(f"Parameter '{_name(path, u.discriminator)}' is missing")
    if not isinstance(disc, str):
        raise QmpError(f"Invalid parameter type for '{_name(path, u.discriminator)}', "
                       "expected: string")
    if disc not in u.branches:
        raise QmpError(f"Parameter '{_name(path, u.discriminator)}' does not accept "
                       f"value '{disc}'")
    _check_struct({**u.base, **u.branches[disc]}, args, path)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "null"


def check_value(spec: Any, value: Any, name: str) -> None:
    """Check one value against a type (see the module docstring)."""
    if isinstance(spec, str):
        if spec == "any":
            return
        ok = {"str": isinstance(value, str),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "bool": isinstance(value, bool),
              "number": isinstance(value, (int, float)) and not isinstance(value, bool),
              "null": value is None}[spec]
        if not ok:
            raise QmpError(f"Invalid parameter type for '{name}', expected: "
                           f"{_EXPECTED.get(spec, spec)}")
        if spec == "int" and not INT_MIN <= value <= INT_MAX:
            raise QmpError(f"Parameter '{name}' expects an integer in 64 bits")
        return
    if isinstance(spec, Enum):
        if not isinstance(value, str):
            raise QmpError(f"Invalid parameter type for '{name}', expected: string")
        if value not in spec.values:
            raise QmpError(f"Parameter '{name}' does not accept value '{value}'")
        return
    if isinstance(spec, Alternate):
        for choice in spec.choices:
            try:
                check_value(choice, value, name)
            except QmpError:
                continue
            return
        raise QmpError(f"Invalid parameter type for '{name}', expected: "
                       + " or ".join(_describe(c) for c in spec.choices))
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise QmpError(f"Invalid parameter type for '{name}', expected: array")
        for i, item in enumerate(value):
            check_value(spec[0], item, f"{name}[{i}]")
        return
    if not isinstance(value, dict):
        raise QmpError(f"Invalid parameter type for '{name}', expected: object")
    check(spec, value, name)


def _describe(spec: Any) -> str:
    if isinstance(spec, str):
        return _EXPECTED.get(spec, spec)
    if isinstance(spec, Enum):
        return "string"
    if isinstance(spec, list):
        return "array"
    return "object"
