"""Nested invocations never wait for capacity their own ancestors hold (issue 20, item 5).

The issue's case: subprocess backend, ``max_concurrent=4``, 4 executions each
``ctx.invoke`` a 0.1 s handler: the callers held every slot and all 4 timed out. Now an
invocation that finds no free capacity runs on its caller's (lent to one invocation of the
caller at a time), so every case below finishes far inside its timeout; cycles are still
refused before anything runs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from plugin_execution import (
    ExecutionBackend,
    ExecutionRequest,
    ExecutionResult,
    InvalidRequestError,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)

PLUGINS = Path(__file__).parents[1] / "plugins"
TIMEOUT = 8.0  # the issue's: each caller then got TIMEOUT

#: Each backend with its capacity taken by as few callers as possible.
LIMITED: dict[str, dict[str, Any]] = {
    "subprocess": {"type": "subprocess", "max_concurrent": 4},
    "zygote": {"type": "subprocess", "max_concurrent": 4, "start_method": "zygote"},
    "worker-pool": {
        "type": "worker-pool",
        "min_workers": 1,
        "max_workers": 2,
        "acquire_timeout": 60.0,  # a queued child would wait to the caller's deadline
    },
    "thread-pool": {
        "type": "worker-pool",
        "kind": "thread",
        "min_workers": 1,
        "max_workers": 2,
        "acquire_timeout": 60.0,
    },
    "in-process": {"type": "in-process"},
}
SLOTS = {"subprocess": 4, "zygote": 4, "worker-pool": 2, "thread-pool": 2, "in-process": 4}


@pytest.fixture
def plugins() -> PluginRegistry:
    registry = PluginRegistry()
    handlers = ("quick", "invoke", "invoke_sync", "invoke_many")
    for name in ("deputy.caller", "deputy.callee", "deputy.middle"):
        registry.register(
            {
                "id": name,
                "root": str(PLUGINS),
                "handlers": [{"id": h, "entry": f"deputy_bounds:{h}"} for h in handlers],
                "permissions": {"invoke": {"allow": ["deputy.*"]}},
            }
        )
    return registry


@asynccontextmanager
async def limited(
    kind: str, plugins: PluginRegistry, workspaces: WorkspaceManager
) -> AsyncIterator[ExecutionBackend]:
    async with create_execution_backend(
        registry=plugins, workspace=workspaces, **LIMITED[kind]
    ) as backend:
        yield backend


def invoking(handler: str, input: dict[str, Any]) -> ExecutionRequest:
    return ExecutionRequest(
        plugin_id="deputy.caller", handler_id=handler, input=input, timeout=TIMEOUT
    )


QUICK = {"plugin": "deputy.callee", "handler": "quick"}


async def run_all(backend: ExecutionBackend, requests: list[ExecutionRequest]) -> list[Any]:
    results: list[ExecutionResult | None] = [None] * len(requests)

    async def one(i: int) -> None:
        results[i] = await backend.execute(requests[i], raise_errors=False)

    async with trio.open_nursery() as nursery:
        for i in range(len(requests)):
            nursery.start_soon(one, i)
    for result in results:
        assert result is not None
        assert result.ok, result.error
    return [result.output for result in results if result is not None]


@pytest.mark.parametrize("kind", list(LIMITED))
async def test_callers_holding_every_slot_still_get_their_invocations_run(
    kind: str, plugins: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    """As many callers as there are slots, half of them sync handlers, each invoking the
    0.1 s handler: all finish, long before the 8 s timeout each of them got before."""
    async with limited(kind, plugins, workspaces) as backend:
        slots = SLOTS[kind]
        requests = [invoking("invoke" if i % 2 else "invoke_sync", QUICK) for i in range(slots)]
        started = time.monotonic()
        assert await run_all(backend, requests) == ["quick"] * slots
        assert time.monotonic() - started < TIMEOUT
        assert backend.stats().failed == 0


@pytest.mark.parametrize("kind", ["subprocess", "worker-pool"])
async def test_a_chain_deeper_than_the_slots_runs_on_one(
    kind: str, plugins: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    """caller -> middle -> callee with every slot taken by such chains: each level borrows
    the slot of the one above."""
    async with limited(kind, plugins, workspaces) as backend:
        chain = {"plugin": "deputy.middle", "handler": "invoke", "input": QUICK}
        requests = [invoking("invoke", chain) for _ in range(SLOTS[kind])]
        assert await run_all(backend, requests) == ["quick"] * SLOTS[kind]


@pytest.mark.parametrize("kind", ["subprocess", "worker-pool"])
async def test_concurrent_invocations_of_one_caller_share_its_slot(
    kind: str, plugins: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    """Callers holding every slot each start 3 invocations at once: with no free capacity
    the caller's slot is lent to one of them at a time, and all of them finish."""
    async with limited(kind, plugins, workspaces) as backend:
        many = {**QUICK, "count": 3}
        requests = [invoking("invoke_many", many) for _ in range(SLOTS[kind])]
        assert await run_all(backend, requests) == [["quick"] * 3] * SLOTS[kind]


@pytest.mark.parametrize("kind", ["subprocess", "worker-pool"])
async def test_cycles_are_still_refused_at_once(
    kind: str, plugins: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async with limited(kind, plugins, workspaces) as backend:
        cycle = {"plugin": "deputy.caller", "handler": "invoke", "input": {}}  # A -> A
        back = {
            "plugin": "deputy.middle",
            "handler": "invoke",
            "input": {"plugin": "deputy.caller", "handler": "invoke", "input": {}},
        }  # A -> B -> A
        for input in (cycle, back):
            with pytest.raises(InvalidRequestError, match="cycle"):
                await backend.execute(invoking("invoke", input))
