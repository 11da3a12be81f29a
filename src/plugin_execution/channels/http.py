"""Plain HTTP on the WebSocket port: ``GET /healthz``, ``GET /metrics`` and the like.

trio-websocket hands its handler only requests that are WebSocket handshakes; a plain
``GET`` is refused with a bare 400 before any handler sees it. So an :class:`HTTPEndpoints`
sits in front of the WebSocket server, per TCP (or TLS) connection: it reads the request
head (h11, at most 16 KiB, within the handshake timeout) and

- a WebSocket handshake (``Upgrade: websocket``) goes on to trio-websocket unchanged, the
  bytes read so far replayed first;
- any other request is answered here, with one response and ``Connection: close``: its
  route's response, 404 for an unknown path, 405 for a method other than GET or HEAD.

Every response carries a reason phrase and, for refusals, a short text body saying why.
"""

from __future__ import annotations

import http
import logging
import socket
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs
import h11
import trio

if TYPE_CHECKING:
    from ..backends.base import ExecutionBackend
    from .registry import ConnectionRegistry

__all__ = [
    "HTTPEndpoints",
    "HTTPRequest",
    "HTTPResponse",
    "mount_health_and_metrics",
    "text_response",
]

log = logging.getLogger("plugin_execution.channels")

#: The largest request head read before deciding; a larger one is handed to trio-websocket.
MAX_HEAD = 16 * 1024


@attrs.frozen
class HTTPRequest:
    """A plain HTTP request: method, target (query string included) and headers."""

    method: str
    target: str
    headers: MappingProxyType[str, str]

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


