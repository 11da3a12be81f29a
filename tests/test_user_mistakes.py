"""Mistakes a new user makes, each answered with an error that says what, why and how to fix.

Found by using the project from its README and docs alone; each test is one thing a user hit
that used to end in a bare exception from deep inside (or a message that did not help).
"""

from __future__ import annotations

import asyncio

import pytest

from plugin_execution import (
    ExecutionRequest,
    InvalidRequestError,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)

P = "tests.sample"


@pytest.mark.parametrize(
    "request_", [{"plugin_id": P, "handler_id": "echo"}, (P, "echo"), "tests.sample/echo"]
)
async def test_execute_of_something_else_than_a_request(
    registry: PluginRegistry, workspaces: WorkspaceManager, request_: object
) -> None:
    async with create_execution_backend(
        type="in-process", registry=registry, workspace=workspaces
    ) as backend:
        with pytest.raises(InvalidRequestError, match="ExecutionRequest") as info:
            await backend.execute(request_)  # type: ignore[arg-type]
        assert type(request_).__name__ in info.value.message
        with pytest.raises(InvalidRequestError, match="ExecutionRequest"):
            async with backend.open_execution(request_):  # type: ignore[arg-type]
                pass  # pragma: no cover
        # Not a result even with raise_errors=False: there is no execution to report on.
        with pytest.raises(InvalidRequestError):
            await backend.execute(request_, raise_errors=False)  # type: ignore[arg-type]


def test_the_trio_backend_entered_from_asyncio(registry: PluginRegistry) -> None:
    async def main() -> None:
        async with create_execution_backend(type="in-process", registry=registry):
            pass  # pragma: no cover

    with pytest.raises(RuntimeError, match="plugin_execution.asyncio.create_execution_backend"):
        asyncio.run(main())


async def test_the_asyncio_backend_entered_from_trio(registry: PluginRegistry) -> None:
    from plugin_execution import asyncio as pe_asyncio

    backend = pe_asyncio.create_execution_backend(type="in-process", registry=registry)
    with pytest.raises(RuntimeError, match="plugin_execution.create_execution_backend"):
        async with backend:
            pass  # pragma: no cover
