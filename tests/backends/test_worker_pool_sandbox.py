"""The sandboxed worker pool's placement: workers per plugin, bounded, fair, retired idle.

What the sandbox stops is the escape suite's (tests/sandbox/test_escapes.py, ``pool``); here,
which worker an execution may go to. Real worker processes throughout.
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from plugin_execution import (
    ExecutionRequest,
    InvalidRequestError,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.backends.worker_pool import WorkerPoolBackend
from plugin_execution.backends.worker_pool import queue as queue_module
from plugin_execution.backends.worker_pool import sandboxed as sandboxed_module
from plugin_execution.sandbox import detect

PLUGINS = Path(__file__).parents[1] / "plugins"
PLUGIN_IDS = ("p0", "p1", "p2", "p3")


@pytest.fixture
def plugins() -> PluginRegistry:
    registry = PluginRegistry()
    for plugin_id in PLUGIN_IDS:
        registry.register(
            {
                "id": plugin_id,
                "root": str(PLUGINS),
                "handlers": [
                    {"id": "echo", "entry": "sample:echo"},
                    {"id": "sleep", "entry": "sample:sleep_sync"},
                    {"id": "add", "entry": "sample:add"},
                    {"id": "crash", "entry": "sample:crash"},
                ],
            }
        )
    return registry


def open_pool(registry: PluginRegistry, workspaces: WorkspaceManager, **options: Any) -> Any:
    options = {"max_workers": 2, "min_workers": 0, "sandbox": True, **options}
    return create_execution_backend(
        type="worker-pool", registry=registry, workspace=workspaces, **options
    )


async def call(backend: Any, plugin_id: str, handler: str = "echo", input: Any = "hi") -> Any:
    return await backend.execute(
        ExecutionRequest(plugin_id=plugin_id, handler_id=handler, input=input), timeout=30
    )


def test_only_process_workers_of_its_own_launcher_can_be_sandboxed() -> None:
    with pytest.raises(ValueError, match="process workers"):
        WorkerPoolBackend(registry=PluginRegistry(), kind="thread", sandbox=True)
    with pytest.raises(ValueError, match="unknown sandbox layer"):
        WorkerPoolBackend(registry=PluginRegistry(), sandbox=("landlock", "jail"))


async def test_a_layer_asked_for_and_missing_fails_at_entry(
    plugins: PluginRegistry, workspaces: WorkspaceManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    support = detect()
    layers = dict(support.layers)
    layers["bubblewrap"] = attrs.evolve(layers["bubblewrap"], available=False, detail="gone")
    monkeypatch.setattr(sandboxed_module, "detect", lambda: attrs.evolve(support, layers=layers))
    with pytest.raises(InvalidRequestError, match="bubblewrap: gone"):
        async with open_pool(plugins, workspaces, sandbox=("bubblewrap",)):
            pass


async def test_each_worker_serves_one_plugin_and_the_total_is_bounded(
    plugins: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async with open_pool(plugins, workspaces) as pool:
        served: dict[str, set[str]] = defaultdict(set)

        async def caller(plugin_id: str) -> None:
            for _ in range(3):
                result = await call(pool, plugin_id, "sleep", {"seconds": 0.05})
                assert result.output == "slept"
                assert (
                    "landlock" in result.metadata["sandbox"] or not detect()["landlock"].available
                )
                served[result.worker_id].add(plugin_id)

        async with trio.open_nursery() as nursery:
            for plugin_id in PLUGIN_IDS:
                for _ in range(2):
                    nursery.start_soon(caller, plugin_id)
        assert all(len(plugins_of) == 1 for plugins_of in served.values()), served
        assert {p for plugins_of in served.values() for p in plugins_of} == set(PLUGIN_IDS)
        assert pool.stats().details["workers_peak"] <= 2


async def test_a_plugin_waits_a_bounded_time_behind_a_busy_one(
    plugins: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    # One worker, p0 keeps it busy with a queue of calls; p1's single call must not wait for
    # the whole queue: p0's worker is retired after its current execution, p1's started.
    async with open_pool(plugins, workspaces, max_workers=1) as pool:
        await call(pool, "p0")  # its worker is up
        finished: list[str] = []

        async def busy(n: int) -> None:
            await call(pool, "p0", "sleep", {"seconds": 0.3})
            finished.append(f"p0-{n}")

        async def other() -> None:
            await trio.sleep(0.1)
            result = await call(pool, "p1")
            assert result.output == "hi"
            finished.append("p1")

        async with trio.open_nursery() as nursery:
            for n in range(6):
                nursery.start_soon(busy, n)
            nursery.start_soon(other)
        assert finished.index("p1") < 3, finished  # not behind all six
        assert pool.stats().details["workers_peak"] == 1


async def test_idle_workers_are_retired_with_their_directory(
    plugins: PluginRegistry, workspaces: WorkspaceManager, workspace_root: Path
) -> None:
    async with open_pool(plugins, workspaces, idle_timeout=0.2) as pool:
        result = await call(pool, "p0", "echo", "x")
        assert result.output == "x"
        homes = [p for p in workspace_root.glob("host-*/.worker-*")]
        assert len(homes) == 1
        with trio.fail_after(10):
            while (await pool.health()).details["workers_total"]:
                await trio.sleep(0.05)
            while homes[0].exists():
                await trio.sleep(0.05)
        assert (await call(pool, "p0", "echo", "again")).output == "again"  # started anew


async def test_a_workers_directory_is_its_home_and_holds_its_workspaces(
    plugins: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    plugins.register(
        {
            "id": "env",
            "root": str(PLUGINS),
            "handlers": [{"id": "environment", "entry": "escape:environment"}],
            "permissions": {"env": {"read": ["SANDBOX_TEST_*"]}},
        }
    )
    os.environ["SANDBOX_TEST_GRANTED"] = "yes"
    os.environ["SANDBOX_TEST_SECRET"] = "no"  # granted too: the pattern matches
    try:
        async with open_pool(plugins, workspaces, env={"POOL_OPTION": "set"}) as pool:

            async def env(name: str) -> Any:
                result = await pool.execute(
                    ExecutionRequest(
                        plugin_id="env", handler_id="environment", input={"name": name}
                    )
                )
                return result.output

            assert await env("SANDBOX_TEST_GRANTED") == "yes"
            assert await env("POOL_OPTION") == "set"
            assert await env("HOME") == await env("TMPDIR")
            assert Path(await env("HOME")).name.startswith(".worker-")
            assert await env("USER") is None and await env("PYTHONPATH") is None
    finally:
        del os.environ["SANDBOX_TEST_GRANTED"], os.environ["SANDBOX_TEST_SECRET"]


async def test_a_worker_that_fails_to_start_is_retried_after_a_pause(
    plugins: PluginRegistry, workspaces: WorkspaceManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plugin_execution.backends.worker_pool.placement import RETRY_START_S, PluginActors
    from plugin_execution.sandbox.policy import ChildSandbox

    starts: list[float] = []
    start_for = PluginActors.start_for

    def counted(self: PluginActors, key: Any) -> bool:
        started = start_for(self, key)
        if started:
            starts.append(trio.current_time())
        return started

    monkeypatch.setattr(PluginActors, "start_for", counted)
    async with open_pool(plugins, workspaces, acquire_timeout=2.5) as pool:
        # Its sandbox cannot start: the worker exits before its handshake.
        failing = ChildSandbox(("process", "rlimits"), {}, ["/bin/false"])
        monkeypatch.setattr(
            pool._sandboxed_pool._sandbox, "for_child", lambda *args, **kwargs: failing
        )
        result = await pool.execute(
            ExecutionRequest(plugin_id="p0", handler_id="echo", input=1), raise_errors=False
        )
        assert result.error is not None and result.error.code == "ACQUIRE_TIMEOUT"
        assert [key.plugin_id for key in pool._actors.failed] == ["p0"]
        assert 1 <= len(starts) <= 2.5 / RETRY_START_S + 1  # not a start per dispatch
        assert all(b - a >= RETRY_START_S * 0.9 for a, b in itertools.pairwise(starts))


async def test_recycled_workers_are_replaced_by_workers_of_the_same_plugin(
    plugins: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async with open_pool(plugins, workspaces, max_executions_per_worker=3) as pool:
        seen: dict[str, set[str]] = defaultdict(set)
        for n in range(10):
            plugin_id = PLUGIN_IDS[n % 2]
            result = await call(pool, plugin_id, "echo", n)
            assert result.output == n
            seen[result.worker_id].add(plugin_id)
        assert pool.stats().workers_recycled >= 2
        assert len(seen) >= 4 and all(len(p) == 1 for p in seen.values()), seen
        assert pool.stats().details["workers_peak"] <= 2


async def test_async_handlers_share_a_worker_of_their_plugin(
    plugins: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    plugins.register(
        {
            "id": "slow",
            "root": str(PLUGINS),
            "handlers": [{"id": "sleep", "entry": "sample:sleep"}],
        }
    )
    async with open_pool(plugins, workspaces, max_workers=1, max_concurrency_per_worker=4) as pool:
        workers = set()
        started = trio.current_time()

        async def sleep() -> None:
            result = await call(pool, "slow", "sleep", {"seconds": 0.5})
            workers.add(result.worker_id)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(sleep)
        assert len(workers) == 1
        assert trio.current_time() - started < 1.9  # together, not one after another


async def call_all(backend: Any, requests: list[ExecutionRequest]) -> dict[str, Any]:
    """Every request from a task of its own, at once; the results by execution id."""
    results: dict[str, Any] = {}

    async def one(request: ExecutionRequest) -> None:
        results[request.execution_id] = await backend.execute(
            request, timeout=30, raise_errors=False
        )

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for request in requests:
                nursery.start_soon(one, request)
    return results


@pytest.fixture
def groups(monkeypatch: pytest.MonkeyPatch, batch_frames: list[int]) -> list[int]:
    """The member count of every batch frame; any duration counts as short (see
    test_worker_pool_batches.py), so that groups form whatever the machine's load."""
    monkeypatch.setattr(queue_module, "GROUP_S", 60.0)
    return batch_frames


