"""The Ray backend on a local Ray instance (loopback only), started once for the module.

Every fault is real: actors killed by the pool at a timeout, by ``ray.kill`` from outside, by
their handler's ``os._exit``. The autouse leak check runs after each test as everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback
ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'plugin-execution[ray]'")

from plugin_execution import (  # noqa: E402
    AcquireTimeoutError,
    ExecutionRequest,
    ExecutionTimeoutError,
    PluginRegistry,
    QueueFullError,
    WorkerCrashedError,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.worker.ray_actor import pack_preamble  # noqa: E402

P = "tests.sample"
R = "tests.ray"
PLUGINS = Path(__file__).parents[1] / "plugins"


@pytest.fixture(scope="module", autouse=True)
def ray_local() -> Iterator[None]:
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
    )
    try:
        warm_up()
        yield
    finally:
        ray.shutdown()


def warm_up() -> None:
    """One actor call and kill before the tests: the connections Ray keeps from then on (a
    core worker's back to the driver's) are not taken for leaks of the first test."""

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self) -> int:
            return os.getpid()

    probe = Probe.remote()  # type: ignore[attr-defined]
    ray.get(probe.ping.remote(), timeout=60)
    ray.kill(probe)


@pytest.fixture
def plugins(registry: PluginRegistry) -> PluginRegistry:
    registry.register(
        {
            "id": R,
            "root": str(PLUGINS),
            "handlers": [
                {"id": "tick", "entry": "ray_handlers:tick_then_wait"},
                {"id": "where", "entry": "ray_handlers:where"},
                {"id": "workspace", "entry": "ray_handlers:write_workspace"},
                {"id": "denied", "entry": "platform_calls:denied_then_ok"},
            ],
        }
    )
    return registry


def req(handler: str, input: object = None, plugin: str = P, **kw: Any) -> ExecutionRequest:
    return ExecutionRequest(plugin_id=plugin, handler_id=handler, input=input, **kw)


def ray_backend(registry: PluginRegistry, workspaces: WorkspaceManager, **options: Any) -> Any:
    options.setdefault("min_workers", 1)
    options.setdefault("max_workers", 1)
    options.setdefault("cancel_grace", 0.3)
    return create_execution_backend(type="ray", registry=registry, workspace=workspaces, **options)


async def idle_workers(backend: Any, count: int, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while (await backend.health()).details["workers_idle"] < count:
            await trio.sleep(0.02)


def actor_of(backend: Any) -> Any:
    (worker,) = [w for w in backend._workers.values() if w.proc is not None]
    return worker.proc.process._actor


async def test_results_come_from_actors_with_their_node_and_worker(plugins, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with ray_backend(plugins, workspaces, min_workers=2, max_workers=2) as backend:
        await idle_workers(backend, 2)
        results = [await backend.execute(req("where", plugin=R)) for _ in range(4)]
        node = ray.get_runtime_context().get_node_id()
        assert {r.metadata["node_id"] for r in results} == {node}
        assert all(r.backend == "ray" and r.worker_id for r in results)
        assert os.getpid() not in {r.output["pid"] for r in results}
        assert (await backend.execute(req("add", {"a": 2, "b": 3}))).output == 5
        assert (await backend.health()).details["kind"] == "ray"


async def test_map_sends_batches_to_the_actors(plugins, workspaces, batch_frames) -> None:  # type: ignore[no-untyped-def]
    requests = [req("add", {"a": i, "b": 1}) for i in range(200)]
    async with ray_backend(plugins, workspaces) as backend:
        with trio.fail_after(60):
            async with backend.map(requests, concurrency=16, ordered=True) as results:
                outputs = [r.output async for r in results]
    assert outputs == [i + 1 for i in range(200)]
    assert sum(batch_frames) == 200 and max(batch_frames) > 1


async def test_events_stream_live_and_prints_are_log_events(plugins, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with ray_backend(plugins, workspaces) as backend:
        await idle_workers(backend, 1)
        started = trio.current_time()
        async with backend.open_execution(req("tick", {"seconds": 1.5}, plugin=R)) as execution:
            async for event in execution.events:
                if event.kind == "tick":
                    break
            assert trio.current_time() - started < 1.4  # not batched with the result
            assert (await execution.result()).output == "done"
        async with backend.open_execution(req("noisy")) as execution:
            logs = [e.data["message"] async for e in execution.events if e.kind == "log"]
            assert (await execution.result()).output == "quiet result"
        assert "to stdout" in logs and "to stderr" in logs


async def test_platform_calls_are_checked_on_the_host(plugins, workspaces, caplog) -> None:  # type: ignore[no-untyped-def]
    async with ray_backend(plugins, workspaces) as backend:
        await idle_workers(backend, 1)
        result = await backend.execute(req("denied", plugin=R))
        assert result.output == "env.read"
    # The denial was decided here, in this process, by the plugin's grants.
    (record,) = [r for r in caplog.records if r.name == "plugin_execution.permissions"]
    assert record.process == os.getpid() and "NOT_GRANTED" in record.getMessage()


async def test_the_workspace_is_made_for_the_execution_and_removed(plugins, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with ray_backend(plugins, workspaces) as backend:
        await idle_workers(backend, 1)
        async with backend.open_execution(req("workspace", plugin=R)) as execution:
            logs = [e.data["message"] async for e in execution.events if e.kind == "log"]
            result = await execution.result()
        assert logs == ["wrote the note"]
        assert result.metadata["workspace_id"] == result.execution_id
        assert not os.path.exists(result.output)


async def test_a_timeout_kills_the_actor_and_the_pool_replaces_it(plugins, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with ray_backend(plugins, workspaces) as backend:
        await idle_workers(backend, 1)
        first = await backend.execute(req("where", plugin=R))
        with pytest.raises(ExecutionTimeoutError):
            await backend.execute(req("sleep_sync", {"seconds": 30}, timeout=0.5))
        with trio.fail_after(30):  # the actor's process is gone (killed, not abandoned)
            while _alive(first.output["pid"]):
                await trio.sleep(0.05)
        second = await backend.execute(req("where", plugin=R))
        assert second.worker_id != first.worker_id
        assert backend.stats().details["workers_killed"] == 1
        # An async handler stops at the cooperative cancel: its actor lives on.
        with pytest.raises(ExecutionTimeoutError):
            await backend.execute(req("sleep", {"seconds": 30}, timeout=0.5))
        assert (await backend.execute(req("where", plugin=R))).worker_id == second.worker_id


async def test_an_actor_that_stops_answering_fails_its_health_check(plugins, workspaces) -> None:  # type: ignore[no-untyped-def]
    options = {"health_check_interval": 0.3, "health_check_timeout": 0.5}
    async with ray_backend(plugins, workspaces, **options) as backend:
        await idle_workers(backend, 1)
        first = await backend.execute(req("where", plugin=R))
        os.kill(first.output["pid"], signal.SIGSTOP)  # hung: alive, connected, silent
        with trio.fail_after(30):
            while _alive(first.output["pid"]):
                await trio.sleep(0.05)
        second = await backend.execute(req("where", plugin=R))
        assert second.worker_id != first.worker_id


async def test_a_cancelled_caller_stops_the_work(plugins, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with ray_backend(plugins, workspaces) as backend:
        await idle_workers(backend, 1)
        first = await backend.execute(req("where", plugin=R))
        with trio.move_on_after(0.5) as scope:
            await backend.execute(req("sleep_sync", {"seconds": 30}))
        assert scope.cancelled_caught
        with trio.fail_after(30):
            while _alive(first.output["pid"]):
                await trio.sleep(0.05)
        assert (await backend.execute(req("where", plugin=R))).worker_id != first.worker_id


async def test_a_crashing_handler_is_worker_crashed_with_the_cause(plugins, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with ray_backend(plugins, workspaces) as backend:
        await idle_workers(backend, 1)
        with pytest.raises(WorkerCrashedError) as info:
            await backend.execute(req("crash", {"code": 3}))
        node = ray.get_runtime_context().get_node_id()
        assert info.value.details["node_id"] == node
        assert "worker process has died" in info.value.details["cause"]
        assert node in info.value.message
        assert (await backend.execute(req("add", {"a": 1, "b": 1}))).output == 2


async def test_an_actor_killed_from_outside_fails_its_caller_only(plugins, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with ray_backend(plugins, workspaces) as backend:
        await idle_workers(backend, 1)
        outcome: list[WorkerCrashedError] = []

        async def call() -> None:
            try:
                await backend.execute(req("where", {"sleep": 20}, plugin=R))
            except WorkerCrashedError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await trio.sleep(0.5)
            ray.kill(actor_of(backend))
        (error,) = outcome
        assert "ray.kill" in error.message
        assert (await backend.execute(req("add", {"a": 1, "b": 2}))).output == 3
        assert backend.stats().failed_by_code == {"WORKER_CRASHED": 1}


async def test_queue_full_and_acquire_timeout_as_configured(plugins, workspaces) -> None:  # type: ignore[no-untyped-def]
    options = {"max_queue": 1, "acquire_timeout": 0.5}
    async with ray_backend(plugins, workspaces, **options) as backend:
        await idle_workers(backend, 1)
        errors: list[BaseException] = []

        async def call(request: ExecutionRequest) -> None:
            try:
                await backend.execute(request)
            except (QueueFullError, AcquireTimeoutError) as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, req("where", {"sleep": 2}, plugin=R))
            await trio.sleep(0.3)
            nursery.start_soon(call, req("echo", 1))  # queued, then gives up
            await trio.sleep(0.1)
            nursery.start_soon(call, req("echo", 2))  # the queue is full
        assert sorted(type(e).__name__ for e in errors) == ["AcquireTimeoutError", "QueueFullError"]


async def test_a_connection_without_the_token_is_dropped_unread(plugins, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with ray_backend(plugins, workspaces) as backend:
        await idle_workers(backend, 1)
        listener = backend._launcher._listener
        assert listener.host == "127.0.0.1"
        hello = {"start": "s1-0000", "node_id": "x", "pid": 1}
        for preamble in (pack_preamble(b"\0" * 32, hello), b"GET / HTTP/1.1\r\n\r\n" * 8):
            with socket.create_connection((listener.host, listener.port), timeout=10) as sock:
                sock.sendall(preamble + b"\x00\x00\x00\x10" + b"x" * 16)  # and a "frame"
                sock.shutdown(socket.SHUT_WR)
                with trio.fail_after(10):
                    # Closed with the "frame" unread in its buffer: the kernel resets it.
                    with pytest.raises(ConnectionResetError):
                        await trio.to_thread.run_sync(sock.recv, 1)
        assert backend.stats().details["connections_refused"] == 2
        assert (await backend.health()).details["workers_total"] == 1
        assert (await backend.execute(req("echo", "still here"))).output == "still here"


async def test_websocket_channels_talk_to_handlers_in_actors() -> None:
    from tests.channels.conftest import MANIFEST, PLUGIN_ID
    from trio_websocket import open_websocket_url

    from plugin_execution import (
        ChannelLimits,
        ConnectionRegistry,
        WebSocketRouter,
        mount_websocket_channels,
    )

    plugins = PluginRegistry([MANIFEST])
    backend = create_execution_backend(type="ray", registry=plugins, min_workers=1, max_workers=1)
    async with backend, trio.open_nursery() as nursery:
        router = WebSocketRouter()
        mount_websocket_channels(
            router,
            plugins,
            backend=backend,
            connection_registry=ConnectionRegistry(),
            limits=ChannelLimits(),
        )
        server = await nursery.start(router.serve, "127.0.0.1", 0)
        base = f"ws://127.0.0.1:{server.port}/v1/ws/plugins/{PLUGIN_ID}"
        async with open_websocket_url(f"{base}/info") as ws:  # session style
            info = await ws.get_message()
            assert f"'pid': {os.getpid()}" not in info  # the handler runs in the actor
            for text in ("one", "two"):
                await ws.send_message(text)
                assert await ws.get_message() == text
        async with (  # events style: each event an execution on an actor
            open_websocket_url(f"{base}/room") as alice,
            open_websocket_url(f"{base}/room") as bob,
        ):
            for ws in (alice, bob):
                assert json.loads(await ws.get_message())["type"] == "welcome"
            await alice.send_message(json.dumps({"type": "say", "payload": "hi all"}))
            for ws in (alice, bob):
                assert json.loads(await ws.get_message()) == {"type": "said", "payload": "hi all"}
            await bob.send_message('{"type": "ping", "payload": 7}')
            assert json.loads(await bob.get_message()) == {"type": "pong", "payload": 7}
        nursery.cancel_scope.cancel()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_workers_are_recycled_by_executions(plugins, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with ray_backend(plugins, workspaces, max_executions_per_worker=2) as backend:
        await idle_workers(backend, 1)
        results = [await backend.execute(req("where", plugin=R)) for _ in range(5)]
        assert len({r.worker_id for r in results}) == 3  # 2 + 2 + 1
        assert len({r.output["pid"] for r in results}) == 3  # each a process of its own
        assert backend.stats().workers_recycled >= 2


async def test_an_actor_no_node_can_place_fails_the_start_clearly(plugins, workspaces) -> None:  # type: ignore[no-untyped-def]
    options = {"resources": {"no-such-resource": 1}, "start_timeout": 1.0, "max_restarts": 0}
    why = "could not be started: no connection within 1 s"
    with pytest.raises(WorkerCrashedError, match=why):
        async with ray_backend(plugins, workspaces, **options):
            pass
    # The pending actor was killed, not left waiting for a node.
    with trio.fail_after(30):
        while _pending_actors():
            await trio.sleep(0.1)


def _pending_actors() -> list[Any]:
    """The backend's actors not dead, from the GCS's table (the state API needs the
    dashboard, which the tests do not start)."""
    from ray._private import state

    return [
        actor
        for actor in state.actors().values()
        if actor["State"] != "DEAD" and "RayWorkerActor" in str(actor.get("ActorClassName"))
    ]


async def test_wait_ref_brings_ray_futures_into_trio() -> None:
    from plugin_execution.host.ray import wait_ref

    @ray.remote(num_cpus=0)
    class Echo:
        def echo(self, value: int) -> int:
            return value

        def fail(self) -> None:
            raise ValueError("no")

        def slow(self) -> None:
            import time

            time.sleep(3)

    actor = Echo.remote()  # type: ignore[attr-defined]
    try:
        assert await wait_ref(actor.echo.remote(7)) == 7
        with pytest.raises(ValueError, match="no"):  # Ray's task error is also a ValueError
            await wait_ref(actor.fail.remote())
        with trio.move_on_after(0.2) as scope:  # cancellable; the late answer is dropped
            await wait_ref(actor.slow.remote())
        assert scope.cancelled_caught
        assert await wait_ref(actor.echo.remote(8)) == 8  # after the slow call, in order
    finally:
        ray.kill(actor)
