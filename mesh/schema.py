"""Plain data to typed frozen dataclasses and back, strictly: the schema half of the wire codec.

`from_plain` checks decoded CBOR or JSON against the declared field types of a dataclass (ints,
floats, bools, text, bytes, optionals and unions, fixed and variable tuples, string-keyed maps,
nested dataclasses, and free-form `Any` data) and builds it, converting lists to tuples. Sizes are
bounded (`MAX_*`), and every failure is one `WireError` whose message names the path of the
field at fault. `as_plain` is the reverse. `loads_cbor` and `loads_json` parse bytes into plain
data, raising `WireError` for anything malformed.

Knows nothing of the wire's record types, versions or kinds (that is `mesh.wire`). Pure code.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

import cbor2

from mesh.errors import WireError

MAX_DEPTH = 16
MAX_STR = 4096
MAX_ITEMS = 1 << 20
MAX_INT = (1 << 64) - 1
MIN_INT = -(1 << 63)

T = TypeVar("T")


def as_plain(value: Any) -> Any:
    """Dataclasses as maps of their fields, tuples as lists, all the way down."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [as_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: as_plain(item) for key, item in value.items()}
    return value


def loads_cbor(data: bytes) -> Any:
    """Plain data from CBOR: bounded nesting, no indefinite lengths, no duplicate keys."""
    try:
        return cbor2.loads(data, max_depth=MAX_DEPTH, allow_indefinite=False,
                           allow_duplicate_keys=False, strict_hashable_types=True)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError,
            MemoryError) as exc:
        raise WireError(f"malformed CBOR: {_one_line(exc)}") from None


def loads_json(data: bytes) -> Any:
    """Plain data from JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise WireError(f"malformed JSON: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _value(tp: Any, value: Any, path: str, from_json: bool, depth: int = 0) -> Any:
    """Check `value` against the declared type `tp`, converting containers; raise WireError."""
    if depth > MAX_DEPTH:
        raise WireError(f"{path}: nested too deeply")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _value(option, value, path, from_json, depth)
            except WireError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise WireError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__}")
    if origin is tuple:
        return _tuple(tp, value, path, from_json, depth)
    if origin is dict:
        return _mapping(tp, value, path, from_json, depth)
    if dataclasses.is_dataclass(tp):
        return from_plain(tp, value, path, from_json, depth)  # type: ignore[arg-type]
    return _scalar(tp, value, path, from_json, depth)


def _scalar(tp: Any, value: Any, path: str, from_json: bool, depth: int) -> Any:
    if tp is Any:
        return _any(value, path, depth)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not MIN_INT <= value <= MAX_INT:
                raise WireError(f"{path}: integer out of range")
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            if len(value) > MAX_STR:
                raise WireError(f"{path}: text longer than {MAX_STR} characters")
            return value
    elif tp is bytes:
        if isinstance(value, bytes):
            return value
        if from_json and isinstance(value, str):
            return value.encode()
    else:  # pragma: no cover - a schema bug, not bad input
        raise TypeError(f"unsupported wire type {tp!r}")
    raise WireError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__}")


def _any(value: Any, path: str, depth: int) -> Any:
    """Free-form data (reply results): plain JSON-like values only, bounded in depth."""
    if depth > MAX_DEPTH:
        raise WireError(f"{path}: nested too deeply")
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    if isinstance(value, list):
        return [_any(item, f"{path}[]", depth + 1) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _any(item, f"{path}.{key}", depth + 1) for key, item in value.items()}
    raise WireError(f"{path}: unsupported value of type {type(value).__name__}")


def _tuple(tp: Any, value: Any, path: str, from_json: bool, depth: int) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise WireError(f"{path}: expected a list, got {type(value).__name__}")
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        if len(value) > MAX_ITEMS:
            raise WireError(f"{path}: more than {MAX_ITEMS} items")
        item_types = [args[0]] * len(value)
    else:
        if len(value) != len(args):
            raise WireError(f"{path}: expected {len(args)} items, got {len(value)}")
        item_types = list(args)
    return tuple(_value(item_tp, item, f"{path}[{i}]", from_json, depth + 1)
                 for i, (item_tp, item) in enumerate(zip(item_types, value, strict=True)))


def _mapping(tp: Any, value: Any, path: str, from_json: bool, depth: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError(f"{path}: expected a map, got {type(value).__name__}")
    if len(value) > 256:
        raise WireError(f"{path}: more than 256 entries")
    _, item_tp = typing.get_args(tp)
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or len(key) > 256:
            raise WireError(f"{path}: keys must be text of at most 256 characters")
        out[key] = _value(item_tp, item, f"{path}.{key}", from_json, depth + 1)
    return out


def from_plain(cls: type[T], value: Any, path: str, from_json: bool = False,
               depth: int = 0) -> T:
    """A `cls` built from the map `value`, every field checked; `path` names it in errors.

    `from_json`: bytes fields may arrive as text (JSON has no bytes).
    """
    if not isinstance(value, dict):
        raise WireError(f"{path}: expected a map, got {type(value).__name__}")
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in value:
            kwargs[f.name] = _value(hints[f.name], value[f.name], f"{path}.{f.name}", from_json,
                                    depth + 1)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise WireError(f"{path}: missing field {f.name!r}")
    try:
        return cls(**kwargs)
    except WireError as exc:
        raise WireError(f"{path}: {exc}") from None
