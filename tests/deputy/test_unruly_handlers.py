"""Handlers that misbehave toward their own worker, on the backends that keep plugins in
processes of their own: what they do stays theirs, the caller gets an error, and the host
serves the next execution."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from plugin_execution import (
    ExecutionBackend,
    ExecutionRequest,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)

from .conftest import BACKENDS, PLUGINS

HANDLERS = ("huge_result", "take_every_fd", "hello")


@pytest.fixture(params=["sandboxed-pool", "spawn"])
async def backend(
    request: pytest.FixtureRequest, workspaces: WorkspaceManager
) -> AsyncIterator[ExecutionBackend]:
    registry = PluginRegistry()
    for plugin_id in ("unruly", "bystander"):
        registry.register(
            {
                "id": plugin_id,
                "root": str(PLUGINS),
                "handlers": [{"id": name, "entry": f"unruly:{name}"} for name in HANDLERS],
            }
        )
    async with create_execution_backend(
        registry=registry, workspace=workspaces, **BACKENDS[request.param]
    ) as backend:
        yield backend


async def call(backend: ExecutionBackend, handler: str, input: Any = None, **kw: Any) -> Any:
    request = ExecutionRequest(
        plugin_id=kw.get("plugin", "unruly"), handler_id=handler, input=input
    )
    return await backend.execute(request, timeout=60, raise_errors=False)


async def test_a_result_bigger_than_a_frame_fails_alone(backend: ExecutionBackend) -> None:
    """65 MiB of result, over the 64 MiB frame: the caller gets an error saying so, and
    the plugin's next execution is served."""
    result = await call(backend, "huge_result", {"mib": 65})
    assert result.error is not None and result.error.code == "INVALID_REQUEST", result
    assert "over the 67108864-byte limit" in result.error.message
    assert (await call(backend, "hello")).output == "hello"
    assert (await call(backend, "hello", plugin="bystander")).output == "hello"


async def test_every_fd_taken_stays_the_plugins_problem(backend: ExecutionBackend) -> None:
    """A handler takes every fd its process may open and keeps them: it ends, the next
    execution of the plugin gets an answer (the same worker, on the sandboxed pool: it needs
    no new fd to serve one; an error would do, never a hang), and other plugins are served
    as ever. Both backends bound the fds (subprocess children 256, sandboxed workers
    1024): it cannot take as many as the host's own limit allows (~20,000 before)."""
    taken = await call(backend, "take_every_fd")
    assert taken.ok and 100 < taken.output < 1024, taken
    after = await call(backend, "hello")
    assert after.output == "hello" or after.error is not None, after
    assert (await call(backend, "hello", plugin="bystander")).output == "hello"