async def test_queued_callers_of_a_plugin_are_handed_over_in_groups(
    plugins: PluginRegistry, workspaces: WorkspaceManager, groups: list[int]
) -> None:
    requests = [
        ExecutionRequest(plugin_id=PLUGIN_IDS[i % 2], handler_id="add", input={"a": i, "b": 1})
        for i in range(120)
    ]
    async with open_pool(plugins, workspaces, max_queue=500) as pool:
        got = await call_all(pool, requests)
    assert groups and max(groups) > 1
    served: dict[str, set[str]] = defaultdict(set)
    for i, request in enumerate(requests):
        result = got[request.execution_id]
        assert result.ok and result.output == i + 1, result
        assert result.metadata["sandbox"]
        served[result.worker_id].add(request.plugin_id)
    assert all(len(plugins_of) == 1 for plugins_of in served.values()), served
    assert workspaces.active() == 0


async def test_a_grouped_caller_that_kills_its_worker_fails_alone(
    plugins: PluginRegistry, workspaces: WorkspaceManager, groups: list[int]
) -> None:
    requests = [
        ExecutionRequest(plugin_id="p0", handler_id="add", input={"a": i, "b": 0})
        for i in range(60)
    ]
    crashers = {9, 29, 49}
    for i in crashers:
        requests[i] = ExecutionRequest(plugin_id="p0", handler_id="crash", input={"code": 3})
    async with open_pool(plugins, workspaces, max_queue=500) as pool:
        got = await call_all(pool, requests)
        assert pool.stats().details["crash_breaker"]["trips"] == 0
    assert groups and max(groups) > 1
    for i, request in enumerate(requests):
        result = got[request.execution_id]
        if i in crashers:
            assert not result.ok and result.error.code == "WORKER_CRASHED"
        else:
            assert result.ok and result.output == i, result
    assert workspaces.active() == 0


