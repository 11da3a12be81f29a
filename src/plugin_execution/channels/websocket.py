"""mount_websocket_channels: one WebSocket route per channel a plugin declares.

Each :class:`~plugin_execution.manifest.ChannelSpec` of each manifest becomes a route of a
:class:`~plugin_execution.channels.router.WebSocketRouter`, by default at
``/v1/ws/plugins/{plugin_id}{channel.path}``. A handshake on it is admitted (backend running,
connection limits: 503), authorized (``authorize``: 401 / 403), accepted, registered in the
:class:`~plugin_execution.channels.registry.ConnectionRegistry`, and served in the channel's
style:

- ``session``: one execution per connection, ``await handler(ctx, channel)``, run by the
  backend (in-process: awaited with the connection itself; process backends: the messages
  are bridged over the worker protocol, see :mod:`~plugin_execution.channels.bridge`);
- ``events``: one short execution per connection event (see
  :mod:`~plugin_execution.channels.events`).

How a connection ends, and its close code:

- the client closes or drops it: the handler is cancelled (no close frame is owed);
- the session handler returns: 1000; it raises, or its worker dies: 1011 with the error's
  code and message as the reason;
- the backend is overloaded (``QUEUE_FULL``, ``ACQUIRE_TIMEOUT``) when a session or an
  events-style ``connect`` is to run: 1013 (try again later), never 1011;
- an events-style event fails: the client gets an error envelope ``{"type": "error",
  "payload": {"code", "message", "event"}}``; after ``message`` / ``error`` the
  connection stays open, after ``connect`` it is closed (1013 / 1011 as above);
- a message over ``max_message_size``: 1009; idle for ``idle_timeout``: 1001;
- a broadcast finds its send queue full: 1013 (the client reads too slowly);
- ``registry.close(id, code)``: that code; the backend shuts down: 1001.

A connection leaves the registry (and frees its place under the connection limits) as soon
as it begins closing, not once its handler has wound down.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs
import trio
from trio_websocket import WebSocketRequest

from .. import tracing
from ..errors import ExecutionError, PermissionDeniedError
from ..manifest import ChannelSpec, HandlerSpec, PluginManifest
from ..registry import ResolvedHandler
from ..types import ExecutionEvent, ExecutionRequest, ExecutionResult
from .channel import (
    GOING_AWAY,
    INTERNAL_ERROR,
    NORMAL_CLOSURE,
    TRY_AGAIN_LATER,
    ChannelClosed,
    clip_reason,
    sendable_close_code,
)
from .connection import ServerChannel
from .events import DISPATCH_ENTRY, encode_message, envelope, parse_envelope
from .registry import ConnectionRegistry
from .router import DEFAULT_MAX_MESSAGE_SIZE, HandshakeRejected, WebSocketRouter, close_rejected

if TYPE_CHECKING:
    from ..backends.base import ExecutionBackend

__all__ = [
    "DEFAULT_BASE_PATH",
    "HIDDEN_HEADERS",
    "Authorize",
    "ChannelLimits",
    "ChannelRoute",
    "mount_websocket_channels",
]

log = logging.getLogger("plugin_execution.channels")

DEFAULT_BASE_PATH = "/v1/ws/plugins"
#: Error codes that mean "the backend has no room now": such a refusal closes with 1013.
OVERLOAD_CODES = frozenset({"QUEUE_FULL", "ACQUIRE_TIMEOUT"})
#: How much of an error's message an error envelope carries (characters).
_MAX_ERROR_MESSAGE = 1000
#: Handshake headers a channel handler never sees: credentials stay with the host.
HIDDEN_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "sec-websocket-key"})

#: ``authorize(request)``: truthy to accept (a value other than True is the principal),
#: falsy for 401; raise ``PermissionDeniedError`` / ``PermissionError`` for 403, or
#: ``HandshakeRejected(status)`` for any status. May be sync or async.
Authorize = Callable[[WebSocketRequest], Any]


def _positive_or_none(_inst: Any, attr: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attr.name} must be positive or None, got {value!r}")


def _positive(_inst: Any, attr: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attr.name} must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class ChannelLimits:
    """The limits of mounted channels. Sizes in bytes, times in seconds.

    - ``max_message_size`` (1 MiB): a larger client message closes the connection with
      1009 (the router's own limit, given to trio-websocket, applies first if lower);
    - ``max_connections`` (None: no cap) in total and ``max_connections_per_channel``:
      further handshakes are rejected with 503;
    - ``handshake_timeout`` (10): for ``authorize``; past it the handshake gets 503;
    - ``idle_timeout`` (300): a connection that neither sent nor received a message for
      this long is closed with 1001; None: never;
    - ``session_timeout`` (None: unlimited): how long one session may last (the plugin's
      ``quotas.timeout`` lowers it);
    - ``event_timeout`` (30): how long one event of an events-style channel may run;
    - ``send_queue_size`` (64 messages): per connection, for broadcasts; full: 1013;
    - ``flow_window`` (64 messages): per direction, how many messages a process backend
      keeps in flight between host and worker (credit-based flow control);
    - ``close_timeout`` (5): how long a close handshake may take before the socket is
      simply closed.
    """

    max_message_size: int = attrs.field(default=DEFAULT_MAX_MESSAGE_SIZE, validator=_positive)
    max_connections: int | None = attrs.field(default=None, validator=_positive_or_none)
    max_connections_per_channel: int | None = attrs.field(default=None, validator=_positive_or_none)
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    idle_timeout: float | None = attrs.field(default=300.0, validator=_positive_or_none)
    session_timeout: float | None = attrs.field(default=None, validator=_positive_or_none)
    event_timeout: float = attrs.field(default=30.0, validator=_positive)
    send_queue_size: int = attrs.field(default=64, validator=_positive)
    flow_window: int = attrs.field(default=64, validator=_positive)
    close_timeout: float = attrs.field(default=5.0, validator=_positive)


@attrs.frozen
class ChannelRoute:
    """A mounted channel: its route and what serves it."""

    path: str
    plugin_id: str
    channel: ChannelSpec

    def __str__(self) -> str:
        return f"{self.path} -> {self.plugin_id} {self.channel.entry} ({self.channel.style})"


def channel_route(plugin_id: str, channel: ChannelSpec, base_path: str) -> str:
    """The default route of a channel: ``{base_path}/{plugin_id}{channel.path}``."""
    return f"{base_path.rstrip('/')}/{plugin_id}{channel.path}"


def mount_websocket_channels(
    router: WebSocketRouter,
    manifests: Iterable[PluginManifest],
    *,
    backend: ExecutionBackend,
    connection_registry: ConnectionRegistry | None = None,
    base_path: str = DEFAULT_BASE_PATH,
    authorize: Authorize | None = None,
    limits: ChannelLimits | None = None,
) -> list[ChannelRoute]:
    """Add a route to ``router`` for every channel of ``manifests`` (or a PluginRegistry).

    Connections run their handlers on ``backend``, which must be running (entered) while
    they are served; its shutdown closes them with 1001. ``connection_registry`` (a new one
    by default) tracks them. Returns the routes added, in order. Raises ``ValueError`` when
    a route is taken.
    """
    registry = connection_registry if connection_registry is not None else ConnectionRegistry()
    limits = limits if limits is not None else ChannelLimits()
    mounted = []
    for manifest in manifests:
        for spec in manifest.channels:
            path = channel_route(manifest.id, spec, base_path)
            mount = _ChannelMount(path, manifest, spec, backend, registry, authorize, limits)
            router.add_route(path, mount.handle, description=f"{manifest.id} {spec.entry}")
            mounted.append(ChannelRoute(path, manifest.id, spec))
    return mounted


def _handler_id(spec: ChannelSpec) -> str:
    """A handler id for a channel's executions, e.g. ``ws.chat`` for ``/chat``."""
    return "ws" + spec.path.replace("/", ".")


def _plain(value: Any) -> Any:
    """``value`` if it is plain data a worker can receive, else its ``str``."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class _ChannelMount:
    """Serves the connections of one mounted channel."""

    def __init__(
        self,
        path: str,
        manifest: PluginManifest,
        spec: ChannelSpec,
        backend: ExecutionBackend,
        registry: ConnectionRegistry,
        authorize: Authorize | None,
        limits: ChannelLimits,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.spec = spec
        self.backend = backend
        self.registry = registry
        self.authorize = authorize
        self.limits = limits
        self.handler_id = _handler_id(spec)
        permissions = manifest.permissions_for(spec)
        self.target = ResolvedHandler(manifest, spec, permissions)
        if spec.style == "events":
            adapter = HandlerSpec(id=self.handler_id, entry=DISPATCH_ENTRY)
            self.target = ResolvedHandler(manifest, adapter, permissions)
        self.session_timeout = (
            limits.session_timeout if limits.session_timeout is not None else math.inf
        )

    # -- the handshake ----------------------------------------------------------------------

    async def handle(self, request: WebSocketRequest) -> None:
        if not self.backend.running:
            await self._reject(request, 503, "the server is not running")
            return
        limits = self.limits
        if not self.registry.reserve(
            self.path, limits.max_connections_per_channel, limits.max_connections
        ):
            await self._reject(request, 503, "too many connections")
            return
        reserved = True

        def release(_: object = None) -> None:
            nonlocal reserved
            if reserved:
                reserved = False
                self.registry.release(self.path)

        try:
            subprotocol = self._subprotocol(request)
            if subprotocol == "":
                await self._reject(
                    request,
                    400,
                    "this channel speaks the subprotocols "
                    f"{', '.join(self.spec.subprotocols)}: propose one in Sec-WebSocket-Protocol",
                )
                return
            principal = await self._authorize(request)
            if principal is None:
                return
            ws = await request.accept(subprotocol=subprotocol)
            conn = ServerChannel(
                ws,
                connection_id=os.urandom(12).hex(),
                path=self.path,
                request_path=_hide_token(request.path),
                plugin_id=self.manifest.id,
                headers=_visible_headers(request.headers),
                principal=None if principal is True else principal,
                tenant_id=_tenant(principal),
                max_message_size=self.limits.max_message_size,
                send_queue_size=self.limits.send_queue_size,
                idle_timeout=self.limits.idle_timeout,
                close_timeout=self.limits.close_timeout,
            )
            conn.when_closed(release)
            with tracing.span(
                f"channel {self.path}",
                {
                    "plugin_id": self.manifest.id,
                    "channel": self.path,
                    "style": self.spec.style,
                    "connection_id": conn.connection_id,
                    "backend": self.backend.name,
                },
            ) as span:
                await self._serve(conn, subprotocol)
                if span is not None:
                    span.set("close_code", conn.close_code)
                    span.set("closed_by", conn.closed_by)
        finally:
            release()

    def _subprotocol(self, request: WebSocketRequest) -> str | None:
        """The channel's most preferred subprotocol the client proposed; None when the
        channel declares none, "" when the client proposed none of them."""
        if not self.spec.subprotocols:
            return None
        proposed = set(request.proposed_subprotocols)
        return next((p for p in self.spec.subprotocols if p in proposed), "")

    async def _reject(self, request: WebSocketRequest, status: int, reason: str) -> None:
        self.registry.rejected(status)
        await request.reject(status, body=f"{reason}\n".encode())
        await close_rejected(request)

    async def _authorize(self, request: WebSocketRequest) -> Any:
        """The principal (True when there is none), or None once the handshake is rejected."""
        if self.authorize is None:
            return True
        status, reason = 401, "not authorized"
        with trio.move_on_after(self.limits.handshake_timeout):
            try:
                verdict = self.authorize(request)
                if isinstance(verdict, Awaitable):
                    verdict = await verdict
            except HandshakeRejected as exc:
                status, reason = exc.status, exc.reason
            except (PermissionDeniedError, PermissionError) as exc:
                status, reason = 403, str(exc) or "forbidden"
            else:
                if verdict:
                    return verdict
            await self._reject(request, status, reason)
            return None
        await self._reject(request, 503, "authorization timed out")
        return None

    # -- serving a connection ---------------------------------------------------------------

    async def _serve(self, conn: ServerChannel, subprotocol: str | None = None) -> None:
        context = {
            "host": "ws",
            "connection_id": conn.connection_id,
            "path": self.path,
            "request_path": conn.request_path,
            "principal": _plain(conn.principal),
        }
        if conn.tenant_id is not None:
            context["tenant_id"] = conn.tenant_id
        if subprotocol is not None:
            context["subprotocol"] = subprotocol
        try:
            self.backend.attach(conn)
        except ExecutionError:
            await conn.serve(_going_away)
            return
        self.registry.add(conn)
        conn.when_closed(self.registry.remove)
        try:
            if self.spec.style == "session":
                await conn.serve(lambda: self._session(conn, context))
            else:
                await conn.serve(lambda: self._events(conn, context))
                await self._disconnected(conn, context)
        finally:
            self.registry.remove(conn)
            self.backend.detach(conn)

    async def _session(self, conn: ServerChannel, context: dict[str, Any]) -> tuple[int, str]:
        request = ExecutionRequest(
            plugin_id=self.manifest.id, handler_id=self.handler_id, context=context
        )
        result = await self.backend.run_channel(
            request, self.target, conn, timeout=self.session_timeout
        )
        return _close_for(result)

    async def _events(self, conn: ServerChannel, context: dict[str, Any]) -> tuple[int, str]:
        result = await self._event(conn, context, "connect")
        if not result.ok:
            return _close_for(result)
        while True:
            try:
                message = await conn.receive()
            except ChannelClosed:  # the handler closed it
                return NORMAL_CLOSURE, ""
            if isinstance(message, bytes):
                await self._event(conn, context, "message", data=message)
                continue
            envelope, error = parse_envelope(message)
            if error is None:
                await self._event(conn, context, "message", message=envelope, data=message)
            else:
                await self._event(conn, context, "error", data=message, error=error)

    async def _disconnected(self, conn: ServerChannel, context: dict[str, Any]) -> None:
        if not self.backend.running:
            return
        with trio.move_on_after(self.limits.event_timeout):
            await self._event(
                conn,
                context,
                "disconnect",
                close_code=conn.close_code,
                close_reason=conn.close_reason,
            )

    async def _event(
        self, conn: ServerChannel, context: dict[str, Any], event: str, **fields: Any
    ) -> ExecutionResult:
        """Run one event through the backend, carrying out the sender's calls as they come."""
        request = ExecutionRequest(
            plugin_id=self.manifest.id,
            handler_id=self.handler_id,
            input={
                "entry": self.spec.entry,
                "root": self.manifest.root,
                "event": event,
                "connection_id": conn.connection_id,
                "path": self.path,
                "headers": dict(conn.headers),
                "principal": context["principal"],
                **fields,
            },
            context=context,
            timeout=self.limits.event_timeout,
        )
        try:
            async with self.backend._open_execution(request, target=self.target) as execution:
                async for action in execution.events:
                    await self._carry_out(conn, action)
                result = await execution.result(raise_errors=False)
        except ExecutionError as exc:  # refused before it ran (the backend is closing)
            result = ExecutionResult(
                execution_id=request.execution_id, ok=False, error=exc, backend=self.backend.name
            )
        if result.ok and result.output is not None:
            await _reply(conn, result.output)
        elif result.error is not None:
            error = result.error
            log.warning(  # the message is the plugin's: repr keeps it on one line
                "%s: the %s event of connection %s failed: %s %r",
                self.path,
                event,
                conn.connection_id,
                error.code,
                error.message,
            )
            if event != "disconnect":  # the client is still there to tell
                reply_to = (fields.get("message") or {}).get("message_id")
                message = error.message[:_MAX_ERROR_MESSAGE]
                payload = {"code": error.code, "message": message, "event": event}
                await _reply(conn, envelope("error", payload, reply_to=reply_to))
        return result

    async def _carry_out(self, conn: ServerChannel, action: ExecutionEvent) -> None:
        data = action.data if isinstance(action.data, dict) else {}
        if action.kind == "ws.send":
            await _reply(conn, data.get("data"))
        elif action.kind == "ws.broadcast":
            exclude = () if data.get("include_self", True) else (conn.connection_id,)
            message = data.get("data")
            if isinstance(message, str | bytes):
                await self.registry.broadcast(self.path, message, exclude=exclude)
        elif action.kind == "ws.close":
            code = data.get("code", NORMAL_CLOSURE)
            reason = data.get("reason", "")
            if not sendable_close_code(code):  # emitted by the handler itself: not a sender's
                code, reason = INTERNAL_ERROR, f"the handler closed with close code {code!r}"
            await conn.close(code, reason if type(reason) is str else "")


async def _reply(conn: ServerChannel, message: Any) -> None:
    try:
        await conn.send(encode_message(message))
    except (ChannelClosed, TypeError):
        pass  # the client is gone, or the handler sent what no WebSocket can carry


async def _going_away() -> tuple[int, str]:
    await trio.lowlevel.checkpoint()
    return 1001, "the server is shutting down"


def _close_for(result: ExecutionResult) -> tuple[int, str]:
    """The close code for how a session (or an events-style ``connect``) ended."""
    if result.ok or result.error is None:
        return NORMAL_CLOSURE, ""
    error = result.error
    reason = clip_reason(f"{error.code}: {error.message}")
    if error.code in OVERLOAD_CODES:
        return TRY_AGAIN_LATER, reason
    if error.code == "BACKEND_CLOSED":
        return GOING_AWAY, reason
    return INTERNAL_ERROR, reason


def _visible_headers(raw: list[tuple[bytes, bytes]]) -> Mapping[str, str]:
    headers: dict[str, str] = {}
    for name_bytes, value_bytes in raw:
        name = name_bytes.decode("latin-1").lower()
        if name in HIDDEN_HEADERS:
            continue
        value = value_bytes.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return MappingProxyType(headers)


def _hide_token(target: str) -> str:
    """``target`` without a ``token=`` query parameter: a credential, like the headers in
    ``HIDDEN_HEADERS``, stays with the host."""
    path, sep, query = target.partition("?")
    if not sep or "token=" not in query:
        return target
    kept = [part for part in query.split("&") if part.partition("=")[0] != "token"]
    return f"{path}?{'&'.join(kept)}" if kept else path


def _tenant(principal: Any) -> str | None:
    tenant = principal.get("tenant_id") if isinstance(principal, Mapping) else None
    if tenant is None:
        tenant = getattr(principal, "tenant_id", None)
    return tenant if isinstance(tenant, str) else None
