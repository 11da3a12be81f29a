"""Checking what a (possibly hostile) worker sent as service arguments, and plain-data
copies. A bad argument is an :class:`InvalidRequestError` naming it."""

from __future__ import annotations

import re
from typing import Any

import msgpack

from ..errors import InvalidRequestError

_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,255}")


def text(value: Any, what: str, *, limit: int = 4096) -> str:
    if type(value) is not str:
        raise InvalidRequestError(f"{what} must be a string, got {type(value).__name__}")
    if not value or len(value) > limit or "\x00" in value:
        raise InvalidRequestError(f"{what} must be 1..{limit} characters without NUL")
    return value


def optional_seconds(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if type(value) not in (int, float) or not value > 0:
        raise InvalidRequestError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def data_bytes(value: Any, what: str) -> bytes:
    """``bytes`` as they are, ``str`` as UTF-8."""
    if type(value) is bytes:
        return value
    if type(value) is str:
        return value.encode("utf-8")
    raise InvalidRequestError(f"{what} must be bytes or str, got {type(value).__name__}")


def namespace(value: Any, default: str) -> str:
    if value is None:
        return default
    if type(value) is not str or _NAMESPACE.fullmatch(value) is None or ".." in value:
        raise InvalidRequestError(
            f"namespace {value!r} must be letters, digits and . _ : @ / - (no '..')"
        )
    return value


def pack(value: Any, what: str) -> bytes:
    """``value`` as msgpack: proof that it is plain data, and a copy nobody else mutates."""
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except Exception as exc:
        raise InvalidRequestError(
            f"{what} must be plain data (dict, list, str, bytes, int, float, bool, None): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return packed


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
