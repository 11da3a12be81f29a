"""Encoding and strict decoding of protocol messages, built once per message class.

The host distrusts its workers (they run plugin code), so a decoded frame becomes a message
only when its keys are exactly the message's fields and every value has exactly the type
its annotation names (no coercion: a bool is not an int, a float field takes an int), and
ids are bounded (:data:`MAX_ID_LENGTH`). :func:`fast_structure` does that check and builds
the message directly, the usual case; anything else goes through cattrs, which says
precisely what is wrong.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, Final, NamedTuple, Union, get_args, get_origin

import attrs
import cattrs
import msgpack  # type: ignore[import-untyped,unused-ignore]
from cattrs.fns import identity
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.v import format_exception

from ..converter import converter
from ._messages import MAX_ID_LENGTH, MESSAGE_TYPES, Message, Result

_ID_FIELDS: Final = frozenset(
    {"execution_id", "plugin_id", "handler_id", "channel_id", "service", "method"}
)


class _WrongType(TypeError):
    pass


# The exact types msgpack decodes to. An int is accepted as a float, a bool is not an int.
_EXACT: Final[dict[Any, frozenset[type]]] = {
    str: frozenset({str}),
    bytes: frozenset({bytes}),
    int: frozenset({int}),
    bool: frozenset({bool}),
    float: frozenset({float, int}),
    type(None): frozenset({type(None)}),
}


def _anything(value: object) -> bool:
    return True


def _accepts(tp: Any) -> Callable[[object], bool]:
    """A strict check of a decoded value against a field annotation (no coercion)."""
    if tp is Any:
        return _anything
    args = get_args(tp)
    origin = get_origin(tp)
    if tp in _EXACT or (origin in (Union, types.UnionType) and all(a in _EXACT for a in args)):
        exact = frozenset().union(*(_EXACT[a] for a in args or (tp,)))
        return lambda v: type(v) in exact
    if origin in (Union, types.UnionType):
        checks = [_accepts(a) for a in args]
        return lambda v: any(check(v) for check in checks)
    if origin is list and args == (Any,):
        return lambda v: type(v) is list
    if origin is dict:
        key, value = (_accepts(a) for a in args)
        if value is _anything:
            return lambda v: type(v) is dict and all(map(key, v))
        return lambda v: type(v) is dict and all(key(k) and value(x) for k, x in v.items())
    raise TypeError(f"no wire check for {tp!r}")


def _bounded_id(value: object) -> bool:
    return type(value) is str and len(value) <= MAX_ID_LENGTH


def _strict_hook(tp: Any, name: str = "") -> Callable[[Any, Any], Any]:
    accepts = _bounded_id if name in _ID_FIELDS else _accepts(tp)
    expected = str(tp).replace("typing.", "") if get_args(tp) else tp.__name__

    def hook(value: Any, _: Any) -> Any:
        if accepts(value):
            return value
        if type(value) is str and name in _ID_FIELDS:
            raise _WrongType(
                f"expected an id of at most {MAX_ID_LENGTH} characters, got {len(value)}"
            )
        got = f"{type(value).__name__} {clip(repr(value), 40)}"
        raise _WrongType(f"expected {expected}, got {got}")

    return hook


def _describe(exc: BaseException, tp: type | None) -> str:
    return str(exc) if isinstance(exc, _WrongType) else format_exception(exc, tp)


class Codec(NamedTuple):
    """How one message class is encoded and decoded."""

    cls: type[Message]
    unstructure: Callable[[Any], dict[str, Any]]
    structure: Callable[[dict[str, Any], Any], Message]
    #: Every field name, and the strict check of each typed one: a decoded map with exactly
    #: these keys whose values pass becomes ``cls(**map)`` directly (what ``structure``
    #: would build, at a fraction of the cost); anything else goes through ``structure``,
    #: which says precisely what is wrong.
    keys: frozenset[str]
    checks: tuple[tuple[str, Callable[[object], bool]], ...]


def _make_codec(cls: type[Message]) -> Codec:
    fields = attrs.fields(attrs.resolve_types(cls))
    # Fields go to msgpack as they are: the packer hands anything it cannot pack natively
    # (an attrs value in ``input``, a set, a datetime) to the converter on the way.
    as_is: dict[str, Any] = {f.name: override(unstruct_hook=identity) for f in fields}
    strict: dict[str, Any] = {
        f.name: override(struct_hook=_strict_hook(f.type, f.name))
        for f in fields
        if f.type is not Any
    }
    return Codec(
        cls,
        make_dict_unstructure_fn(cls, converter, **as_is),
        make_dict_structure_fn(
            cls,
            converter,
            _cattrs_forbid_extra_keys=True,
            _cattrs_detailed_validation=True,
            **strict,
        ),
        frozenset(f.name for f in fields),
        tuple(
            (f.name, _bounded_id if f.name in _ID_FIELDS else _accepts(f.type))
            for f in fields
            if f.type is not Any
        ),
    )


#: The codec of each message class, by tag.
CODECS: Final[dict[str, Codec]] = {tag: _make_codec(cls) for tag, cls in MESSAGE_TYPES.items()}


def clip(text: str, limit: int = 200) -> str:
    """``text``, cut to ``limit`` characters: error messages quote what a peer sent."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def problems(exc: Exception) -> str:
    """What cattrs found wrong in a map, in one clipped line."""
    try:
        return clip("; ".join(cattrs.transform_error(exc, format_exception=_describe)))
    except Exception:  # cattrs' own formatting can fail (it sorts extra keys: an int key)
        return clip(f"{type(exc).__name__}: {exc}")


