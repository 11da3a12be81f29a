"""The worker's end of the wire: protocol frames as plain dicts, on msgpack alone.

A worker child imports this instead of :mod:`plugin_execution.protocol`, which needs attrs
and cattrs (~100 ms to import, five times a bare interpreter's start). The protocol module
is the definition; this is a mirror of its bytes (a 4-byte big-endian length, then a
msgpack map ``{"t": tag, field: value, ...}``), and the tests hold the two to the same
bytes for every message.

The host validates every field's type, because it must distrust a worker that runs plugin
code. The worker trusts the host that started it, so checks here stop at the frame, the tag
and the field names: enough that ``fields["execution_id"]`` never raises ``KeyError``.

Imports: the standard library and msgpack only, nothing else from plugin_execution.
"""

from __future__ import annotations

import msgpack  # type: ignore[import-untyped,unused-ignore]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import KeysView
    from typing import Any

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FIELDS",
    "PROTOCOL_VERSION",
    "FrameDecoder",
    "WireError",
    "encode",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
_HEADER_SIZE = 4

# tag -> the message's field names; every frame carries all of them.
FIELDS: dict[str, frozenset[str]] = {
    tag: frozenset(names.split())
    for tag, names in {
        "hello": "version pid",
        "execute": "execution_id plugin_id handler_id entry root input context workspace "
        "timeout warmup linger",
        "event": "execution_id kind data timestamp",
        "result": "execution_id output duration_s metadata",
        "error": "execution_id error",
        "cancel": "execution_id reason",
        "ping": "seq",
        "pong": "seq rss_bytes uptime_s in_flight",
        "shutdown": "",
        "warmup": "plugin_id handler_id entry root",
        "warmed": "plugin_id handler_id ok error",
        "ch_open": "channel_id execution_id path headers window principal",
        "ch_data": "channel_id data",
        "ch_close": "channel_id code reason",
        "ch_credit": "channel_id messages",
        "pcall": "call_id execution_id service method args kwargs",
        "preply": "call_id ok value error",
    }.items()
}


class WireError(ValueError):
    """A frame that cannot be read, or a message that cannot be written.

    A ``ValueError``, like ``json.JSONDecodeError``: callers that already catch what
    msgpack raises for unencodable values (``TypeError``, ``ValueError``) catch this too.
    """


def _check_fields(tag: object, names: KeysView[Any]) -> None:
    expected = FIELDS.get(tag) if type(tag) is str else None
    if expected is None:
        raise WireError(f"unknown message tag {_clip(repr(tag))}")
    if names != expected:
        missing = ", ".join(sorted(expected - names)) or "none"
        extra = ", ".join(sorted(map(repr, names - expected))) or "none"
        raise WireError(f"{tag!r} message: missing fields: {missing}; extra: {_clip(extra)}")


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode(
    tag: str, fields: dict[str, Any], *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes:
    """One frame holding message ``tag`` with exactly its ``fields``, as plain data.

    Raises :class:`WireError` for an unknown tag, missing or extra fields, values msgpack
    cannot pack, or a frame over ``max_frame_size``. Safe to call from several threads.
    """
    _check_fields(tag, fields.keys())
    try:
        payload: bytes = msgpack.packb({"t": tag, **fields}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"cannot encode {tag!r}: {_clip(str(exc))}") from exc
    if len(payload) > max_frame_size:
        raise WireError(
            f"cannot send {tag!r}: its frame of {len(payload)} bytes is over the "
            f"{max_frame_size}-byte limit"
        )
    return len(payload).to_bytes(_HEADER_SIZE, "big") + payload


class FrameDecoder:
    """Turns a byte stream into ``(tag, fields)`` messages.

    :meth:`feed` bytes as they arrive (``b""`` at EOF), then iterate: the iteration yields
    the messages complete so far and stops; feed more and iterate again. A bad frame raises
    :class:`WireError`, and so does every later iteration. Not thread-safe.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._pos = 0  # start of the unread part of _buffer
        self._eof = False
        self._failure: WireError | None = None

    def feed(self, data: bytes) -> None:
        if not data:
            self._eof = True
        elif self._eof:
            raise WireError("received data after EOF")
        else:
            self._buffer += data

    def __iter__(self) -> FrameDecoder:
        return self

    def __next__(self) -> tuple[str, dict[str, Any]]:
        if self._failure is not None:
            raise WireError(f"the stream already failed: {self._failure}")
        try:
            payload = self._next_frame()
            if payload is None:
                raise StopIteration
            return _decode(payload)
        except WireError as exc:
            self._failure = exc
            raise

    def _next_frame(self) -> bytearray | None:
        buffer, start = self._buffer, self._pos
        available = len(buffer) - start
        if available < _HEADER_SIZE:
            if self._eof and available:
                raise WireError(f"stream ended inside a frame header ({available} of 4 bytes)")
            return None
        size = int.from_bytes(buffer[start : start + _HEADER_SIZE], "big")
        if size > self.max_frame_size:
            raise WireError(
                f"frame of {size} bytes announced, over the {self.max_frame_size}-byte limit"
            )
        end = start + _HEADER_SIZE + size
        if end > len(buffer):
            if self._eof:
                raise WireError(
                    f"stream ended inside a frame ({available} of {_HEADER_SIZE + size} bytes)"
                )
            return None
        payload = buffer[start + _HEADER_SIZE : end]
        # Compact once most of the buffer is read: linear time for big frames in small pieces.
        if end * 2 >= len(buffer):
            del buffer[:end]
            self._pos = 0
        else:
            self._pos = end
        return payload


def _decode(payload: bytearray) -> tuple[str, dict[str, Any]]:
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises a zoo of ValueError/TypeError subclasses
        raise WireError(f"a frame is not valid msgpack: {_clip(str(exc))}") from exc
    if type(message) is not dict:
        raise WireError(f"a frame holds {type(message).__name__}, not a map")
    tag = message.pop("t", None)
    _check_fields(tag, message.keys())
    return tag, message
