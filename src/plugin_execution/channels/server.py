"""The WebSocket server a router runs: trio-websocket's, hardened against hostile clients.

trio-websocket (0.12) is written for peers that follow the protocol. Against clients that do
not (issue 23), its server connection:

- assembles a fragmented message as a list of the fragments' payloads, some 50 bytes of
  bookkeeping per fragment: 1 MiB sent as 1-byte fragments held ~60 MB, and it counts a text
  message's size in characters, so 4-byte characters reached 4 MiB before a 1 MiB limit;
- after closing with 1009 (message too big) stops reading but never closes the TCP
  connection: a silent client kept it open indefinitely;
- on a protocol error (an unmasked frame, bad UTF-8...) closes TCP without the 1002 / 1007
  close frame RFC 6455 section 7.1.7 says it SHOULD send; wsproto reports the error as a
  ``CloseConnection`` event, so the code was recorded as if the client had sent it.

:class:`HardenedConnection` changes exactly that. A message is assembled in one
``bytearray`` (text as its UTF-8 bytes) and its size checked in bytes after every fragment,
so before the limit check a connection holds at most ``max_message_size`` bytes of an
incoming message plus one read (4 KiB), and a whole message waiting in trio-websocket's
one-message queue. Every close the server starts (1009, a protocol error, ``aclose``) sends
its close frame and ends the TCP connection within ``close_timeout``; ``closed_by`` says
which side began the close. :class:`HardenedServer` is trio-websocket's server with that
connection class, and always closes a connection's socket when its handler is done.

:func:`handshake_problem` refuses the handshakes RFC 6455 section 4.2.1 says a server must
refuse and wsproto accepts (a key that is not 16 bytes of base64, a key given twice, an
HTTP/1.0 request); the router answers them with 400.

Reaches into trio-websocket's and wsproto's private parts, guarded where they may move:
pinned by the tests in ``tests/channels/test_hostile.py``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any, Literal

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
)
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, TextMessage

__all__ = ["HardenedConnection", "HardenedServer", "handshake_problem"]

_LINGER_READ = 65536
_MAX_REASON_BYTES = 123

ClosedBy = Literal["client", "server"]


def handshake_problem(request: WebSocketRequest) -> str | None:
    """Why RFC 6455 section 4.2.1 says to refuse ``request`` (with 400), or None.

    wsproto checks the method, ``Upgrade``, ``Connection``, ``Sec-WebSocket-Version`` and that
    a ``Sec-WebSocket-Key`` is present; this adds what it lets through: the request line must
    be HTTP/1.1, and there must be exactly one key, the base64 of 16 bytes.
    """
    version = _http_version(getattr(request, "_connection", None))
    if version is not None and version != b"1.1":
        return f"a WebSocket handshake is an HTTP/1.1 request, not HTTP/{version.decode()}"
    keys = [value for name, value in request.headers if name.lower() == b"sec-websocket-key"]
    if len(keys) != 1:
        return f"the handshake must have one Sec-WebSocket-Key header, not {len(keys)}"
    try:
        nonce = base64.b64decode(keys[0].strip(), validate=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:
        return "Sec-WebSocket-Key must be the base64 of 16 bytes"
    return None


def _http_version(connection: Any) -> bytes | None:
    """The HTTP version of a server connection's request line, when it can be told."""
    handshake = getattr(getattr(connection, "_wsproto", None), "handshake", None)
    h11 = getattr(handshake, "_h11_connection", None)
    version = getattr(h11, "their_http_version", None)
    return version if isinstance(version, bytes) else None


def _clip(reason: str | None) -> str:
    data = (reason or "").encode("utf-8")[:_MAX_REASON_BYTES]
    return data.decode("utf-8", "ignore")


