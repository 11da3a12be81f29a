"""mount_websocket_channels with a real trio-websocket client, on every backend.

Each test serves the channels of ``tests/plugins/ws_handlers.py`` on 127.0.0.1 (port 0) and
talks to them as a client would; the autouse leak check then verifies that no process or fd
outlived the server and the backend.
"""

from __future__ import annotations

import ast
import json
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from .conftest import BACKENDS, rejected_status, wait_until

pytestmark = pytest.mark.parametrize("kind", BACKENDS)


async def closed_with(ws: WebSocketConnection, timeout: float = 10) -> tuple[int, str | None]:
    """Read until the server closes; the close code and reason it sent."""
    with trio.fail_after(timeout):
        while True:
            try:
                await ws.get_message()
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return exc.reason.code, exc.reason.reason


async def test_echo_text_and_binary(serve, kind) -> None:  # type: ignore[no-untyped-def]
    async with serve(kind) as served, open_websocket_url(served.url("/echo")) as ws:
        for message in ("héllo ✓", b"\x00\xffbytes", "", b""):
            await ws.send_message(message)
            assert await ws.get_message() == message  # text stays str, binary bytes


async def test_thousands_of_messages_arrive_in_order(serve, kind) -> None:  # type: ignore[no-untyped-def]
    # 2,000 each way: over 30 times a worker channel's credit window (DEFAULT_WINDOW: 64)
    count = 2_000
    sent = [str(i) if i % 2 else str(i).encode() for i in range(count)]
    async with serve(kind) as served, open_websocket_url(served.url("/echo")) as ws:
        received: list[Any] = []

        async def read() -> None:
            for _ in range(count):
                received.append(await ws.get_message())

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                for message in sent:
                    await ws.send_message(message)
        assert received == sent


async def test_the_handler_sees_its_connection(serve, kind) -> None:  # type: ignore[no-untyped-def]
    def authorize(request: Any) -> dict[str, str]:
        return {"user": "ada", "tenant_id": "t-1"}

    async with (
        serve(kind, authorize=authorize) as served,
        open_websocket_url(
            served.url("/info?room=1"),
            extra_headers=[(b"X-Trace", b"abc"), (b"Authorization", b"Bearer secret")],
        ) as ws,
    ):
        info = ast.literal_eval(str(await ws.get_message()))
        assert info["request_path"].endswith("/tests.ws/info?room=1")
        assert info["headers"]["x-trace"] == "abc"
        assert "authorization" not in info["headers"]  # credentials stay with the host
        assert info["principal"] == {"user": "ada", "tenant_id": "t-1"}
        assert info["context"]["host"] == "ws"
        assert info["context"]["connection_id"] == info["connection_id"]
        assert info["context"]["tenant_id"] == "t-1"
        [live] = served.registry.list(served.url("/info").split(str(served.port))[1])
        assert live.connection_id == info["connection_id"]
        assert live.tenant_id == "t-1"


async def test_handler_return_closes_1000_and_raise_closes_1011(serve, kind) -> None:  # type: ignore[no-untyped-def]
    async with serve(kind) as served:
        async with open_websocket_url(served.url("/once")) as ws:
            await ws.send_message("one")
            assert await ws.get_message() == "one"
            assert (await closed_with(ws))[0] == 1000
        async with open_websocket_url(served.url("/boom")) as ws:
            await ws.send_message("go")
            code, reason = await closed_with(ws)
            assert code == 1011
            assert reason is not None and reason.startswith("HANDLER_ERROR")
            assert "boom" in reason


async def test_a_burst_sent_just_before_returning_all_arrives_before_the_close(serve, kind) -> None:  # type: ignore[no-untyped-def]
    """Replies that arrive with the handler's end are all delivered, in order, then 1000,
    whichever pump writes them (on a worker, the one that sent the count polls for the
    answer and starts writing it itself)."""
    async with serve(kind) as served:
        for count in (1, 3, 300):
            async with open_websocket_url(served.url("/burst")) as ws:
                await ws.send_message(str(count))
                with trio.fail_after(30):
                    received = [await ws.get_message() for _ in range(count)]
                assert received == [str(i) for i in range(count)]
                assert (await closed_with(ws))[0] == 1000


async def test_the_handler_closes_with_its_own_code(serve, kind) -> None:  # type: ignore[no-untyped-def]
    async with serve(kind) as served, open_websocket_url(served.url("/bye")) as ws:
        await ws.send_message("last")
        assert await ws.get_message() == "last"  # what it sent before closing arrives first
        assert await closed_with(ws) == (4000, "bye")


async def test_a_client_disconnect_cancels_the_handler(serve, kind) -> None:  # type: ignore[no-untyped-def]
    import ws_handlers  # type: ignore[import-not-found]

    ws_handlers.ENDED.clear()
    async with serve(kind) as served:
        async with open_websocket_url(served.url("/hold")) as ws:
            await ws.send_message("start")
            assert await ws.get_message() == "holding"
            await wait_until(lambda: served.registry.count() == 1)
        # the client left: the handler is cancelled wherever it runs, and counted ABORTED
        await wait_until(lambda: served.registry.count() == 0)
        await wait_until(lambda: served.backend.stats().in_flight == 0)
        assert served.backend.stats().failed_by_code.get("ABORTED") == 1
        if kind == "in-process":
            assert ws_handlers.ENDED == ["Cancelled"]
        if kind == "worker-pool":  # stopped by Cancel, not by killing the worker
            assert served.backend.stats().details["workers_killed"] == 0


async def test_an_oversize_message_closes_1009(serve, kind) -> None:  # type: ignore[no-untyped-def]
    async with (
        serve(kind, max_message_size=1000) as served,
        open_websocket_url(served.url("/echo")) as ws,
    ):
        await ws.send_message("x" * 1000)
        assert await ws.get_message() == "x" * 1000
        await ws.send_message(b"x" * 1001)
        assert (await closed_with(ws))[0] == 1009
    # the router's own limit (given to trio-websocket) closes with 1009 as well
    async with (
        serve(kind, router_options={"max_message_size": 500}) as served,
        open_websocket_url(served.url("/echo")) as ws,
    ):
        await ws.send_message(b"x" * 501)
        assert (await closed_with(ws))[0] == 1009
    # the mount's limit counts text in bytes of UTF-8
    async with (
        serve(kind, max_message_size=500) as served,
        open_websocket_url(served.url("/echo")) as ws,
    ):
        await ws.send_message("é" * 250)
        assert await ws.get_message() == "é" * 250
        await ws.send_message("é" * 251)
        assert (await closed_with(ws))[0] == 1009


async def test_backend_shutdown_closes_every_connection_1001(serve, kind) -> None:  # type: ignore[no-untyped-def]
    async with serve(kind) as served:
        async with (
            open_websocket_url(served.url("/echo")) as first,
            open_websocket_url(served.url("/room")) as second,
        ):
            await first.send_message("up")
            assert await first.get_message() == "up"
            assert json.loads(await second.get_message())["type"] == "welcome"
            await wait_until(lambda: served.registry.count() == 2)
            with trio.fail_after(20):
                await served.backend.shutdown()
            assert served.registry.count() == 0
            for ws in (first, second):
                assert (await closed_with(ws))[0] == 1001
        # new handshakes are turned away while the backend is closed
        assert await rejected_status(served.url("/echo")) == 503
