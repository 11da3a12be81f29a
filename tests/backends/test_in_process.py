"""InProcessBackend: every path of issue 2, triggered for real."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from plugin_execution import (
    BackendClosedError,
    ExecutionRequest,
    ExecutionTimeoutError,
    HandlerContractError,
    HandlerError,
    HandlerNotFoundError,
    InvalidRequestError,
    PluginNotFoundError,
    PluginRegistry,
    ValidationError,
    WorkspaceManager,
    create_execution_backend,
)

P = "tests.sample"


def req(handler: str, input: object = None, **kw: object) -> ExecutionRequest:
    return ExecutionRequest(plugin_id=P, handler_id=handler, input=input, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def backend(registry: PluginRegistry, workspaces: WorkspaceManager):  # type: ignore[no-untyped-def]
    async with create_execution_backend(
        type="in-process", registry=registry, workspace=workspaces
    ) as backend:
        yield backend


async def test_async_and_sync_handlers(backend) -> None:  # type: ignore[no-untyped-def]
    result = await backend.execute(req("echo", {"x": [1, "two", b"3"]}))
    assert result.ok and result.output == {"x": [1, "two", b"3"]}
    assert result.backend == "in-process" and result.duration_s > 0
    result = await backend.execute(req("add", {"a": 2, "b": 3}))
    assert result.output == 5


async def test_sync_handler_does_not_block_the_loop(backend) -> None:  # type: ignore[no-untyped-def]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await backend.execute(req("sleep_sync", {"seconds": 0.3}))
        nursery.cancel_scope.cancel()
    assert ticks >= 5  # the loop kept running while the handler slept in its thread


async def test_context_fields(backend) -> None:  # type: ignore[no-untyped-def]
    request = req("whoami", context={"host": "cli", "request_id": "r1"})
    out = (await backend.execute(request)).output
    assert out["pid"] == os.getpid()
    assert out["execution_id"] == request.execution_id
    assert (out["plugin_id"], out["handler_id"]) == (P, "whoami")
    assert out["context"] == {"host": "cli", "request_id": "r1"}


async def test_class_handler_is_instantiated_once(backend) -> None:  # type: ignore[no-untyped-def]
    first = (await backend.execute(req("counter"))).output
    second = (await backend.execute(req("counter"))).output
    assert second["calls"] == first["calls"] + 1


async def test_typed_input_and_output(backend) -> None:  # type: ignore[no-untyped-def]
    assert (await backend.execute(req("typed", {"x": 3, "y": 4}))).output == {"squared": 25}
    with pytest.raises(ValidationError) as info:
        await backend.execute(req("typed", {"x": 3}))
    assert "y" in str(info.value)


@pytest.mark.parametrize(
    ("plugin", "handler", "error", "text"),
    [
        ("no.such.plugin", "echo", PluginNotFoundError, "no.such.plugin"),
        (P, "no_such_handler", HandlerNotFoundError, "no_such_handler"),
        (P, "missing_module", HandlerNotFoundError, "no_such_module_here"),
        (P, "missing_attr", HandlerNotFoundError, "no_such_function"),
        (P, "not_a_handler", HandlerContractError, "not a handler"),
        (P, "no_execute", HandlerContractError, "not a handler"),
    ],
)
async def test_resolution_errors(backend, plugin, handler, error, text) -> None:  # type: ignore[no-untyped-def]
    request = ExecutionRequest(plugin_id=plugin, handler_id=handler)
    with pytest.raises(error) as info:
        await backend.execute(request)
    assert text in info.value.message
    assert info.value.execution_id == request.execution_id
    assert (info.value.plugin_id, info.value.handler_id) == (plugin, handler)


@pytest.mark.parametrize("handler", ["fail", "fail_sync"])
async def test_handler_error_keeps_type_and_traceback(backend, handler) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(HandlerError) as info:
        await backend.execute(req(handler, "oops"))
    err = info.value
    assert err.code == "HANDLER_ERROR"
    assert err.remote_type in ("builtins.ValueError", "builtins.KeyError")
    assert "sample.py" in err.remote_traceback


async def test_raise_errors_false_returns_failed_result(backend) -> None:  # type: ignore[no-untyped-def]
    result = await backend.execute(req("fail", 1), raise_errors=False)
    assert not result.ok and result.error is not None and result.error.code == "HANDLER_ERROR"
    with pytest.raises(HandlerError):
        result.unwrap()


async def test_unserializable_input_and_output(backend) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError, match="input is not serializable"):
        await backend.execute(req("echo", {"x": object()}))
    with pytest.raises(InvalidRequestError, match="output is not serializable"):
        await backend.execute(req("unserializable"))


async def test_async_timeout_with_mock_clock(backend, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    start = trio.current_time()
    with pytest.raises(ExecutionTimeoutError) as info:
        await backend.execute(req("sleep", {"seconds": 3600}), timeout=2.5)
    assert isinstance(info.value, TimeoutError)
    assert info.value.timeout_s == 2.5
    assert trio.current_time() - start == pytest.approx(2.5)


async def test_handler_spec_timeout_and_quota(backend, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    start = trio.current_time()
    with pytest.raises(ExecutionTimeoutError):
        await backend.execute(req("quick", {"seconds": 10}))  # HandlerSpec timeout = 0.5
    assert trio.current_time() - start == pytest.approx(0.5)
    start = trio.current_time()
    with pytest.raises(ExecutionTimeoutError):  # the plugin's quota (60 s) caps 1000 s
        await backend.execute(req("sleep", {"seconds": 5000}, timeout=1000))
    assert trio.current_time() - start == pytest.approx(60)


async def test_sync_timeout_is_real_and_sets_cancelled(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with create_execution_backend(
        type="in-process", registry=registry, workspace=workspaces, thread_grace=10
    ) as backend:
        with trio.fail_after(5):
            with pytest.raises(ExecutionTimeoutError) as caught:
                await backend.execute(req("sleep_sync", {"seconds": 0.5}), timeout=0.05)
        # honest: the thread was abandoned, not stopped
        assert "the thread was abandoned and runs on" in caught.value.message
        assert "stopped (" not in caught.value.message.replace("could not be stopped", "")
        assert caught.value.details == {"timeout_s": 0.05, "abandoned": True}
        assert backend.stats().failed_by_code == {"TIMEOUT": 1}
        assert (await backend.health()).details["threads_running"] == 1
    # leaving the block waited for the abandoned thread
    assert backend.stats().details["threads_running"] == 0


async def test_abandoned_thread_gets_no_workspace(registry, workspaces, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    report = tmp_path / "report"
    async with create_execution_backend(
        type="in-process", registry=registry, workspace=workspaces, thread_grace=10
    ) as backend:
        with pytest.raises(ExecutionTimeoutError):
            await backend.execute(
                req("late_workspace", {"seconds": 0.3, "report": str(report)}), timeout=0.05
            )
    # leaving the block waited for the thread; its late request was refused, nothing leaked
    assert report.read_text().startswith("WorkspaceError: ")
    assert "has ended" in report.read_text()


async def test_caller_cancellation(backend) -> None:  # type: ignore[no-untyped-def]
    with trio.move_on_after(0.05) as scope:
        await backend.execute(req("sleep", {"seconds": 30}))
    assert scope.cancelled_caught
    assert backend.stats().failed_by_code == {"ABORTED": 1}
    assert backend.stats().in_flight == 0


async def test_streaming_events(backend) -> None:  # type: ignore[no-untyped-def]
    request = req("events", {"count": 3})
    async with backend.open_execution(request) as execution:
        events = [event async for event in execution.events]
        result = await execution.result()
    assert result.output == 3
    kinds = [e.kind for e in events]
    assert kinds == ["progress", "tick"] * 3 + ["log"]
    assert events[0].data == {"done": 1, "total": 3}
    assert events[1].data == {"i": 0}
    assert events[-1].data["message"] == "done after 3"
    assert all(e.execution_id == request.execution_id for e in events)


async def test_streaming_from_sync_handler(backend) -> None:  # type: ignore[no-untyped-def]
    async with backend.open_execution(req("events_sync", {"count": 50}), buffer=4) as execution:
        events = [event async for event in execution.events]
        assert (await execution.result()).output == 50
    assert [e.data["done"] for e in events] == list(range(1, 51))  # waited, none dropped


async def test_streaming_errors_and_early_exit(backend) -> None:  # type: ignore[no-untyped-def]
    async with backend.open_execution(req("fail", 1)) as execution:
        with pytest.raises(HandlerError):
            await execution.result()
        failed = await execution.result(raise_errors=False)
        assert failed.error is not None and failed.error.code == "HANDLER_ERROR"
    async with backend.open_execution(req("sleep", {"seconds": 30})) as execution:
        await trio.sleep(0.01)
    assert backend.stats().failed_by_code["ABORTED"] == 1
    assert backend.stats().in_flight == 0


async def test_workspace_is_private_and_removed(backend, workspace_root: Path) -> None:  # type: ignore[no-untyped-def]
    result = await backend.execute(req("use_workspace"))
    assert result.output["mode"] == "0o700"
    assert result.metadata["workspace_id"] == result.execution_id
    assert not Path(result.output["dir"]).exists()
    assert Path(result.output["dir"]).is_relative_to(workspace_root)


async def test_stats_and_health(backend) -> None:  # type: ignore[no-untyped-def]
    for _ in range(20):
        await backend.execute(req("echo", 1))
    await backend.execute(req("fail", 1), raise_errors=False)
    stats = backend.stats()
    assert (stats.total, stats.ok, stats.failed) == (21, 20, 1)
    assert stats.failed_by_code == {"HANDLER_ERROR": 1}
    assert stats.latency.count == 21
    assert 0 < stats.latency.p50 <= stats.latency.p95 <= stats.latency.p99 <= stats.latency.max
    health = await backend.health()
    assert health.healthy and health.status == "healthy" and health.backend == "in-process"
    assert health.details["last_error"].startswith("HANDLER_ERROR")


async def test_closed_backend(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    backend = create_execution_backend(type="in-process", registry=registry, workspace=workspaces)
    with pytest.raises(BackendClosedError, match="has not been started"):
        await backend.execute(req("echo"))
    async with backend:
        pass
    with pytest.raises(BackendClosedError, match="closed"):
        await backend.execute(req("echo"))
    result = await backend.execute(req("echo"), raise_errors=False)
    assert result.error is not None and result.error.code == "BACKEND_CLOSED"
    with pytest.raises(BackendClosedError, match="already started"):
        async with backend:
            pass
    assert not (await backend.health()).healthy


async def test_factory_rejects_bad_options(registry) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError, match="unknown backend type"):
        create_execution_backend(type="quantum", registry=registry)
    with pytest.raises(InvalidRequestError, match="bad option"):
        create_execution_backend(type="in-process", registry=registry, no_such_option=1)
    with pytest.raises(InvalidRequestError, match="PluginRegistry"):
        create_execution_backend(type="in-process", registry={})  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="timeout"):
        async with create_execution_backend(type="in-process", registry=registry) as backend:
            await backend.execute(req("echo"), timeout=-1)


async def test_auto_is_in_process(registry) -> None:  # type: ignore[no-untyped-def]
    async with create_execution_backend(registry=registry) as backend:
        assert backend.name == "in-process"
        assert (await backend.execute(req("echo", "hi"))).output == "hi"


async def test_concurrent_executions(backend) -> None:  # type: ignore[no-untyped-def]
    results = []

    async def one(i: int) -> None:
        results.append((await backend.execute(req("echo", i))).output)

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(one, i)
    assert sorted(results) == list(range(100))
