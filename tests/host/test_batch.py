"""Batched dispatch on one worker (``host/batch.py``): a ``Batch`` frame's members run one
after another, each with its own answer, deadline and cancellation, and after a loss the
members behind the one that was running are known never to have started."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from plugin_execution import (
    AbortedError,
    ExecutionError,
    ExecutionRequest,
    ExecutionResult,
    ExecutionTimeoutError,
    InvalidRequestError,
    PluginRegistry,
    WorkerCrashedError,
)
from plugin_execution.backends.job import Job, admit
from plugin_execution.context import NULL_SINK
from plugin_execution.host import open_worker_process
from plugin_execution.host.batch import NOT_STARTED

P = "tests.sample"


def job(registry: PluginRegistry, handler: str, input: Any = None, timeout: float = 30) -> Job:
    request = ExecutionRequest(plugin_id=P, handler_id=handler, input=input)
    return admit(registry, None, request, timeout, NULL_SINK)  # type: ignore[arg-type]


async def run(
    registry: PluginRegistry, make: Callable[[], list[Job]], grace: float = 1.0
) -> list[Any]:
    """The outcomes of the jobs ``make`` gives, as one batch on a warm worker (the jobs made
    then: their deadlines count from there), then whether the worker is still alive."""
    async with open_worker_process(close_grace=0.5) as worker:
        await worker.execute(job(registry, "add", {"a": 0, "b": 0}), backend="test")
        jobs = make()
        batch = worker.submit_batch([(j, None) for j in jobs], cancel_grace=grace)
        with trio.fail_after(30):
            outcomes = await worker.collect_batch(batch, backend="test")
        outcomes.append(worker.alive)
    return outcomes


async def test_every_member_gets_its_own_result_in_order(registry: PluginRegistry) -> None:
    def make() -> list[Job]:
        jobs = [job(registry, "add", {"a": i, "b": 1}) for i in range(20)]
        jobs[7] = job(registry, "fail_sync")
        return jobs

    jobs = make()
    *outcomes, alive = await run(registry, lambda: jobs)
    assert alive
    for i, outcome in enumerate(outcomes):
        if i == 7:
            assert isinstance(outcome, ExecutionError) and outcome.code == "HANDLER_ERROR"
        else:
            assert isinstance(outcome, ExecutionResult) and outcome.output == i + 1
            assert outcome.execution_id == jobs[i].request.execution_id


async def test_async_members_run_one_after_another(registry: PluginRegistry) -> None:
    *outcomes, _ = await run(
        registry, lambda: [job(registry, "overlap", {"seconds": 0.01}) for _ in range(6)]
    )
    assert [o.output for o in outcomes] == [1] * 6  # never two at once


async def test_members_behind_a_worker_killer_never_started(registry: PluginRegistry) -> None:
    def make() -> list[Job]:
        jobs = [job(registry, "add", {"a": 1, "b": 1}), job(registry, "crash", {"code": 3})]
        return jobs + [job(registry, "add", {"a": 2, "b": 2}) for _ in range(3)]

    first, crashed, *rest, alive = await run(registry, make)
    assert isinstance(first, ExecutionResult) and first.output == 2
    assert isinstance(crashed, WorkerCrashedError)
    assert rest == [NOT_STARTED] * 3 and not alive


async def test_a_hung_member_times_out_and_those_behind_it_never_started(
    registry: PluginRegistry,
) -> None:
    def make() -> list[Job]:
        return [
            job(registry, "add", {"a": 1, "b": 1}),
            job(registry, "spin", timeout=1.0),  # starts well before its deadline
            job(registry, "add", {"a": 2, "b": 2}),
        ]

    first, hung, behind, alive = await run(registry, make, grace=0.2)
    assert isinstance(first, ExecutionResult)
    assert isinstance(hung, ExecutionTimeoutError)  # a sync handler: its worker was killed
    assert behind is NOT_STARTED and not alive


async def test_a_member_past_its_deadline_before_its_turn_is_never_started(
    registry: PluginRegistry,
) -> None:
    def make() -> list[Job]:
        return [
            job(registry, "sleep_sync", {"seconds": 1.0}),
            job(registry, "crash", {"code": 3}, timeout=0.1),  # would kill the worker if it ran
            job(registry, "add", {"a": 2, "b": 2}),
        ]

    slow, expired, last, alive = await run(registry, make)
    assert isinstance(slow, ExecutionResult) and slow.output == "slept"
    assert isinstance(expired, ExecutionTimeoutError)
    assert isinstance(last, ExecutionResult) and last.output == 4
    assert alive  # the expired member was answered ABORTED unstarted: no kill, no crash


async def test_cancelling_the_collect_stops_every_member(registry: PluginRegistry) -> None:
    jobs = [job(registry, "sleep", {"seconds": 30}) for _ in range(4)]
    async with open_worker_process(close_grace=0.5) as worker:
        batch = worker.submit_batch([(j, None) for j in jobs])
        with trio.move_on_after(0.2) as scope:
            await worker.collect_batch(batch, backend="test")
        assert scope.cancelled_caught
        assert worker.alive  # the running one was cancelled, the others answered unstarted
        assert worker.in_flight == 0
        result = await worker.execute(job(registry, "add", {"a": 1, "b": 2}), backend="test")
        assert result.output == 3


async def test_a_member_that_cannot_be_sent_fails_alone(registry: PluginRegistry) -> None:
    bad = ExecutionRequest(plugin_id=P, handler_id="echo", input=None)
    object.__setattr__(bad, "input", object())  # not plain data (validation bypassed)

    def make() -> list[Job]:
        return [
            job(registry, "add", {"a": 1, "b": 1}),
            admit(registry, None, bad, 30, NULL_SINK),  # type: ignore[arg-type]
            job(registry, "add", {"a": 2, "b": 2}),
        ]

    first, unsendable, last, alive = await run(registry, make)
    assert isinstance(unsendable, InvalidRequestError)
    assert first.output == 2 and last.output == 4 and alive


def test_not_started_is_neither_a_result_nor_an_error() -> None:
    assert repr(NOT_STARTED) == "NOT_STARTED"
    assert not isinstance(NOT_STARTED, ExecutionResult | ExecutionError | AbortedError)


async def test_a_member_already_past_its_deadline_is_not_sent(registry: PluginRegistry) -> None:
    def make() -> list[Job]:
        expired = job(registry, "crash", {"code": 3})  # would kill the worker if it ran
        expired.deadline = trio.current_time() - 1
        return [
            job(registry, "add", {"a": 1, "b": 1}),
            expired,
            job(registry, "add", {"a": 2, "b": 2}),
        ]

    first, expired, last, alive = await run(registry, make)
    assert isinstance(expired, ExecutionTimeoutError)
    assert "while waiting for a worker" in expired.message
    assert first.output == 2 and last.output == 4 and alive