class HardenedConnection(WebSocketConnection):
    """A server-side trio-websocket connection, bounded and explicit about closing.

    See the module docstring. ``closed_by`` is ``"client"`` or ``"server"`` once the
    connection is closing; ``close_sent`` the code and reason of the close frame the server
    sent when it began the close. ``on_close(by, code, reason)`` (set by the owner) is called
    once, as soon as the connection starts closing, before a client's close frame is
    answered: with the client's code (1006 when the TCP connection just dropped), or the one
    the server sends.
    """

    def __init__(self, stream: trio.abc.Stream, *, close_timeout: float, **options: Any) -> None:
        super().__init__(stream, WSConnection(ConnectionType.SERVER), **options)
        self.close_timeout = close_timeout
        self.closed_by: ClosedBy | None = None
        self.close_sent: tuple[int, str] | None = None
        self.on_close: Callable[[ClosedBy, int, str], None] | None = None
        self._assembly = bytearray()
        self._reader_scope = trio.CancelScope()
        self._reader_done = trio.Event()

    def limit_message_size(self, limit: int) -> None:
        """Lower the message size limit (bytes) for what the client sends from now on."""
        self._max_message_size = min(self._max_message_size, limit)

    # -- closing ----------------------------------------------------------------------------

    def _closing(self, by: ClosedBy, code: int, reason: str | None) -> None:
        if self.closed_by is not None:
            return
        self.closed_by = by
        if self.on_close is not None:
            self.on_close(by, code, reason or "")

    def _bound_close(self) -> None:
        """The server began a close: whatever the client does, reading stops (and the TCP
        connection ends) within ``close_timeout``."""
        deadline = trio.current_time() + self.close_timeout
        self._reader_scope.deadline = min(self._reader_scope.deadline, deadline)

    async def _server_close(self, code: int, reason: str | None) -> None:
        """Begin a close from this side: the close frame, then the client's answer is
        awaited (by the reader, within the close timeout)."""
        if self._close_reason is not None:
            return
        reason = _clip(reason)
        self.close_sent = (code, reason)
        self._closing("server", code, reason)
        self._bound_close()
        try:
            await self._send(CloseConnection(code=code, reason=reason or None))
        except ConnectionClosed:
            pass
        await self._close_web_socket(code, reason or None)

    async def _aclose(self, code: int, reason: str | None) -> None:
        if self._close_reason is None and self._wsproto.state == ConnectionState.OPEN:
            self.close_sent = (code, _clip(reason))
            self._closing("server", *self.close_sent)
            self._bound_close()
        await super()._aclose(code, reason)

    async def _abort_web_socket(self) -> None:
        self._closing("client", 1006, "")  # the TCP connection dropped
        await super()._abort_web_socket()

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        if self._wsproto.state == ConnectionState.OPEN:
            # No close frame came: wsproto found a protocol error in what the client sent
            # (it reports one as a CloseConnection, leaving the state OPEN). Fail the
            # connection (RFC 6455 section 7.1.7): our close frame with its code and a FIN
            # at once; what the client still sends is dropped (see _read, _linger).
            await self._server_close(event.code, event.reason)
            await self._send_eof()
            self._reader_running = False
            raise ConnectionClosed(self._close_reason)
        self._closing("client", event.code, event.reason)
        await super()._handle_close_connection_event(event)

    # -- receiving --------------------------------------------------------------------------

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:
        if self._close_reason is not None:
            return  # closing: what the client still sends is read and dropped
        if isinstance(event, TextMessage):
            text: str | None = event.data
            chunk = b""
        else:
            text, chunk = None, bytes(event.data)
        assembly = self._assembly
        if not assembly and event.message_finished:  # the usual case: one whole frame
            if text is None:
                size = len(chunk)
            else:
                size = len(text) if text.isascii() else len(text.encode("utf-8"))
            if size > self._max_message_size:
                await self._too_big()
            else:
                await self._deliver(chunk if text is None else text)
            return
        assembly += chunk if text is None else text.encode("utf-8")
        if len(assembly) > self._max_message_size:
            self._assembly = bytearray()
            await self._too_big()
            return
        if event.message_finished:
            message = bytes(assembly) if text is None else assembly.decode("utf-8")
            self._assembly = bytearray()
            await self._deliver(message)

    async def _deliver(self, message: str | bytes) -> None:
        try:
            await self._send_channel.send(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the receiving side was closed (aclose): nobody will read it

    async def _too_big(self) -> None:
        limit = self._max_message_size
        await self._server_close(1009, f"message over the {limit}-byte limit")

    async def _read(self) -> None:
        """The reader task: trio-websocket's, within a scope that a close the server began
        bounds by the close timeout; then, when the server failed the connection, a lingering
        close so the close frame is not lost to a reset; then the socket is closed."""
        try:
            with self._reader_scope:
                await self._reader_task()
            if self.close_sent is not None and not self._close_handshake.is_set():
                await self._linger()
        finally:
            self._close_handshake.set()  # an aclose() waiting for the client's answer
            self._reader_done.set()
            with trio.CancelScope(shield=True):
                await self._close_stream()

    async def _linger(self) -> None:
        """Half-close, then read and drop until the client closes (within the close timeout),
        so that unread data does not turn our close into a reset that loses the close frame."""
        with trio.CancelScope(deadline=self._reader_scope.deadline):
            await self._send_eof()
            try:
                while await self._stream.receive_some(_LINGER_READ):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _send_eof(self) -> None:
        """Half-close (TCP FIN) after our close frame, where the stream can (not TLS)."""
        send_eof = getattr(self._stream, "send_eof", None)
        if send_eof is not None:
            try:
                async with self._stream_lock:
                    await send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def wait_done(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until the reader is done with the socket."""
        with trio.move_on_after(timeout):
            await self._reader_done.wait()


class HardenedServer(WebSocketServer):
    """trio-websocket's server with :class:`HardenedConnection` connections.

    When the handler returns, an open connection is closed (1000), and the socket is closed
    once the close handshake is done or the close timeout passed; a rejected handshake's
    socket is closed at once.
    """

    def __init__(self, *args: Any, close_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._close_timeout = close_timeout

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            connection = HardenedConnection(
                stream,
                close_timeout=self._close_timeout,
                message_queue_size=self._message_queue_size,
                max_message_size=self._max_message_size,
                receive_buffer_size=self._receive_buffer_size,
            )
            nursery.start_soon(connection._read)
            with trio.move_on_after(self._connect_timeout) as connect_scope:
                request = await connection._get_request()
            if connect_scope.cancelled_caught:
                nursery.cancel_scope.cancel()
                await stream.aclose()
                return
            try:
                await self._handler(request)
            finally:
                with trio.CancelScope(shield=True):
                    if connection._open_handshake.is_set():
                        with trio.move_on_after(self._close_timeout):
                            await connection.aclose()
                        await connection.wait_done(self._close_timeout)
                    nursery.cancel_scope.cancel()
                    await connection._close_stream()
