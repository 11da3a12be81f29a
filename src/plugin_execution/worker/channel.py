"""WorkerChannel: a session handler's channel inside a worker process.

The WebSocket lives on the host; this proxy speaks ``ch_data`` / ``ch_credit`` / ``ch_close``
frames with the host's bridge (``plugin_execution.channels.bridge``, which documents the flow
control). It lives on the worker's trio loop thread: the reader thread hands it the frames
of each read in one batch (``Worker._deliver_channels``), so a burst of messages costs
one wake-up of the loop, not one per message. It writes its frames with the ``send`` it is
given (``FrameWriter.send``) and knows nothing else of the worker.

Imported only when a host opens a channel, by a worker that then also runs trio.
"""

from __future__ import annotations

from collections import deque
from types import MappingProxyType

import trio

from ..channels.channel import (
    NORMAL_CLOSURE,
    Channel,
    ChannelClosed,
    check_close_code,
    check_message,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["WorkerChannel"]


class WorkerChannel(Channel):
    """The worker's end of one bridged channel; see :class:`Channel` for the API.

    Created by the reader thread on ``ch_open``; everything else runs on the trio loop.
    A ``ch_close`` from the host (the client went away, or the host closed the connection)
    cancels the handler, as in-process.
    """

    def __init__(self, send: Callable[[str, dict[str, Any]], None], msg: dict[str, Any]) -> None:
        self._send = send
        self.connection_id: str = msg["channel_id"]
        self.execution_id: str = msg["execution_id"]
        self.request_path: str = msg["path"]
        self.headers = MappingProxyType(dict(msg["headers"]))
        self.principal = msg["principal"]
        window = int(msg["window"])
        self._credit = window  # ch_data the host will still take
        self._ack_every = max(1, window // 2)
        self._consumed = 0
        self._inbox: deque[str | bytes] = deque()
        self._closed: tuple[int | None, str] | None = None
        self._receivers = trio.lowlevel.ParkingLot()
        self._senders = trio.lowlevel.ParkingLot()
        self.cancel: Callable[[], None] | None = None  # cancels the handler (set by the runtime)

    # -- the Channel API ------------------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The client's next message; raises ChannelClosed once closed. A checkpoint."""
        if self._inbox and self._closed is None:
            await trio.lowlevel.checkpoint()
        while not self._inbox or self._closed is not None:
            if self._closed is not None:
                raise ChannelClosed(*self._closed)
            await self._receivers.park()
        message = self._inbox.popleft()
        self._consumed += 1
        if self._consumed >= self._ack_every:
            self._send("ch_credit", {"channel_id": self.connection_id, "messages": self._consumed})
            self._consumed = 0
        return message

    async def send(self, message: str | bytes) -> None:
        """Send one message; waits while the host has no room for it (its window is full
        because the client reads slowly). Raises ChannelClosed once closed. A checkpoint."""
        check_message(message)
        while self._credit <= 0 and self._closed is None:
            await self._senders.park()
        if self._closed is not None:
            await trio.lowlevel.checkpoint()
            raise ChannelClosed(*self._closed)
        self._credit -= 1
        self._send("ch_data", {"channel_id": self.connection_id, "data": message})
        await trio.lowlevel.checkpoint()

    async def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        """Ask the host to close the WebSocket with ``code``. Idempotent."""
        check_close_code(code)
        if self._closed is None:
            self._closed = (code, reason)
            self._send(
                "ch_close", {"channel_id": self.connection_id, "code": code, "reason": reason}
            )
            self._wake_all()
        await trio.lowlevel.checkpoint()

    # -- from the runtime (on the trio loop) ----------------------------------------------

    def deliver(self, tag: str, msg: dict[str, Any]) -> None:
        if tag == "ch_data":
            if self._closed is None:
                self._inbox.append(msg["data"])
                self._receivers.unpark()
        elif tag == "ch_credit":
            self._credit += msg["messages"]
            self._senders.unpark_all()
        elif tag == "ch_close" and self._closed is None:
            self._closed = (msg["code"], msg["reason"])
            self._wake_all()
            if self.cancel is not None:
                self.cancel()

    def end(self) -> None:
        """The handler returned: the channel is closed for anything still holding it."""
        if self._closed is None:
            self._closed = (None, "the handler ended")
            self._wake_all()

    def _wake_all(self) -> None:
        self._receivers.unpark_all()
        self._senders.unpark_all()
