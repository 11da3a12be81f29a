"""A channel session on the sandboxed worker pool: it runs on a worker of its plugin."""

from __future__ import annotations

from trio_websocket import open_websocket_url

from .conftest import serving


async def test_a_channel_session_runs_on_a_worker_of_its_plugin() -> None:
    options = {"sandbox": True, "min_workers": 0}
    async with (
        serving("worker-pool", backend_options=options) as served,
        open_websocket_url(served.url("/echo")) as ws,
    ):
        for message in ("héllo", b"\x00bytes"):
            await ws.send_message(message)
            assert await ws.get_message() == message
        details = (await served.backend.health()).details
        assert details["workers_total"] == 1 and details["sandbox"]["enabled"] is True
