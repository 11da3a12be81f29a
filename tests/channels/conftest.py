"""Fixtures for WebSocket channel tests: a real trio-websocket server on 127.0.0.1, port 0.

``serving(backend_type, ...)`` enters a backend, mounts the test channels of
``tests/plugins/ws_handlers.py`` on a router, serves it in a nursery, and yields a
:class:`Served` with the URL base, the backend and the connection registry. Leaving it
stops the server and the backend; the autouse ``no_leaks`` check then runs.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from plugin_execution import (
    ChannelLimits,
    ChannelSpec,
    ConnectionRegistry,
    ExecutionBackend,
    PluginManifest,
    PluginRegistry,
    WebSocketRouter,
    create_execution_backend,
    mount_websocket_channels,
)

PLUGINS = Path(__file__).parents[1] / "plugins"
PLUGIN_ID = "tests.ws"

MANIFEST = PluginManifest(
    id=PLUGIN_ID,
    root=str(PLUGINS),
    channels=[
        ChannelSpec(path="/echo", entry="ws_handlers:echo"),
        ChannelSpec(path="/info", entry="ws_handlers:info"),
        ChannelSpec(path="/boom", entry="ws_handlers:boom"),
        ChannelSpec(path="/crash", entry="ws_handlers:crash"),
        ChannelSpec(path="/bye", entry="ws_handlers:bye"),
        ChannelSpec(path="/once", entry="ws_handlers:done_after_one"),
        ChannelSpec(path="/burst", entry="ws_handlers:burst"),
        ChannelSpec(path="/hold", entry="ws_handlers:hold"),
        ChannelSpec(path="/big", entry="ws_handlers:big"),
        ChannelSpec(path="/close", entry="ws_handlers:close_with"),
        ChannelSpec(path="/room", entry="ws_handlers:room", style="events"),
    ],
)
BACKENDS = ("in-process", "worker-pool", "subprocess")
OPTIONS: dict[str, dict[str, Any]] = {
    "in-process": {},
    "worker-pool": {"min_workers": 1, "max_workers": 2, "cancel_grace": 0.3},
    "subprocess": {"start_method": "zygote", "cancel_grace": 0.3},
}


@attrs.define
class Served:
    base: str  # ws://127.0.0.1:PORT/v1/ws/plugins/tests.ws
    backend: ExecutionBackend
    registry: ConnectionRegistry
    router: WebSocketRouter
    port: int

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


@asynccontextmanager
async def serving(
    backend_type: str = "in-process",
    *,
    authorize: Any = None,
    router_options: dict[str, Any] | None = None,
    registry: ConnectionRegistry | None = None,
    manifest: PluginManifest = MANIFEST,
    backend_options: dict[str, Any] | None = None,
    **limits: Any,
) -> AsyncIterator[Served]:
    plugins = PluginRegistry([manifest])
    registry = registry if registry is not None else ConnectionRegistry()
    options = {**OPTIONS[backend_type], **(backend_options or {})}
    backend = create_execution_backend(type=backend_type, registry=plugins, **options)
    async with backend, trio.open_nursery() as nursery:
        router = WebSocketRouter(**(router_options or {}))
        mount_websocket_channels(
            router,
            plugins,
            backend=backend,
            connection_registry=registry,
            authorize=authorize,
            limits=ChannelLimits(**limits),
        )
        server = await nursery.start(router.serve, "127.0.0.1", 0)
        base = f"ws://127.0.0.1:{server.port}/v1/ws/plugins/{PLUGIN_ID}"
        yield Served(base, backend, registry, router, server.port)
        nursery.cancel_scope.cancel()


@pytest.fixture
def serve() -> Callable[..., AbstractAsyncContextManager[Served]]:
    return serving


async def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``check`` (bounded): for state that settles in another task or process."""
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.01)


async def rejected_status(url: str, **options: Any) -> int:
    """The HTTP status a handshake to ``url`` is rejected with (fails if it is accepted).

    trio-websocket's client does not close its socket when its handshake is rejected: the
    socket is freed only when the exception's frames are collected, so collect them here
    (the leak check would otherwise see the client's socket, never the server's).
    """
    try:
        async with open_websocket_url(url, **options):
            pass
    except ConnectionRejected as exc:
        status: int = exc.status_code
    else:
        raise AssertionError(f"the handshake to {url} was accepted")
    gc.collect()
    return status
