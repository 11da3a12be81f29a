"""Hostile WebSocket clients (issue 23): raw frames and handshakes no real client would send.

Each test mounts the attack for real with :mod:`.rawws` (TCP to 127.0.0.1, hand-made bytes)
against a real server, and asserts what the server sent back, when it ended the TCP
connection, and that well-behaved clients were not hurt.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import signal
import tracemalloc
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from plugin_execution.channels.bridge import ChannelBridge
from plugin_execution.protocol import ChannelClose, ChannelData

from .conftest import wait_until
from .rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawClient,
    close_payload,
    frame,
    new_key,
    request,
)
from .test_websocket import closed_with

ECHO = "/v1/ws/plugins/tests.ws/echo"


async def abort_with_unmasked_frame(port: int) -> None:
    """Open a session, then send what only a server may send: an unmasked frame."""
    async with await RawClient.connect(port) as client:
        await client.open(ECHO)
        await client.send_quietly(frame(OP_TEXT, b"hi", masked=False))
        with trio.fail_after(10):
            await client.until_eof()


async def test_clients_that_abort_end_only_their_own_sessions(serve) -> None:  # type: ignore[no-untyped-def]
    """Issue 23.1: three dozen sessions ended by a protocol error right after opening. Each
    is stopped by a cancel its worker answers, never by killing the worker (a generous
    cancel grace, so a loaded machine is no excuse): a session opened before them and one
    opened after them go on."""
    async with serve("worker-pool", backend_options={"cancel_grace": 5.0}) as served:
        async with open_websocket_url(served.url("/echo")) as before:
            for _ in range(3):
                for _ in range(12):
                    await abort_with_unmasked_frame(served.port)
                await before.send_message("and me")
                assert await before.get_message() == "and me"
            # every aborted session has ended: answered, or its worker killed
            await wait_until(lambda: served.backend.stats().in_flight == 1, timeout=60)
            assert served.backend.stats().details["workers_killed"] == 0
            async with await RawClient.connect(served.port) as after:
                await after.open(ECHO)
                await after.send(frame(OP_PING, b"p"))
                pong = await after.next_frame()
                assert pong is not None and pong.opcode == OP_PONG
                await after.send(frame(OP_TEXT, b"still here"))
                assert (await after.message()).payload == b"still here"
            await before.send_message("and still me")
            assert await before.get_message() == "and still me"
        await wait_until(lambda: served.backend.stats().in_flight == 0)
        stats = served.backend.stats()
        assert stats.details["workers_killed"] == 0
        assert stats.failed_by_code == {"ABORTED": 38}  # every session, ended by its client


async def test_a_dying_worker_closes_only_the_sessions_on_it(serve) -> None:  # type: ignore[no-untyped-def]
    """Issue 23.1: when a worker does die, its sessions are closed with 1011 WORKER_CRASHED,
    and the sessions on the other worker go on."""
    options = {"min_workers": 2, "max_workers": 2}
    async with serve("worker-pool", backend_options=options) as served:
        await wait_until(lambda: served.backend.stats().details["workers"]["idle"] == 2, 30)
        async with trio.open_nursery() as nursery:
            sessions: list[tuple[Any, int]] = []
            for _ in range(4):
                ws = await nursery.start(_open, served.url("/info"))
                info = ast.literal_eval(str(await ws.get_message()))
                sessions.append((ws, info["pid"]))
            pids = {pid for _, pid in sessions}
            assert len(pids) == 2  # spread over both workers
            victim = sessions[0][1]
            os.kill(victim, signal.SIGKILL)
            for ws, pid in sessions:
                if pid == victim:
                    code, reason = await closed_with(ws, timeout=20)
                    assert code == 1011
                    assert reason is not None and reason.startswith("WORKER_CRASHED")
                else:
                    await ws.send_message("alive")
                    with trio.fail_after(10):
                        assert await ws.get_message() == "alive"
            nursery.cancel_scope.cancel()


async def _open(url: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with open_websocket_url(url) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


# -- 23.2: every close the server starts ends the TCP connection within close_timeout ------


async def silent_after_close(client: RawClient) -> tuple[int | None, float]:
    """The server's close code, and how long it kept TCP open after it while the client
    stayed silent (neither answering the close nor closing)."""
    closing = await client.closing()
    assert closing is not None, "the server ended TCP without a close frame"
    started = trio.current_time()
    with trio.fail_after(30):
        await client.until_eof()
    return closing.close_code, trio.current_time() - started


@pytest.mark.parametrize("where", ["mount", "router"])
async def test_a_1009_close_ends_tcp_within_the_close_timeout(serve, where) -> None:  # type: ignore[no-untyped-def]
    limits: dict[str, Any] = (
        {"max_message_size": 1000, "close_timeout": 0.5}
        if where == "mount"
        else {"router_options": {"max_message_size": 1000, "close_timeout": 0.5}}
    )
    async with serve(**limits) as served, await RawClient.connect(served.port) as client:
        await client.open(ECHO)
        await client.send(frame(OP_BINARY, b"x" * 1001))
        code, lingered = await silent_after_close(client)
        assert code == 1009
        assert lingered < 5  # 0.5 s and scheduling; it was over 60 s
        await wait_until(lambda: served.registry.stats()["closed_by"]["server"] == {1009: 1})


async def test_an_idle_close_ends_tcp_within_the_close_timeout(serve) -> None:  # type: ignore[no-untyped-def]
    async with (
        serve(idle_timeout=0.3, close_timeout=0.5) as served,
        await RawClient.connect(served.port) as client,
    ):
        await client.open(ECHO)
        code, lingered = await silent_after_close(client)
        assert code == 1001
        assert lingered < 5


# -- 23.3: handshakes RFC 6455 section 4.2.1 says to refuse ---------------------------------


@pytest.mark.parametrize(
    ("handshake", "problem"),
    [
        (request(ECHO, key="abc"), b"16 bytes"),
        (request(ECHO, key=base64.b64encode(b"x" * 15).decode()), b"16 bytes"),
        (request(ECHO, key="not base64 at all!!!!!!="), b"16 bytes"),
        (request(ECHO, extra=[("Sec-WebSocket-Key", new_key())]), b"one Sec-WebSocket-Key"),
        (request(ECHO, version="HTTP/1.0"), b"HTTP/1.1"),
        (request("/nowhere", key="abc"), b"16 bytes"),  # refused before any route
    ],
)
async def test_handshakes_the_rfc_refuses_get_400(serve, handshake, problem) -> None:  # type: ignore[no-untyped-def]
    async with serve() as served, await RawClient.connect(served.port) as client:
        status, _ = await client.handshake(handshake)
        assert status == 400
        with trio.fail_after(10):
            await client.until_eof()  # and the socket is closed
        assert problem in client.body
        assert served.registry.stats()["opened"] == 0
        async with await RawClient.connect(served.port) as good:
            await good.open(ECHO)  # a valid handshake still gets 101


# -- 23.4: what one connection may make the server hold before the size check ------------


async def test_a_message_in_tiny_fragments_holds_about_its_own_size(serve) -> None:  # type: ignore[no-untyped-def]
    """16 KiB in 2-byte fragments, all but the last sent: what the WebSocket libraries hold
    for the connection then (allocations made in their code, so that other threads of the
    test process do not count) is about the message's own bytes; trio-websocket kept ~45
    bytes per fragment (~370 KB here). The last fragment completes it: echoed whole."""
    limit = 16 * 1024
    count = limit // 2
    frames = [
        frame(OP_BINARY if i == 0 else OP_CONT, b"ab", fin=i == count - 1) for i in range(count)
    ]
    over = frame(OP_BINARY, b"a", fin=False) + frame(OP_CONT, b"a", fin=False) * limit
    code = ("*trio_websocket*", "*wsproto*", "*plugin_execution*")
    async with (
        serve(max_message_size=limit) as served,
        await RawClient.connect(served.port) as client,
    ):
        await client.open(ECHO)
        await wait_until(lambda: served.registry.count() == 1)
        [conn] = served.registry._by_id.values()
        ws = conn._ws
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            await client.send(b"".join(frames[:-1]))
            await wait_until(lambda: _assembled(ws) == limit - 2)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        filters = [tracemalloc.Filter(True, pattern) for pattern in code]
        grown = sum(
            max(stat.size_diff, 0)
            for stat in after.filter_traces(filters).compare_to(
                before.filter_traces(filters), "filename"
            )
        )
        assert grown < 3 * limit, f"{grown} bytes held for {limit - 2} bytes of a message"
        await client.send(frames[-1])
        echoed = b""
        while len(echoed) < limit:
            echoed += (await client.message()).payload
        assert echoed == b"ab" * count
        # one byte more, in 1-byte fragments: 1009
        await client.send_quietly(over)
        closing = await client.closing()
        assert closing is not None and closing.close_code == 1009


def _assembled(ws: Any) -> int:
    """How much of a message a server connection has assembled (trio-websocket's own
    connection counts it in ``_message_size``)."""
    assembly = getattr(ws, "_assembly", None)
    return len(assembly) if assembly is not None else int(ws._message_size)


@pytest.mark.parametrize("where", ["mount", "router"])
async def test_text_is_limited_in_bytes_of_utf8(serve, where) -> None:  # type: ignore[no-untyped-def]
    """250 four-byte characters fit in 1000 bytes, 251 do not, whole or in fragments
    (trio-websocket counted characters: the router's limit let 4x through)."""
    options: dict[str, Any] = (
        {"max_message_size": 1000}
        if where == "mount"
        else {"router_options": {"max_message_size": 1000}}
    )
    clef = "\U0001d11e"
    async with serve(**options) as served:
        async with await RawClient.connect(served.port) as client:
            await client.open(ECHO)
            await client.send(frame(OP_TEXT, (clef * 250).encode()))
            assert (await client.message()).text == clef * 250
            await client.send(frame(OP_TEXT, (clef * 100).encode(), fin=False))
            await client.send(frame(OP_CONT, (clef * 151).encode()))
            closing = await client.closing()
            assert closing is not None and closing.close_code == 1009
        async with await RawClient.connect(served.port) as client:
            await client.open(ECHO)
            await client.send(frame(OP_TEXT, (clef * 251).encode()))
            closing = await client.closing()
            assert closing is not None and closing.close_code == 1009


# -- 23.5: protocol errors are answered with a close frame, and recorded as the server's ---


@pytest.mark.parametrize(
    ("attack", "code"),
    [
        (frame(OP_TEXT, b"hi", masked=False), 1002),  # an unmasked frame
        (frame(OP_TEXT, b"hi", rsv=4), 1002),  # a reserved bit
        (frame(0x3, b"hi"), 1002),  # an unknown opcode
        (frame(OP_PING, b"p", fin=False), 1002),  # a fragmented control frame
        (frame(OP_CONT, b"hi"), 1002),  # a continuation of nothing
        (frame(OP_TEXT, b"\xff\xfe"), 1007),  # invalid UTF-8
        (frame(OP_CLOSE, close_payload(999)), 1002),  # a close code no one may send
    ],
)
async def test_protocol_errors_get_a_close_frame(serve, attack, code) -> None:  # type: ignore[no-untyped-def]
    async with serve(close_timeout=0.5) as served:
        async with await RawClient.connect(served.port) as client:
            await client.open(ECHO)
            await client.send(attack)
            closing = await client.closing()
            assert closing is not None, "the server ended TCP without a close frame"
            assert closing.close_code == code
            with trio.fail_after(10):
                await client.until_eof()
        async with open_websocket_url(served.url("/echo")) as ws:  # a clean close, by us
            await ws.send_message("fine")
            assert await ws.get_message() == "fine"
        await wait_until(lambda: served.registry.count() == 0)
        assert served.registry.stats()["closed_by"] == {
            "server": {code: 1},
            "client": {1000: 1},
        }


@pytest.mark.parametrize("kind", ["in-process", "worker-pool", "subprocess"])
async def test_a_handler_message_over_the_limit_closes_with_1009_unsent(serve, kind) -> None:  # type: ignore[no-untyped-def]
    """What a handler sends is bounded like what a client sends: a message over
    ``max_message_size`` closes the connection with 1009 and is never written. On a process
    backend the host never holds it either: a plugin's worker may send up to the flow window
    (64) of 64 MiB frames to a client that does not read, ~4 GiB of the host's memory, where
    now it holds at most the window's messages of ``max_message_size`` each."""
    limit = 64 * 1024
    async with (
        serve(kind, max_message_size=limit) as served,
        open_websocket_url(served.url("/big"), max_message_size=4 * limit) as ws,
    ):
        await ws.send_message(f"{limit} 2")  # at the limit: delivered
        assert [len(await ws.get_message()) for _ in range(2)] == [limit, limit]
        assert await ws.get_message() == "after"
    async with (
        serve(kind, max_message_size=limit) as served,
        open_websocket_url(served.url("/big"), max_message_size=4 * limit) as ws,
    ):
        await ws.send_message(f"{limit + 1} 3")
        code, reason = await _first_is_the_close(ws)  # no message of limit + 1 before it
        assert code == 1009 and str(limit) in reason


async def _first_is_the_close(ws: Any) -> tuple[int, str]:
    """The close code and reason, when what the server sends next is its close."""
    with trio.fail_after(10):
        try:
            message = await ws.get_message()
        except ConnectionClosed as exc:
            assert exc.reason is not None
            return exc.reason.code, exc.reason.reason or ""
    raise AssertionError(f"a message of {len(message)} came before the close")


def test_the_bridge_never_holds_a_message_over_the_limit() -> None:
    """What the worker sends over the limit is dropped as its frame is read: the bridge
    keeps at most its window of messages, each within the limit."""

    class Limited:
        max_message_size = 1000

    bridge = ChannelBridge(None, Limited(), "c", window=64)  # type: ignore[arg-type]
    for size in (1000, 1001, 64 * 1024 * 1024):
        bridge.on_message(ChannelData(channel_id="c", data=b"x" * size))
    held = [len(item) for item in bridge._out if isinstance(item, bytes)]
    assert held == [1000] and len(bridge._out) == 3


@pytest.mark.parametrize("kind", ["in-process", "subprocess"])
async def test_a_handler_cannot_put_an_unsendable_close_code_on_the_wire(serve, kind) -> None:  # type: ignore[no-untyped-def]
    """RFC 6455 7.4: 0-999, 1004-1006, 1015 and 2000-2999 are never sent, nor is anything
    outside 0-4999. A handler closing with one gets a ValueError (its session then ends with
    1011, as for any handler error), never an invalid close frame or a dropped socket."""
    async with serve(kind) as served:
        for code in (0, 999, 1005, 1006, 1015, 2000, 5000, 99999, -5):
            async with open_websocket_url(served.url("/close")) as ws:
                await ws.send_message(f"{code} bye")
                got, reason = await _first_is_the_close(ws)
                assert got == 1011 and "close code" in reason, (code, got, reason)
        async with open_websocket_url(served.url("/close")) as ws:  # valid ones still work
            await ws.send_message("4000 bye")
            assert await _first_is_the_close(ws) == (4000, "bye")


def test_the_bridge_turns_an_unsendable_close_code_into_1011() -> None:
    """A worker that writes its own ``ch_close`` frame with code 0 (its channel would have
    refused it) gets the connection closed with 1011, not an invalid frame."""

    class Recording:
        closes: list[tuple[int, str]] = []

        async def close(self, code: int, reason: str) -> None:
            self.closes.append((code, reason))

    channel = Recording()
    bridge = ChannelBridge(None, channel, "c", window=64)  # type: ignore[arg-type]
    bridge.on_message(ChannelClose(channel_id="c", code=0, reason="x"))
    trio.run(bridge._deliver)
    assert [code for code, _ in channel.closes] == [1011]


@pytest.mark.parametrize("kind", ["in-process", "subprocess"])
@pytest.mark.parametrize(
    ("action", "data", "code"),
    [
        ("ws.close", {"code": 0, "reason": "x"}, 1011),
        ("ws.close", {"code": 1006, "reason": "x"}, 1011),
        ("ws.send", {"size": 2000}, 1009),
        ("ws.broadcast", {"size": 2000}, 1009),
    ],
)
async def test_an_events_handler_forging_its_senders_actions_is_held_to_the_same_rules(
    serve, kind, action, data, code
) -> None:  # type: ignore[no-untyped-def]
    """An events-style handler's sender travels as events the host carries out; a handler
    can emit those events itself, with any code or size: the host checks them as it checks
    a session's (an unsendable close code: 1011; a message over the limit: 1009, unsent)."""
    action_message = (
        {"kind": action, "data": {}, **data}
        if "size" in data
        else {
            "kind": action,
            "data": data,
        }
    )
    async with (
        serve(kind, max_message_size=1000) as served,
        open_websocket_url(served.url("/room"), max_message_size=4000) as ws,
    ):
        assert "welcome" in await ws.get_message()
        await ws.send_message(json.dumps({"type": "emit", "payload": action_message}))
        got, reason = await _first_is_the_close(ws)
        assert got == code, (got, reason)
        assert reason.startswith("the handler"), reason  # not the client's own message


@pytest.mark.parametrize("kind", ["in-process", "subprocess"])
async def test_a_failed_event_logs_one_line_whatever_the_plugin_said(
    serve, kind, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """The host logs a failed event with the handler's error message, which the plugin
    chose: newlines in it must not forge log lines of their own (nor escapes drive a
    terminal the log is tailed on)."""
    forged = "boom\n2026-12-05 WARNING plugin_execution: all clear\x1b[2J"
    async with serve(kind) as served, open_websocket_url(served.url("/room")) as ws:
        assert "welcome" in await ws.get_message()
        await ws.send_message(json.dumps({"type": "raise", "payload": forged}))
        assert "all clear" in await ws.get_message()  # the error envelope, to the client
    logged = [r.getMessage() for r in caplog.records if "event of connection" in r.getMessage()]
    assert logged and "all clear" in logged[0], logged
    assert not any("\n" in line or "\x1b" in line for line in logged), logged


@pytest.mark.parametrize(
    "path",
    [
        "/v1/ws/plugins/tests.ws/echo",  # the route itself: refused by authorize (401)
        "/v1/ws/plugins/tests.ws/echo?token=x",
        "/v1/ws/plugins/tests.ws/echo/",
        "/v1/ws/plugins/tests.ws//echo",
        "//v1/ws/plugins/tests.ws/echo",
        "/v1/ws/plugins/tests.ws/./echo",
        "/v1/ws/plugins/x/../tests.ws/echo",
        "/v1/ws/plugins/tests.ws/%65cho",
        "/v1/ws/plugins/tests.ws%2fecho",
        "/V1/WS/PLUGINS/TESTS.WS/ECHO",
        "/v1/ws/plugins/tests.ws/echo;x",
        "/v1/ws/plugins/tests.ws/echo%00",
        "/v1/ws/plugins/tests.ws/echo#x",
        "/v1/ws/plugins/tests.ws\\echo",
        "http://127.0.0.1/v1/ws/plugins/tests.ws/echo",
    ],
)
async def test_no_spelling_of_a_path_gets_past_authorize(serve, path) -> None:  # type: ignore[no-untyped-def]
    """A route is found by its exact path, and its ``authorize`` hook runs for every
    handshake it gets: another spelling of the path (encoded, doubled or trailing slashes,
    dot segments, case, parameters, an absolute URL) finds no route (404) or the route's
    own refusal (401), never a session."""
    asked: list[str] = []

    def authorize(request: Any) -> bool:
        asked.append(request.path)
        return False

    async with serve("in-process", authorize=authorize) as served:
        async with await RawClient.connect(served.port) as client:
            status, _ = await client.handshake(request(path))
        assert status in (400, 401, 404), (path, status)
        assert served.registry.count() == 0
        assert (status == 401) == bool(asked), (path, status, asked)
