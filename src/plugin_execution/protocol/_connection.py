"""The sans-I/O state machine of one end of a host <-> worker conversation.

Like h11 and wsproto, nothing here touches a socket, a clock or a thread: a
:class:`Connection` turns messages into bytes (:meth:`Connection.send`) and bytes into
messages (:meth:`Connection.receive_data`, :meth:`Connection.next_message`), enforcing the
framing (``worker._wire.FrameBuffer``, shared with the worker's lean mirror), the direction
of each message and the ``Hello`` handshake. The host's I/O loop around it is a few lines.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import msgpack  # type: ignore[import-untyped,unused-ignore]

from ..converter import converter
from ..worker._wire import PACKER_KEEP, FrameBuffer, pack_parts
from ._codec import (
    CODECS,
    TooManyValues,
    clip,
    fast_structure,
    pack_plain,
    problems,
    structure_result,
    unpack_counted,
)
from ._messages import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_FRAME_VALUES,
    PEER,
    PROTOCOL_VERSION,
    SENT_BY,
    Batch,
    ChannelData,
    Execute,
    Hello,
    Message,
    Role,
)

_HEADER_SIZE = 4
# A Batch frame's map up to its members' array, and its last key (see send_batch).
_BATCH_HEAD: Final = b"\x83" + b"".join(map(pack_plain, ("t", Batch.tag, "executes")))
_LINGER_KEY: Final = pack_plain("linger")


class ProtocolError(Exception):
    """The byte stream broke the protocol, or a message could not be put on it.

    Receiving: a frame over the size limit, a frame cut short by EOF, a payload that is not
    a msgpack map, an unknown tag, a message sent the wrong way, missing, extra or ill-typed
    fields, no ``Hello`` first or the wrong version. The connection cannot be trusted after
    that: every later :meth:`Connection.next_message` raises again.

    Sending: a message this role must not send, or content that cannot be encoded (not
    plain data, over the frame limit). Nothing was emitted; the connection stays usable.
    """


class Connection(FrameBuffer):
    """One end of a host <-> worker conversation, as a state machine over bytes.

    ``role`` is the side this object plays. A host must receive ``Hello`` (with
    :data:`PROTOCOL_VERSION`) before any other message; a worker must send it first. Each
    message type travels one way only (channel data and close travel both ways); a host
    receiving ``Execute`` is a :class:`ProtocolError`, and so is a host trying to send one.

    Not thread-safe: one I/O loop owns it.
    """

    error = ProtocolError

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_frame_values: int = DEFAULT_MAX_FRAME_VALUES,
    ) -> None:
        if role not in PEER:
            raise ValueError(f"role must be 'host' or 'worker', not {role!r}")
        if not 0 < max_frame_size < 2 ** (8 * _HEADER_SIZE):
            raise ValueError(f"max_frame_size must be in 1..2**32-1, not {max_frame_size}")
        if max_frame_values < 1:
            raise ValueError(f"max_frame_values must be >= 1, not {max_frame_values}")
        super().__init__(max_frame_size)
        #: The most maps, arrays and members decoded from one frame (see
        #: :data:`DEFAULT_MAX_FRAME_VALUES`).
        self.max_frame_values = max_frame_values
        self.role: Final = role
        self._sends = SENT_BY[role]
        self._receives = SENT_BY[PEER[role]]
        self._greeted = False  # host: Hello received; worker: Hello sent
        self._fast_results = False  # a greeted host: Result frames take structure_result
        self._failure: ProtocolError | None = None
        #: The payload size of the last message :meth:`next_message` returned, in bytes.
        self.frame_size = 0
        # msgpack.packb makes a Packer (and its buffer) per call; one kept here packs the
        # same bytes for about half the cost. Not shared: a Packer is not thread-safe.
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def pack_plain(self, value: Any) -> bytes:
        """msgpack of plain data, as ``_codec.pack_plain`` (the hot paths' encoding), with
        this connection's packer; after a big payload, a new packer (see ``PACKER_KEEP``)."""
        packed: bytes = self._pack(value)
        if len(packed) > PACKER_KEEP:
            self._pack = msgpack.Packer(use_bin_type=True).pack
        return packed

    @property
    def eof_received(self) -> bool:
        """The peer closed its end; ``next_message()`` returning ``None`` now means the
        stream ended cleanly at a frame boundary (a cut frame raises instead)."""
        return self._eof

    # -- sending ------------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Encode ``message`` as one frame, ready to write to the peer.

        Raises :class:`ProtocolError` when this role must not send it now, or when it
        cannot be encoded; nothing is emitted then, and the connection stays usable.
        """
        tag = getattr(type(message), "tag", None)
        codec = CODECS.get(tag) if isinstance(tag, str) else None
        if codec is None or type(message) is not codec.cls:
            raise ProtocolError(f"not a protocol message: {clip(repr(message))}")
        if tag not in self._sends:
            raise ProtocolError(f"a {self.role} must not send {tag!r} messages")
        if self.role == "worker" and (tag == Hello.tag) == self._greeted:
            raise ProtocolError(
                "a worker sends 'hello' only once"
                if self._greeted
                else f"a worker must send 'hello' before anything else, not {tag!r}"
            )
        try:
            payload: bytes = msgpack.packb(
                {"t": tag, **codec.unstructure(message)},
                use_bin_type=True,
                default=converter.unstructure,
            )
        except Exception as exc:  # msgpack's TypeError/ValueError/OverflowError, or a hook's
            raise ProtocolError(f"cannot encode {tag!r}: {clip(str(exc))}") from exc
        if len(payload) > self.max_frame_size:
            raise ProtocolError(
                f"cannot send {tag!r}: its frame of {len(payload)} bytes is over the "
                f"{self.max_frame_size}-byte limit"
            )
        if self.role == "worker":
            self._greeted = True
        return len(payload).to_bytes(_HEADER_SIZE, "big") + payload

    # -- receiving ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes received from the peer; ``b""`` means the peer closed its end (EOF).

        Only buffers: problems surface from :meth:`next_message`. Data after EOF is a
        :class:`ProtocolError`.
        """
        self.feed(data)

    def next_message(self) -> Message | None:
        """The next complete message, or ``None`` when more data is needed (or, once
        :attr:`eof_received`, when the stream ended cleanly).

        Raises :class:`ProtocolError` for anything wrong in the stream; after that, every
        call raises again.
        """
        if self._failure is not None:
            raise ProtocolError(f"the connection already failed: {self._failure}")
        try:
            payload = self._next_frame()
            if payload is None:
                return None
            self.frame_size = len(payload)
            return self._decode(payload)
        except ProtocolError as exc:
            self._failure = exc
            raise

    def __iter__(self) -> Iterator[Message]:
        """The messages complete so far; iterate again after more :meth:`receive_data`."""
        while (message := self.next_message()) is not None:
            yield message

    def _decode(self, payload: bytearray | memoryview) -> Message:
        try:
            if 2 * len(payload) <= self.max_frame_values:  # too small to hold more
                data = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            else:
                data = unpack_counted(payload, self.max_frame_values)
        except TooManyValues as exc:
            raise ProtocolError(f"a frame of {len(payload)} bytes: {exc}") from None
        except Exception as exc:  # msgpack raises a zoo of ValueError/TypeError subclasses
            raise ProtocolError(f"a frame is not valid msgpack: {clip(str(exc))}") from exc
        if self._fast_results:  # a greeted host: a worker's answer, its usual frame
            result = structure_result(data)
            if result is not None:
                return result
        if type(data) is not dict:
            raise ProtocolError(f"a frame holds {type(data).__name__}, not a map")
        tag = data.pop("t", None)
        codec = CODECS.get(tag) if type(tag) is str else None
        if codec is None:
            raise ProtocolError(f"unknown message tag {clip(repr(tag), 60)}")
        if tag not in self._receives:
            raise ProtocolError(f"a {PEER[self.role]} must not send {tag!r} messages")
        message = fast_structure(codec, data)
        if message is None:
            try:
                message = codec.structure(data, codec.cls)
            except Exception as exc:
                raise ProtocolError(f"malformed {tag!r} message: {problems(exc)}") from exc
        if self.role == "host" and (not self._greeted or tag == Hello.tag):
            self._handshake(message)
        return message

    def send_execute(
        self,
        *,
        execution_id: str,
        plugin_id: str,
        handler_id: str,
        entry: str,
        root: str | None,
        input: Any,
        context: dict[str, Any],
        workspace: str | None,
        timeout: float | None,
        linger: float = 0.0,
    ) -> bytes | list[bytes]:
        """The frame of ``Execute(...)`` with these fields, as :meth:`send` would encode it,
        without building the message object: the host's per-execution hot path. An
        ``input`` of ``bytes`` of 64 KiB or more comes back as the frame's pieces, itself
        one of them, not copied (see ``pack_parts``; write them with ``os.writev``).

        ``input`` and ``context`` must be plain data (msgpack's own types); raises
        :class:`ProtocolError` otherwise, or for a frame over the size limit.
        """
        fields = {
            "t": Execute.tag,
            "execution_id": execution_id,
            "plugin_id": plugin_id,
            "handler_id": handler_id,
            "entry": entry,
            "root": root,
            "input": input,
            "context": context,
            "workspace": workspace,
            "timeout": timeout,
            "warmup": False,
            "linger": linger,
        }
        try:
            parts = pack_parts(fields, "input") if type(input) is bytes else None
            payload: bytes = self.pack_plain(fields) if parts is None else parts[0]
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"cannot encode 'execute': {clip(str(exc))}") from exc
        size = len(payload) if parts is None else int.from_bytes(payload[:_HEADER_SIZE], "big")
        if size > self.max_frame_size:
            raise ProtocolError(
                f"cannot send 'execute': its frame of {size} bytes is over the "
                f"{self.max_frame_size}-byte limit"
            )
        if parts is not None:
            return parts
        return len(payload).to_bytes(_HEADER_SIZE, "big") + payload

    def send_batch(self, members: list[bytes], linger: float = 0.0) -> bytes:
        """The frame of a ``Batch`` whose members are already packed: each of ``members``
        is the msgpack map of one execution's fields (``execute_fields``, packed with
        ``pack_plain``). The same bytes :meth:`send` makes of ``Batch(...)``, without
        packing the members again. Raises :class:`ProtocolError` for a frame over the
        size limit."""
        count = len(members)
        if count < 16:
            header = bytes((0x90 | count,))
        elif count < 1 << 16:
            header = b"\xdc" + count.to_bytes(2, "big")
        else:
            header = b"\xdd" + count.to_bytes(4, "big")
        payload = b"".join((_BATCH_HEAD, header, *members, _LINGER_KEY, pack_plain(float(linger))))
        if len(payload) > self.max_frame_size:
            raise ProtocolError(
                f"cannot send 'batch': its frame of {len(payload)} bytes is over the "
                f"{self.max_frame_size}-byte limit"
            )
        return len(payload).to_bytes(_HEADER_SIZE, "big") + payload

    def send_channel_data(self, channel_id: str, data: str | bytes) -> bytes:
        """The frame of ``ChannelData(channel_id=..., data=...)``, as :meth:`send` would
        encode it, without the message object: a bridged channel's per-message path.
        Raises :class:`ProtocolError` for data that is not ``str`` or ``bytes``, or a frame
        over the size limit."""
        if type(channel_id) is not str or (type(data) is not str and type(data) is not bytes):
            raise ProtocolError(
                f"cannot encode 'ch_data': channel_id is str and data str or bytes, not "
                f"{type(channel_id).__name__} and {type(data).__name__}"
            )
        payload = self.pack_plain({"t": ChannelData.tag, "channel_id": channel_id, "data": data})
        if len(payload) > self.max_frame_size:
            raise ProtocolError(
                f"cannot send 'ch_data': its frame of {len(payload)} bytes is over the "
                f"{self.max_frame_size}-byte limit"
            )
        return len(payload).to_bytes(_HEADER_SIZE, "big") + payload

    def _handshake(self, message: Message) -> None:
        if self._greeted:
            raise ProtocolError("the worker sent 'hello' twice")
        if not isinstance(message, Hello):
            raise ProtocolError(
                f"the worker must send 'hello' before anything else, not {message.tag!r}"
            )
        if message.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version mismatch: the worker speaks version {message.version}, "
                f"this host speaks version {PROTOCOL_VERSION}; run both from the same "
                f"plugin-execution installation"
            )
        self._greeted = True
        self._fast_results = self.role == "host" and "result" in self._receives
