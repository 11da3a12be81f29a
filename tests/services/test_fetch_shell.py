"""ctx.fetch against a local HTTP server on 127.0.0.1, and ctx.shell."""

from __future__ import annotations

import sys

import pytest

from plugin_execution import (
    ExecutionTimeoutError,
    InvalidRequestError,
    PermissionDeniedError,
    Permissions,
)
from plugin_execution.manifest import NetworkPermissions, ShellPermissions
from plugin_execution.platform import Platform

from .conftest import Harness


def fetch_grant(*patterns: str) -> Permissions:
    return Permissions(network=NetworkPermissions(fetch=patterns))


async def test_fetch_granted(harness: Harness, http_server: str) -> None:
    fetch = harness.ctx(fetch_grant("http://127.0.0.1:*/public/*")).fetch
    response = await fetch(f"{http_server}/public/a?q=1")
    assert response.status == 200 and response.ok
    assert response.text == "GET /public/a?q=1 "
    assert response.headers["content-type"].startswith("text/plain")
    posted = await fetch.post(f"{http_server}/public/p", json={"a": 1})
    assert posted.content == b'POST /public/p {"a": 1}'


async def test_fetch_denied(harness: Harness, http_server: str) -> None:
    port = http_server.rsplit(":", 1)[1]
    fetch = harness.ctx(fetch_grant(f"http://127.0.0.1:{port}/public/*")).fetch
    for url in (
        f"{http_server}/private/x",
        f"{http_server}/public/../private/x",
        f"{http_server}/public/%2e%2e/private/x",
        f"{http_server}/public/a%2fb",
        f"http://127.0.0.1:{port}@localhost:{port}/public/x",  # the host is localhost
        f"https://127.0.0.1:{port}/public/x",
        f"http://127.0.0.2:{port}/public/x",
        "file:///etc/passwd",
    ):
        with pytest.raises(PermissionDeniedError) as info:
            await fetch(url)
        assert info.value.permission == "network.fetch", url
        assert (info.value.plugin_id, info.value.handler_id) == ("tests.p", "h")


async def test_fetch_nothing_by_default(harness: Harness, http_server: str) -> None:
    with pytest.raises(PermissionDeniedError):
        await harness.ctx().fetch(f"{http_server}/public/x")


async def test_redirects_are_checked_at_every_hop(harness: Harness, http_server: str) -> None:
    fetch = harness.ctx(
        fetch_grant("http://127.0.0.1:*/public/*", "http://127.0.0.1:*/redirect-*")
    ).fetch
    landed = await fetch(f"{http_server}/redirect-in")
    assert landed.status == 200 and landed.text.startswith("GET /public/landed")
    with pytest.raises(PermissionDeniedError) as info:
        await fetch(f"{http_server}/redirect-out")
    assert info.value.resource.endswith("/private/secret")


async def test_response_size_is_capped(tmp_path, http_server: str) -> None:  # type: ignore[no-untyped-def]
    async with Platform(max_transfer_bytes=1024, storage_root=tmp_path) as platform:
        harness = Harness(platform, tmp_path)
        fetch = harness.ctx(fetch_grant("http://127.0.0.1:*")).fetch
        with pytest.raises(InvalidRequestError, match="1024-byte limit"):
            await fetch(f"{http_server}/big")


async def test_unreachable_is_a_connection_error(harness: Harness) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError):
        await harness.ctx(fetch_grant("http://127.0.0.1:*")).fetch(f"http://127.0.0.1:{port}/")


# -- shell ----------------------------------------------------------------------------------------


def shell_grant(*commands: str) -> Permissions:
    return Permissions(shell=ShellPermissions(allow=commands))


async def test_shell_granted_command(harness: Harness) -> None:
    shell = harness.ctx(shell_grant(sys.executable)).shell
    result = await shell.run(
        [sys.executable, "-c", "import os,sys; print(os.getcwd()); sys.exit(3)"]
    )
    assert result.returncode == 3 and not result.ok
    assert result.stdout.decode().strip() == str(harness.workspace.resolve())
    echoed = await shell.run(
        [sys.executable, "-c", "import sys; print(sys.stdin.read())"], input="hi"
    )
    assert echoed.stdout == b"hi\n"


async def test_shell_environment_is_reduced(harness: Harness) -> None:
    shell = harness.ctx(shell_grant(sys.executable)).shell
    result = await shell.run([sys.executable, "-c", "import os; print(sorted(os.environ))"])
    names = result.stdout.decode()
    assert "SECRET" not in names and "APP_TOKEN" not in names and "HOME" in names


async def test_shell_by_name_on_path(harness: Harness) -> None:
    result = await harness.ctx(shell_grant("true")).shell.run(["true"])
    assert result.returncode == 0


async def test_shell_denied(harness: Harness, tmp_path) -> None:  # type: ignore[no-untyped-def]
    shell = harness.ctx(shell_grant("true")).shell
    fake = tmp_path / "true"
    fake.write_text("#!/bin/sh\necho pwned\n")
    fake.chmod(0o755)
    for argv in (["sh", "-c", "true"], [str(fake)], ["/bin/sh"], ["nonexistent-cmd-xyz"]):
        with pytest.raises(PermissionDeniedError) as info:
            await shell.run(argv)
        assert (info.value.permission, info.value.resource) == ("shell.allow", argv[0])
    with pytest.raises(TypeError, match="not a shell command line"):
        shell.run("true; rm -rf /")  # type: ignore[arg-type]


async def test_shell_timeout_kills_the_command(harness: Harness) -> None:
    shell = harness.ctx(shell_grant(sys.executable)).shell
    with pytest.raises(ExecutionTimeoutError):
        await shell.run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.3)
