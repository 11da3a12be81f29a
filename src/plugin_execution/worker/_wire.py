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

import _thread

import msgpack  # type: ignore[import-untyped,unused-ignore]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import KeysView
    from typing import Any

__all__ = [
    "BIG",
    "DEFAULT_MAX_FRAME_SIZE",
    "FIELDS",
    "PROTOCOL_VERSION",
    "BigFrame",
    "FrameBuffer",
    "FrameDecoder",
    "FrameEncoder",
    "WireError",
    "encode",
    "encode_parts",
    "pack_parts",
    "unsent",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
_HEADER_SIZE = 4
#: Frames of at least this many bytes are read straight into a buffer of their own, and a
#: ``bytes`` value of at least this size is written from where it lies (see pack_parts).
BIG = 1 << 16
_KEEP = 8 << 20  # the largest big-frame buffer kept for the next one
#: A kept msgpack ``Packer`` keeps its buffer at about twice the largest payload it ever
#: packed (a fresh one holds 256 KiB). After a payload bigger than this, its keeper takes a
#: new Packer, so one big frame's memory is not held for the life of the connection.
PACKER_KEEP = 256 << 10
_BIN32 = b"\xc6"  # msgpack's bin 32 header byte: what packb writes for bytes >= 64 KiB

# tag -> the message's field names; every frame carries all of them.
FIELDS: dict[str, frozenset[str]] = {
    tag: frozenset(names.split())
    for tag, names in {
        "hello": "version pid",
        "execute": "execution_id plugin_id handler_id entry root input context workspace "
        "timeout warmup linger",
        "batch": "executes linger",
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
    return _framed(tag, payload, max_frame_size)


def _framed(tag: str, payload: bytes, max_frame_size: int) -> bytes:
    """``payload`` behind its length header; ``WireError`` when it is over the limit."""
    if len(payload) > max_frame_size:
        raise WireError(
            f"cannot send {tag!r}: its frame of {len(payload)} bytes is over the "
            f"{max_frame_size}-byte limit"
        )
    return len(payload).to_bytes(_HEADER_SIZE, "big") + payload


class FrameEncoder:
    """:func:`encode` and :func:`encode_parts` with one msgpack ``Packer`` kept for every
    frame, where ``packb`` makes a new one per call: that is two thirds of what packing a
    small frame costs. Thread-safe: a call that finds the packer in use (by another thread,
    or by the very value being packed, whose own code may send a frame) packs with
    ``packb`` instead."""

    __slots__ = ("_in_use", "_packer")

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)
        self._in_use = _thread.allocate_lock()

    def encode(
        self,
        tag: str,
        fields: dict[str, Any],
        big: str | None = None,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> bytes | list[bytes]:
        """:func:`encode`, or :func:`encode_parts` when ``big`` names a field: the same
        bytes, the same errors."""
        _check_fields(tag, fields.keys())
        return self.encode_message({"t": tag, **fields}, big, max_frame_size=max_frame_size)

    def encode_message(
        self,
        message: dict[str, Any],
        big: str | None = None,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> bytes | list[bytes]:
        """The frame of ``message``, a whole message map: ``"t"`` (the tag) first, then
        exactly that message's fields, which are not checked (see :meth:`encode`): for the
        worker's own maps, made anew for each execution. ``big`` as in :meth:`encode`."""
        if big is not None and type(value := message[big]) is bytes and len(value) >= BIG:
            return self._parts(message, big, max_frame_size)
        in_use = self._in_use
        try:
            if in_use.acquire(False):
                try:
                    # A Packer that raises drops what it had packed of the value: nothing
                    # is left over for the next frame.
                    payload: bytes = self._packer.pack(message)
                    if len(payload) > PACKER_KEEP:
                        self._packer = msgpack.Packer(use_bin_type=True)
                finally:
                    in_use.release()
            else:
                payload = msgpack.packb(message, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise WireError(f"cannot encode {message['t']!r}: {_clip(str(exc))}") from exc
        return _framed(message["t"], payload, max_frame_size)

    def _parts(self, message: dict[str, Any], big: str, max_frame_size: int) -> bytes | list[bytes]:
        parts = _checked_parts(message, big, max_frame_size)
        if parts is None:
            return self.encode_message(message, max_frame_size=max_frame_size)
        return parts


def pack_parts(fields: dict[str, Any], key: str) -> list[bytes] | None:
    """``fields`` (a msgpack map, ``"t"`` first) as the pieces of one frame, ``fields[key]``
    (``bytes`` of at least :data:`BIG`) not copied: its own piece, after the rest packed.

    The same map ``packb`` would make, its entries in another order: a 1 MB value costs two
    fewer copies a way (into msgpack's buffer, then behind the frame header), which is most
    of what a big frame costs above the socket itself. None when ``fields[key]`` is not such
    a value, or the map is not a fixmap (more than 15 entries): pack it the usual way.
    Raises what ``packb`` raises for the other values; the size limit is the caller's.
    """
    value = fields[key]
    if type(value) is not bytes or len(value) < BIG or len(fields) > 15:
        return None
    rest = dict(fields)
    del rest[key]
    head: bytes = msgpack.packb(rest, use_bin_type=True)
    # head[0] is fixmap | (entries - 1): one more entry follows, the big value.
    tail = msgpack.packb(key) + _BIN32 + len(value).to_bytes(4, "big")
    size = len(head) + len(tail) + len(value)
    return [size.to_bytes(_HEADER_SIZE, "big") + bytes((head[0] + 1,)) + head[1:] + tail, value]


def unsent(parts: list[bytes] | list[memoryview], sent: int) -> list[memoryview]:
    """What is left of a frame's ``parts`` once their first ``sent`` bytes were written."""
    rest = []
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
        else:
            rest.append(memoryview(part)[sent:])
            sent = 0
    return rest


def encode_parts(
    tag: str, fields: dict[str, Any], key: str, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes | list[bytes]:
    """:func:`encode`, or the frame as :func:`pack_parts` pieces when ``fields[key]`` is a
    big ``bytes`` value (write them with ``os.writev``)."""
    value = fields.get(key)
    if type(value) is not bytes or len(value) < BIG:  # the usual case: a small frame
        return encode(tag, fields, max_frame_size=max_frame_size)
    _check_fields(tag, fields.keys())
    parts = _checked_parts({"t": tag, **fields}, key, max_frame_size)
    if parts is None:
        return encode(tag, fields, max_frame_size=max_frame_size)
    return parts


def _checked_parts(message: dict[str, Any], key: str, max_frame_size: int) -> list[bytes] | None:
    """:func:`pack_parts` of ``message`` (a whole message, ``"t"`` first), its frame held to
    ``max_frame_size``; None when ``message[key]`` is not big after all (encode it whole)."""
    tag = message["t"]
    try:
        parts = pack_parts(message, key)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"cannot encode {tag!r}: {_clip(str(exc))}") from exc
    if parts is not None:
        size = int.from_bytes(parts[0][:_HEADER_SIZE], "big")
        if size > max_frame_size:
            raise WireError(
                f"cannot send {tag!r}: its frame of {size} bytes is over the "
                f"{max_frame_size}-byte limit"
            )
    return parts


class BigFrame:
    """Where a frame of :data:`BIG` bytes or more is gathered: the reader reads straight into
    :meth:`view` (``os.readv``) instead of through the stream buffer, one copy instead of
    three (read, append, slice). The buffer is kept for the next big frame (up to
    ``_KEEP`` bytes): fresh memory costs a page fault per 4 KiB written, which for 1 MB is
    several times the copy itself."""

    __slots__ = ("buffer", "filled", "size")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.size = 0  # of the frame coming in; 0: none
        self.filled = 0

    @property
    def pending(self) -> bool:
        """A frame is coming in and not complete yet."""
        return self.filled < self.size

    def start(self, size: int, head: bytes | bytearray) -> None:
        """A frame of ``size`` bytes begins with ``head``."""
        if len(self.buffer) < size:
            self.buffer = bytearray(size)
        self.buffer[: len(head)] = head
        self.size = size
        self.filled = len(head)

    def view(self) -> memoryview:
        """Where the frame's next bytes go."""
        return memoryview(self.buffer)[self.filled : self.size]

    def take(self, data: bytes) -> bytes:
        """Keep what of ``data`` belongs to the frame; return the rest."""
        n = min(len(data), self.size - self.filled)
        self.buffer[self.filled : self.filled + n] = data[:n]
        self.filled += n
        return data[n:]

    def finish(self) -> memoryview:
        """The complete frame; valid until the next :meth:`start` (decode it first)."""
        frame = memoryview(self.buffer)[: self.size]
        if len(self.buffer) > _KEEP:
            self.buffer = bytearray()  # ``frame`` keeps the big one alive while it is used
        self.size = self.filled = 0
        return frame


class FrameBuffer:
    """Frames out of a byte stream (a 4-byte big-endian length, then the payload): the half
    of reading that both ends share, the host's :class:`~plugin_execution.protocol.Connection`
    and the worker's :class:`FrameDecoder`. Problems raise ``error`` (the subclass's type).

    :meth:`feed` bytes as they arrive (``b""`` at EOF). A big frame (see :class:`BigFrame`)
    may instead be read straight into :meth:`big_view`, then :meth:`big_filled`.
    """

    error: type[Exception] = WireError

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._pos = 0  # start of the unread part of _buffer
        self._eof = False
        self._big = BigFrame()
        # What one read brought when nothing was buffered, read where it lies: the usual
        # case (one read, whole frames) then costs no copy into the buffer and out of it.
        self._chunk: bytes | None = None
        self._chunk_pos = 0

    def feed(self, data: bytes) -> None:
        """Add bytes received from the peer; ``b""`` means the peer closed its end (EOF).
        Only buffers: problems surface when the frames are read. Data after EOF is an
        error."""
        if not data:
            self._eof = True
        elif self._eof:
            raise self.error("received data after EOF")
        else:
            if self._big.pending:
                data = self._big.take(data)
                if not data:
                    return
            if self._chunk is None and self._pos == len(self._buffer):
                self._chunk, self._chunk_pos = data, 0
                return
            self._absorb()
            self._buffer += data

    def _absorb(self) -> None:
        """Move what is left of the chunk into the buffer (a frame it does not hold whole)."""
        chunk = self._chunk
        if chunk is not None:
            self._chunk = None
            if self._pos == len(self._buffer):
                del self._buffer[:]
                self._pos = 0
            self._buffer += memoryview(chunk)[self._chunk_pos :]

    def big_view(self) -> memoryview | None:
        """Where to read the rest of a big frame coming in, straight from the socket (then
        :meth:`big_filled`): one copy instead of three for a 1 MB payload. None if none."""
        return self._big.view() if self._big.pending else None

    def big_filled(self, count: int) -> None:
        """``count`` bytes were read into :meth:`big_view` (0: the peer closed its end)."""
        if not count:
            self._eof = True
        else:
            self._big.filled += count

    def _next_frame(self) -> bytearray | memoryview | None:
        """The next complete frame's payload, or None when more data is needed."""
        big = self._big
        if big.size:
            if big.pending:
                if self._eof:
                    raise self.error(
                        f"the peer closed the connection inside a frame ({big.filled} of "
                        f"{big.size} bytes received)"
                    )
                return None
            return big.finish()
        chunk = self._chunk
        if chunk is not None:
            start = self._chunk_pos
            if len(chunk) - start >= _HEADER_SIZE:
                size = int.from_bytes(chunk[start : start + _HEADER_SIZE], "big")
                end = start + _HEADER_SIZE + size
                if size <= self.max_frame_size and end <= len(chunk):
                    if end == len(chunk):
                        self._chunk = None
                    else:
                        self._chunk_pos = end
                    return memoryview(chunk)[start + _HEADER_SIZE : end]
            self._absorb()  # a frame it does not hold whole, or one to refuse: as buffered
        buffer, start = self._buffer, self._pos
        available = len(buffer) - start
        if available < _HEADER_SIZE:
            if self._eof and available:
                raise self.error(
                    f"the peer closed the connection inside a frame header "
                    f"({available} of {_HEADER_SIZE} bytes)"
                )
            return None
        size = int.from_bytes(buffer[start : start + _HEADER_SIZE], "big")
        if size > self.max_frame_size:
            raise self.error(
                f"the peer announced a frame of {size} bytes, over the "
                f"{self.max_frame_size}-byte limit"
            )
        end = start + _HEADER_SIZE + size
        if end > len(buffer):
            if self._eof:
                raise self.error(
                    f"the peer closed the connection inside a frame ({available} of "
                    f"{_HEADER_SIZE + size} bytes received)"
                )
            if size >= BIG:  # the rest goes straight into a buffer of its own
                self._big.start(size, buffer[start + _HEADER_SIZE :])
                del buffer[:]
                self._pos = 0
            return None
        payload = buffer[start + _HEADER_SIZE : end]
        # Drop what was read once it is most of the buffer: each byte moves at most once
        # more, so a big frame arriving in many small pieces costs linear time.
        if end * 2 >= len(buffer):
            del buffer[:end]
            self._pos = 0
        else:
            self._pos = end
        return payload


class FrameDecoder(FrameBuffer):
    """Turns a byte stream into ``(tag, fields)`` messages.

    :meth:`feed` bytes as they arrive (``b""`` at EOF), then iterate: the iteration yields
    the messages complete so far and stops; feed more and iterate again. A bad frame raises
    :class:`WireError`, and so does every later iteration. Not thread-safe.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        super().__init__(max_frame_size)
        self._failure: WireError | None = None

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


def _decode(payload: bytearray | memoryview) -> tuple[str, dict[str, Any]]:
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises a zoo of ValueError/TypeError subclasses
        raise WireError(f"a frame is not valid msgpack: {_clip(str(exc))}") from exc
    if type(message) is not dict:
        raise WireError(f"a frame holds {type(message).__name__}, not a map")
    tag = message.pop("t", None)
    _check_fields(tag, message.keys())
    return tag, message
