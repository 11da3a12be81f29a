"""The messages of the host <-> worker protocol: what each says, and who may send it.

Each message is a small frozen attrs class with a ``tag`` (its name on the wire); its
fields are the keys of its frame's msgpack map. :data:`MESSAGE_TYPES` lists them by tag;
the host sends ``Execute``, ``Cancel``, ``Ping``... and the worker ``Hello``, ``Result``,
``Error``, ``Pong``... (``SENT_BY``); channel data, credit and close travel both ways.
Pure data: no encoding here (see ``_codec``) and no I/O anywhere in the package.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final, Literal, TypeAlias, get_args

import attrs

from ..errors import ExecutionError

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_FRAME_SIZE: Final = 64 * 1024 * 1024
#: The most values (maps and arrays, each counted with its members) a host decodes from one
#: frame. A value can take one byte on the wire and ~64 once decoded (an empty map is a
#: dict): without a bound, a 64 MiB frame a worker wrote itself is ~4.6 GB of the host's
#: memory and seconds of its event loop. Past it, the frame is a :class:`ProtocolError`.
#: Frames of less than half this many bytes cannot hold more, and are decoded uncounted.
DEFAULT_MAX_FRAME_VALUES: Final = 1 << 21
#: The longest id a frame may carry, in characters: execution, plugin, handler and channel
#: ids and a platform call's service and method names. Real ids are at most 128 characters
#: (see ``types.py``); a longer one is a :class:`ProtocolError` when received, so a worker
#: cannot make the host keep (or echo) megabytes under an "id".
MAX_ID_LENGTH: Final = 256

Role: TypeAlias = Literal["host", "worker"]


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
class Batch:
    """Several executions in one frame, run one after another in the order given.

    Each of ``executes`` is the field map of an :class:`Execute` (without its tag) and is
    answered as if it had come alone: its own ``Result`` or ``Error``, events, deadline
    (``timeout``, counted from when the batch arrived) and ``Cancel``. A member cancelled
    before its turn is answered ``ABORTED`` at once and never started. One after another,
    even for async handlers: a batch takes one of the worker's slots, as one execution does
    (``backend.map`` sends them; see ``host/batch.py``). ``linger`` as ``Execute.linger``,
    after the last member.
    """

    tag: ClassVar[str] = "batch"
    executes: list[Any]
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
    | Batch
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

#: The tags each side may send; the other side may receive exactly those.
SENT_BY: Final[dict[Role, frozenset[str]]] = {
    "host": frozenset(
        cls.tag
        for cls in (
            Execute,
            Batch,
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
PEER: Final[dict[Role, Role]] = {"host": "worker", "worker": "host"}
