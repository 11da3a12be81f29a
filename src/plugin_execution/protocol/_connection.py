"""The host <-> worker protocol, sans-I/O: typed messages in, bytes out, and back.

Like h11 and wsproto, nothing here touches a socket, a clock or a thread. A
:class:`Connection` turns messages into bytes (:meth:`Connection.send`) and bytes into
messages (:meth:`Connection.receive_data`, :meth:`Connection.next_message`); the host's
I/O loop around it is a few lines.

A frame is a 4-byte big-endian payload length, then a msgpack map
``{"t": <tag>, <field>: <value>, ...}`` whose keys are the attrs field names of the message.
This module is the definition of the protocol. :mod:`plugin_execution.worker._wire` writes
and reads the same bytes as plain dicts with the standard library and msgpack only, so a
worker child starts without attrs and cattrs; the tests hold the two to the same bytes.

Every way incoming bytes can be wrong raises :class:`ProtocolError`, and nothing else.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Final, Literal, NamedTuple, TypeAlias, Union, get_args, get_origin

import attrs
import cattrs
import msgpack  # type: ignore[import-untyped,unused-ignore]
from cattrs.fns import identity
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.v import format_exception

from .converter import converter
from .errors import ExecutionError
from .worker._wire import FrameBuffer, pack_parts

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_ID_LENGTH",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "Cancel",
    "ChannelClose",
    "ChannelCredit",
    "ChannelData",
    "ChannelOpen",
    "Connection",
    "Error",
    "Event",
    "Execute",
    "Hello",
    "Message",
    "Ping",
    "PlatformCall",
    "PlatformReply",
    "Pong",
    "ProtocolError",
    "Result",
    "Role",
    "Shutdown",
    "Warmed",
    "Warmup",
]

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_FRAME_SIZE: Final = 64 * 1024 * 1024
#: The longest id a frame may carry, in characters: execution, plugin, handler and channel
#: ids and a platform call's service and method names. Real ids are at most 128 characters
#: (see ``types.py``); a longer one is a :class:`ProtocolError` when received, so a worker
#: cannot make the host keep (or echo) megabytes under an "id".
MAX_ID_LENGTH: Final = 256
_ID_FIELDS: Final = frozenset(
    {"execution_id", "plugin_id", "handler_id", "channel_id", "service", "method"}
)
_HEADER_SIZE = 4

Role: TypeAlias = Literal["host", "worker"]


class ProtocolError(Exception):
    """The byte stream broke the protocol, or a message could not be put on it.

    Receiving: a frame over the size limit, a frame cut short by EOF, a payload that is not
    a msgpack map, an unknown tag, a message sent the wrong way, missing, extra or ill-typed
    fields, no ``Hello`` first or the wrong version. The connection cannot be trusted after
    that: every later :meth:`Connection.next_message` raises again.

    Sending: a message this role must not send, or content that cannot be encoded (not
    plain data, over the frame limit). Nothing was emitted; the connection stays usable.
    """


# -- messages ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Hello:
    """The worker's first message: the protocol version it speaks and its pid."""

    tag: ClassVar[str] = "hello"
    version: int
    pid: int


@attrs.frozen(kw_only=True)
class Execute:
    """Run ``entry`` (``"pkg.mod:attr"``, importable once ``root`` is on ``sys.path``).

    ``workspace`` is a directory path the worker creates when the handler first asks for
    it; ``timeout`` is in seconds. ``warmup`` marks an execution sent only to warm the
    handler up. ``linger``: seconds the worker may poll for the next request after
    answering this one before it sleeps (the host sets it when this execution is alone in
    flight, so the next request likely follows at once; 0: sleep at once).
    """

    tag: ClassVar[str] = "execute"
    execution_id: str
    plugin_id: str
    handler_id: str
    entry: str
    root: str | None
    input: Any
    context: dict[str, Any]
    workspace: str | None
    timeout: float | None
    warmup: bool = False
    linger: float = 0.0


@attrs.frozen(kw_only=True)
class Event:
    """Something a running handler emitted (``kind``: progress, log, custom...)."""

    tag: ClassVar[str] = "event"
    execution_id: str
    kind: str
    data: Any
    timestamp: float


@attrs.frozen(kw_only=True)
class Result:
    """An execution finished: its output, how long it ran, and what the worker knows."""

    tag: ClassVar[str] = "result"
    execution_id: str
    output: Any
    duration_s: float
    metadata: dict[str, Any]


@attrs.frozen(kw_only=True)
class Error:
    """An execution failed; ``error`` is the ``ExecutionError.to_dict()`` wire form."""

    tag: ClassVar[str] = "error"
    execution_id: str
    error: dict[str, Any]

    @classmethod
    def from_exception(cls, execution_id: str, exc: ExecutionError) -> Error:
        """The message that reports ``exc`` as the end of execution ``execution_id``."""
        return cls(execution_id=execution_id, error=exc.to_dict())

    def exception(self) -> ExecutionError:
        """A new exception of the subclass the error's code names, ready to raise."""
        return ExecutionError.from_dict(self.error)


