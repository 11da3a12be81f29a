"""One shutdown contract on every backend (docs/backends.md, "Shutdown").

Callers run in a nursery OUTSIDE the backend's block (the host's nursery, as a server has
it): leaving the block, or ``shutdown(drain=..., timeout=...)``, must give every one of them
an outcome before it returns: a result that finished in time, or ``BACKEND_CLOSED``; nothing
may complete afterwards, and no workspace dir or process may be left. Real handlers, real
processes; the in-process backend, with no process involved, runs on trio's MockClock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from plugin_execution import (
    BackendClosedError,
    ExecutionBackend,
    ExecutionRequest,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)

P = "tests.lifecycle"
PLUGINS = Path(__file__).parents[1] / "plugins"
HANDLERS = ("nap", "nap_sync", "shut_down_own_backend")
KINDS = ["in-process", "worker-pool", "worker-pool-thread", "subprocess-spawn", "subprocess-zygote"]


@pytest.fixture
def lifecycle() -> PluginRegistry:
    registry = PluginRegistry()
    registry.register(
        {
            "id": P,
            "root": str(PLUGINS),
            "handlers": [{"id": name, "entry": f"lifecycle:{name}"} for name in HANDLERS],
        }
    )
    return registry


def open_backend(
    kind: str, registry: PluginRegistry, workspaces: WorkspaceManager, **options: Any
) -> ExecutionBackend:
    if kind.startswith("worker-pool"):
        options.update(min_workers=2, max_workers=2, max_concurrency_per_worker=4)
        if kind.endswith("-thread"):
            options.update(kind="thread")
    elif kind.startswith("subprocess"):
        options.update(start_method=kind.removeprefix("subprocess-"), max_concurrent=8)
    return create_execution_backend(
        type=kind.removesuffix("-spawn").removesuffix("-zygote").removesuffix("-thread"),
        registry=registry,
        workspace=workspaces,
        **options,
    )


class Callers:
    """``count`` callers in the host's nursery: a mix of async and sync handlers, a few
    quick, most far longer than any drain. Each outcome is kept with when it came."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.outcomes: list[tuple[str, float]] = []
        self.started = 0

    def start(self, nursery: trio.Nursery, backend: ExecutionBackend) -> None:
        for i in range(self.count):
            handler = "nap" if i % 2 else "nap_sync"
            seconds = 0.0 if i % 10 == 0 else 3.0 if handler == "nap_sync" else 60.0
            nursery.start_soon(self.call, backend, handler, seconds)

    async def call(self, backend: ExecutionBackend, handler: str, seconds: float) -> None:
        self.started += 1
        result = await backend.execute(
            ExecutionRequest(plugin_id=P, handler_id=handler, input={"seconds": seconds}),
            timeout=120,
            raise_errors=False,
        )
        outcome = "ok" if result.ok else result.error.code  # type: ignore[union-attr]
        self.outcomes.append((outcome, trio.current_time()))

    async def all_started(self) -> None:
        with trio.fail_after(60):
            while self.started < self.count:
                await trio.sleep(0.01)
        await trio.sleep(0.2)  # into their handlers, mostly

    def check(self, closed_at: float) -> None:
        assert len(self.outcomes) == self.count  # every caller has its outcome, once
        codes = {code for code, _ in self.outcomes}
        assert codes <= {"ok", "BACKEND_CLOSED"}, codes
        assert "BACKEND_CLOSED" in codes  # the long ones were stopped, not waited for
        late = [when for _, when in self.outcomes if when > closed_at]
        assert not late, f"{len(late)} outcomes came after the block"


Leave = Callable[[ExecutionBackend], Awaitable[None]]


async def leave_block(backend: ExecutionBackend) -> None:
    pass  # __aexit__: shutdown with the defaults (shutdown_timeout=0.5 below)


async def drain_briefly(backend: ExecutionBackend) -> None:
    await backend.shutdown(drain=True, timeout=0.5)


