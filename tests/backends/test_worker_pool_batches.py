"""``backend.map`` on the worker pool: batches of executions, one frame and one slot each.

What a user of ``map`` must not notice: every request still ends as its own result with its
own id, async handlers still run one at a time on a one-slot worker, a member that kills its
worker fails alone (those behind it run again elsewhere), a timeout stops only its member,
leaving the block stops what is in flight, and options that count executions turn batches off.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from plugin_execution import (
    ExecutionRequest,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.backends.worker_pool import batches as batches_module
from plugin_execution.backends.worker_pool import queue as queue_module
from plugin_execution.backends.worker_pool.batches import MAX_BATCH, PoolBatches

P = "tests.sample"


def req(handler: str, input: object = None, plugin: str = P) -> ExecutionRequest:
    return ExecutionRequest(plugin_id=plugin, handler_id=handler, input=input)


def pool(registry: PluginRegistry, workspaces: WorkspaceManager, **options: Any) -> Any:
    options.setdefault("cancel_grace", 0.3)
    options.setdefault("min_workers", 1)
    options.setdefault("max_workers", 1)
    return create_execution_backend(
        type="worker-pool", registry=registry, workspace=workspaces, **options
    )


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch, batch_frames: list[int]) -> list[int]:
    """The member count of every Batch frame the host makes. Batches are sized by how long
    executions take, which a loaded machine stretches: here any duration counts as short,
    so that batches are made whatever the load."""
    monkeypatch.setattr(batches_module, "BATCH_S", 60.0)
    monkeypatch.setattr(queue_module, "GROUP_S", 60.0)
    return batch_frames


async def run_map(backend: Any, requests: list[ExecutionRequest], **options: Any) -> list[Any]:
    with trio.fail_after(60):
        async with backend.map(requests, **options) as results:
            return [result async for result in results]


@pytest.mark.parametrize("kind", ["process", "thread"])
async def test_map_sends_several_executions_per_frame(
    registry: PluginRegistry, workspaces: WorkspaceManager, batches: list[int], kind: str
) -> None:
    requests = [req("add", {"a": i, "b": 1}) for i in range(300)]
    async with pool(registry, workspaces, kind=kind) as backend:
        got = await run_map(backend, requests, concurrency=16, ordered=True)
    assert [r.execution_id for r in got] == [r.execution_id for r in requests]
    assert [r.output for r in got] == [i + 1 for i in range(300)]
    assert all(r.ok and r.backend == "worker-pool" for r in got)
    assert sum(batches) == 300 and max(batches) > 1 and len(batches) < 300
    assert max(batches) <= 16 // 2  # a batch is at most concurrency / (2 x slots)
    assert workspaces.active() == 0


def test_batch_size_follows_concurrency_and_the_pool_options() -> None:
    class Options:
        max_workers = 2
        max_concurrency_per_worker = 1
        max_concurrent_per_plugin: int | None = None

    options = Options()
    sizes = PoolBatches(options)  # type: ignore[arg-type]
    assert [sizes.size(c) for c in (1, 4, 8, 64, 10_000)] == [1, 1, 2, 16, MAX_BATCH]
    assert sizes.take(16) == 4  # before any batch is measured: short
    sizes._measured(0.010, 1)  # a slow handler (10 ms each): one at a time
    assert sizes.take(16) == 1
    for _ in range(30):
        sizes._measured(0.001, 100)  # fast again (10 us each): the sizes come back
    assert sizes.take(16) == 16
    options.max_concurrent_per_plugin = 3  # a cap counts executions: no batches
    assert sizes.size(64) == 1


async def test_async_members_never_overlap_on_a_one_slot_worker(
    registry: PluginRegistry, workspaces: WorkspaceManager, batches: list[int]
) -> None:
    requests = [req("overlap", {"seconds": 0.002}) for _ in range(40)]
    async with pool(registry, workspaces) as backend:
        got = await run_map(backend, requests, concurrency=16)
    assert max(batches) > 1
    assert [r.output for r in got] == [1] * 40


async def test_a_member_that_kills_its_worker_fails_alone(
    registry: PluginRegistry, workspaces: WorkspaceManager, batches: list[int]
) -> None:
    requests = [req("add", {"a": i, "b": 0}) for i in range(60)]
    crashers = {9, 23, 41}
    for i in crashers:
        requests[i] = req("crash", {"code": 3})
    async with pool(registry, workspaces, min_workers=2, max_workers=2) as backend:
        got = {r.execution_id: r for r in await run_map(backend, requests, concurrency=16)}
        assert backend.stats().details["crash_breaker"]["trips"] == 0
    assert max(batches) > 1
    for i, request in enumerate(requests):
        result = got[request.execution_id]
        if i in crashers:
            assert not result.ok and result.error.code == "WORKER_CRASHED"
        else:
            assert result.ok and result.output == i
    assert workspaces.active() == 0


async def test_a_timeout_stops_only_its_member(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    requests = [req("add", {"a": i, "b": 0}) for i in range(30)]
    requests[5] = requests[17] = req("spin")  # never returns: its worker is killed
    async with pool(registry, workspaces, min_workers=2, max_workers=2) as backend:
        got = {
            r.execution_id: r for r in await run_map(backend, requests, concurrency=8, timeout=1.0)
        }
    for i, request in enumerate(requests):
        result = got[request.execution_id]
        if request.handler_id == "spin":
            assert result.error is not None and result.error.code == "TIMEOUT"
        else:
            assert result.ok and result.output == i


async def test_leaving_the_block_stops_the_batches_in_flight(
    registry: PluginRegistry, workspaces: WorkspaceManager, batches: list[int]
) -> None:
    requests = [req("sleep", {"seconds": 30}) for _ in range(64)]
    # A generous cancel_grace: 32 cancelled sleeps are acknowledged at once, and a worker a
    # loaded machine keeps waiting past the file's 0.3 s would be killed, not cancelled.
    options = {"min_workers": 2, "max_workers": 2, "cancel_grace": 10.0}
    async with pool(registry, workspaces, **options) as backend:
        with trio.fail_after(20):
            async with backend.map(requests, concurrency=32):
                await trio.sleep(0.5)
            assert backend.stats().in_flight == 0
            assert backend.stats().failed_by_code.get("ABORTED", 0) >= 1
        result = await backend.execute(req("add", {"a": 1, "b": 1}))
        assert result.output == 2
        assert backend.stats().details["workers_killed"] == 0  # cancelled, not killed
    assert batches and workspaces.active() == 0


async def test_members_with_quotas_run_one_at_a_time(
    registry: PluginRegistry, workspaces: WorkspaceManager, batches: list[int]
) -> None:
    registry.register(
        {
            "id": "tests.quotas",
            "root": str(registry.get(P).root),
            "handlers": [{"id": "add", "entry": "sample:add"}],
            "permissions": {"quotas": {"cpu_s": 5, "timeout": 60}},
        }
    )
    requests = [req("add", {"a": i, "b": 1}, plugin="tests.quotas") for i in range(20)]
    async with pool(registry, workspaces) as backend:
        got = await run_map(backend, requests, concurrency=16, ordered=True)
    assert [r.output for r in got] == [i + 1 for i in range(20)]
    assert batches == []  # watched one at a time, never in a batch


async def test_a_per_plugin_cap_turns_batches_off(
    registry: PluginRegistry, workspaces: WorkspaceManager, batches: list[int]
) -> None:
    requests = [req("add", {"a": i, "b": 1}) for i in range(40)]
    async with pool(registry, workspaces, max_concurrent_per_plugin=4) as backend:
        got = await run_map(backend, requests, concurrency=16)
    assert sorted(r.output for r in got) == [i + 1 for i in range(40)]
    assert batches == []


# -- callers of execute queued for a worker: handed over in groups, as one batch ----------


async def call_all(backend: Any, requests: list[ExecutionRequest]) -> dict[str, Any]:
    """Every request from its own task at once (so most of them queue); results by id."""
    results: dict[str, Any] = {}

    async def call(request: ExecutionRequest) -> None:
        results[request.execution_id] = await backend.execute(request, raise_errors=False)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for request in requests:
                nursery.start_soon(call, request)
    return results


@pytest.mark.parametrize("kind", ["process", "thread"])
async def test_queued_callers_are_handed_over_in_groups(
    registry: PluginRegistry, workspaces: WorkspaceManager, batches: list[int], kind: str
) -> None:
    requests = [req("add", {"a": i, "b": 1}) for i in range(200)]
    async with pool(registry, workspaces, kind=kind, max_queue=500) as backend:
        got = await call_all(backend, requests)
    assert [got[r.execution_id].output for r in requests] == [i + 1 for i in range(200)]
    assert batches and max(batches) > 1
    assert workspaces.active() == 0


async def test_grouped_async_callers_never_overlap_on_a_one_slot_worker(
    registry: PluginRegistry, workspaces: WorkspaceManager, batches: list[int]
) -> None:
    requests = [req("overlap", {"seconds": 0.002}) for _ in range(40)]
    async with pool(registry, workspaces) as backend:
        got = await call_all(backend, requests)
    assert batches and [got[r.execution_id].output for r in requests] == [1] * 40


async def test_a_grouped_caller_that_kills_the_worker_fails_alone(
    registry: PluginRegistry, workspaces: WorkspaceManager, batches: list[int]
) -> None:
    requests = [req("add", {"a": i, "b": 0}) for i in range(80)]
    crashers = {13, 37, 61}
    for i in crashers:
        requests[i] = req("crash", {"code": 3})
    async with pool(registry, workspaces, max_queue=500) as backend:
        got = await call_all(backend, requests)
        assert backend.stats().details["crash_breaker"]["trips"] == 0
    assert batches and max(batches) > 1
    for i, request in enumerate(requests):
        result = got[request.execution_id]
        if i in crashers:
            assert not result.ok and result.error.code == "WORKER_CRASHED"
        else:
            assert result.ok and result.output == i
    assert workspaces.active() == 0


async def test_a_grouped_caller_that_hangs_stops_only_itself(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    requests = [req("add", {"a": i, "b": 0}) for i in range(40)]
    requests[11] = ExecutionRequest(plugin_id=P, handler_id="spin", timeout=1.0)
    async with pool(registry, workspaces, max_queue=500) as backend:
        got = await call_all(backend, requests)
    for i, request in enumerate(requests):
        result = got[request.execution_id]
        if i == 11:
            assert result.error is not None and result.error.code == "TIMEOUT"
        else:
            assert result.ok and result.output == i


async def test_batches_whose_deadline_passes_in_the_queue_time_out_without_a_kill(
    registry: PluginRegistry, workspaces: WorkspaceManager, batches: list[int]
) -> None:
    slow = [req("sleep_sync", {"seconds": 0.5}) for _ in range(4)]  # one batch, 2 s
    hurried = [
        ExecutionRequest(plugin_id=P, handler_id="crash", input={"code": 3}, timeout=0.1)
        for _ in range(12)
    ]  # each would kill its worker if it ever ran: all are pulled, and time out, meanwhile
    async with pool(registry, workspaces) as backend:
        got = {r.execution_id: r for r in await run_map(backend, slow + hurried, concurrency=16)}
        assert backend.stats().details["workers_killed"] == 0
        assert backend.stats().worker_crashes == 0
    assert all(got[r.execution_id].ok for r in slow)
    for request in hurried:
        error = got[request.execution_id].error
        assert error is not None and error.code == "TIMEOUT"
        assert "while waiting for a worker" in error.message


async def test_grouped_callers_each_get_their_own_events(
    registry: PluginRegistry, workspaces: WorkspaceManager, batches: list[int]
) -> None:
    seen: dict[int, list[Any]] = {}

    async def stream(backend: Any, n: int) -> None:
        request = req("events_sync", {"count": n})
        async with backend.open_execution(request) as execution:
            seen[n] = [event async for event in execution.events]
            assert (await execution.result()).output == n

    async with pool(registry, workspaces, max_queue=500) as backend:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for n in range(1, 41):
                    nursery.start_soon(stream, backend, n)
    assert batches and max(batches) > 1
    for n, events in seen.items():
        progress = [e.data for e in events if e.kind == "progress"]
        assert progress == [{"done": i + 1, "total": n} for i in range(n)]


async def test_shutdown_during_a_map_ends_every_request_promptly(
    registry: PluginRegistry, workspaces: WorkspaceManager, batches: list[int]
) -> None:
    requests = [req("sleep_sync", {"seconds": 0.05}) for _ in range(200)]
    codes: list[str] = []
    async with pool(registry, workspaces, min_workers=2, max_workers=2) as backend:

        async def consume() -> None:
            async with backend.map(requests, concurrency=32) as results:
                async for result in results:
                    codes.append("ok" if result.ok else result.error.code)

        with trio.fail_after(20):  # far below acquire_timeout x the batches left
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                await trio.sleep(0.5)
                await backend.shutdown(drain=False)
    assert batches and len(codes) == 200
    assert set(codes) <= {"ok", "BACKEND_CLOSED"} and "BACKEND_CLOSED" in codes
    assert workspaces.active() == 0
