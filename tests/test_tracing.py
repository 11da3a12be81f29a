"""OpenTelemetry spans per execution, parented to the caller's span; nothing when unconfigured."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from plugin_execution import ExecutionRequest, PluginRegistry, create_execution_backend, tracing

trace = pytest.importorskip("opentelemetry.trace", reason="opentelemetry-api is not installed")
sdk_trace = pytest.importorskip(
    "opentelemetry.sdk.trace", reason="opentelemetry-sdk is not installed"
)
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """A tracer provider for this test only. ``set_tracer_provider`` works once per process,
    so the API's global is patched instead (it is what ``get_tracer_provider`` returns)."""
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield exporter
    provider.shutdown()


def _attributes(span: Any) -> dict[str, Any]:
    return {k.removeprefix("plugin_execution."): v for k, v in span.attributes.items()}


async def test_no_provider_no_spans(registry: PluginRegistry) -> None:
    assert not tracing.enabled()
    async with create_execution_backend(type="in-process", registry=registry) as backend:
        result = await backend.execute(
            ExecutionRequest(plugin_id="tests.sample", handler_id="echo", input=1)
        )
    assert result.output == 1


@pytest.mark.parametrize("variable", [None, "sdk_tracer_provider"])
def test_a_provider_named_by_the_environment_is_used(variable: str | None) -> None:
    """opentelemetry makes the provider ``OTEL_PYTHON_TRACER_PROVIDER`` names on first use;
    tracing must not skip that step while no provider is set."""
    env = {k: v for k, v in os.environ.items() if k != "OTEL_PYTHON_TRACER_PROVIDER"}
    if variable is not None:
        env["OTEL_PYTHON_TRACER_PROVIDER"] = variable
    code = "from plugin_execution import tracing; print(tracing.enabled())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(variable is not None)


@pytest.mark.parametrize("backend_type", ["in-process", "worker-pool"])
async def test_one_span_per_execution_under_the_callers_span(
    registry: PluginRegistry, spans: InMemorySpanExporter, backend_type: str
) -> None:
    tracer = trace.get_tracer_provider().get_tracer("host")
    async with create_execution_backend(type=backend_type, registry=registry) as backend:
        with tracer.start_as_current_span("request") as parent:
            ok = await backend.execute(
                ExecutionRequest(plugin_id="tests.sample", handler_id="echo", input=1)
            )
            failed = await backend.execute(
                ExecutionRequest(plugin_id="tests.sample", handler_id="fail", input={}),
                raise_errors=False,
            )
            with pytest.raises(Exception, match="no handler"):
                await backend.execute(ExecutionRequest(plugin_id="tests.sample", handler_id="nope"))
    finished = {s.name: s for s in spans.get_finished_spans()}
    ok_span = finished["execute tests.sample/echo"]
    assert ok_span.parent.span_id == parent.get_span_context().span_id
    assert _attributes(ok_span) == {
        "plugin_id": "tests.sample",
        "handler_id": "echo",
        "execution_id": ok.execution_id,
        "backend": backend_type,
        "outcome": "ok",
        **({"worker_id": ok.worker_id} if ok.worker_id else {}),
    }
    assert ok_span.status.is_ok
    fail_span = finished["execute tests.sample/fail"]
    assert _attributes(fail_span)["outcome"] == "HANDLER_ERROR" == failed.error.code
    assert not fail_span.status.is_ok
    assert _attributes(finished["execute tests.sample/nope"])["outcome"] == "HANDLER_NOT_FOUND"


async def test_a_cancelled_execution_is_aborted(
    registry: PluginRegistry, spans: InMemorySpanExporter
) -> None:
    async with create_execution_backend(type="in-process", registry=registry) as backend:
        with trio.move_on_after(0.05):
            await backend.execute(
                ExecutionRequest(
                    plugin_id="tests.sample", handler_id="sleep", input={"seconds": 30}
                )
            )
    (span,) = spans.get_finished_spans()
    assert _attributes(span)["outcome"] == "ABORTED"


async def test_one_span_per_channel_connection_around_its_session(
    spans: InMemorySpanExporter,
) -> None:
    from tests.channels.conftest import serving
    from trio_websocket import open_websocket_url

    async with serving("in-process") as served:
        async with open_websocket_url(served.url("/echo")) as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
        with trio.fail_after(10):
            while not any(s.name.startswith("channel ") for s in spans.get_finished_spans()):
                await trio.sleep(0.01)
    finished = spans.get_finished_spans()
    (channel,) = [s for s in finished if s.name.startswith("channel ")]
    attributes = _attributes(channel)
    assert channel.name == "channel /v1/ws/plugins/tests.ws/echo"
    assert attributes["plugin_id"] == "tests.ws" and attributes["style"] == "session"
    assert attributes["closed_by"] == "client" and attributes["close_code"] == 1000
    assert attributes["outcome"] == "ok"
    (session,) = [s for s in finished if s.name.startswith("execute tests.ws/")]
    assert session.parent.span_id == channel.get_span_context().span_id


async def test_map_on_the_pool_makes_a_span_per_execution(
    registry: PluginRegistry, spans: InMemorySpanExporter
) -> None:
    """With tracing on, map runs each execution on its own (no batches), each in a span."""
    requests = [
        ExecutionRequest(plugin_id="tests.sample", handler_id="add", input={"a": i, "b": 1})
        for i in range(40)
    ]
    async with (
        create_execution_backend(
            type="worker-pool", registry=registry, min_workers=1, max_workers=1
        ) as backend,
        backend.map(requests, concurrency=16) as results,
    ):
        assert sorted([r.output async for r in results]) == [i + 1 for i in range(40)]
    ids = {_attributes(s)["execution_id"] for s in spans.get_finished_spans()}
    assert ids == {r.execution_id for r in requests}
