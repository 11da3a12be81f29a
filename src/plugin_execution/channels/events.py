"""The ``events`` channel style: each lifecycle event is one short execution.

A channel declared with ``style = "events"`` has a handler ``async def on_event(ctx, input)``
run once per event of a connection: ``connect``, ``message`` (each message the client
sends), ``error`` (a text message that is not a valid JSON envelope) and ``disconnect``.
``input`` is a :class:`WSInput`; its ``sender`` replies to this client, broadcasts to every
client of the channel, or closes the connection. Consecutive events of one connection run
one after the other, in order, but each is its own execution: on a worker pool they may run
on different workers, so a handler keeps no state between them in memory.

A JSON envelope is a text message holding an object
``{"type": str, "payload": any, "message_id": str, "timestamp": number}``; ``type`` is
required, ``message_id`` and ``timestamp`` are filled in when missing. A binary message is
a ``message`` event whose ``message`` is None and whose ``data`` is the bytes.

How it works: the host executes :func:`dispatch` (this module's entry) with the event as
plain data; it calls the plugin's handler, and the sender's calls travel back to the host as
events of that execution (``ws.send``, ``ws.broadcast``, ``ws.close``), so every backend
carries them. A handler's non-None return value is sent as a reply too.

Standard library only: worker children import this module.
"""

from __future__ import annotations

import json
import os
import time

from ..errors import HandlerContractError
from ..handlers import Handler, load_handler
from .channel import check_close_code

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__all__ = [
    "DISPATCH_ENTRY",
    "WSInput",
    "WSSender",
    "dispatch",
    "encode_message",
    "envelope",
    "parse_envelope",
]

#: The entry the host executes for every event of an events-style channel.
DISPATCH_ENTRY = "plugin_execution.channels.events:dispatch"

_handlers: dict[tuple[str, str | None], Handler] = {}


def envelope(
    type: str,
    payload: Any = None,
    *,
    message_id: str | None = None,
    reply_to: str | None = None,
) -> dict[str, Any]:
    """A JSON envelope ``{type, payload, message_id, timestamp}`` (plus ``reply_to``)."""
    message: dict[str, Any] = {
        "type": type,
        "payload": payload,
        "message_id": message_id or os.urandom(8).hex(),
        "timestamp": time.time(),
    }
    if reply_to is not None:
        message["reply_to"] = reply_to
    return message


def parse_envelope(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(envelope, None)`` for a valid JSON envelope, else ``(None, what is wrong)``."""
    try:
        message = json.loads(text)
    except ValueError as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(message, dict):
        return None, f"a message is a JSON object, not {type(message).__name__}"
    kind = message.get("type")
    if not isinstance(kind, str) or not kind:
        return None, "the envelope has no 'type' (a non-empty string)"
    message_id = message.get("message_id")
    if message_id is None:
        message["message_id"] = os.urandom(8).hex()
    elif not isinstance(message_id, str):
        return None, "'message_id' must be a string"
    stamp = message.get("timestamp")
    if stamp is None:
        message["timestamp"] = time.time()
    elif isinstance(stamp, bool) or not isinstance(stamp, int | float):
        return None, "'timestamp' must be a number"
    message.setdefault("payload", None)
    return message, None


def encode_message(message: Any) -> str | bytes:
    """What a sender's message becomes on the wire: ``str`` and ``bytes`` as they are,
    anything else (a dict such as an :func:`envelope`, a list...) as JSON text."""
    if type(message) is str or type(message) is bytes:
        return message
    try:
        return json.dumps(message, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot send {type(message).__name__} as JSON: {exc}") from None


class WSSender:
    """Acts on the connection an event came from. Every method is a checkpoint.

    Calls are carried to the host as events of the execution and carried out there in
    order, as they arrive (a ``broadcast`` never waits for slow clients; see
    ``ConnectionRegistry.broadcast``).
    """

    __slots__ = ("_ctx", "connection_id", "path")

    def __init__(self, ctx: Any, connection_id: str, path: str) -> None:
        self._ctx = ctx
        self.connection_id = connection_id
        self.path = path

    async def reply(self, message: Any) -> None:
        """Send ``message`` (str, bytes, or JSON-able data) to this connection."""
        await self._ctx.emit("ws.send", {"data": encode_message(message)})

    async def broadcast(self, message: Any, *, include_self: bool = True) -> None:
        """Send ``message`` to every connection of this channel (this one too unless
        ``include_self`` is false)."""
        data = encode_message(message)
        await self._ctx.emit("ws.broadcast", {"data": data, "include_self": include_self})

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close this connection with ``code`` once the event is handled. ``ValueError``
        for a code a close frame may not carry (see ``check_close_code``)."""
        check_close_code(code)
        await self._ctx.emit("ws.close", {"code": int(code), "reason": str(reason)})


class WSInput:
    """One event of a connection, as an events-style handler gets it.

    ``event``: ``"connect"``, ``"message"``, ``"error"`` or ``"disconnect"``;
    ``connection_id``, ``path`` (the channel's route), ``headers``, ``principal``;
    ``message``: the parsed envelope of a ``message`` event (None for binary messages);
    ``data``: the raw message (``str`` or ``bytes``) of ``message`` and ``error`` events;
    ``error``: what is wrong with the message of an ``error`` event;
    ``close_code`` / ``close_reason``: how the connection ended (``disconnect``);
    ``sender``: a :class:`WSSender` for this connection.
    """

    __slots__ = (
        "close_code",
        "close_reason",
        "connection_id",
        "data",
        "error",
        "event",
        "headers",
        "message",
        "path",
        "principal",
        "sender",
    )

    def __init__(self, fields: Mapping[str, Any], sender: WSSender) -> None:
        self.event: str = fields["event"]
        self.connection_id: str = fields["connection_id"]
        self.path: str = fields["path"]
        self.headers: Mapping[str, str] = fields.get("headers") or {}
        self.principal: Any = fields.get("principal")
        self.message: dict[str, Any] | None = fields.get("message")
        self.data: str | bytes | None = fields.get("data")
        self.error: str | None = fields.get("error")
        self.close_code: int | None = fields.get("close_code")
        self.close_reason: str | None = fields.get("close_reason")
        self.sender = sender

    def __repr__(self) -> str:
        return f"<WSInput {self.event} {self.connection_id} {self.path}>"


async def dispatch(ctx: Any, input: dict[str, Any]) -> Any:
    """The handler the host executes per event: run the channel's own handler on it."""
    key = (input["entry"], input.get("root"))
    handler = _handlers.get(key)
    if handler is None:
        handler = load_handler(*key)
        if not handler.is_async:
            raise HandlerContractError(
                f"channel entry {key[0]!r} is not an async function: an events-style "
                "channel handler is 'async def handler(ctx, input)'",
                details={"entry": key[0]},
            )
        _handlers[key] = handler
    sender = WSSender(ctx, input["connection_id"], input["path"])
    return await handler.call(ctx, WSInput(input, sender))
