"""ASGIChannels: plugin WebSocket channels served from a FastAPI (asyncio) application,
driven by Starlette's test client (the app runs on an asyncio loop in the client's thread)."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, WebSocket

with warnings.catch_warnings():  # it asks for httpx2; httpx (a dependency) serves us
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from plugin_execution import ChannelLimits, ChannelSpec, PluginManifest
from plugin_execution.asyncio import ASGIChannels, create_execution_backend

PLUGINS = Path(__file__).parent / "plugins"
MANIFEST = PluginManifest(
    id="tests.ws",
    root=str(PLUGINS),
    channels=[
        ChannelSpec(path="/echo", entry="ws_handlers:echo"),
        ChannelSpec(path="/info", entry="ws_handlers:info"),
        ChannelSpec(path="/crash", entry="ws_handlers:crash"),
        ChannelSpec(path="/hold", entry="ws_handlers:hold"),
        ChannelSpec(path="/room", entry="ws_handlers:room", style="events"),
    ],
)
BASE = "/v1/ws/plugins/tests.ws"
OPTIONS: dict[str, dict[str, Any]] = {
    "in-process": {},
    "worker-pool": {"min_workers": 1, "max_workers": 1, "cancel_grace": 0.3},
}


async def authorize(request: Any) -> Any:
    """An asyncio coroutine: it runs on the application's loop."""
    import asyncio

    await asyncio.sleep(0)
    if dict(request.headers).get(b"authorization") == b"Bearer letmein":
        return {"user": "ada", "tenant_id": "t1"}
    return False


def make_app(kind: str, *, guarded: bool = False) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with create_execution_backend(type=kind, registry=_registry(), **OPTIONS[kind]) as b:
            app.state.backend = b
            app.state.channels = ASGIChannels(
                b,
                [MANIFEST],
                authorize=authorize if guarded else None,
                limits=ChannelLimits(max_message_size=1024),
            )
            yield

    app = FastAPI(lifespan=lifespan)

    @app.websocket("/v1/ws/plugins/{plugin_id}/{name}")
    async def channel(websocket: WebSocket) -> None:
        await websocket.app.state.channels.serve(websocket)

    @app.post("/shutdown")
    async def shutdown() -> None:
        await app.state.backend.shutdown()

    app.mount("/mounted", _Mounted(app))
    return app


class _Mounted:
    """``ASGIChannels`` as an ASGI app of its own, looked up once the app has started."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app.state.channels(scope, receive, send)


def _registry() -> Any:
    from plugin_execution import PluginRegistry

    registry = PluginRegistry()
    registry.register(MANIFEST)
    return registry


def refusal(client: TestClient, path: str) -> int:
    """The HTTP status a handshake on ``path`` is refused with."""
    try:
        client.websocket_connect(path).__enter__()
    except WebSocketDenialResponse as exc:
        return exc.status_code
    raise AssertionError(f"{path} was accepted")


@pytest.fixture(params=list(OPTIONS))
def client(request: pytest.FixtureRequest) -> Iterator[TestClient]:
    with TestClient(make_app(request.param)) as client:
        yield client


def test_a_session_channel_echoes_text_and_bytes(client: TestClient) -> None:
    with client.websocket_connect(f"{BASE}/echo") as ws:
        ws.send_text("hello")
        assert ws.receive_text() == "hello"
        ws.send_bytes(b"\x00\x01")
        assert ws.receive_bytes() == b"\x00\x01"
        for i in range(50):  # more than the inbox holds, in order
            ws.send_text(str(i))
        assert [ws.receive_text() for _ in range(50)] == [str(i) for i in range(50)]
    stats = client.app.state.channels.connections.stats()  # type: ignore[attr-defined]
    assert stats["opened"] == 1


def test_the_handler_sees_its_connection(client: TestClient) -> None:
    with client.websocket_connect(f"{BASE}/info?x=1", headers={"x-trace": "t-9"}) as ws:
        info = ws.receive_text()
        assert "'request_path': '/v1/ws/plugins/tests.ws/info?x=1'" in info
        assert "'x-trace': 't-9'" in info and "'host': 'ws'" in info


def test_an_events_channel_replies_per_event(client: TestClient) -> None:
    with client.websocket_connect(f"{BASE}/room") as ws:
        welcome = json.loads(ws.receive_text())
        assert welcome["type"] == "welcome"
        ws.send_text(json.dumps({"type": "ping", "payload": 7}))
        assert json.loads(ws.receive_text())["payload"] == 7
        ws.send_text(json.dumps({"type": "say", "payload": "hi"}))
        assert json.loads(ws.receive_text()) | {"message_id": "", "timestamp": 0} == {
            "type": "said",
            "payload": "hi",
            "message_id": "",
            "timestamp": 0,
        }
        ws.send_text(json.dumps({"type": "quit"}))
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert closed.value.code == 4001


def test_unknown_paths_are_refused_with_404(client: TestClient) -> None:
    assert refusal(client, f"{BASE}/nope") == 404
    assert refusal(client, "/mounted/elsewhere") == 404
    assert client.get("/mounted/elsewhere").status_code == 404


def test_limits_apply(client: TestClient) -> None:
    with client.websocket_connect(f"{BASE}/echo") as ws:
        ws.send_text("x" * 2000)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert closed.value.code == 1009


def test_an_asyncio_authorize_hook_guards_the_handshake() -> None:
    with TestClient(make_app("in-process", guarded=True)) as client:
        assert refusal(client, f"{BASE}/info") == 401
        headers = {"authorization": "Bearer letmein"}
        with client.websocket_connect(f"{BASE}/info", headers=headers) as ws:
            info = ws.receive_text()
            assert "'principal': {'user': 'ada', 'tenant_id': 't1'}" in info
            assert "authorization" not in info  # credentials stay with the host


def test_a_dead_worker_closes_with_1011() -> None:
    with (
        TestClient(make_app("worker-pool")) as client,
        client.websocket_connect(f"{BASE}/crash") as ws,
    ):
        ws.send_text("die")
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert closed.value.code == 1011 and "WORKER_CRASHED" in closed.value.reason


def test_a_client_disconnect_cancels_the_session() -> None:
    import ws_handlers

    ws_handlers.ENDED.clear()
    with TestClient(make_app("in-process")) as client:
        with client.websocket_connect(f"{BASE}/hold") as ws:
            ws.send_text("go")
            assert ws.receive_text() == "holding"
        channels = client.app.state.channels  # type: ignore[attr-defined]
        for _ in range(500):
            if ws_handlers.ENDED:
                break
            time.sleep(0.01)
        assert ws_handlers.ENDED == ["Cancelled"]
        assert channels.connections.count() == 0


def test_shutting_the_backend_down_closes_connections_with_1001() -> None:
    with TestClient(make_app("in-process")) as client:
        with client.websocket_connect(f"{BASE}/echo") as ws:
            ws.send_text("a")
            assert ws.receive_text() == "a"
            assert client.post("/shutdown").status_code == 200
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
            assert closed.value.code == 1001
        assert refusal(client, f"{BASE}/echo") == 503