def fast_structure(codec: Codec, data: dict[str, Any]) -> Message | None:
    """``codec.cls(**data)`` when ``data`` is exactly right, else None (see ``Codec``)."""
    if data.keys() != codec.keys:
        return None
    for name, accepts in codec.checks:
        if not accepts(data[name]):
            return None
    return codec.cls(**data)


_RESULT_KEYS: Final = frozenset({"t", "execution_id", "output", "duration_s", "metadata"})
_new = object.__new__
_set = object.__setattr__


def structure_result(data: object) -> Result | None:
    """The ``Result`` a decoded frame (``"t"`` still in it) holds when it is exactly a
    well-formed one, else None (another message, or a malformed result: the general path
    decides). The checks are :func:`fast_structure`'s for ``Result``, inlined: a worker's
    answer is the host's most frequent frame."""
    if type(data) is not dict or data.keys() != _RESULT_KEYS or data["t"] != "result":
        return None
    execution_id = data["execution_id"]
    duration_s = data["duration_s"]
    metadata = data["metadata"]
    if (
        type(execution_id) is not str
        or len(execution_id) > MAX_ID_LENGTH
        or (type(duration_s) is not float and type(duration_s) is not int)
        or type(metadata) is not dict
    ):
        return None
    for key in metadata:
        if type(key) is not str:
            return None
    # What Result(...) builds (no validators, no converters), without its __init__'s calls.
    result: Result = _new(Result)
    _set(result, "execution_id", execution_id)
    _set(result, "output", data["output"])
    _set(result, "duration_s", duration_s)
    _set(result, "metadata", metadata)
    return result


class TooManyValues(ValueError):
    """A frame holds more values than :func:`unpack_counted` may decode."""


def unpack_counted(payload: bytes | bytearray | memoryview, max_values: int) -> Any:
    """``msgpack.unpackb(payload)``, counting each map and array as it is decoded, itself
    and its members (so a nested one counts twice): raises :class:`TooManyValues` as soon as
    the count passes ``max_values``, and for a map or array declaring more members than
    that, before any is made. So what a hostile frame makes the host build stays bounded: a
    value is ~1 byte on the wire and up to ~64 decoded, and no more than ``max_values`` of
    them are made (plus the members of the last container, at most as many again)."""
    left = max_values

    def counted(value: Any) -> Any:
        nonlocal left
        left -= len(value) + 1
        if left < 0:
            raise TooManyValues(f"a frame holds more than {max_values} values")
        return value

    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=False,
            list_hook=counted,
            object_hook=counted,
            max_array_len=max_values,
            max_map_len=max_values,
        )
    except ValueError as exc:
        if "exceeds max_array_len" in str(exc) or "exceeds max_map_len" in str(exc):
            raise TooManyValues(f"a frame holds more than {max_values} values") from None
        raise


def pack_plain(value: Any) -> bytes:
    """msgpack of plain data, without the converter's hook (the hot paths' encoding)."""
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed
