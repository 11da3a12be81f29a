"""plugin_execution.asyncio: the backends awaited from asyncio programs (``asyncio.run``).

Real processes, real kills: a cancelled asyncio task must stop the work it was waiting for,
wherever it runs, and leave nothing behind once the program ends.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from tests.conftest import child_pids

from plugin_execution import (
    BackendClosedError,
    ExecutionRequest,
    ExecutionTimeoutError,
    HandlerError,
    InvalidRequestError,
    PluginNotFoundError,
    PluginRegistry,
    WorkspaceManager,
)
from plugin_execution.asyncio import AsyncioBackend, _guest, create_execution_backend

PLUGINS = Path(__file__).parent / "plugins"
BACKENDS = ["in-process", "worker-pool", "subprocess"]


@pytest.fixture
def aio_registry(registry: PluginRegistry, tmp_path: Path) -> PluginRegistry:
    registry.register(
        {
            "id": "tests.aio",
            "version": "1",
            "root": str(PLUGINS),
            # The subprocess backend's sandbox lets the handler write its pid file there.
            "permissions": {"fs": {"write": [str(tmp_path)]}},
            "handlers": [
                {"id": "pid_then_sleep", "entry": "aio_handlers:pid_then_sleep"},
                {"id": "emit_pid_then_sleep", "entry": "aio_handlers:emit_pid_then_sleep"},
            ],
        }
    )
    return registry


def req(handler: str, input: object = None, **kw: Any) -> ExecutionRequest:
    return ExecutionRequest(plugin_id="tests.sample", handler_id=handler, input=input, **kw)


def sleeper(pid_file: Path, seconds: float = 60) -> ExecutionRequest:
    return ExecutionRequest(
        plugin_id="tests.aio",
        handler_id="pid_then_sleep",
        input={"pid_file": str(pid_file), "seconds": seconds},
    )


def run(main: Callable[[], Awaitable[Any]], limit: float = 60) -> Any:
    """``asyncio.run(main())`` with a time limit; afterwards no trio run is left on this
    thread and no guest run is remembered for any loop."""

    async def bounded() -> Any:
        async with asyncio.timeout(limit):
            return await main()

    result = asyncio.run(bounded())
    with pytest.raises(RuntimeError):
        trio.lowlevel.current_trio_token()  # the guest run ended with the program
    assert len(_guest._runs) == 0
    return result


async def read_pid(path: Path) -> int:
    for _ in range(3000):
        if path.exists():
            return int(path.read_text())
        await asyncio.sleep(0.01)
    raise AssertionError(f"the handler never wrote {path}")


def alive(pid: int) -> bool:
    """``pid`` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


async def settled(check: Callable[[], bool], within: float = 15) -> bool:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def gone(pid: int) -> bool:
    return await settled(lambda: not alive(pid))


def backend_for(
    kind: str, registry: PluginRegistry, workspaces: WorkspaceManager, **options: Any
) -> AsyncioBackend:
    if kind == "worker-pool":
        options = {"min_workers": 1, "max_workers": 1, **options}
    return create_execution_backend(type=kind, registry=registry, workspace=workspaces, **options)


# -- results and errors -------------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
def test_results_and_errors_are_those_of_the_trio_api(
    kind: str, registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async def main() -> None:
        async with backend_for(kind, registry, workspaces) as backend:
            assert asyncio.current_task() is not None  # still plain asyncio here
            result = await backend.execute(req("add", {"a": 2, "b": 3}))
            assert result.ok and result.output == 5 and result.backend == kind
            with pytest.raises(HandlerError) as caught:
                await backend.execute(req("fail", 7))
            assert caught.value.code == "HANDLER_ERROR" and "bad input: 7" in caught.value.message
            with pytest.raises(PluginNotFoundError):
                await backend.execute(ExecutionRequest(plugin_id="no.such", handler_id="x"))
            failed = await backend.execute(req("fail_sync"), raise_errors=False)
            assert not failed.ok and failed.error is not None
            assert failed.error.code == "HANDLER_ERROR"
            with pytest.raises(ExecutionTimeoutError) as timed_out:
                await backend.execute(req("sleep", {"seconds": 30}), timeout=0.3)
            assert isinstance(timed_out.value, TimeoutError)
            stats = backend.stats()
            assert stats.ok == 1 and stats.in_flight == 0
            assert stats.failed_by_code == {"HANDLER_ERROR": 2, "PLUGIN_NOT_FOUND": 1, "TIMEOUT": 1}
            health = await backend.health()
            assert health.healthy and health.backend == kind
        assert not (await backend.health()).healthy

    run(main)


def test_the_backend_is_usable_only_inside_its_block(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async def main() -> None:
        backend = backend_for("in-process", registry, workspaces)
        with pytest.raises(BackendClosedError, match="has not been started"):
            await backend.execute(req("echo", 1))
        async with backend:
            assert backend.running
        assert not backend.running
        with pytest.raises(BackendClosedError, match="is closed"):
            await backend.execute(req("echo", 1))
        with pytest.raises(BackendClosedError, match="already started"):
            async with backend:
                pass

    run(main)


def test_bad_options_raise_at_creation(registry: PluginRegistry) -> None:
    with pytest.raises(InvalidRequestError):
        create_execution_backend(type="worker-pool", registry=registry, no_such_option=1)
    with pytest.raises(InvalidRequestError):
        create_execution_backend(type="nope", registry=registry)


# -- one guest run per loop ---------------------------------------------------------------


def test_backends_of_a_loop_share_one_guest_run_that_ends_with_the_last(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with backend_for("in-process", registry, workspaces) as first:
            token = trio.lowlevel.current_trio_token()
            async with backend_for("worker-pool", registry, workspaces) as second:
                assert trio.lowlevel.current_trio_token() is token
                results = await asyncio.gather(
                    first.execute(req("echo", "a")), second.execute(req("echo", "b"))
                )
                assert [r.output for r in results] == ["a", "b"]
            assert _guest._runs[loop].users == 1
            assert (await first.execute(req("echo", "c"))).output == "c"
        assert loop not in _guest._runs
        with pytest.raises(RuntimeError):
            trio.lowlevel.current_trio_token()
        # A later backend starts a fresh run.
        async with backend_for("in-process", registry, workspaces) as third:
            assert trio.lowlevel.current_trio_token() is not token
            assert (await third.execute(req("echo", "d"))).output == "d"

    run(main)


def test_concurrent_entries_and_exits_share_the_run(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async def one(n: int) -> Any:
        async with backend_for("in-process", registry, workspaces) as backend:
            await asyncio.sleep(0.01 * (n % 3))
            return (await backend.execute(req("echo", n))).output

    async def main() -> None:
        assert await asyncio.gather(*(one(n) for n in range(8))) == list(range(8))
        assert await asyncio.gather(*(one(n) for n in range(3))) == list(range(3))

    run(main)


def test_separate_loops_in_separate_threads_have_their_own_runs(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    outputs: list[Any] = []

    async def main(n: int) -> None:
        async with backend_for("in-process", registry, workspaces) as backend:
            outputs.append((await backend.execute(req("echo", n))).output)

    threads = [threading.Thread(target=asyncio.run, args=(main(n),)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outputs) == [0, 1]
    assert len(_guest._runs) == 0


# -- cancellation crosses the bridge ------------------------------------------------------


@pytest.mark.parametrize("kind", ["worker-pool", "subprocess"])
def test_cancelling_the_task_kills_the_process_running_the_work(
    kind: str, aio_registry: PluginRegistry, workspaces: WorkspaceManager, tmp_path: Path
) -> None:
    async def main() -> None:
        async with backend_for(kind, aio_registry, workspaces) as backend:
            pid_file = tmp_path / "pid"
            children = child_pids()
            task = asyncio.create_task(backend.execute(sleeper(pid_file)))
            pid = await read_pid(pid_file)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            if kind == "worker-pool":
                assert pid != os.getpid()
                assert await gone(pid), "the worker running the cancelled execution still runs"
            else:  # the child sees its pid in its own pid namespace: count children instead
                assert await settled(lambda: child_pids() <= children), "the child still runs"
            stats = backend.stats()
            assert stats.failed_by_code == {"ABORTED": 1} and stats.in_flight == 0
            # The backend goes on serving.
            assert (await backend.execute(req("add", {"a": 1, "b": 1}))).output == 2

    run(main)


def test_wait_for_timeout_cancels_the_execution(
    aio_registry: PluginRegistry, workspaces: WorkspaceManager, tmp_path: Path
) -> None:
    async def main() -> None:
        async with backend_for("worker-pool", aio_registry, workspaces) as backend:
            pid_file = tmp_path / "pid"
            started = time.monotonic()
            with pytest.raises(TimeoutError) as caught:
                await asyncio.wait_for(backend.execute(sleeper(pid_file)), 1.0)
            assert not isinstance(caught.value, ExecutionTimeoutError)  # asyncio's own
            assert time.monotonic() - started < 30
            assert await gone(await read_pid(pid_file))
            assert backend.stats().failed_by_code == {"ABORTED": 1}
            async with asyncio.timeout(0.5):  # the other spelling, on an async handler
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await backend.execute(req("sleep", {"seconds": 30}))
            assert backend.stats().failed_by_code == {"ABORTED": 2}

    run(main)


def test_cancelling_an_in_process_async_handler_cancels_it(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async def main() -> None:
        async with backend_for("in-process", registry, workspaces) as backend:
            tasks = [asyncio.create_task(backend.execute(req("sleep", {"seconds": 30})))]
            tasks += [asyncio.create_task(backend.execute(req("echo", n))) for n in range(3)]
            await asyncio.sleep(0.1)
            tasks[0].cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(done[0], asyncio.CancelledError)
            assert [r.output for r in done[1:]] == [0, 1, 2]  # type: ignore[union-attr]
            stats = backend.stats()
            assert stats.in_flight == 0 and stats.failed_by_code == {"ABORTED": 1}

    run(main)


def test_a_task_cancelled_before_its_call_began_runs_nothing(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async def main() -> None:
        async with backend_for("in-process", registry, workspaces) as backend:
            tasks = [asyncio.create_task(backend.execute(req("echo", n))) for n in range(20)]
            await asyncio.sleep(0)  # every call handed to trio, none run yet
            for task in tasks[::2]:
                task.cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(d, asyncio.CancelledError) for d in done[::2])
            assert [r.output for r in done[1::2]] == list(range(1, 20, 2))  # type: ignore[union-attr]
            stats = backend.stats()
            assert stats.ok + stats.failed_by_code.get("ABORTED", 0) <= 20
            assert stats.ok >= 10 and stats.in_flight == 0

    run(main)


def test_shutdown_fails_what_waits_with_backend_closed(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async def main() -> None:
        async with backend_for("in-process", registry, workspaces) as backend:
            task = asyncio.create_task(backend.execute(req("sleep", {"seconds": 30})))
            await asyncio.sleep(0.1)
            await backend.shutdown(timeout=0.1)
            with pytest.raises(BackendClosedError):
                await task
            with pytest.raises(BackendClosedError):
                await backend.execute(req("echo", 1))
            await backend.shutdown()  # idempotent

    run(main)


# -- streaming and run-many ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["in-process", "worker-pool"])
def test_open_execution_streams_events_then_the_result(
    kind: str, registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async def main() -> None:
        async with backend_for(kind, registry, workspaces) as backend:
            async with backend.open_execution(req("events", {"count": 3})) as execution:
                kinds = [event.kind async for event in execution.events]
                result = await execution.result()
            assert kinds.count("tick") == 3 and kinds.count("progress") == 3
            assert result.output == 3 and execution.done
            async with backend.open_execution(req("fail")) as execution:
                assert [e async for e in execution.events] == []
                with pytest.raises(HandlerError):
                    await execution.result()
                failed = await execution.result(raise_errors=False)
                assert failed.error is not None and failed.error.code == "HANDLER_ERROR"

    run(main)


def test_leaving_a_stream_early_kills_its_worker(
    aio_registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async def main() -> None:
        async with backend_for("worker-pool", aio_registry, workspaces) as backend:
            request = ExecutionRequest(
                plugin_id="tests.aio", handler_id="emit_pid_then_sleep", input={"seconds": 60}
            )
            async with backend.open_execution(request) as execution:
                async for event in execution.events:
                    if event.kind == "pid":
                        pid = event.data["pid"]
                        break
            assert await gone(pid)
            assert backend.stats().failed_by_code == {"ABORTED": 1}

    run(main)


def test_map_over_a_list_and_an_async_generator(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async def requests(n: int) -> AsyncIterator[ExecutionRequest]:
        for i in range(n):
            await asyncio.sleep(0)  # an asyncio source: it awaits asyncio things
            yield req("add", {"a": i, "b": 1}) if i != 5 else req("fail")

    async def main() -> None:
        async with backend_for("worker-pool", registry, workspaces, max_workers=2) as backend:
            async with backend.map(
                [req("echo", i) for i in range(50)], concurrency=8, ordered=True
            ) as results:
                assert [r.output async for r in results] == list(range(50))
            async with backend.map(requests(40), concurrency=4) as results:
                outcomes = [r async for r in results]
            assert sorted(r.output for r in outcomes if r.ok) == [
                i + 1 for i in range(40) if i != 5
            ]
            assert [r.error.code for r in outcomes if r.error is not None] == ["HANDLER_ERROR"]
            with pytest.raises(InvalidRequestError):
                async with backend.map([], concurrency=0):
                    pass

    run(main)


def test_leaving_map_early_cancels_what_is_in_flight(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async def main() -> None:
        async with backend_for("in-process", registry, workspaces) as backend:
            requests = [req("sleep", {"seconds": 0.01 if i == 0 else 30}) for i in range(100)]
            started = time.monotonic()
            async with backend.map(requests, concurrency=4) as results:
                async for result in results:
                    assert result.output == "slept"
                    break
            assert time.monotonic() - started < 10
            stats = backend.stats()
            assert stats.in_flight == 0 and stats.failed_by_code == {"ABORTED": 4}

    run(main)


def test_a_program_cancelled_mid_flight_leaves_nothing_running(
    aio_registry: PluginRegistry, workspaces: WorkspaceManager, tmp_path: Path
) -> None:
    async def main() -> None:
        async with backend_for("worker-pool", aio_registry, workspaces, max_workers=2) as backend:
            calls = [backend.execute(sleeper(tmp_path / f"pid{n}")) for n in range(2)]
            calls.append(backend.execute(req("sleep", {"seconds": 30})))
            async with asyncio.timeout(1.0):
                await asyncio.gather(*calls)

    with pytest.raises(TimeoutError):
        asyncio.run(main())
    with pytest.raises(RuntimeError):
        trio.lowlevel.current_trio_token()
    assert len(_guest._runs) == 0  # and no_leaks checks that no worker is left


def test_the_execution_span_is_a_child_of_the_asyncio_callers_span(
    registry: PluginRegistry, workspaces: WorkspaceManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = pytest.importorskip("opentelemetry.trace")
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)

    async def main() -> None:
        tracer = provider.get_tracer("host")
        async with backend_for("in-process", registry, workspaces) as backend:
            for n in range(3):  # each caller's own span, not the span of whoever came first
                with tracer.start_as_current_span(f"request {n}"):
                    assert (await backend.execute(req("echo", n))).output == n
            assert (await backend.execute(req("echo", 3))).output == 3

    try:
        run(main)
    finally:
        provider.shutdown()
    spans = exporter.get_finished_spans()
    parents = {s.context.span_id: s.name for s in spans}
    executions = [s for s in spans if s.name.startswith("execute")]
    assert [parents.get(s.parent.span_id) if s.parent else None for s in executions] == [
        "request 0",
        "request 1",
        "request 2",
        None,
    ]


# -- trio kept awake between calls, and only then ------------------------------------------


class IOWaits(trio.abc.Instrument):
    """Counts trio's scheduling batches; ``slept`` once trio waited for I/O with a timeout
    (asleep in its I/O thread, not polling once per batch)."""

    def __init__(self) -> None:
        self.batches = 0
        self.slept = False

    def before_io_wait(self, timeout: float) -> None:
        self.batches += 1
        self.slept = self.slept or timeout > 0


def test_trio_stays_awake_while_calls_come(
    registry: PluginRegistry, workspaces: WorkspaceManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_guest, "LINGER", 3600.0)  # an hour: no sleep between the calls

    async def main() -> None:
        async with backend_for("in-process", registry, workspaces) as backend:
            assert (await backend.execute(req("echo", 0))).output == 0
            waits = IOWaits()
            trio.lowlevel.add_instrument(waits)
            for n in range(20):  # the caller awaits other asyncio things between calls
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                assert (await backend.execute(req("echo", n))).output == n
            trio.lowlevel.remove_instrument(waits)
            assert waits.batches >= 20
            assert not waits.slept
        # Leaving ends the keeper's lingering at once (this test's limit is 60 s).

    run(main)


def test_an_idle_application_lets_trio_sleep(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async def main() -> None:
        async with backend_for("in-process", registry, workspaces) as backend:
            waits = IOWaits()
            trio.lowlevel.add_instrument(waits)
            for n in range(20):
                await asyncio.sleep(0)
                assert (await backend.execute(req("echo", n))).output == n
            waits.slept = False
            assert await settled(lambda: waits.slept)  # the lingering ended: trio sleeps
            batches = waits.batches
            await asyncio.sleep(0.1)
            # Asleep, trio runs a batch only when woken; spinning would be thousands.
            assert waits.batches - batches < 20
            trio.lowlevel.remove_instrument(waits)

    run(main)
