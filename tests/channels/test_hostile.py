"""Hostile WebSocket clients (issue 23): raw frames and handshakes no real client would send.

Each test mounts the attack for real with :mod:`.rawws` (TCP to 127.0.0.1, hand-made bytes)
against a real server, and asserts what the server sent back, when it ended the TCP
connection, and that well-behaved clients were not hurt.
"""

from __future__ import annotations

import ast
import os
import signal
from typing import Any

import trio
from trio_websocket import open_websocket_url

from .conftest import wait_until
from .rawws import OP_PING, OP_PONG, OP_TEXT, RawClient, frame
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
    """Issue 23.1: a dozen sessions ended by a protocol error right after opening; a session
    opened before them and one opened after them go on, and no worker is killed."""
    async with serve("worker-pool", backend_options={"cancel_grace": 1.0}) as served:
        async with open_websocket_url(served.url("/echo")) as before:
            for _ in range(3):
                for _ in range(12):
                    await abort_with_unmasked_frame(served.port)
                async with await RawClient.connect(served.port) as after:
                    await after.open(ECHO)
                    await after.send(frame(OP_PING, b"p"))
                    pong = await after.next_frame()
                    assert pong is not None and pong.opcode == OP_PONG
                    # past the cancel grace: a session killed with its worker would be closed
                    await trio.sleep(1.5)
                    await after.send(frame(OP_TEXT, b"still here"))
                    assert (await after.message()).payload == b"still here"
                await before.send_message("and me")
                assert await before.get_message() == "and me"
        await wait_until(lambda: served.backend.stats().in_flight == 0)
        stats = served.backend.stats()
        assert stats.details["workers_killed"] == 0
        assert stats.failed_by_code == {"ABORTED": 40}  # every session, ended by its client
        assert "WORKER_CRASHED" not in stats.failed_by_code


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
