"""backend.map: lazy, bounded, every request one result, order on demand, early exit cancels."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import trio
import trio.lowlevel

from plugin_execution import ExecutionRequest, InvalidRequestError, PluginRegistry
from plugin_execution import create_execution_backend as make


def echo(i: int) -> ExecutionRequest:
    return ExecutionRequest(plugin_id="tests.sample", handler_id="echo", input=i)


def sleep(seconds: float) -> ExecutionRequest:
    return ExecutionRequest(
        plugin_id="tests.sample", handler_id="sleep", input={"seconds": seconds}
    )


@pytest.mark.parametrize("backend_type", ["in-process", "worker-pool", "subprocess"])
async def test_every_request_gets_its_own_result(
    registry: PluginRegistry, backend_type: str
) -> None:
    requests = [
        echo(i) if i % 5 else ExecutionRequest(plugin_id="tests.sample", handler_id="fail", input=i)
        for i in range(40)
    ]
    async with (
        make(type=backend_type, registry=registry) as backend,
        backend.map(requests, concurrency=4) as results,
    ):
        got = [result async for result in results]
    by_id = {r.execution_id: r for r in got}
    assert len(got) == 40 and set(by_id) == {r.execution_id for r in requests}
    for request in requests:
        result = by_id[request.execution_id]
        if request.handler_id == "echo":
            assert result.ok and result.output == request.input
        else:  # a failure is a result, not an exception
            assert not result.ok and result.error.code == "HANDLER_ERROR"


async def test_ordered_results_follow_the_source(registry: PluginRegistry) -> None:
    durations = [0.05, 0.0, 0.03, 0.0, 0.01, 0.0] * 3
    requests = [sleep(d) for d in durations]
    async with make(type="in-process", registry=registry) as backend:
        async with backend.map(requests, concurrency=6, ordered=True) as results:
            got = [r.execution_id async for r in results]
        async with backend.map(requests, concurrency=6) as results:
            unordered = [r.execution_id async for r in results]
    assert got == [r.execution_id for r in requests]
    assert sorted(unordered) == sorted(got) and unordered != got  # as they finish


async def test_the_source_is_pulled_lazily_and_early_exit_cancels(
    registry: PluginRegistry,
) -> None:
    pulled = 0

    def source() -> Iterator[ExecutionRequest]:
        nonlocal pulled
        for _ in range(1_000_000):
            pulled += 1
            yield sleep(0.0) if pulled <= 3 else sleep(30)

    async with make(type="in-process", registry=registry) as backend:
        with trio.fail_after(20):  # the 30 s sleepers must be cancelled, not awaited
            async with backend.map(source(), concurrency=8) as results:
                first = [await results.__anext__() for _ in range(3)]
                await trio.sleep(0.1)  # callers stay within their window meanwhile
                assert pulled <= 2 * 8 + 3
        assert all(r.ok for r in first)
        stats = backend.stats()
        assert stats.in_flight == 0
        assert stats.failed_by_code.get("ABORTED", 0) >= 8  # in-flight work was cancelled
    assert pulled <= 2 * 8 + 3  # nothing more after the block


async def test_an_unconsumed_map_stops_pulling(registry: PluginRegistry) -> None:
    pulled = 0

    def source() -> Iterator[ExecutionRequest]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield echo(i)

    async with (
        make(type="in-process", registry=registry) as backend,
        backend.map(source(), concurrency=4),
    ):
        await trio.sleep(0.2)  # nobody reads: the callers must wait, not run ahead
        assert pulled <= 2 * 4 + 1


async def test_async_iterable_source(registry: PluginRegistry) -> None:
    async def source() -> AsyncIterator[ExecutionRequest]:
        for i in range(20):
            await trio.lowlevel.checkpoint()
            yield echo(i)

    async with (
        make(type="worker-pool", registry=registry) as backend,
        backend.map(source(), concurrency=3, ordered=True) as results,
    ):
        assert [r.output async for r in results] == list(range(20))


async def test_timeout_applies_to_each_execution(registry: PluginRegistry) -> None:
    async with (
        make(type="in-process", registry=registry) as backend,
        backend.map([sleep(30), sleep(0)], concurrency=2, timeout=0.2) as results,
    ):
        codes = sorted([r.error.code if r.error else "ok" async for r in results])
    assert codes == ["TIMEOUT", "ok"]


async def test_a_failing_source_raises_out_of_the_block(registry: PluginRegistry) -> None:
    def source() -> Iterator[ExecutionRequest]:
        yield echo(1)
        raise ValueError("the source broke")

    async with make(type="in-process", registry=registry) as backend:
        with pytest.raises(ValueError, match="the source broke"):
            async with backend.map(source(), concurrency=2) as results:
                async for _ in results:
                    pass


async def test_bad_items_and_options_are_invalid_requests(registry: PluginRegistry) -> None:
    async with make(type="in-process", registry=registry) as backend:
        with pytest.raises(InvalidRequestError, match="item 1 is a dict"):
            async with backend.map([echo(0), {"plugin_id": "x"}], concurrency=1) as results:
                async for _ in results:
                    pass
        with pytest.raises(InvalidRequestError, match="concurrency"):
            async with backend.map([], concurrency=0):
                pass
        with pytest.raises(InvalidRequestError, match="iterable"):
            async with backend.map(42, concurrency=1):  # type: ignore[arg-type]
                pass
        async with backend.map([], concurrency=2) as results:
            assert [r async for r in results] == []


async def test_an_exception_in_the_block_is_not_swallowed(registry: PluginRegistry) -> None:
    """Leaving by an exception cancels the callers; the exception must still come out
    (an async channel close in the cancelled nursery would have replaced it)."""
    async with make(type="in-process", registry=registry) as backend:
        for requests in ([], [sleep(30)] * 4):
            with pytest.raises(KeyError, match="mine"):
                async with backend.map(requests, concurrency=2):
                    raise KeyError("mine")
        assert backend.stats().in_flight == 0


@pytest.mark.parametrize("backend_type", ["in-process", "worker-pool"])
async def test_requests_failing_at_admission_never_starve_the_run(
    registry: PluginRegistry, backend_type: str
) -> None:
    # They end without a wait; the callers still give way to the run's other tasks at least
    # once per window (2 x concurrency) of them.
    runs = 0

    async def other_task() -> None:
        nonlocal runs
        while True:
            runs += 1
            await trio.lowlevel.checkpoint()

    unknown = [ExecutionRequest(plugin_id="tests.nope", handler_id="x") for _ in range(400)]
    async with (
        make(type=backend_type, registry=registry) as backend,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(other_task)
        async with backend.map(unknown, concurrency=4) as results:
            codes = {result.error.code async for result in results if result.error is not None}
        nursery.cancel_scope.cancel()
    assert codes == {"PLUGIN_NOT_FOUND"}
    assert runs >= 400 // 8, runs
