"""ctx.storage and ctx.fetch as confused deputies: deep keys that would make the host build
directory chains, errors that would show the host's storage path, and Host (routing) headers
that would reach a host never granted through a granted address. Mounted through real
handlers (tests/plugins/confused_deputy.py) on every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from plugin_execution import (
    ExecutionBackend,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.platform import Platform
from plugin_execution.platform.storage import MAX_KEY_PARTS, MAX_NAMESPACE_PARTS

from .conftest import BACKENDS, register, run


async def storage(backend: ExecutionBackend, method: str, *args: Any) -> Any:
    """``ctx.storage.method(*args)`` by the plugin ``bystander`` (granted ``storage``)."""
    return await run(
        backend, "storage_call", {"method": method, "args": list(args)}, plugin="bystander"
    )


def depth(root: Path) -> int:
    """How many directories deep the tree under ``root`` goes."""
    return max((len(p.relative_to(root).parts) for p in root.rglob("*") if p.is_dir()), default=0)


async def test_a_deep_key_is_refused_before_any_directory_is_made(
    backend: ExecutionBackend, platform: Platform, tmp_path: Path
) -> None:
    root = tmp_path / "storage"
    for parts in (400, MAX_KEY_PARTS + 1):
        result = await storage(backend, "put", "/".join(["d"] * parts), "x")
        assert result["error"] == "INVALID_REQUEST", result
        assert f"at most {MAX_KEY_PARTS}" in result["message"]
    assert depth(root) <= 1  # at most the namespace directory
    result = await storage(backend, "put", "x" * 256, "x")
    assert result["error"] == "INVALID_REQUEST" and "255" in result["message"], result
    deepest = "/".join(["d"] * MAX_KEY_PARTS)
    assert await storage(backend, "put", deepest, "ok") is None
    assert depth(root) == MAX_KEY_PARTS  # the namespace and 15 levels of directories
    assert await storage(backend, "get", deepest) == b"ok"
    assert await storage(backend, "delete", deepest) is True
    assert [p.name for p in root.rglob("*")] == ["bystander"]  # emptied directories went too


async def test_a_deep_namespace_is_refused_too(backend: ExecutionBackend, tmp_path: Path) -> None:
    # the bare grant covers the plugin's own namespace and everything under it
    deep = "/".join(["bystander", *["n"] * 120])
    result = await storage(backend, "put_in", deep, "k", "x")
    assert result["error"] == "INVALID_REQUEST", result
    assert f"at most {MAX_NAMESPACE_PARTS}" in result["message"]
    for bad in ("bystander//x", "bystander/./x"):
        assert (await storage(backend, "put_in", bad, "k", "x"))["error"] == "INVALID_REQUEST"
    ok = "/".join(["bystander", *["n"] * (MAX_NAMESPACE_PARTS - 1)])
    assert await storage(backend, "put_in", ok, "k", "x") is None
    assert depth(tmp_path / "storage") == MAX_NAMESPACE_PARTS


async def test_storage_errors_name_the_key_not_the_host_path(
    backend: ExecutionBackend, tmp_path: Path
) -> None:
    root = str(tmp_path / "storage")
    assert await storage(backend, "put", "a", "file") is None
    assert await storage(backend, "put", "c/d", "file") is None
    for key in ("a/b", "c"):  # under a file; over a directory
        result = await storage(backend, "put", key, "x")
        kinds = ("NotADirectoryError", "IsADirectoryError", "FileExistsError")
        assert result["error"].startswith(kinds), result
        assert result["filename"] == f"storage key {key}", result
        assert root not in result["message"] and "storage" + "/" not in result["message"], result


# -- fetch: routing headers --------------------------------------------------------------------


@pytest.fixture
async def echo_host() -> AsyncIterator[tuple[str, list[str]]]:
    """``(base URL, hosts)``: a server on 127.0.0.1 that answers with the Host header it got,
    and the list of every Host header it got."""
    seen: list[str] = []

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            host = ""
            for line in data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "host":
                    host = value.strip()
            seen.append(host)
            body = host.encode()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                % (len(body), body)
            )

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}", seen
        nursery.cancel_scope.cancel()


async def fetch(backend: ExecutionBackend, plugin: str, url: str, **headers: str) -> Any:
    headers = {name.replace("_", "-"): value for name, value in headers.items()}
    return await run(backend, "fetch_call", {"url": url, "headers": headers}, plugin=plugin)


async def test_a_host_header_must_name_a_granted_host(
    backend: ExecutionBackend, deputies: PluginRegistry, echo_host: tuple[str, list[str]]
) -> None:
    base, seen = echo_host
    port = base.rsplit(":", 1)[1]
    register(deputies, "fetcher", network={"fetch": [f"{base}/public/*"]})
    register(
        deputies,
        "fetcher.proxied",
        network={"fetch": [f"{base}/public/*", "http://internal.example:*/public/*"]},
    )
    url = f"{base}/public/x"
    assert await fetch(backend, "fetcher", url) == {"status": 200, "body": f"127.0.0.1:{port}"}
    assert (await fetch(backend, "fetcher", url, Host=f"127.0.0.1:{port}"))["status"] == 200
    refused = [
        {"Host": "internal.example"},
        {"host": "internal.example:80"},
        {"HOST ": "internal.example"},
        {"Host": "127.0.0.1:1"},  # another port of the granted host
        {"Host": "127.0.0.1@internal.example"},
        {"X-Forwarded-Host": "internal.example"},
        {"X-Host": "internal.example"},
        {"Forwarded": "host=127.0.0.1"},
        {"X-Original-URL": "/private/secret"},
        {"X-Rewrite-URL": "/private/secret"},
        # servers behind CGI/WSGI (and some frameworks) read X_Forwarded_Host as
        # X-Forwarded-Host: the same header to them
        {"X_Forwarded_Host": "internal.example"},
        {"x_host": "internal.example"},
        {"X_Original_URL": "/private/secret"},
    ]
    before = len(seen)
    for headers in refused:
        result = await run(
            backend, "fetch_call", {"url": url, "headers": headers}, plugin="fetcher"
        )
        assert result.get("error") == "PERMISSION_DENIED", (headers, result)
        assert result["details"]["permission"] == "network.fetch"
    assert len(seen) == before  # none of them reached the server
    # where the grants name the host, the header may name it too
    result = await fetch(backend, "fetcher.proxied", url, Host="internal.example")
    assert result == {"status": 200, "body": "internal.example"}
    result = await fetch(backend, "fetcher.proxied", f"{base}/private/x", Host="internal.example")
    assert result["error"] == "PERMISSION_DENIED"  # the path is still checked


@pytest.mark.parametrize("kind", list(BACKENDS))
async def test_a_key_listing_is_bounded_like_a_transfer(
    kind: str, deputies: PluginRegistry, workspaces: WorkspaceManager, tmp_path: Path
) -> None:
    """Keys last from one execution to the next: a plugin may gather any number over time,
    then ask for all of them at once. A listing past ``max_transfer_bytes`` is refused
    (``INVALID_REQUEST``) rather than held and sent whole."""
    limit = 64 * 1024
    namespace = tmp_path / "storage" / "bystander"
    namespace.mkdir(parents=True)
    for i in range(400):  # ~80 KB of keys, as 400 earlier puts would have left them
        (namespace / (f"{i:05d}" + "k" * 195)).write_bytes(b"")
    async with (
        Platform(storage_root=tmp_path / "storage", max_transfer_bytes=limit) as platform,
        create_execution_backend(
            registry=deputies, workspace=workspaces, platform=platform, **BACKENDS[kind]
        ) as backend,
    ):
        listed = await storage(backend, "list", "")
        assert isinstance(listed, dict) and listed["error"] == "INVALID_REQUEST", str(listed)[:200]
        assert len(await storage(backend, "list", "0000")) == 10  # a narrower prefix fits


@pytest.mark.parametrize("backend", ["in-process", "sandboxed-pool"], indirect=True)
async def test_no_spelling_of_a_namespace_or_key_reaches_another_plugins(
    backend: ExecutionBackend, tmp_path: Path
) -> None:
    """``bystander`` (granted its own storage) names ``deputy``'s namespace in every way it
    can think of, and keys that climb out of its own: each is refused, and nothing is
    written outside ``bystander``'s directory."""
    root = tmp_path / "storage"
    namespaces = [
        "deputy",
        "Deputy",
        "bystander/../deputy",
        "bystander/..",
        "bystander/.",
        "bystander/",
        "/deputy",
        "bystanderx",
        "bystander\x00/x",
        "bystander/x\x00",
        "\uff42ystander",
        "bystander\uff0f..\uff0fdeputy",
        "b" * 100_000,
    ]
    for namespace in namespaces:
        result = await storage(backend, "put_in", namespace, "k", "x")
        assert result["error"] in ("PERMISSION_DENIED", "INVALID_REQUEST"), (namespace, result)
    keys = [
        "../deputy/k",
        "x/../../deputy/k",
        "/etc/k",
        "k\x00",
        "\uff0e\uff0e/deputy/k",
        "x\uff0f..\uff0f..",
        "",
    ]
    for key in keys:
        result = await storage(backend, "put", key, "x")
        assert result["error"] == "INVALID_REQUEST", (key, result)
    assert [p.relative_to(root).parts[0] for p in root.rglob("*")] in ([], ["bystander"])