@attrs.frozen(kw_only=True)
class Cancel:
    """Stop an execution; the worker answers with its ``Error`` (or its ``Result``)."""

    tag: ClassVar[str] = "cancel"
    execution_id: str
    reason: str = ""


@attrs.frozen(kw_only=True)
class Ping:
    """A health check; the worker answers ``Pong`` with the same ``seq``."""

    tag: ClassVar[str] = "ping"
    seq: int


@attrs.frozen(kw_only=True)
class Pong:
    """The answer to ``Ping``, with the worker's resident memory, age and load."""

    tag: ClassVar[str] = "pong"
    seq: int
    rss_bytes: int
    uptime_s: float
    in_flight: int


@attrs.frozen(kw_only=True)
class Shutdown:
    """Exit now; the worker does not answer."""

    tag: ClassVar[str] = "shutdown"


@attrs.frozen(kw_only=True)
class Warmup:
    """Import a handler and run its ``warmup()`` hook; the worker answers ``Warmed``."""

    tag: ClassVar[str] = "warmup"
    plugin_id: str
    handler_id: str
    entry: str
    root: str | None


@attrs.frozen(kw_only=True)
class Warmed:
    """The answer to ``Warmup``; ``error`` is an ``ExecutionError.to_dict()`` when not ok."""

    tag: ClassVar[str] = "warmed"
    plugin_id: str
    handler_id: str
    ok: bool
    error: dict[str, Any] | None


@attrs.frozen(kw_only=True)
class ChannelOpen:
    """A WebSocket connection for a channel handler opened on the host.

    Sent just before the ``Execute`` of execution ``execution_id``, whose handler then gets
    the channel. ``window`` is the flow-control window of both directions: each side sends
    at most ``window`` ``ChannelData`` that the other has not yet returned as credit
    (``ChannelCredit``). ``principal`` is what the host's authorization gave, as plain data.
    """

    tag: ClassVar[str] = "ch_open"
    channel_id: str
    execution_id: str
    path: str
    headers: dict[str, str]
    window: int
    principal: Any


@attrs.frozen(kw_only=True)
class ChannelData:
    """One WebSocket message, either way: text as ``str``, binary as ``bytes``."""

    tag: ClassVar[str] = "ch_data"
    channel_id: str
    data: str | bytes


@attrs.frozen(kw_only=True)
class ChannelClose:
    """A channel closed, either way, with a WebSocket close code and reason."""

    tag: ClassVar[str] = "ch_close"
    channel_id: str
    code: int
    reason: str


@attrs.frozen(kw_only=True)
class ChannelCredit:
    """Either way: the sender consumed ``messages`` more ``ChannelData`` of the channel, so
    the peer may send that many more (credit-based flow control, see ``ChannelOpen``)."""

    tag: ClassVar[str] = "ch_credit"
    channel_id: str
    messages: int


@attrs.frozen(kw_only=True)
class PlatformCall:
    """A handler calls a platform service on the host; answered by ``PlatformReply``."""

    tag: ClassVar[str] = "pcall"
    call_id: int
    execution_id: str
    service: str
    method: str
    args: list[Any]
    kwargs: dict[str, Any]


@attrs.frozen(kw_only=True)
class PlatformReply:
    """The answer to ``PlatformCall``: ``value``, or ``error`` (an error's wire form)."""

    tag: ClassVar[str] = "preply"
    call_id: int
    ok: bool
    value: Any
    error: dict[str, Any] | None


Message: TypeAlias = (
    Hello
    | Execute
    | Event
    | Result
    | Error
    | Cancel
    | Ping
    | Pong
    | Shutdown
    | Warmup
    | Warmed
    | ChannelOpen
    | ChannelData
    | ChannelClose
    | ChannelCredit
    | PlatformCall
    | PlatformReply
)

MESSAGE_TYPES: Final[dict[str, type[Message]]] = {cls.tag: cls for cls in get_args(Message)}

_SENT_BY: Final[dict[Role, frozenset[str]]] = {
    "host": frozenset(
        cls.tag
        for cls in (
            Execute,
            Cancel,
            Ping,
            Shutdown,
            Warmup,
            ChannelOpen,
            ChannelData,
            ChannelClose,
            ChannelCredit,
            PlatformReply,
        )
    ),
    "worker": frozenset(
        cls.tag
        for cls in (
            Hello,
            Event,
            Result,
            Error,
            Pong,
            Warmed,
            ChannelData,
            ChannelClose,
            ChannelCredit,
            PlatformCall,
        )
    ),
}
_PEER: Final[dict[Role, Role]] = {"host": "worker", "worker": "host"}


# -- codecs: built once per message class -------------------------------------------------


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
        got = f"{type(value).__name__} {_clip(repr(value), 40)}"
        raise _WrongType(f"expected {expected}, got {got}")

    return hook


def _describe(exc: BaseException, tp: type | None) -> str:
    return str(exc) if isinstance(exc, _WrongType) else format_exception(exc, tp)