async def no_drain(backend: ExecutionBackend) -> None:
    await backend.shutdown(drain=False)


LEAVES = [leave_block, drain_briefly, no_drain]


async def shut_down_under_load(
    kind: str, registry: PluginRegistry, workspaces: WorkspaceManager, leave: Leave, count: int
) -> None:
    callers = Callers(count)
    async with trio.open_nursery() as host:
        async with open_backend(kind, registry, workspaces, shutdown_timeout=0.5) as backend:
            callers.start(host, backend)
            await callers.all_started()
            await leave(backend)
            if leave is not leave_block:
                assert not backend.running
                callers.check(trio.current_time())  # shutdown() itself settled them all
        closed_at = trio.current_time()
        callers.check(closed_at)
        with pytest.raises(BackendClosedError):
            await backend.execute(ExecutionRequest(plugin_id=P, handler_id="nap", input={}))
        # Nothing may come now. Every caller has had its one outcome since the check above,
        # so a short look is enough (under MockClock, in-process, it costs nothing anyway).
        await trio.sleep(0.1)
        callers.check(closed_at)
    assert backend.stats().in_flight == 0
    assert workspaces.active() == 0


@pytest.mark.parametrize("leave", LEAVES)
@pytest.mark.parametrize("kind", KINDS[1:])
async def test_every_caller_gets_a_finished_result_or_backend_closed(
    lifecycle: PluginRegistry, workspaces: WorkspaceManager, kind: str, leave: Leave
) -> None:
    count = 24 if kind.startswith("subprocess") else 100  # a child each: be kind to 2 CPUs
    await shut_down_under_load(kind, lifecycle, workspaces, leave, count)


@pytest.mark.parametrize("leave", LEAVES)
def test_in_process_stops_async_handlers_and_abandons_threads(
    lifecycle: PluginRegistry, workspaces: WorkspaceManager, leave: Leave
) -> None:
    # 100 callers; before the fix they all returned ok 4 s after the block had exited.
    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(shut_down_under_load, "in-process", lifecycle, workspaces, leave, 100, clock=clock)


async def test_drain_lets_what_finishes_in_time_finish(
    lifecycle: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    results: list[str] = []

    async def call(backend: ExecutionBackend, seconds: float) -> None:
        result = await backend.execute(
            ExecutionRequest(plugin_id=P, handler_id="nap", input={"seconds": seconds}),
            raise_errors=False,
        )
        results.append("ok" if result.ok else result.error.code)  # type: ignore[union-attr]

    async with (
        trio.open_nursery() as host,
        open_backend("worker-pool", lifecycle, workspaces) as backend,
    ):
        for seconds in (0.5, 0.5, 3600):
            host.start_soon(call, backend, seconds)
        await trio.sleep(0.2)
        # the drain lasts its whole timeout (the third never finishes): 2.5 s is still
        # ample for the 0.3 s the two short ones have left
        await backend.shutdown(drain=True, timeout=2.5)
        assert len(results) == 3
    # the two that could finish in the drain did; the third was stopped at its deadline
    assert sorted(results) == ["BACKEND_CLOSED", "ok", "ok"]


async def test_an_in_process_handler_may_shut_its_own_backend_down(
    lifecycle: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    import lifecycle as plugin  # the module the backend imported (tests/plugins is on sys.path)

    callers = Callers(10)
    async with trio.open_nursery() as host:
        async with open_backend("in-process", lifecycle, workspaces) as backend:
            plugin.BACKEND = backend
            callers.start(host, backend)
            await callers.all_started()
            with trio.fail_after(30):  # it must not wait for itself
                result = await backend.execute(
                    ExecutionRequest(plugin_id=P, handler_id="shut_down_own_backend"),
                    raise_errors=False,
                )
            assert not backend.running
            assert result.error is not None and result.error.code == "BACKEND_CLOSED"
            callers.check(trio.current_time())
        plugin.BACKEND = None
