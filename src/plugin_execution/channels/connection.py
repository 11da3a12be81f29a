"""ServerChannel: the host's end of one accepted WebSocket connection.

It is the :class:`~plugin_execution.channels.channel.Channel` an in-process session handler
gets, what the process backends bridge to their workers, and the record the
:class:`~plugin_execution.channels.registry.ConnectionRegistry` keeps.

Sending has two paths, so the common case costs nothing extra: a handler's ``send`` writes
straight to the socket while nothing is queued; a broadcast (which must never wait for one
slow client) puts the message in the connection's bounded send queue, drained by the
connection's writer task. While anything is queued, a handler's sends queue behind it too,
so the client sees each sender's messages in order. A broadcast that finds the queue full
disconnects the client with 1013 (try again later): a laggard never slows the others.

On a :class:`~plugin_execution.channels.server.HardenedConnection` (what ``router.serve``
runs) the connection learns at once that the WebSocket began closing, and from which side:
``closed_by`` is ``"client"`` or ``"server"``, and the callbacks given to
:meth:`ServerChannel.when_closed` run then (the registry forgets the connection before the
client's close is even answered). On a plain trio-websocket connection a client that went
away while nobody read or wrote is noticed within a second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .channel import (
    GOING_AWAY,
    MESSAGE_TOO_BIG,
    NORMAL_CLOSURE,
    TRY_AGAIN_LATER,
    Channel,
    ChannelClosed,
    check_close_code,
    check_message,
    clip_reason,
)
from .server import HardenedConnection

__all__ = ["ServerChannel", "message_size"]

#: How often a connection's watchdog looks for a client that went away unnoticed.
PEER_CHECK_INTERVAL = 1.0


def message_size(message: str | bytes, limit: int) -> int:
    """The size of ``message`` in bytes as sent (UTF-8 for text), computed only when it
    could be over ``limit``."""
    if type(message) is bytes or len(message) * 4 <= limit:
        return len(message)
    return len(message.encode("utf-8"))  # type: ignore[union-attr]


class ServerChannel(Channel):
    """One live WebSocket connection on the host. See the module docstring.

    Created by ``mount_websocket_channels`` once a handshake is accepted; run by
    :meth:`serve`, which owns its writer and watchdog tasks.
    """

    def __init__(
        self,
        ws: WebSocketConnection,
        *,
        connection_id: str,
        path: str,
        request_path: str,
        plugin_id: str,
        headers: Mapping[str, str],
        principal: Any = None,
        tenant_id: str | None = None,
        max_message_size: int,
        send_queue_size: int,
        idle_timeout: float | None,
        close_timeout: float,
    ) -> None:
        self._ws = ws
        self.connection_id = connection_id
        self.path = path
        self.request_path = request_path
        self.plugin_id = plugin_id
        self.headers = headers
        self.principal = principal
        self.tenant_id = tenant_id
        self.metadata: dict[str, Any] = {}
        self.opened_at = time.time()
        self._max_message_size = max_message_size
        self._idle_timeout = idle_timeout
        self._close_timeout = close_timeout
        self._queue, self._queue_out = trio.open_memory_channel[str | bytes](send_queue_size)
        self._queued = 0  # messages in the queue or being written by the writer task
        self._flushed = trio.Event()
        self._flushed.set()
        self._scope: trio.CancelScope | None = None
        #: Why the host is ending the connection (idle, laggard, shutdown, close(id)...).
        self._ending: tuple[int, str] | None = None
        self._closed_here = False  # we sent (or tried to send) the close frame
        self._peer_closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        #: Which side began the close, once it began.
        self.closed_by: Literal["client", "server"] | None = None
        self._on_closed: list[Callable[[ServerChannel], None]] = []
        self._done = trio.Event()
        self.last_activity = trio.current_time()
        self._hardened = isinstance(ws, HardenedConnection)
        if isinstance(ws, HardenedConnection):
            ws.limit_message_size(max_message_size)
            ws.close_timeout = close_timeout
            ws.on_close = self._ws_closing

    # -- the Channel API ------------------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The client's next message. A checkpoint.

        A client disconnect cancels the session this channel belongs to (the caller sees
        ``trio.Cancelled``); outside a session, and after this side closed the channel, it
        raises :class:`ChannelClosed`. A message over the size limit closes the connection
        with 1009 the same way.
        """
        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            await self._lost(exc)
            raise ChannelClosed(self.close_code, self.close_reason) from None
        if message_size(message, self._max_message_size) > self._max_message_size:
            self.end(MESSAGE_TOO_BIG, f"message over the {self._max_message_size}-byte limit")
            await trio.lowlevel.checkpoint()
            raise ChannelClosed(MESSAGE_TOO_BIG, self.close_reason)
        self.last_activity = trio.current_time()
        return message

    @property
    def max_message_size(self) -> int:
        """The largest message, in bytes (text in UTF-8), either side may send."""
        return self._max_message_size

    def too_big(self, size: int) -> None:
        """The handler sent a message of ``size`` bytes, over :attr:`max_message_size`: end
        the connection with 1009, as a client's message over it does."""
        self.end(
            MESSAGE_TOO_BIG,
            f"the handler sent {size} bytes, over the {self._max_message_size}-byte limit",
        )

    async def send(self, message: str | bytes) -> None:
        """Send one message; waits while the client is slow to read. A checkpoint.

        Raises :class:`ChannelClosed` once the connection is closed (or closing), and
        ``TypeError`` for anything but ``str`` or ``bytes``. A message over
        :attr:`max_message_size` is not sent: it ends the connection with 1009 (see
        :meth:`too_big`) and raises :class:`ChannelClosed`.
        """
        check_message(message)
        size = message_size(message, self._max_message_size)
        if size > self._max_message_size:
            self.too_big(size)
            await trio.lowlevel.checkpoint()
            raise ChannelClosed(MESSAGE_TOO_BIG, self.close_reason)
        if self._closed_here or self._ending is not None:
            await trio.lowlevel.checkpoint()
            raise ChannelClosed(self.close_code, self.close_reason)
        if self._queued:
            self._queued += 1
            self._flushed = trio.Event()
            try:
                await self._queue.send(message)
            except BaseException:
                self._sent()
                raise
            return
        try:
            await self._ws.send_message(message)
        except ConnectionClosed as exc:
            await self._lost(exc)
            raise ChannelClosed(self.close_code, self.close_reason) from None
        self.last_activity = trio.current_time()

    async def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        """Close the connection with ``code``; what was queued is sent first (within the
        close timeout). Idempotent; returns once the close is done. Not cancellable past
        the close timeout."""
        check_close_code(code)
        if self._closed_here or self._peer_closed:
            await trio.lowlevel.checkpoint()
            return
        await self._close(code, reason, flush=True)

    # -- what the host does to a connection ----------------------------------------------

    def offer(self, message: str | bytes) -> bool:
        """Queue ``message`` without waiting (a broadcast). A full queue means the client
        does not keep up: it is disconnected with 1013 and this returns False; a message
        over :attr:`max_message_size` ends the connection with 1009 (see :meth:`too_big`)."""
        if self._ending is not None or self._closed_here or self._peer_closed:
            return False
        size = message_size(message, self._max_message_size)
        if size > self._max_message_size:
            self.too_big(size)
            return False
        try:
            self._queue.send_nowait(message)
        except trio.WouldBlock:
            self.end(TRY_AGAIN_LATER, "send queue full: the client reads too slowly")
            return False
        self._queued += 1
        self._flushed = trio.Event()
        return True

    def end(self, code: int, reason: str) -> None:
        """Ask the connection to end with ``code`` / ``reason``: its session (or event loop)
        is cancelled and the connection closes. Never waits; the first reason wins."""
        if self._ending is None and not self._peer_closed:
            self._ending = (code, clip_reason(reason))
            self.close_code, self.close_reason = self._ending
        if self._scope is not None:
            self._scope.cancel()

    def backend_closing(self) -> None:
        """The backend is shutting down: close with 1001 (going away)."""
        self.end(GOING_AWAY, "the server is shutting down")

    @property
    def closed(self) -> bool:
        return self._closed_here or self._peer_closed or self._done.is_set()

    @property
    def peer_closed(self) -> bool:
        """True when the client closed (or dropped) the connection."""
        return self._peer_closed

    async def wait_closed(self) -> None:
        """Wait until the connection is closed and its tasks are done."""
        await self._done.wait()

    def when_closed(self, callback: Callable[[ServerChannel], None]) -> None:
        """Call ``callback(self)`` once the connection begins closing (at once if it has);
        for the owner's bookkeeping, so it must not wait or raise."""
        if self.closed_by is not None:
            callback(self)
        else:
            self._on_closed.append(callback)

    def _closing(self, by: Literal["client", "server"]) -> None:
        if self.closed_by is not None:
            return
        self.closed_by = by
        callbacks, self._on_closed = self._on_closed, []
        for callback in callbacks:
            callback(self)

    def _ws_closing(self, by: Literal["client", "server"], code: int, reason: str) -> None:
        """The hardened WebSocket began closing (called by its reader, never waits)."""
        if by == "client":
            if not self._closed_here and not self._peer_closed:
                self._peer_closed = True
                self.close_code, self.close_reason = code, reason
        elif not self._closed_here:  # it closed by itself: too big, or a protocol error
            self._closed_here = True
            if self._ending is None:
                self._ending = (code, reason)
                self.close_code, self.close_reason = code, reason
        if self._scope is not None:
            self._scope.cancel()
        self._closing(by)

    # -- running ----------------------------------------------------------------------------

    async def serve(self, body: Callable[[], Awaitable[tuple[int, str]]]) -> None:
        """Run ``await body()`` as this connection's session, with the writer and watchdog.

        ``body`` returns the close code and reason for a normal end; whatever ended the
        connection first (the client, :meth:`end`, the idle timeout) wins over it. The
        connection is closed (within the close timeout) before this returns.
        """
        outcome: tuple[int, str] = (NORMAL_CLOSURE, "")
        try:
            async with trio.open_nursery() as tasks:
                tasks.start_soon(self._writer)
                tasks.start_soon(self._watchdog)
                try:
                    with trio.CancelScope() as self._scope:
                        if self._ending is not None:  # ended before it started
                            self._scope.cancel()
                        outcome = await body()
                finally:
                    self._scope = None
                    with trio.CancelScope(shield=True):
                        if not self._peer_closed and not self._closed_here:
                            code, reason = self._ending or outcome
                            flush = code in (NORMAL_CLOSURE, GOING_AWAY)
                            await self._close(code, reason, flush=flush)
                    tasks.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._ws.aclose()  # frees the socket if a close above timed out
            self._queue.close()
            self._closing("client" if self._peer_closed else "server")
            self._done.set()

    async def _close(self, code: int, reason: str, *, flush: bool) -> None:
        self._closed_here = True
        if self._ending is None:
            self.close_code, self.close_reason = code, clip_reason(reason)
        if not self._hardened:
            self._closing("server")
        with trio.CancelScope(shield=True), trio.move_on_after(self._close_timeout):
            if flush:
                await self._flushed.wait()
            await self._ws.aclose(self.close_code or code, self.close_reason or None)

    async def _lost(self, exc: ConnectionClosed) -> None:
        """The WebSocket closed under us: by the client, or by trio-websocket (over its
        message size limit). Cancel the session, then (outside one) let the caller raise."""
        if not self._closed_here and not self._peer_closed:
            self._peer_closed = True
            if exc.reason is not None:
                self.close_code = exc.reason.code
                self.close_reason = exc.reason.reason or ""
            if self._scope is not None:
                self._scope.cancel()
            self._closing("client")
        await trio.lowlevel.checkpoint()

    def _sent(self) -> None:
        self._queued -= 1
        if not self._queued:
            self._flushed.set()

    async def _writer(self) -> None:
        """Drain the send queue to the socket, in order."""
        async for message in self._queue_out:
            try:
                await self._ws.send_message(message)
            except ConnectionClosed as exc:
                self._sent()
                await self._lost(exc)
                return
            self._sent()
            self.last_activity = trio.current_time()

    async def _watchdog(self) -> None:
        """Close an idle connection (nothing received or sent for ``idle_timeout``), and
        (on a plain trio-websocket connection) notice a client that went away while nobody
        was reading or writing; a hardened connection says so itself."""
        idle = self._idle_timeout if self._idle_timeout is not None else math.inf
        check = math.inf if self._hardened else PEER_CHECK_INTERVAL
        while True:
            now = trio.current_time()
            if now - self.last_activity >= idle:
                self.end(GOING_AWAY, f"idle for {idle:g} s")
                return
            await trio.sleep(min(self.last_activity + idle - now, check))
            reason = self._ws.closed
            if reason is not None and not self._closed_here and not self._peer_closed:
                self._peer_closed = True
                self.close_code, self.close_reason = reason.code, reason.reason or ""
                if self._scope is not None:
                    self._scope.cancel()
                self._closing("client")
                return
