"""Fixtures for the platform services: a Platform, sessions with given permissions, and a
tiny HTTP server on 127.0.0.1 (loopback only)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from plugin_execution.context import ExecutionContext
from plugin_execution.manifest import Permissions
from plugin_execution.platform import Platform, PlatformSession

ENVIRON = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "APP_TOKEN": "t0k", "SECRET": "s3"}


@pytest.fixture
async def platform(tmp_path: Path) -> AsyncIterator[Platform]:
    async with Platform(storage_root=tmp_path / "storage", environ=ENVIRON) as platform:
        yield platform


class Harness:
    """Builds contexts whose platform calls go straight to a session (the in-process path)."""

    def __init__(self, platform: Platform, tmp_path: Path) -> None:
        self.platform = platform
        self.workspace = tmp_path / "ws"
        self.workspace.mkdir(exist_ok=True)
        self.root = tmp_path / "plugin"
        self.root.mkdir(exist_ok=True)
        self.denials = 0
        self.sessions: list[PlatformSession] = []

    def _denied(self) -> None:
        self.denials += 1

    def session(self, permissions: Permissions | None = None, **kw: Any) -> PlatformSession:
        session = self.platform.session(
            execution_id="e-1",
            plugin_id=kw.pop("plugin_id", "tests.p"),
            handler_id="h",
            permissions=permissions if permissions is not None else Permissions(),
            root=str(self.root.resolve()),
            workspace=str(self.workspace.resolve()),
            on_denied=self._denied,
            **kw,
        )
        session.bind_loop()
        self.sessions.append(session)
        return session

    def ctx(self, permissions: Permissions | None = None, **kw: Any) -> ExecutionContext:
        session = self.session(permissions, **kw)
        return ExecutionContext(
            execution_id="e-1", plugin_id=session.plugin_id, handler_id="h", platform=session
        )


@pytest.fixture
def harness(platform: Platform, tmp_path: Path) -> Harness:
    return Harness(platform, tmp_path)


Route = Callable[[str, str, bytes], tuple[int, dict[str, str], bytes]]


async def _read_request(stream: trio.SocketStream) -> tuple[str, str, bytes] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(body) < length:
        body += await stream.receive_some(65536)
    return method, path, body


def default_route(method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    if path.startswith("/redirect-out"):
        return 302, {"location": "/private/secret"}, b""
    if path.startswith("/redirect-in"):
        return 302, {"location": "/public/landed"}, b""
    if path.startswith("/big"):
        return 200, {}, b"x" * 4096
    return (
        200,
        {"content-type": "text/plain; charset=utf-8"},
        f"{method} {path} {body.decode()}".encode(),
    )


@pytest.fixture
async def http_server() -> AsyncIterator[str]:
    """``http://127.0.0.1:PORT``, serving :func:`default_route`, one request per connection."""

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            request = await _read_request(stream)
            if request is None:
                return
            status, headers, body = default_route(*request)
            head = f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\nconnection: close\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            await stream.send_all(head.encode() + b"\r\n" + body)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()
