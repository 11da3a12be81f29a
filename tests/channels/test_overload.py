"""Channels under overload and as connections come and go (issue 14.7), on the worker pool."""

from __future__ import annotations

import json

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from plugin_execution import ConnectionRegistry

from .conftest import rejected_status, wait_until
from .test_websocket import closed_with

OVERLOAD = {"QUEUE_FULL", "ACQUIRE_TIMEOUT"}


async def test_every_event_gets_a_reply_or_a_1013_under_overload(serve) -> None:  # type: ignore[no-untyped-def]
    """Many events-style connections sending at once into a pool with a tiny queue: each
    message gets its reply or an error envelope with the overload code; a connection whose
    connect event is refused is closed with 1013. Never silence, never 1011."""
    clients = 40
    options = {"min_workers": 1, "max_workers": 1, "max_queue": 2}
    outcomes: list[str] = []
    async with serve("worker-pool", backend_options=options) as served:

        async def client(i: int) -> None:
            try:
                async with open_websocket_url(served.url("/room")) as ws:
                    first = json.loads(await ws.get_message())
                    if first["type"] == "error":  # the connect event was refused
                        outcomes.append("refused")
                        assert (await closed_with(ws))[0] == 1013
                        return
                    assert first["type"] == "welcome"
                    await ws.send_message(json.dumps({"type": "ping", "payload": i}))
                    reply = json.loads(await ws.get_message())
                    if reply["type"] == "pong":
                        assert reply["payload"] == i
                        outcomes.append("pong")
                    else:
                        assert reply["type"] == "error"
                        assert reply["payload"]["code"] in OVERLOAD
                        outcomes.append("overloaded")
            except ConnectionClosed as exc:
                assert exc.reason is not None and exc.reason.code == 1013, exc.reason
                outcomes.append("1013")

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(clients):
                    nursery.start_soon(client, i)
        assert len(outcomes) == clients
        assert "pong" in outcomes
        assert set(outcomes) - {"pong"}, "the pool was never overloaded: nothing was tested"
        closed = served.registry.stats()["closed"]
        assert 1011 not in closed


async def test_a_failed_event_sends_an_error_envelope(serve) -> None:  # type: ignore[no-untyped-def]
    async with serve("worker-pool") as served, open_websocket_url(served.url("/room")) as ws:
        assert json.loads(await ws.get_message())["type"] == "welcome"
        await ws.send_message(json.dumps({"type": "boom", "message_id": "m-1"}))
        reply = json.loads(await ws.get_message())
        assert reply["type"] == "error" and reply["reply_to"] == "m-1"
        assert reply["payload"]["code"] == "HANDLER_ERROR"
        assert "boom" in reply["payload"]["message"]
        await ws.send_message(json.dumps({"type": "ping", "payload": "still open"}))
        assert json.loads(await ws.get_message())["payload"] == "still open"


async def test_a_closed_connection_frees_its_place_at_once(serve) -> None:  # type: ignore[no-untyped-def]
    """At max_connections=1, a client that closes and reconnects straight away is let in,
    session or events style: the registry forgets a connection as soon as it closes."""
    registry = ConnectionRegistry(max_connections=1)
    async with serve("worker-pool", registry=registry) as served:
        for _ in range(10):
            async with open_websocket_url(served.url("/echo")) as ws:
                await ws.send_message("x")
                assert await ws.get_message() == "x"
            async with open_websocket_url(served.url("/room")) as ws:
                assert json.loads(await ws.get_message())["type"] == "welcome"
        async with open_websocket_url(served.url("/echo")):
            assert await rejected_status(served.url("/echo")) == 503  # the cap holds
        await wait_until(lambda: served.backend.stats().in_flight == 0)
        stats = served.registry.stats()
        assert stats["rejected"] == {503: 1}
        assert stats["closed_by"]["client"] == {1000: 21}
