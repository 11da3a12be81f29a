"""WebSocketRouter: one trio-websocket server, many endpoints, dispatched by path.

trio-websocket serves a single ``async def handler(request)``; a router is such a handler
that looks the request's path up in its routes. A route is any ``async def route(request)``
that accepts or rejects the handshake itself: a plugin channel mounted by
``mount_websocket_channels``, or one of the host's own endpoints. An unknown path is
rejected with 404, and a handshake RFC 6455 says to refuse (see
:func:`~plugin_execution.channels.server.handshake_problem`) with 400, before any route.

``await nursery.start(router.serve, "127.0.0.1", 0)`` runs the server with the router's
limits and returns trio-websocket's ``WebSocketServer`` (its ``port`` is the one bound): a
:class:`~plugin_execution.channels.server.HardenedServer`, bounded against hostile clients.
Plain HTTP requests on the same port are answered by ``router.http`` (:mod:`.http`).
"""

from __future__ import annotations

import http
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, NoReturn

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, WebSocketServer

from .http import HTTPEndpoints
from .server import HardenedServer, handshake_problem

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "HandshakeRejected", "Route", "WebSocketRouter"]

log = logging.getLogger("plugin_execution.channels")

#: The largest message a client may send, by default (DESIGN: 1 MiB).
DEFAULT_MAX_MESSAGE_SIZE = 1 << 20

RouteHandler = Callable[[WebSocketRequest], Awaitable[None]]


class HandshakeRejected(Exception):
    """Raised by an ``authorize`` hook (or a route) to reject a handshake with ``status``."""

    def __init__(self, status: int, reason: str = "") -> None:
        if not 300 <= status <= 599:
            raise ValueError(f"a handshake rejection needs an HTTP status 300-599, not {status}")
        self.status = status
        self.reason = reason or _phrase(status)  # the refusal's body says why, always
        super().__init__(f"{status} {reason}".strip())


@attrs.frozen
class Route:
    """One path of a router: the handler that accepts or rejects its handshakes."""

    path: str
    handler: RouteHandler
    description: str = ""


class WebSocketRouter:
    """Dispatches WebSocket handshakes to routes by exact path (the query string is ignored).

    ``max_message_size`` (bytes, text counted in UTF-8), ``handshake_timeout`` (seconds to
    receive a client's handshake) and ``close_timeout`` (seconds a close handshake may take
    before the socket is closed) are what :meth:`serve` runs the server with; a mounted
    channel may set a lower message limit of its own.
    """

    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        handshake_timeout: float = 10.0,
        close_timeout: float = 5.0,
    ) -> None:
        if max_message_size < 1 or not handshake_timeout > 0 or not close_timeout > 0:
            raise ValueError(
                "max_message_size must be >= 1, handshake_timeout and close_timeout > 0"
            )
        self.max_message_size = max_message_size
        self.handshake_timeout = handshake_timeout
        self.close_timeout = close_timeout
        self._routes: dict[str, Route] = {}
        #: Plain HTTP endpoints on the same port (``GET /healthz``...): see :mod:`.http`.
        self.http = HTTPEndpoints(head_timeout=handshake_timeout)

    @property
    def routes(self) -> Mapping[str, Route]:
        """The routes by path, read-only."""
        return MappingProxyType(self._routes)

    def add_route(self, path: str, handler: RouteHandler, *, description: str = "") -> Route:
        """Serve ``path`` with ``handler(request)``, which must accept or reject the handshake.

        Raises ``ValueError`` for a path that does not start with ``/`` or is taken.
        """
        if not path.startswith("/") or "?" in path:
            raise ValueError(f"a route path starts with '/' and has no query: {path!r}")
        if path in self._routes:
            raise ValueError(f"the route {path!r} is already taken")
        route = self._routes[path] = Route(path, handler, description)
        return route

    def route(self, path: str, *, description: str = "") -> Callable[[RouteHandler], RouteHandler]:
        """Decorator form of :meth:`add_route`."""

        def register(handler: RouteHandler) -> RouteHandler:
            self.add_route(path, handler, description=description)
            return handler

        return register

    async def handle(self, request: WebSocketRequest) -> None:
        """The handler to give ``trio_websocket.serve_websocket``.

        A handshake RFC 6455 says to refuse gets 400, whatever its path. A route's exception
        never reaches trio-websocket (it would stop the whole server): it is logged, and a
        handshake not yet answered is rejected with 500.
        """
        path = request.path.partition("?")[0]
        route = self._routes.get(path)
        try:
            problem = handshake_problem(request)
            if problem is not None:
                await request.reject(400, body=f"{problem}\n".encode())
                await close_rejected(request)
                return
            if route is None:
                await request.reject(404, body=b"no WebSocket endpoint at this path\n")
                await close_rejected(request)
                return
            await route.handler(request)
        except ConnectionClosed:
            pass  # the client went away during the handshake
        except HandshakeRejected as exc:
            await _reject_quietly(request, exc.status, exc.reason)
        except Exception:
            log.exception("WebSocket route %s failed", path)
            await _reject_quietly(request, 500, "internal error")

    async def serve(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        handler_nursery: trio.Nursery | None = None,
        task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Serve this router on ``host``:``port`` until cancelled (``nursery.start`` gives
        the ``WebSocketServer``, whose ``port`` is the one bound when ``port`` is 0).

        ``handler_nursery``: where connections run (default: inside this call, so cancelling
        it ends them too); with a nursery of its own, cancelling this call only stops
        listening.
        """
        listeners: list[Any]
        if ssl_context is None:
            listeners = await trio.open_tcp_listeners(port, host=host)
        else:
            listeners = await trio.open_ssl_over_tcp_listeners(
                port, ssl_context, host=host, https_compatible=True
            )
        server = HardenedServer(
            self.handle,
            listeners,
            handler_nursery=handler_nursery,
            max_message_size=self.max_message_size,
            connect_timeout=self.handshake_timeout,
            disconnect_timeout=self.close_timeout,
            close_timeout=self.close_timeout,
        )
        if self.http:  # plain HTTP first, on the same port (see .http)
            setattr(server, "_handle_connection", self.http.wrap(server._handle_connection))  # noqa: B010
        await server.run(task_status=task_status)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return f"refused with {status}"


async def close_rejected(request: WebSocketRequest) -> None:
    """Close a rejected handshake's socket now.

    trio-websocket answers a rejection but keeps the socket open until the client closes
    it; a client that does not would hold a server socket indefinitely. Reaches into its
    connection (``_close_stream``), guarded, since there is no public way.
    """
    close_stream = getattr(getattr(request, "_connection", None), "_close_stream", None)
    if close_stream is not None:
        await close_stream()


async def _reject_quietly(request: WebSocketRequest, status: int, reason: str) -> None:
    """Reject a handshake that may already be answered or gone; never raises."""
    try:
        await request.reject(status, body=f"{reason}\n".encode() if reason else None)
        await close_rejected(request)
    except Exception:  # accepted already, or the client left: nothing more to say
        log.debug("could not reject a handshake with %d", status, exc_info=True)
