"""What a server operator relies on: plain HTTP on the WebSocket port (``/healthz``,
``/metrics``), refusals that say why, auth tokens, origins, TLS and the serve options.

Every test runs a real server on 127.0.0.1, port 0, and talks to it with real sockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from trio_websocket import open_websocket_url

from plugin_execution import (
    ConnectionRegistry,
    ExecutionBackend,
    ExecutionRequest,
    HandlerSpec,
    PluginRegistry,
    WebSocketRouter,
    create_execution_backend,
    mount_websocket_channels,
)
from plugin_execution.channels.http import mount_health_and_metrics

from .conftest import MANIFEST, OPTIONS, PLUGIN_ID

#: The test channels, and a handler that sleeps (to keep a pool busy).
OPS_MANIFEST = attrs.evolve(MANIFEST, handlers=[HandlerSpec(id="sleep", entry="sample:sleep")])


@attrs.frozen
class HTTPReply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


async def http_get(
    port: int, target: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> HTTPReply:
    """One plain HTTP/1.1 request over a raw socket; reads until the server closes."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        with trio.fail_after(20):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    _, status, reason = status_line.split(" ", 2)
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return HTTPReply(int(status), reason, parsed, body)


@attrs.define
class Ops:
    port: int
    backend: ExecutionBackend
    connections: ConnectionRegistry

    def ws(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws/plugins/{PLUGIN_ID}{path}"


@asynccontextmanager
async def ops_server(
    backend_type: str = "in-process", **backend_options: Any
) -> AsyncIterator[Ops]:
    plugins = PluginRegistry([OPS_MANIFEST])
    connections = ConnectionRegistry()
    options = {**OPTIONS[backend_type], **backend_options}
    backend = create_execution_backend(type=backend_type, registry=plugins, **options)
    async with backend, trio.open_nursery() as nursery:
        router = WebSocketRouter()
        mount_websocket_channels(router, plugins, backend=backend, connection_registry=connections)
        mount_health_and_metrics(router.http, backend, connections)
        server = await nursery.start(router.serve, "127.0.0.1", 0)
        yield Ops(server.port, backend, connections)
        nursery.cancel_scope.cancel()


# -- /healthz and /metrics ------------------------------------------------------------------


async def test_healthz_is_200_with_the_backends_health_and_503_once_it_shuts_down() -> None:
    import json

    async with ops_server() as ops:
        reply = await http_get(ops.port, "/healthz")
        assert (reply.status, reply.reason) == (200, "OK")
        assert reply.headers["content-type"] == "application/json"
        health = json.loads(reply.body)
        assert health["healthy"] is True and health["backend"] == "in-process"
        assert health["details"]["state"] == "running"
        await ops.backend.shutdown()
        reply = await http_get(ops.port, "/healthz")
        assert (reply.status, reply.reason) == (503, "Service Unavailable")
        assert json.loads(reply.body)["serving"] is False


async def test_healthz_is_503_while_the_pool_is_degraded() -> None:
    """A worker pool whose queue is full reports ``degraded``: still serving, but a load
    balancer should send new clients elsewhere."""
    import json

    async with (
        ops_server("worker-pool", max_workers=1, max_queue=1) as ops,
        trio.open_nursery() as nursery,
    ):
        for _ in range(2):  # one runs, one fills the queue
            request = ExecutionRequest(
                plugin_id=PLUGIN_ID, handler_id="sleep", input={"seconds": 30}
            )
            nursery.start_soon(_execute_quietly, ops.backend, request)
        with trio.fail_after(20):
            while ops.backend.stats().queued < 1:
                await trio.sleep(0.02)
        reply = await http_get(ops.port, "/healthz")
        assert reply.status == 503
        assert json.loads(reply.body)["status"] == "degraded"
        nursery.cancel_scope.cancel()


async def _execute_quietly(backend: ExecutionBackend, request: ExecutionRequest) -> None:
    await backend.execute(request, raise_errors=False)


async def test_metrics_count_executions_by_plugin_handler_backend_and_outcome() -> None:
    async with ops_server() as ops:
        for handler in ("ws.echo", "nope", "nope"):
            await ops.backend.execute(
                ExecutionRequest(plugin_id=PLUGIN_ID, handler_id=handler), raise_errors=False
            )
        async with open_websocket_url(ops.ws("/echo")) as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
            reply = await http_get(ops.port, "/metrics")
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = reply.body.decode()
        want = 'plugin_execution_executions_total{backend="in-process",handler="nope",outcome="HANDLER_NOT_FOUND",plugin="tests.ws"} 2.0'
        assert want in text
        assert (
            'plugin_execution_execution_duration_seconds_bucket{backend="in-process",handler="nope"'
            in text
        )
        assert 'plugin_execution_in_flight{backend="in-process"} 1.0' in text  # the session
        assert 'plugin_execution_queued{backend="in-process"} 0.0' in text
        path = f"/v1/ws/plugins/{PLUGIN_ID}/echo"
        assert f'plugin_execution_ws_connections{{path="{path}"}} 1.0' in text
        assert "plugin_execution_ws_connections_opened_total 1.0" in text


async def test_metrics_show_pool_workers_by_state() -> None:
    async with ops_server("worker-pool") as ops:
        with trio.fail_after(30):
            while not ops.backend.stats().details["workers"].get("idle"):
                await trio.sleep(0.02)
        text = (await http_get(ops.port, "/metrics")).body.decode()
        assert 'plugin_execution_workers{backend="worker-pool",state="idle"} 1.0' in text


async def test_two_servers_keep_their_metrics_apart() -> None:
    """Each server has its own registry: nothing goes to prometheus_client's global one."""
    from prometheus_client import REGISTRY

    async with ops_server() as first, ops_server() as second:
        await first.backend.execute(
            ExecutionRequest(plugin_id=PLUGIN_ID, handler_id="nope"), raise_errors=False
        )
        one = (await http_get(first.port, "/metrics")).body.decode()
        other = (await http_get(second.port, "/metrics")).body.decode()
    assert 'outcome="HANDLER_NOT_FOUND"' in one
    assert 'outcome="HANDLER_NOT_FOUND"' not in other
    assert (
        REGISTRY.get_sample_value("plugin_execution_in_flight", {"backend": "in-process"}) is None
    )


async def test_plain_http_refusals_have_a_reason_phrase_and_say_why() -> None:
    async with ops_server() as ops:
        unknown = await http_get(ops.port, "/nowhere")
        assert (unknown.status, unknown.reason) == (404, "Not Found")
        assert b"Upgrade: websocket" in unknown.body
        post = await http_get(ops.port, "/healthz", method="POST")
        assert (post.status, post.reason) == (405, "Method Not Allowed")
        assert post.headers["allow"] == "GET, HEAD"
        head = await http_get(ops.port, "/healthz", method="HEAD")
        assert head.status == 200 and head.body == b""
        # and WebSocket handshakes on the same port still work
        async with open_websocket_url(ops.ws("/echo")) as ws:
            await ws.send_message("still here")
            assert await ws.get_message() == "still here"
