"""Channel: what a session-style channel handler talks through.

``async def chat(ctx, channel)`` gets a :class:`Channel` whichever backend runs it: in-process
it is the host's end of the WebSocket itself, in a worker process it is a proxy whose messages
travel over the worker protocol. Both behave the same way.

Standard library only: worker children import this module.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__all__ = [
    "GOING_AWAY",
    "INTERNAL_ERROR",
    "MESSAGE_TOO_BIG",
    "NORMAL_CLOSURE",
    "POLICY_VIOLATION",
    "TRY_AGAIN_LATER",
    "Channel",
    "ChannelClosed",
    "check_close_code",
    "check_message",
    "clip_reason",
    "sendable_close_code",
]

#: WebSocket close codes (RFC 6455 section 7.4) the channels use.
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013

#: A close frame's reason is at most 123 bytes of UTF-8.
_MAX_REASON_BYTES = 123


def clip_reason(reason: str) -> str:
    """``reason`` cut to what a close frame can carry (123 bytes of UTF-8)."""
    data = reason.encode("utf-8")
    if len(data) <= _MAX_REASON_BYTES:
        return reason
    return data[: _MAX_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


class ChannelClosed(Exception):
    """The channel is closed: no more messages can be received or sent.

    ``code`` and ``reason`` are the WebSocket close code and reason, when known.
    """

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        detail = f" with code {code}" if code is not None else ""
        super().__init__(f"the channel is closed{detail}" + (f": {reason}" if reason else ""))


class Channel:
    """A live, two-way message channel to one WebSocket client.

    Messages are ``str`` (text frames) or ``bytes`` (binary frames), delivered in order.

    - ``await channel.receive()``: the next message; raises :class:`ChannelClosed` once the
      channel was closed by this side. A checkpoint. When the *client* disconnects, the
      handler is cancelled instead (its ``finally`` blocks run, then ``trio.Cancelled``
      ends it), so a handler never needs to handle a client going away.
    - ``await channel.send(message)``: waits while the client is slow to read
      (backpressure); raises :class:`ChannelClosed` after a close. A checkpoint.
    - ``async for message in channel``: receive until the channel is closed.
    - ``await channel.close(code=1000, reason="")``: close the WebSocket with that code; the
      handler may go on running, but can no longer send or receive. Idempotent.
    - ``connection_id``, ``request_path`` (the URL path the client asked for, query string
      included), ``headers`` (the handshake's headers, names lower-case, read-only; the
      credentials headers are left out) and ``principal`` (what the host's ``authorize``
      hook returned, when it returned more than ``True``).
    """

    connection_id: str
    request_path: str
    headers: Mapping[str, str]
    principal: Any = None

    async def receive(self) -> str | bytes:
        raise NotImplementedError

    async def send(self, message: str | bytes) -> None:
        raise NotImplementedError

    async def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        raise NotImplementedError

    def __aiter__(self) -> Channel:
        return self

    async def __anext__(self) -> str | bytes:
        try:
            return await self.receive()
        except ChannelClosed:
            raise StopAsyncIteration from None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.connection_id} {self.request_path}>"


def sendable_close_code(code: object) -> bool:
    """Whether ``code`` may be sent in a close frame (RFC 6455 section 7.4): 1000-1003,
    1007-1014 and the 3000-4999 of libraries and applications; never the reserved ones
    (1004-1006, 1015: "no status", "abnormal closure"...) nor anything else."""
    return type(code) is int and (
        1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999
    )


def check_close_code(code: object) -> None:
    """Raise ValueError unless ``code`` may be sent in a close frame."""
    if not sendable_close_code(code):
        raise ValueError(
            f"close code {code!r} cannot be sent: use 1000-1003, 1007-1014 or 3000-4999 "
            "(RFC 6455 section 7.4)"
        )


def check_message(message: object) -> None:
    """Raise TypeError unless ``message`` can be a WebSocket message (str or bytes)."""
    if type(message) is not str and type(message) is not bytes:
        raise TypeError(
            f"a channel message is str (a text frame) or bytes (a binary frame), "
            f"not {type(message).__name__}"
        )