class _Codec(NamedTuple):
    cls: type[Message]
    unstructure: Callable[[Any], dict[str, Any]]
    structure: Callable[[dict[str, Any], Any], Message]
    #: Every field name, and the strict check of each typed one: a decoded map with exactly
    #: these keys whose values pass becomes ``cls(**map)`` directly (what ``structure``
    #: would build, at a fraction of the cost); anything else goes through ``structure``,
    #: which says precisely what is wrong.
    keys: frozenset[str]
    checks: tuple[tuple[str, Callable[[object], bool]], ...]


def _codec(cls: type[Message]) -> _Codec:
    fields = attrs.fields(attrs.resolve_types(cls))
    # Fields go to msgpack as they are: the packer hands anything it cannot pack natively
    # (an attrs value in ``input``, a set, a datetime) to the converter on the way.
    as_is: dict[str, Any] = {f.name: override(unstruct_hook=identity) for f in fields}
    strict: dict[str, Any] = {
        f.name: override(struct_hook=_strict_hook(f.type, f.name))
        for f in fields
        if f.type is not Any
    }
    return _Codec(
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


_CODECS: Final[dict[str, _Codec]] = {tag: _codec(cls) for tag, cls in MESSAGE_TYPES.items()}


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _problems(exc: Exception) -> str:
    try:
        return _clip("; ".join(cattrs.transform_error(exc, format_exception=_describe)))
    except Exception:  # cattrs' own formatting can fail (it sorts extra keys: an int key)
        return _clip(f"{type(exc).__name__}: {exc}")


def _fast_structure(codec: _Codec, data: dict[str, Any]) -> Message | None:
    """``codec.cls(**data)`` when ``data`` is exactly right, else None (see ``_Codec``)."""
    if data.keys() != codec.keys:
        return None
    for name, accepts in codec.checks:
        if not accepts(data[name]):
            return None
    return codec.cls(**data)


def _pack_plain(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


# -- the state machine -------------------------------------------------------------------


class Connection(FrameBuffer):
    """One end of a host <-> worker conversation, as a state machine over bytes.

    ``role`` is the side this object plays. A host must receive ``Hello`` (with
    :data:`PROTOCOL_VERSION`) before any other message; a worker must send it first. Each
    message type travels one way only (channel data and close travel both ways); a host
    receiving ``Execute`` is a :class:`ProtocolError`, and so is a host trying to send one.

    Not thread-safe: one I/O loop owns it.
    """

    error = ProtocolError

    def __init__(self, role: Role, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if role not in _PEER:
            raise ValueError(f"role must be 'host' or 'worker', not {role!r}")
        if not 0 < max_frame_size < 2 ** (8 * _HEADER_SIZE):
            raise ValueError(f"max_frame_size must be in 1..2**32-1, not {max_frame_size}")
        super().__init__(max_frame_size)
        self.role: Final = role
        self._sends = _SENT_BY[role]
        self._receives = _SENT_BY[_PEER[role]]
        self._greeted = False  # host: Hello received; worker: Hello sent
        self._failure: ProtocolError | None = None
        #: The payload size of the last message :meth:`next_message` returned, in bytes.
        self.frame_size = 0

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
        codec = _CODECS.get(tag) if isinstance(tag, str) else None
        if codec is None or type(message) is not codec.cls:
            raise ProtocolError(f"not a protocol message: {_clip(repr(message))}")
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
            raise ProtocolError(f"cannot encode {tag!r}: {_clip(str(exc))}") from exc
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
            data = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises a zoo of ValueError/TypeError subclasses
            raise ProtocolError(f"a frame is not valid msgpack: {_clip(str(exc))}") from exc
        if type(data) is not dict:
            raise ProtocolError(f"a frame holds {type(data).__name__}, not a map")
        tag = data.pop("t", None)
        codec = _CODECS.get(tag) if type(tag) is str else None
        if codec is None:
            raise ProtocolError(f"unknown message tag {_clip(repr(tag), 60)}")
        if tag not in self._receives:
            raise ProtocolError(f"a {_PEER[self.role]} must not send {tag!r} messages")
        message = _fast_structure(codec, data)
        if message is None:
            try:
                message = codec.structure(data, codec.cls)
            except Exception as exc:
                raise ProtocolError(f"malformed {tag!r} message: {_problems(exc)}") from exc
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
            payload: bytes = _pack_plain(fields) if parts is None else parts[0]
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"cannot encode 'execute': {_clip(str(exc))}") from exc
        size = len(payload) if parts is None else int.from_bytes(payload[:_HEADER_SIZE], "big")
        if size > self.max_frame_size:
            raise ProtocolError(
                f"cannot send 'execute': its frame of {size} bytes is over the "
                f"{self.max_frame_size}-byte limit"
            )
        if parts is not None:
            return parts
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
        payload = _pack_plain({"t": ChannelData.tag, "channel_id": channel_id, "data": data})
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
