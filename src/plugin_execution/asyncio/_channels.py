"""Plugin WebSocket channels served by an asyncio (ASGI) application.

:class:`ASGIChannels` mounts every channel of some manifests, exactly as
:func:`~plugin_execution.mount_websocket_channels` does for a trio-websocket server (the same
routes, limits, ``authorize`` hook, connection registry, close codes and handler styles), and
serves them from ASGI: as an ASGI application of its own, or from a Starlette / FastAPI
WebSocket route (``await channels.serve(websocket)``).

How: the connection's handshake is handed to the mounted route in trio as a request object
that speaks the part of trio-websocket's ``WebSocketRequest`` / ``WebSocketConnection`` API
the routes use (``accept``, ``reject``, ``get_message``, ``send_message``, ``aclose``,
``closed``), backed by the ASGI ``receive`` / ``send`` callables. An asyncio task reads the
client's messages as they come (so a client that leaves is noticed at once, even while the
handler is not reading) into a small bounded inbox, which the trio side drains; what the
handler sends goes out through ``send`` in an asyncio task, one message after the other.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import CloseReason, ConnectionClosed, Endpoint

from plugin_execution import (
    ChannelLimits,
    ChannelRoute,
    ConnectionRegistry,
    HandshakeRejected,
    PluginManifest,
    WebSocketRouter,
    mount_websocket_channels,
)

from . import _guest

if TYPE_CHECKING:
    from ._backend import AsyncioBackend

__all__ = ["ASGIChannels"]

log = logging.getLogger("plugin_execution.channels")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Client messages read ahead of the handler, per connection; past it, reading waits.
INBOX_SIZE = 16
_ABNORMAL_CLOSURE = 1006


class ASGIChannels:
    """Serve the WebSocket channels of ``manifests`` (or a PluginRegistry) from asyncio.

    Each channel gets the route ``mount_websocket_channels`` would give it (by default
    ``/v1/ws/plugins/{plugin_id}{channel.path}``), matched against the request's whole
    ``path``; its connections run on ``backend``, which must be entered (running) while they
    are served: its shutdown closes them with 1001. ``connection_registry``, ``base_path``,
    ``authorize`` and ``limits`` are those of ``mount_websocket_channels``; ``authorize`` may
    be a plain function or an asyncio coroutine function (run on the asyncio loop), given a
    request with ``path``, ``headers`` (raw ``(name, value)`` byte pairs, names lower-case),
    ``proposed_subprotocols``, ``local`` and ``remote``.

    Use it as an ASGI application (``app.mount("/v1/ws/plugins", channels)``; unknown paths
    get 404, plain HTTP too), or from a route: ``await channels.serve(websocket)`` with a
    Starlette / FastAPI ``WebSocket`` not yet accepted. A refused handshake is answered with
    its HTTP status where the server supports the ASGI ``websocket.http.response``
    extension, else with 403.
    """

    def __init__(
        self,
        backend: AsyncioBackend,
        manifests: Iterable[PluginManifest],
        *,
        connection_registry: ConnectionRegistry | None = None,
        base_path: str | None = None,
        authorize: Callable[[Any], Any] | None = None,
        limits: ChannelLimits | None = None,
    ) -> None:
        self.backend = backend
        self.connections = connection_registry or ConnectionRegistry()
        self._router = WebSocketRouter()
        options: dict[str, Any] = {}
        if base_path is not None:
            options["base_path"] = base_path
        #: The routes mounted, in order.
        self.routes: list[ChannelRoute] = mount_websocket_channels(
            self._router,
            manifests,
            backend=backend.backend,
            connection_registry=self.connections,
            authorize=None if authorize is None else self._on_asyncio(authorize),
            limits=limits,
            **options,
        )

    def _on_asyncio(self, authorize: Callable[[Any], Any]) -> Callable[[Any], Awaitable[Any]]:
        async def bridged(request: Any) -> Any:
            verdict = authorize(request)
            if inspect.isawaitable(verdict):
                verdict = await request.run.call_asyncio(_awaited(verdict))
            return verdict

        return bridged

    async def serve(self, websocket: Any) -> None:
        """Serve one connection from a Starlette / FastAPI WebSocket route, not yet
        accepted; returns once it is closed. Cancelling it ends the connection."""
        await self(websocket.scope, websocket.receive, websocket.send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await _http_not_found(send)
            return
        if scope["type"] != "websocket":
            return  # lifespan: nothing to start or stop here
        if (await receive())["type"] != "websocket.connect":
            return
        run = self.backend._run
        route = self._router.routes.get(scope["path"])
        socket = _Socket(run, scope, receive, send)
        if run is None or not self.backend.running:
            await socket.refuse(503, "the server is not running")
            return
        if route is None:
            await socket.refuse(404, "no WebSocket endpoint at this path")
            return
        try:
            await run.run(_handle, route.handler, _Request(socket))
        finally:
            await socket.finish()


async def _handle(handler: Callable[[Any], Awaitable[None]], request: _Request) -> None:
    """Run a route in trio, as ``WebSocketRouter.handle`` does (the ASGI server already
    checked the handshake)."""
    try:
        await handler(request)
    except ConnectionClosed:
        pass  # the client went away during the handshake
    except HandshakeRejected as exc:
        await request.reject_quietly(exc.status, exc.reason)
    except Exception:
        log.exception("WebSocket route %s failed", request.path)
        await request.reject_quietly(500, "internal error")


class _Request:
    """The handshake, as a mounted route sees it (trio side)."""

    def __init__(self, socket: _Socket) -> None:
        scope = socket.scope
        query = scope.get("query_string", b"")
        self.run = socket.run
        self.path: str = scope["path"] + (f"?{query.decode('latin-1')}" if query else "")
        self.headers = [(bytes(name), bytes(value)) for name, value in scope.get("headers", ())]
        self.proposed_subprotocols = tuple(scope.get("subprotocols", ()))
        secure = scope.get("scheme") == "wss"
        self.local = _endpoint(scope.get("server"), secure)
        self.remote = _endpoint(scope.get("client"), secure)
        self._socket = socket

    async def accept(
        self,
        *,
        subprotocol: str | None = None,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> _Socket:
        await self._socket.accept(subprotocol, extra_headers or [])
        return self._socket

    async def reject(
        self,
        status_code: int,
        *,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
    ) -> None:
        await self.run.call_asyncio(
            self._socket.deny(status_code, body or b"", extra_headers or [])
        )

    async def reject_quietly(self, status: int, reason: str) -> None:
        if self._socket.state != "connecting":
            return  # accepted already: nothing more to say
        try:
            await self.reject(status, body=f"{reason}\n".encode())
        except Exception:
            log.debug("could not reject a handshake with %d", status, exc_info=True)


def _endpoint(address: Any, secure: bool) -> Endpoint | None:
    if not address:
        return None
    try:
        return Endpoint(address[0], address[1], secure)
    except ValueError:  # not an IP address (a test client's made-up host)
        return None


class _Socket:
    """One ASGI WebSocket, as trio code uses a trio-websocket connection.

    Methods named like trio-websocket's run in trio; ``accept``/``deny``/``refuse``/
    ``finish`` and the reader task run in asyncio.
    """

    def __init__(
        self, run: _guest.GuestRun | None, scope: Scope, receive: Receive, send: Send
    ) -> None:
        self.run: _guest.GuestRun = run  # type: ignore[assignment]  # (None: refused at once)
        self.scope = scope
        self._receive = receive
        self._send = send
        self.state = "connecting"  # -> "open" -> "closed"
        self._inbox: deque[str | bytes] = deque()
        self._room = asyncio.Event()
        self._waiter: trio.Event | None = None
        self._reason: CloseReason | None = None  # once closed, by either side
        self._send_lock = trio.Lock()
        self._reader: asyncio.Task[None] | None = None

    # -- asyncio side -----------------------------------------------------------------------

    async def accept(self, subprotocol: str | None, headers: list[tuple[bytes, bytes]]) -> None:
        await self.run.call_asyncio(self._accept(subprotocol, headers))

    async def _accept(self, subprotocol: str | None, headers: list[tuple[bytes, bytes]]) -> None:
        message: Message = {"type": "websocket.accept", "subprotocol": subprotocol}
        if headers:
            message["headers"] = headers
        await self._send(message)
        self.state = "open"
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def deny(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """Answer the handshake with an HTTP response (or, without the ASGI extension for
        it, a close before accepting: the server answers 403)."""
        self.state = "closed"
        self._reason = CloseReason(1008, f"refused with {status}")
        if "websocket.http.response" in (self.scope.get("extensions") or {}):
            await self._send(
                {
                    "type": "websocket.http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), *headers],
                }
            )
            await self._send({"type": "websocket.http.response.body", "body": body})
        else:
            await self._send({"type": "websocket.close", "code": 1008})

    async def refuse(self, status: int, reason: str) -> None:
        await self.deny(status, f"{reason}\n".encode(), [])

    async def _read(self) -> None:
        """Read the client's messages into the inbox until it disconnects."""
        try:
            while True:
                message = await self._receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    data = message.get("text")
                    if data is None:
                        data = message.get("bytes") or b""
                    while len(self._inbox) >= INBOX_SIZE:
                        self._room.clear()
                        await self._room.wait()
                    self._inbox.append(data)
                    self._wake()
                elif kind == "websocket.disconnect":
                    code = message.get("code", 1005)
                    self._closed(CloseReason(code, message.get("reason") or None))
                    return
        except Exception:  # the server gave up on the connection
            self._closed(CloseReason(_ABNORMAL_CLOSURE, "the connection was lost"))

    def _closed(self, reason: CloseReason) -> None:
        if self._reason is None:
            self._reason = reason
        self.state = "closed"
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.set()

    async def finish(self) -> None:
        """The connection is over: stop reading (after a close the server only has the
        client's disconnect left to say); close it if the route never did."""
        if self.state == "connecting":
            try:
                await self.refuse(500, "internal error")
            except Exception:
                log.debug("could not refuse a handshake", exc_info=True)
        elif self._reason is None:
            self._reason = CloseReason(1011, "internal error")
            await self._send_quietly({"type": "websocket.close", "code": 1011})
        reader = self._reader
        if reader is not None and not reader.done():
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise  # we are cancelled too, not just the reader

    async def _send_quietly(self, message: Message) -> None:
        try:
            await self._send(message)
        except Exception:
            log.debug("could not send %s", message["type"], exc_info=True)

    # -- trio side (trio-websocket's names) -------------------------------------------------

    @property
    def closed(self) -> CloseReason | None:
        return self._reason

    async def get_message(self) -> str | bytes:
        await trio.lowlevel.checkpoint()
        while not self._inbox:
            if self._reason is not None:
                raise ConnectionClosed(self._reason)
            waiter = self._waiter = trio.Event()
            await waiter.wait()
        message = self._inbox.popleft()
        self._room.set()
        return message

    async def send_message(self, message: str | bytes) -> None:
        if self._reason is not None:
            await trio.lowlevel.checkpoint()
            raise ConnectionClosed(self._reason)
        event: Message = {"type": "websocket.send"}
        event["text" if isinstance(message, str) else "bytes"] = message
        async with self._send_lock:
            try:
                await self.run.call_asyncio(_awaited(self._send(event)))
            except Exception:
                self._closed(CloseReason(_ABNORMAL_CLOSURE, "the connection was lost"))
                raise ConnectionClosed(self._reason) from None

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        if self._reason is not None:
            await trio.lowlevel.checkpoint()
            return
        self._closed(CloseReason(code, reason))
        await self.run.call_asyncio(
            self._send_quietly({"type": "websocket.close", "code": code, "reason": reason or ""})
        )


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


async def _http_not_found(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": b"no WebSocket endpoint at this path\n"})