@attrs.frozen
class HTTPResponse:
    """One response: status, body and its content type, and extra headers."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def text_response(status: int, text: str, **kwargs: Any) -> HTTPResponse:
    """A response whose body is ``text`` and a newline."""
    return HTTPResponse(status, f"{text}\n".encode(), **kwargs)


HTTPHandler = Callable[[HTTPRequest], Awaitable[HTTPResponse]]
ConnectionHandler = Callable[[trio.abc.Stream], Awaitable[None]]


class HTTPEndpoints:
    """Plain HTTP routes answered on the WebSocket port (see the module docstring)."""

    def __init__(self, *, head_timeout: float = 10.0) -> None:
        self.head_timeout = head_timeout
        self._routes: dict[str, HTTPHandler] = {}

    def add(self, path: str, handler: HTTPHandler) -> None:
        """Answer ``GET path`` (and ``HEAD``) with ``await handler(request)``."""
        if not path.startswith("/") or path in self._routes:
            raise ValueError(f"an HTTP path starts with '/' and is not taken: {path!r}")
        self._routes[path] = handler

    def __bool__(self) -> bool:
        return bool(self._routes)

    def wrap(self, websocket: ConnectionHandler) -> ConnectionHandler:
        """A connection handler that answers plain HTTP itself and gives WebSocket
        handshakes to ``websocket`` (trio-websocket's own connection handler)."""

        async def handle(stream: trio.abc.Stream) -> None:
            received = bytearray()
            request = None
            peek = isinstance(stream, trio.SocketStream)
            with trio.move_on_after(self.head_timeout):
                request = await _read_head(stream, received, peek=peek)
            if request is None or _is_websocket(request):
                # A plain TCP stream was only peeked at: trio-websocket gets the stream
                # itself, so its request.remote / .local stay endpoints.
                await websocket(stream if peek else _Replay(stream, bytes(received)))
                return
            if peek:  # consume the peeked head: closing with unread bytes would reset
                await stream.receive_some(len(received))
            try:
                await self._answer(stream, request)
                await _linger(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client left before reading the answer
            finally:
                await trio.aclose_forcefully(stream)

        return handle

    async def _answer(self, stream: trio.abc.Stream, request: h11.Request) -> None:
        headers = MappingProxyType(
            {
                name.decode("latin-1").lower(): value.decode("latin-1")
                for name, value in request.headers
            }
        )
        req = HTTPRequest(
            request.method.decode("ascii"), request.target.decode("ascii", "replace"), headers
        )
        handler = self._routes.get(req.path)
        if handler is None:
            response = text_response(
                404, "no such endpoint (WebSocket endpoints need an Upgrade: websocket handshake)"
            )
        elif req.method not in ("GET", "HEAD"):
            response = text_response(
                405, f"{req.path} answers GET only", headers=(("Allow", "GET, HEAD"),)
            )
        else:
            try:
                response = await handler(req)
            except Exception:
                log.exception("HTTP endpoint %s failed", req.path)
                response = text_response(500, "internal error")
        await _send(stream, response, head_only=req.method == "HEAD")


async def _read_head(
    stream: trio.abc.Stream, received: bytearray, *, peek: bool
) -> h11.Request | None:
    """The request head, or None when it is not one h11 reads (malformed, too large, EOF):
    trio-websocket then answers whatever it is, as before.

    With ``peek`` (a ``trio.SocketStream``) the bytes are only peeked at (``MSG_PEEK``) and
    stay in the socket; otherwise every byte read is kept in ``received``.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    seen = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return None
        if isinstance(event, h11.Request):
            return event
        if event is not h11.NEED_DATA:
            return None
        try:
            if peek:
                assert isinstance(stream, trio.SocketStream)
                if seen:  # the head is not complete yet: let more of it arrive
                    await trio.sleep(0.01)
                peeked = await stream.socket.recv(MAX_HEAD + 1, socket.MSG_PEEK)
                if not peeked:
                    return None
                data = peeked[seen:]
                if not data:
                    continue
            else:
                data = bytes(await stream.receive_some(MAX_HEAD))
                if not data:
                    return None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        seen += len(data)
        received += data
        conn.receive_data(data)


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then read what the client still sends (a request body), bounded: closing
    a socket with unread bytes resets the connection, which can destroy the answer before
    the client reads it."""
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    left = MAX_HEAD * 4
    with trio.move_on_after(1.0):
        while left > 0 and (data := await stream.receive_some(MAX_HEAD)):
            left -= len(data)


def _is_websocket(request: h11.Request) -> bool:
    return any(
        name.lower() == b"upgrade" and b"websocket" in value.lower()
        for name, value in request.headers
    )


async def _send(stream: trio.abc.Stream, response: HTTPResponse, *, head_only: bool) -> None:
    conn = h11.Connection(h11.SERVER)
    # h11 must see a request before it sends a response: feed it a minimal one.
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    try:
        reason = http.HTTPStatus(response.status).phrase.encode()
    except ValueError:
        reason = b""
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        ("Connection", "close"),
        ("Cache-Control", "no-store"),
        *response.headers,
    ]
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    assert data is not None
    if response.body and not head_only:
        data += conn.send(h11.Data(data=response.body)) or b""
    await stream.send_all(data)


class _Replay(trio.abc.Stream):
    """``stream`` with ``prefix`` (bytes already read from it) given back first."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return bytes(data)
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def __getattr__(self, name: str) -> Any:
        # trio-websocket reads ``socket`` (or ``transport_stream``) for the endpoints.
        return getattr(self._stream, name)


def mount_health_and_metrics(
    endpoints: HTTPEndpoints,
    backend: ExecutionBackend,
    connections: ConnectionRegistry | None = None,
) -> None:
    """Add ``GET /healthz`` and ``GET /metrics`` for ``backend`` (and ``connections``).

    ``/healthz``: the backend's ``health()`` as JSON, 200 when ``healthy`` and running,
    503 when degraded, unhealthy or shutting down (a load balancer then stops sending
    clients here). ``/metrics``: :class:`~plugin_execution.metrics.ServerMetrics` in the
    Prometheus text format.
    """
    import json

    from ..metrics import CONTENT_TYPE, ServerMetrics

    metrics = ServerMetrics(backend, connections)

    async def healthz(request: HTTPRequest) -> HTTPResponse:
        health = await backend.health()
        body = attrs.asdict(health)
        ok = health.healthy and health.status == "healthy" and backend.running
        body["serving"] = ok
        text = json.dumps(body, default=str, sort_keys=True) + "\n"
        return HTTPResponse(200 if ok else 503, text.encode(), "application/json")

    async def render(request: HTTPRequest) -> HTTPResponse:
        await trio.lowlevel.checkpoint()
        return HTTPResponse(200, metrics.render(), CONTENT_TYPE)

    endpoints.add("/healthz", healthz)
    endpoints.add("/metrics", render)
