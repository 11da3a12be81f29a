"""``plugin-execution serve`` stopped by a signal, as a real process (issue 14.7).

SIGTERM (what systemd and container runtimes send) and SIGINT (Ctrl-C) both stop listening,
close every connection with 1001 at once, let in-flight work finish within ``--grace``, and
exit: 0 on SIGTERM, 130 on SIGINT.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio
from tests.conftest import serve_process
from trio_websocket import open_websocket_url

from plugin_execution import cli

from .test_websocket import closed_with

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize(
    ("signum", "status"),
    [(signal.SIGTERM, cli.EXIT_OK), (signal.SIGINT, cli.EXIT_INTERRUPTED)],
)
async def test_serve_closes_every_connection_1001_on_a_signal_and_exits(
    signum: int, status: int
) -> None:
    async with serve_process("--backend", "worker-pool", "--grace", "5") as (process, urls):
        assert process.stderr is not None
        echo = next(url for url in urls if url.endswith("/examples.chat/echo"))
        room = next(url for url in urls if url.endswith("/examples.chat/room"))
        async with open_websocket_url(echo) as session, open_websocket_url(room) as events:
            await session.send_message("before")
            with trio.fail_after(30):
                assert await session.get_message() == "before"
                await events.get_message()  # the room's welcome
            process.send_signal(signum)
            # at once: well within the close timeout (5 s) a stuck close would take
            with trio.fail_after(4):
                assert (await closed_with(session))[0] == 1001
                assert (await closed_with(events))[0] == 1001
        with trio.fail_after(30):
            assert await process.wait() == status
        errors = await process.stderr.receive_some(65536)
        assert b"Traceback" not in errors, errors.decode()


def test_serve_refuses_a_negative_grace(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--port", "0", "--grace", "-1"]) == cli.EXIT_USAGE
    assert "--grace" in capsys.readouterr().err
