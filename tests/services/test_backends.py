"""Every platform service through real backends: a granted call works, a denied one raises
PermissionDeniedError with the right fields, the same on each backend, for async and sync
handlers alike. On process backends each call is a round trip to the host."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from plugin_execution import (
    ExecutionBackend,
    ExecutionRequest,
    ExecutionTimeoutError,
    HandlerError,
    InvalidRequestError,
    PermissionDeniedError,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.platform import Platform

from .conftest import ENVIRON

PLUGINS = Path(__file__).parents[1] / "plugins"
BACKENDS = ["in-process", "worker-pool", "subprocess"]
OPTIONS: dict[str, dict[str, Any]] = {
    "in-process": {},
    # nested ctx.invoke holds a worker per level: let async handlers share workers
    "worker-pool": {"min_workers": 1, "max_workers": 3, "max_concurrency_per_worker": 16},
    "subprocess": {"cancel_grace": 0.3},
}
SHAPES = ["call", "call_sync"]  # async handler, sync handler


def register(
    registry: PluginRegistry, plugin_id: str, permissions: dict[str, Any], **handlers: str
) -> None:
    handlers = handlers or {"call": "platform_calls:call", "call_sync": "platform_calls:call_sync"}
    registry.register(
        {
            "id": plugin_id,
            "root": str(PLUGINS),
            "handlers": [{"id": h, "entry": e} for h, e in handlers.items()],
            "permissions": permissions,
        },
        replace=True,
    )


@pytest.fixture
def plugins(tmp_path: Path) -> PluginRegistry:
    registry = PluginRegistry()
    register(
        registry,
        "tests.granted",
        {
            "platform": ["cache", "storage", "events:news.*"],
            "env": {"read": ["APP_*"]},
            "fs": {"read": [str(tmp_path / "data")]},
            "network": {"fetch": ["http://127.0.0.1:*/public/*"]},
            "shell": {"allow": [sys.executable]},
            "invoke": {"allow": ["tests.granted"]},
        },
    )
    register(registry, "tests.nothing", {})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.txt").write_text("data")
    return registry


@pytest.fixture(params=BACKENDS)
async def backend(
    request: pytest.FixtureRequest,
    plugins: PluginRegistry,
    workspaces: WorkspaceManager,
    tmp_path: Path,
) -> AsyncIterator[ExecutionBackend]:
    platform = Platform(storage_root=tmp_path / "storage", environ=ENVIRON)
    async with create_execution_backend(
        type=request.param,
        registry=plugins,
        workspace=workspaces,
        platform=platform,
        **OPTIONS[request.param],
    ) as backend:
        yield backend


async def call(
    backend: ExecutionBackend,
    plugin: str,
    shape: str,
    service: str,
    method: str | None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    request = ExecutionRequest(
        plugin_id=plugin,
        handler_id=shape,
        input={"service": service, "method": method, "args": list(args), "kwargs": kwargs},
    )
    return (await backend.execute(request, timeout=20)).output


async def denied(
    backend: ExecutionBackend, shape: str, permission: str, resource: str, *call_args: Any
) -> None:
    before = backend.stats().permission_denials
    with pytest.raises(PermissionDeniedError) as info:
        await call(backend, "tests.nothing", shape, *call_args)
    err = info.value
    assert err.code == "PERMISSION_DENIED"
    assert (err.plugin_id, err.handler_id) == ("tests.nothing", shape)
    assert err.permission == permission
    assert err.resource.startswith(resource), err.resource
    assert "tests.nothing" in err.message and permission in err.message
    assert backend.stats().permission_denials == before + 1


@pytest.mark.parametrize("shape", SHAPES)
async def test_fs(backend: ExecutionBackend, shape: str, tmp_path: Path) -> None:
    assert await call(backend, "tests.granted", shape, "fs", "write", "out.txt", "hi") == 2
    assert (
        await call(backend, "tests.granted", shape, "fs", "read", str(tmp_path / "data/in.txt"))
        == b"data"
    )
    await denied(
        backend, shape, "fs.read", str(tmp_path), "fs", "read", str(tmp_path / "data/in.txt")
    )
    await denied(backend, shape, "fs.read", "../", "fs", "read", "../../etc/passwd")
    with pytest.raises(HandlerError, match="FileNotFoundError"):
        await call(backend, "tests.granted", shape, "fs", "read", "missing.txt")


@pytest.mark.parametrize("shape", SHAPES)
async def test_env(backend: ExecutionBackend, shape: str) -> None:
    assert await call(backend, "tests.granted", shape, "env", "get", "APP_TOKEN") == "t0k"
    await denied(backend, shape, "env.read", "SECRET", "env", "get", "SECRET")


@pytest.mark.parametrize("shape", SHAPES)
async def test_cache(backend: ExecutionBackend, shape: str) -> None:
    await call(backend, "tests.granted", shape, "cache", "set", "k", {"v": [1]}, ttl=60)
    assert await call(backend, "tests.granted", shape, "cache", "get", "k") == {"v": [1]}
    await denied(backend, shape, "platform.cache", "cache namespace", "cache", "get", "k")


@pytest.mark.parametrize("shape", SHAPES)
async def test_storage(backend: ExecutionBackend, shape: str) -> None:
    await call(backend, "tests.granted", shape, "storage", "put", "a/b.bin", b"\x00\x01")
    assert await call(backend, "tests.granted", shape, "storage", "get", "a/b.bin") == b"\x00\x01"
    assert await call(backend, "tests.granted", shape, "storage", "list") == ["a/b.bin"]
    await denied(backend, shape, "platform.storage", "storage namespace", "storage", "list")


@pytest.mark.parametrize("shape", SHAPES)
async def test_events(backend: ExecutionBackend, shape: str) -> None:
    platform = backend.platform
    with platform.events.subscribe("news.today") as sub:
        assert (
            await call(backend, "tests.granted", shape, "events", "publish", "news.today", 7) == 1
        )
        assert (await sub.receive())["data"] == 7
    await denied(
        backend, shape, "platform.events:news.today", "topic", "events", "publish", "news.today"
    )


async def test_events_subscription_from_a_handler(backend: ExecutionBackend) -> None:
    register(
        backend.registry,
        "tests.listener",
        {"platform": ["events:news.*"]},
        listen="platform_calls:wait_event",
        both="platform_calls:subscribe_then_publish",
        both_sync="platform_calls:subscribe_then_publish_sync",
    )
    for handler in ("both", "both_sync"):
        request = ExecutionRequest(
            plugin_id="tests.listener",
            handler_id=handler,
            input={"topic": "news.x", "data": handler},
        )
        assert (await backend.execute(request)).output == handler
    with backend.platform.events.subscribe("news.ready") as ready:
        async with trio.open_nursery() as nursery:
            results = []

            async def listen() -> None:
                request = ExecutionRequest(
                    plugin_id="tests.listener",
                    handler_id="listen",
                    input={"topic": "news.flash", "ready": "news.ready"},
                )
                results.append((await backend.execute(request, timeout=20)).output)

            nursery.start_soon(listen)
            await ready.receive()
            backend.platform.events.publish("news.flash", "extra!")
    assert results == ["extra!"]
    assert backend.platform.events.subscribers("news.flash") == 0  # closed with the execution


@pytest.mark.parametrize("shape", SHAPES)
async def test_fetch(backend: ExecutionBackend, shape: str, http_server: str) -> None:
    out = await call(backend, "tests.granted", shape, "fetch", None, f"{http_server}/public/x")
    assert out["status"] == 200 and out["body"] == b"GET /public/x "
    await denied(
        backend, shape, "network.fetch", http_server, "fetch", None, f"{http_server}/public/x"
    )


@pytest.mark.parametrize("shape", SHAPES)
async def test_shell(backend: ExecutionBackend, shape: str) -> None:
    argv = [sys.executable, "-c", "print('ran')"]
    out = await call(backend, "tests.granted", shape, "shell", "run", argv)
    assert out["returncode"] == 0 and out["stdout"] == b"ran\n"
    await denied(backend, shape, "shell.allow", sys.executable, "shell", "run", argv)


@pytest.mark.parametrize("shape", SHAPES)
async def test_invoke(backend: ExecutionBackend, shape: str) -> None:
    inner = {"service": "env", "method": "get", "args": ["APP_TOKEN"], "kwargs": {}}
    other = "call_sync" if shape == "call" else "call"  # the same handler would be a cycle
    out = await call(backend, "tests.granted", shape, "invoke", None, "tests.granted", other, inner)
    assert out == "t0k"
    await denied(
        backend,
        shape,
        "invoke.allow",
        "tests.granted/call",
        "invoke",
        None,
        "tests.granted",
        "call",
    )


async def test_invoke_cycles_and_depth(backend: ExecutionBackend) -> None:
    register(
        backend.registry,
        "tests.cycle",
        {"invoke": {"allow": ["tests.cycle"]}},
        loop="platform_calls:invoke_self",
    )
    with pytest.raises(InvalidRequestError, match=r"cycle: tests\.cycle/loop -> tests\.cycle/loop"):
        await backend.execute(ExecutionRequest(plugin_id="tests.cycle", handler_id="loop"))
    depth = backend.platform.max_invoke_depth
    for i in range(depth + 2):
        register(
            backend.registry,
            f"tests.chain{i}",
            {"invoke": {"allow": ["tests.chain*"]}},
            chain="platform_calls:chain",
        )
    ok = ExecutionRequest(plugin_id=f"tests.chain{depth}", handler_id="chain", input=depth)
    assert (await backend.execute(ok, timeout=30)).output == "bottom"
    too_deep = ExecutionRequest(
        plugin_id=f"tests.chain{depth + 1}", handler_id="chain", input=depth + 1
    )
    with pytest.raises(InvalidRequestError, match="deeper than"):
        await backend.execute(too_deep, timeout=30)


async def test_a_caught_denial_is_still_counted(backend: ExecutionBackend) -> None:
    register(backend.registry, "tests.careful", {}, careful="platform_calls:denied_then_ok")
    result = await backend.execute(
        ExecutionRequest(plugin_id="tests.careful", handler_id="careful")
    )
    assert result.output == "env.read"
    stats = backend.stats()
    assert stats.permission_denials == 1 and stats.failed == 0


@pytest.mark.parametrize("kind", ["worker-pool", "subprocess"])
async def test_host_secrets_stay_out_of_worker_processes(
    kind: str,
    plugins: PluginRegistry,
    workspaces: WorkspaceManager,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOST_SECRET_TOKEN", "hunter2")
    monkeypatch.setenv("APP_VISIBLE", "yes")
    register(plugins, "tests.env", {"env": {"read": ["APP_*"]}}, env="platform_calls:environment")
    async with create_execution_backend(
        type=kind, registry=plugins, workspace=workspaces, **OPTIONS[kind]
    ) as backend:
        env = (
            await backend.execute(ExecutionRequest(plugin_id="tests.env", handler_id="env"))
        ).output
        assert "HOST_SECRET_TOKEN" not in env
        # A subprocess child gets the granted variables in its environment; pool workers are
        # shared by plugins, so they get none: ctx.env.get is the way to read them there.
        assert ("APP_VISIBLE" in env) == (kind == "subprocess")


async def test_a_cancel_releases_a_sync_handler_blocked_in_a_call(
    backend: ExecutionBackend,
) -> None:
    register(
        backend.registry,
        "tests.waiter",
        {"platform": ["events:never"]},
        wait="platform_calls:wait_forever_sync",
    )
    request = ExecutionRequest(
        plugin_id="tests.waiter", handler_id="wait", input={"topic": "never"}
    )
    with pytest.raises(ExecutionTimeoutError):
        await backend.execute(request, timeout=0.5)
    if backend.name == "worker-pool":  # released by the cancel, not killed after the grace
        assert backend.stats().details["workers_killed"] == 0
    assert backend.platform.events.subscribers("never") == 0