async def test_an_invocation_of_its_own_plugin_borrows_its_callers_worker(
    workspaces: WorkspaceManager,
) -> None:
    # Callers holding both workers each invoke a handler of their own plugin: as on any pool,
    # the invocation runs on its caller's worker (one of that plugin, so it may), instead of
    # waiting for the workers its callers hold until the acquire timeout.
    registry = PluginRegistry()
    registry.register(
        {
            "id": "deputy.caller",
            "root": str(PLUGINS),
            "handlers": [{"id": h, "entry": f"deputy_bounds:{h}"} for h in ("quick", "invoke")],
            "permissions": {"invoke": {"allow": ["deputy.*"]}},
        }
    )
    async with open_pool(registry, workspaces, acquire_timeout=30) as pool:
        outputs: list[Any] = []

        async def caller() -> None:
            result = await call(
                pool, "deputy.caller", "invoke", {"plugin": "deputy.caller", "handler": "quick"}
            )
            outputs.append(result.output)

        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(caller)
        assert outputs == ["quick", "quick"]
        stats = pool.stats()
        assert stats.acquire_timeouts == 0
        assert stats.details["workers_peak"] <= 2


async def test_a_plugin_arriving_behind_one_that_keeps_queueing_gets_a_worker(
    plugins: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    # p0's callers queue again as soon as each call ends, so p0 is always waiting (a queued
    # call of the only waiting plugin skips placement); p1's one call, made once p0 holds the
    # only worker, still gets a worker long before p0's callers are done.
    async with open_pool(plugins, workspaces, max_workers=1) as pool:
        finished: list[str] = []
        first = trio.Event()

        async def busy() -> None:
            for _ in range(12):
                await call(pool, "p0", "sleep", {"seconds": 0.05})
                finished.append("p0")
                first.set()

        async def other() -> None:
            await first.wait()
            assert (await call(pool, "p1")).output == "hi"
            finished.append("p1")

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(busy)
            nursery.start_soon(other)
        assert len(finished) == 49
        assert finished.index("p1") < 36, finished  # not behind all of p0's calls
        assert pool.stats().details["workers_peak"] == 1


async def test_its_stats_count_the_callers_queued(
    plugins: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async with open_pool(plugins, workspaces, max_workers=1) as pool:
        await call(pool, "p0")  # its worker is up
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(call, pool, "p0", "sleep", {"seconds": 0.2})
            with trio.fail_after(30):
                while len(pool._queue.waiters) < 2:
                    await trio.sleep(0.01)
            assert pool.stats().queued == 2  # one runs, two wait
        assert pool.stats().queued == 0
