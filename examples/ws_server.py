"""A trio-websocket server with bearer-token auth, serving the example plugin's channels.

    python examples/ws_server.py --port 8765 --token s3cret
    python examples/ws_server.py --self-test      # serve on a free port, talk to it, exit

Clients connect to ``ws://127.0.0.1:8765/v1/ws/plugins/examples.chat/echo`` with the header
``Authorization: Bearer s3cret``; a wrong or missing token is refused with 401 before any
plugin code runs.
"""

from __future__ import annotations

import argparse
import hmac
from collections.abc import Callable

import trio
from trio_websocket import ConnectionRejected, WebSocketRequest, open_websocket

from plugin_execution import (
    PluginRegistry,
    WebSocketRouter,
    create_execution_backend,
    mount_websocket_channels,
)


def bearer_token_check(token: str) -> Callable[[WebSocketRequest], str | None]:
    """An ``authorize`` callback: the principal for a good token, None (401) otherwise."""

    def authorize(request: WebSocketRequest) -> str | None:
        headers = {name.lower(): value for name, value in request.headers}
        given = headers.get(b"authorization", b"").decode("latin-1")
        if hmac.compare_digest(given, f"Bearer {token}"):
            return "token-holder"
        return None

    return authorize


async def serve(
    port: int, token: str, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    registry = PluginRegistry.from_entry_points()
    router = WebSocketRouter()
    async with (
        create_execution_backend(type="worker-pool", registry=registry) as backend,
        trio.open_nursery() as nursery,
    ):
        routes = mount_websocket_channels(
            router, registry, backend=backend, authorize=bearer_token_check(token)
        )
        server = await nursery.start(router.serve, "127.0.0.1", port)
        for route in routes:
            print(f"ws://127.0.0.1:{server.port}{route.path}")
        task_status.started(server.port)


async def self_test() -> None:
    token = "s3cret"
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, 0, token)
        url_path = "/v1/ws/plugins/examples.chat/echo"
        try:
            async with open_websocket("127.0.0.1", port, url_path, use_ssl=False):
                pass
        except ConnectionRejected as rejected:
            print(f"without a token: refused with {rejected.status_code}")
        headers = [(b"authorization", f"Bearer {token}".encode())]
        async with open_websocket(
            "127.0.0.1", port, url_path, use_ssl=False, extra_headers=headers
        ) as ws:
            await ws.send_message("hello")
            print(f"with the token: echoed {await ws.get_message()!r}")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default="s3cret")
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    if args.self_test:
        trio.run(self_test)
    else:
        trio.run(serve, args.port, args.token)
