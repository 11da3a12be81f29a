"""Routing, admission, limits, the registry and the events style, with real clients.

Mostly on the in-process backend (what is tested here happens on the host, whatever runs
the handler); worker crashes are tested on the process backends.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import trio
from trio_websocket import (
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    wrap_client_stream,
)

from plugin_execution import (
    ConnectionRegistry,
    HandshakeRejected,
    PermissionDeniedError,
    WebSocketRouter,
)

from .conftest import rejected_status, wait_until
from .test_websocket import closed_with


def route_of(served: Any, path: str) -> str:
    return f"/v1/ws/plugins/tests.ws{path}"


async def test_unknown_paths_get_404_and_host_routes_share_the_server(serve) -> None:  # type: ignore[no-untyped-def]
    async with serve() as served:
        root = f"ws://127.0.0.1:{served.port}"
        assert await rejected_status(f"{root}/nowhere") == 404
        assert await rejected_status(served.url("/nope")) == 404

        @served.router.route("/health")
        async def health(request: WebSocketRequest) -> None:
            ws = await request.accept()
            await ws.send_message("ok")

        @served.router.route("/broken")
        async def broken(request: WebSocketRequest) -> None:
            raise RuntimeError("a bug in a host route")

        async with open_websocket_url(f"{root}/health?probe=1") as ws:
            assert await ws.get_message() == "ok"
        # a route's exception is a 500 for that client, never the end of the server
        assert await rejected_status(f"{root}/broken") == 500
        async with open_websocket_url(served.url("/echo")) as ws:
            await ws.send_message("still serving")
            assert await ws.get_message() == "still serving"
    with pytest.raises(ValueError, match="already taken"):
        served.router.add_route("/health", health)


async def test_authorize_refusal_gets_401_and_denial_403(serve) -> None:  # type: ignore[no-untyped-def]
    async def authorize(request: WebSocketRequest) -> Any:
        token = dict(request.headers).get(b"authorization")
        if token is None:
            return False
        if token == b"Bearer banned":
            raise PermissionDeniedError("banned")
        if token == b"Bearer teapot":
            raise HandshakeRejected(418, "teapot")
        if token == b"Bearer slow":
            await trio.sleep(10)
        return {"user": "ok"}

    async with serve(authorize=authorize, handshake_timeout=0.2) as served:
        url = served.url("/echo")
        assert await rejected_status(url) == 401
        for token, status in ((b"banned", 403), (b"teapot", 418), (b"slow", 503)):
            headers = [(b"Authorization", b"Bearer " + token)]
            assert await rejected_status(url, extra_headers=headers) == status
        good = [(b"Authorization", b"Bearer fine")]
        async with open_websocket_url(url, extra_headers=good) as ws:
            await ws.send_message("in")
            assert await ws.get_message() == "in"
        assert served.registry.stats()["rejected"] == {401: 1, 403: 1, 418: 1, 503: 1}


async def test_connection_limits_reject_with_503(serve) -> None:  # type: ignore[no-untyped-def]
    registry = ConnectionRegistry(max_connections=3)
    async with serve(registry=registry, max_connections_per_channel=2) as served:
        async with (
            open_websocket_url(served.url("/echo")) as a,
            open_websocket_url(served.url("/echo")) as b,
        ):
            assert await rejected_status(served.url("/echo")) == 503  # per channel
            async with open_websocket_url(served.url("/info")) as c:
                assert await rejected_status(served.url("/info")) == 503  # in total
                for ws in (a, b):
                    await ws.send_message("fine")
                    assert await ws.get_message() == "fine"
                assert (await c.get_message()).startswith("{")
        await wait_until(lambda: registry.count() == 0)
        async with open_websocket_url(served.url("/echo")) as ws:  # room again
            await ws.send_message("again")
            assert await ws.get_message() == "again"


async def test_an_idle_connection_is_closed_1001(serve) -> None:  # type: ignore[no-untyped-def]
    async with serve(idle_timeout=0.3) as served, open_websocket_url(served.url("/echo")) as ws:
        await ws.send_message("once")
        assert await ws.get_message() == "once"
        code, reason = await closed_with(ws)
        assert code == 1001 and reason is not None and "idle" in reason


async def test_broadcast_reaches_everyone_and_drops_a_stalled_client(serve) -> None:  # type: ignore[no-untyped-def]
    clients, rounds = 49, 40
    message = b"m" * 16384
    async with serve(send_queue_size=8, close_timeout=0.5) as served:
        path = route_of(served, "/echo")
        async with trio.open_nursery() as nursery:
            # A client that stops reading: a tiny receive buffer, and trio-websocket stops
            # reading the socket once one message waits in its queue.
            stream = await trio.open_tcp_stream("127.0.0.1", served.port)
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled = await wrap_client_stream(
                nursery, stream, "127.0.0.1", path, message_queue_size=1
            )
            received = [0] * clients

            async def reader(i: int, ws: WebSocketConnection) -> None:
                for _ in range(rounds):
                    assert await ws.get_message() == message
                    received[i] += 1

            async with trio.open_nursery() as readers:
                for i in range(clients):
                    ws = await nursery.start(_client, served.url("/echo"))
                    readers.start_soon(reader, i, ws)
                await wait_until(lambda: served.registry.count() == clients + 1)
                # The healthy clients keep up (the next round goes out once they have the
                # last one); the stalled one falls behind until its queue overflows.
                with trio.fail_after(30):
                    for sent in range(1, rounds + 1):
                        await served.registry.broadcast(path, message)
                        await wait_until(lambda n=sent: min(received) >= n)  # type: ignore[misc]
            assert received == [rounds] * clients  # nobody waited for the stalled client
            await wait_until(lambda: served.registry.stats()["closed"].get(1013) == 1)
            assert served.registry.count() == clients
            closed = await served.registry.close_all(1001, "test over")
            assert closed == clients and served.registry.count() == 0
            await stalled.aclose()
            nursery.cancel_scope.cancel()


async def _client(url: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with open_websocket_url(url) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


async def test_registry_lists_and_closes_one_connection(serve) -> None:  # type: ignore[no-untyped-def]
    async with (
        serve() as served,
        open_websocket_url(served.url("/echo")) as a,
        open_websocket_url(served.url("/info")) as b,
    ):
        await wait_until(lambda: served.registry.count() == 2)
        assert served.registry.count(route_of(served, "/echo")) == 1
        [info] = served.registry.list(route_of(served, "/info"))
        assert info.plugin_id == "tests.ws" and info.request_path.endswith("/info")
        assert served.registry.get(info.connection_id) == info
        assert await served.registry.close(info.connection_id, 4002, "kicked")
        assert await closed_with(b) == (4002, "kicked")
        assert not await served.registry.close(info.connection_id)
        await a.send_message("unaffected")
        assert await a.get_message() == "unaffected"


@pytest.mark.parametrize("kind", ["in-process", "worker-pool"])
async def test_events_style_room(serve, kind) -> None:  # type: ignore[no-untyped-def]
    async with (
        serve(kind) as served,
        open_websocket_url(served.url("/room")) as alice,
        open_websocket_url(served.url("/room")) as bob,
    ):
        for ws in (alice, bob):
            assert json.loads(await ws.get_message())["type"] == "welcome"
        await alice.send_message(json.dumps({"type": "say", "payload": "hi all"}))
        for ws in (alice, bob):  # a broadcast reaches everyone in the room
            assert json.loads(await ws.get_message()) == {"type": "said", "payload": "hi all"}
        await bob.send_message('{"type": "ping", "payload": 7, "message_id": "m-1"}')
        assert json.loads(await bob.get_message()) == {"type": "pong", "payload": 7}
        await bob.send_message(b"\x00raw")  # binary: no envelope, echoed as is
        assert await bob.get_message() == b"\x00raw"
        for bad in ("not json", "[1, 2]", '{"payload": 1}', '{"type": "x", "timestamp": "now"}'):
            await bob.send_message(bad)  # an error event, and the connection stays up
            reply = json.loads(await bob.get_message())
            assert reply["type"] == "error" and reply["payload"]
        await bob.send_message('{"type": "quit"}')
        assert await closed_with(bob) == (4001, "quit")
        await alice.send_message('{"type": "ping", "payload": "still here"}')
        assert json.loads(await alice.get_message())["payload"] == "still here"


@pytest.mark.parametrize("kind", ["worker-pool", "subprocess"])
async def test_a_worker_crash_closes_1011(serve, kind) -> None:  # type: ignore[no-untyped-def]
    async with serve(kind) as served:
        async with open_websocket_url(served.url("/crash")) as ws:
            await ws.send_message("die")
            code, reason = await closed_with(ws, timeout=20)
            assert code == 1011
            assert reason is not None and reason.startswith("WORKER_CRASHED")
        async with open_websocket_url(served.url("/echo")) as ws:  # a new worker serves
            await ws.send_message("after")
            assert await ws.get_message() == "after"


def test_routes_need_a_path() -> None:
    router = WebSocketRouter()

    async def handler(request: WebSocketRequest) -> None:
        pass

    for bad in ("nope", "/a?b=1"):
        with pytest.raises(ValueError, match="starts with '/'"):
            router.add_route(bad, handler)
    with pytest.raises(ValueError, match="HTTP status"):
        HandshakeRejected(200)


async def test_channels_on_thread_workers(serve) -> None:  # type: ignore[no-untyped-def]
    """A pool of thread workers bridges channels the same way, without polling for answers
    (the worker needs the GIL a polling host thread would hold): echo, order, a burst."""
    async with serve("worker-pool", backend_options={"kind": "thread"}) as served:
        async with open_websocket_url(served.url("/echo")) as ws:
            for message in ("text", b"\x00bytes", *[str(i) for i in range(200)]):
                await ws.send_message(message)
                with trio.fail_after(10):
                    assert await ws.get_message() == message
        async with open_websocket_url(served.url("/burst")) as ws:
            await ws.send_message("50")
            with trio.fail_after(30):
                assert [await ws.get_message() for _ in range(50)] == [str(i) for i in range(50)]
