"""WorkerPoolBackend: warm supervised workers; every fault of issue 4 triggered for real.

After each fault the pool is back to full strength; the autouse leak check then verifies no
process or fd outlived the backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio

from plugin_execution import (
    BackendClosedError,
    ExecutionRequest,
    ExecutionTimeoutError,
    HandlerError,
    InvalidRequestError,
    PluginRegistry,
    QueueFullError,
    WorkerCrashedError,
    WorkerUnhealthyError,
    WorkspaceManager,
    create_execution_backend,
)

P = "tests.sample"


def req(handler: str, input: object = None, **kw: object) -> ExecutionRequest:
    return ExecutionRequest(plugin_id=P, handler_id=handler, input=input, **kw)  # type: ignore[arg-type]


def pool(registry: PluginRegistry, workspaces: WorkspaceManager, **options: object):  # type: ignore[no-untyped-def]
    options.setdefault("cancel_grace", 0.3)
    return create_execution_backend(
        type="worker-pool", registry=registry, workspace=workspaces, **options
    )


async def full_strength(backend, workers: int, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while (await backend.health()).details["workers_idle"] < workers:
            await trio.sleep(0.02)


async def test_runs_on_warm_long_lived_workers(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(registry, workspaces, min_workers=2, max_workers=2) as backend:
        await full_strength(backend, 2)
        results = [await backend.execute(req("whoami")) for _ in range(6)]
        pids = {r.output["pid"] for r in results}
        assert len(pids) <= 2 and os.getpid() not in pids
        assert all(r.backend == "worker-pool" and r.worker_id for r in results)
        # the second call of a handler on the same worker finds it warm
        assert any(r.metadata["warm"] for r in results)
        assert (await backend.execute(req("echo", {"b": b"\x01"}))).output == {"b": b"\x01"}


async def test_grows_under_load_and_shrinks_when_idle(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(
        registry, workspaces, min_workers=1, max_workers=3, idle_timeout=0.5
    ) as backend:
        await full_strength(backend, 1)
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(backend.execute, req("sleep_sync", {"seconds": 1.0}))
        assert (
            backend.stats().details["workers"]["idle"] + backend.stats().details["workers"]["busy"]
            >= 2
        )
        with trio.fail_after(30):
            while (await backend.health()).details["workers_total"] > 1:
                await trio.sleep(0.05)


async def test_worker_crash_fails_only_its_execution(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(registry, workspaces, min_workers=2, max_workers=2) as backend:
        await full_strength(backend, 2)
        async with trio.open_nursery() as nursery:
            other = []

            async def survivor() -> None:
                other.append(await backend.execute(req("sleep_sync", {"seconds": 0.5})))

            nursery.start_soon(survivor)
            await trio.sleep(0.1)
            with pytest.raises(WorkerCrashedError) as info:
                await backend.execute(req("crash", {"code": 7}))
            assert info.value.exit_code == 7
        assert other[0].output == "slept"
        await full_strength(backend, 2)
        assert backend.stats().worker_crashes == 1
        assert (await backend.execute(req("add", {"a": 1, "b": 1}))).output == 2


async def test_sigkill_from_outside(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        pid = (await backend.execute(req("whoami"))).output["pid"]
        async with trio.open_nursery() as nursery:

            async def kill_soon() -> None:
                await trio.sleep(0.2)
                os.kill(pid, signal.SIGKILL)

            nursery.start_soon(kill_soon)
            with pytest.raises(WorkerCrashedError) as info:
                await backend.execute(req("sleep_sync", {"seconds": 30}))
        assert info.value.signal == signal.SIGKILL
        await full_strength(backend, 1)
        assert (await backend.execute(req("whoami"))).output["pid"] != pid


async def test_timeout_kills_a_cpu_loop_and_replaces_the_worker(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        pid = (await backend.execute(req("whoami"))).output["pid"]
        with pytest.raises(ExecutionTimeoutError):
            await backend.execute(req("spin"), timeout=0.5)
        await full_strength(backend, 1)
        assert (await backend.execute(req("whoami"))).output["pid"] != pid


async def test_async_timeout_is_cooperative(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    # Not a race against the clock: the worker gets all the grace it could need to answer the
    # Cancel (it was killed after the 0.3 s grace when, under load, its first async handler
    # waited for trio's import, which took ~1 s: a replacement with another pid). Its trio
    # loop is started first, and the call must end long before the grace would.
    async with pool(registry, workspaces, min_workers=1, max_workers=1, cancel_grace=60) as backend:
        await full_strength(backend, 1)
        await backend.execute(req("echo"))  # starts the worker's loop for async handlers
        pid = (await backend.execute(req("whoami"))).output["pid"]
        started = time.monotonic()
        with pytest.raises(ExecutionTimeoutError):
            await backend.execute(req("sleep", {"seconds": 30}), timeout=0.3)
        assert time.monotonic() - started < 30  # the worker answered: not killed after the grace
        # the handler honoured Cancel, so its worker was kept
        assert (await backend.execute(req("whoami"))).output["pid"] == pid


async def test_hung_worker_fails_health_check(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(
        registry,
        workspaces,
        min_workers=1,
        max_workers=1,
        health_check_interval=0.2,
        health_check_timeout=0.5,
    ) as backend:
        await full_strength(backend, 1)
        pid = (await backend.execute(req("whoami"))).output["pid"]
        async with trio.open_nursery() as nursery:

            async def freeze() -> None:
                await trio.sleep(0.2)
                os.kill(pid, signal.SIGSTOP)  # hung: alive, but answers nothing

            nursery.start_soon(freeze)
            with pytest.raises(WorkerUnhealthyError):
                await backend.execute(req("sleep_sync", {"seconds": 30}), timeout=60)
        await full_strength(backend, 1)


async def test_queue_full_and_acquire_timeout(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(
        registry, workspaces, min_workers=1, max_workers=1, max_queue=2, acquire_timeout=0.5
    ) as backend:
        await full_strength(backend, 1)
        errors: list[str] = []

        async def one() -> None:
            result = await backend.execute(req("sleep_sync", {"seconds": 2}), raise_errors=False)
            errors.append(result.error.code if result.error else "OK")

        async with trio.open_nursery() as nursery:
            for _ in range(3):  # one runs, two queue
                nursery.start_soon(one)
                await trio.sleep(0.05)
            with pytest.raises(QueueFullError) as info:
                await backend.execute(req("echo"))
            assert (info.value.queue_size, info.value.capacity) == (2, 2)
            saturated = await backend.health()
            assert saturated.status == "degraded" and saturated.healthy
        assert (await backend.health()).status == "healthy"
        assert sorted(errors) == ["ACQUIRE_TIMEOUT", "ACQUIRE_TIMEOUT", "OK"]
        stats = backend.stats()
        assert stats.queue_full_rejections == 1 and stats.acquire_timeouts == 2


async def test_recycles_after_max_executions(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(
        registry, workspaces, min_workers=1, max_workers=1, max_executions_per_worker=3
    ) as backend:
        await full_strength(backend, 1)
        pids = []
        for _ in range(7):
            pids.append((await backend.execute(req("whoami"))).output["pid"])
        assert len(set(pids)) == 3
        assert backend.stats().workers_recycled >= 2
        assert backend.stats().failed == 0


async def test_recycles_on_memory_growth(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(
        registry,
        workspaces,
        min_workers=1,
        max_workers=1,
        max_worker_memory_mb=200,
        health_check_interval=0.2,
    ) as backend:
        await full_strength(backend, 1)
        registry.register(
            {
                "id": "tests.hog",
                "root": str(registry.get(P).root),
                "handlers": [{"id": "hog", "entry": "hog:keep"}],
            },
            replace=True,
        )
        pid = (
            await backend.execute(
                ExecutionRequest(plugin_id="tests.hog", handler_id="hog", input={"mb": 300})
            )
        ).output
        with trio.fail_after(30):
            while True:
                out = (
                    await backend.execute(
                        ExecutionRequest(plugin_id="tests.hog", handler_id="hog", input={"mb": 0})
                    )
                ).output
                if out != pid:
                    break
                await trio.sleep(0.1)
        assert backend.stats().workers_recycled >= 1 and backend.stats().failed == 0


async def test_shutdown_drains_in_flight_work(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    results = []
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)

        async def run() -> None:
            results.append(await backend.execute(req("sleep_sync", {"seconds": 0.5})))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.sleep(0.2)
            await backend.shutdown(timeout=30)
            assert results and results[0].output == "slept"  # drained, not killed
            with pytest.raises(BackendClosedError):
                await backend.execute(req("echo"))


async def test_shutdown_kills_what_outlives_its_timeout(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)

        async def run(handler: str) -> None:
            result = await backend.execute(req(handler), raise_errors=False)
            assert result.error is not None and result.error.code == "BACKEND_CLOSED"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "spin")
            await trio.sleep(0.2)
            nursery.start_soon(run, "echo")  # queued behind it
            await trio.sleep(0.1)
            await backend.shutdown(timeout=0.2)
        stats = backend.stats()
        assert stats.failed_by_code == {"BACKEND_CLOSED": 2}


async def test_host_cancellation_kills_the_work(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        with trio.move_on_after(0.5):
            await backend.execute(req("spin"))
        assert backend.stats().failed_by_code == {"ABORTED": 1}
        await full_strength(backend, 1)
        assert (await backend.execute(req("add", {"a": 2, "b": 2}))).output == 4


async def test_concurrency_per_worker_and_per_plugin(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(
        registry,
        workspaces,
        min_workers=1,
        max_workers=1,
        max_concurrency_per_worker=4,
        max_concurrent_per_plugin=2,
    ) as backend:
        await full_strength(backend, 1)
        start = time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(backend.execute, req("sleep", {"seconds": 0.5}))
        elapsed = time.monotonic() - start
        assert elapsed >= 0.9  # two at a time (plugin cap), not four


async def test_warmup_marked(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(registry, workspaces, min_workers=1, max_workers=1, warmup="marked") as backend:
        await full_strength(backend, 1)
        result = await backend.execute(req("counter"))
        assert result.metadata["warm"] is True
        assert result.output == {"calls": 1, "warm": True}  # warmup() ran in the worker


async def test_handler_errors(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        with pytest.raises(HandlerError, match="bad input"):
            await backend.execute(req("fail", "x"))
        async with backend.open_execution(req("events", {"count": 3})) as execution:
            kinds = [e.kind async for e in execution.events]
            assert (await execution.result()).output == 3
        assert kinds.count("tick") == 3


async def test_a_caller_already_cancelled_runs_nothing(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    """Every execute is a cancel point, even though a quick answer may come without a wait
    (polled for): a cancelled caller gets Cancelled before a worker is taken."""
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        await backend.execute(req("whoami"))
        (worker,) = backend._workers.values()
        sent = worker.proc.executions
        with trio.CancelScope() as scope:
            scope.cancel()
            await backend.execute(req("whoami"))
        assert scope.cancelled_caught
        assert worker.proc.executions == sent  # nothing was sent to the worker
        stats = backend.stats()
        assert stats.ok == 1 and stats.failed_by_code == {"ABORTED": 1}
        assert stats.details["workers"]["busy"] == 0
        host_dirs = list(workspaces.root.iterdir())
        assert not [ws for host in host_dirs for ws in host.iterdir()]  # none was made
        assert (await backend.execute(req("add", {"a": 1, "b": 2}))).output == 3


async def test_thread_workers(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(registry, workspaces, kind="thread", min_workers=2, max_workers=2) as backend:
        await full_strength(backend, 2)
        result = await backend.execute(req("whoami"))
        assert result.output["pid"] == os.getpid()
        assert (await backend.execute(req("sleep", {"seconds": 0.01}))).output == "slept"
        with pytest.raises(ExecutionTimeoutError):
            await backend.execute(req("sleep_sync", {"seconds": 1.0}), timeout=0.2)
        await full_strength(backend, 2)
        assert (await backend.execute(req("add", {"a": 1, "b": 2}))).output == 3


HOST_SCRIPT = """
import sys, trio
from plugin_execution import PluginRegistry, create_execution_backend

async def main():
    registry = PluginRegistry()
    registry.load_path(sys.argv[1])
    async with create_execution_backend(type="worker-pool", registry=registry,
                                        min_workers=2, max_workers=2) as pool:
        while (await pool.health()).details["workers_idle"] < 2:
            await trio.sleep(0.02)
        for worker in pool._workers.values():
            print(worker.proc.pid, flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's reaper may be slow, or absent in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_workers_exit_when_the_host_is_sigkilled(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sys
    from pathlib import Path

    plugins = Path(__file__).resolve().parent.parent / "plugins"
    async with trio.open_nursery() as nursery:
        host = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-c", HOST_SCRIPT, str(plugins)],
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        pids: list[int] = []
        buffer = b""
        with trio.fail_after(60):
            while len(pids) < 2:
                buffer += await host.stdout.receive_some()
                *lines, buffer = buffer.split(b"\n")
                pids += [int(line) for line in lines if line.strip()]
        host.kill()
    assert all(pid != os.getpid() for pid in pids)
    with trio.fail_after(30):
        while any(_alive(pid) for pid in pids):
            await trio.sleep(0.05)


@pytest.mark.parametrize(
    ("quotas", "handler", "input", "reason"),
    [
        ({"memory_mb": 200}, "hog:keep", {"mb": 400}, "memory_limit"),
        ({"cpu_s": 0.5}, "sample:spin", None, "cpu_limit"),
    ],
)
async def test_quotas_are_enforced_on_shared_workers(  # type: ignore[no-untyped-def]
    registry, workspaces, quotas, handler, input, reason
) -> None:
    registry.register(
        {
            "id": "tests.quotas",
            "root": str(registry.get(P).root),
            "handlers": [{"id": "greedy", "entry": handler}],
            "permissions": {"quotas": {**quotas, "timeout": 60}},
        }
    )
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        with trio.fail_after(30), pytest.raises(WorkerCrashedError) as info:
            await backend.execute(
                ExecutionRequest(plugin_id="tests.quotas", handler_id="greedy", input=input)
            )
        assert info.value.details["reason"] == reason
        await full_strength(backend, 1)  # replaced, and the pool serves again
        assert (await backend.execute(req("add", {"a": 1, "b": 1}))).output == 2
        assert backend.stats().details["workers_killed"] == 1


# -- workspaces: removed when the handler made one, no filesystem work when it did not ---


@pytest.mark.parametrize("kind", ["process", "thread"])
async def test_a_workspace_the_handler_used_is_reported_and_removed(  # type: ignore[no-untyped-def]
    registry, workspaces, kind
) -> None:
    async with pool(registry, workspaces, kind=kind, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        request = req("use_workspace")
        result = await backend.execute(request)
        assert result.metadata["workspace_id"] == request.execution_id
        made = Path(result.output["dir"])
        assert made == workspaces.host_dir / request.execution_id
        assert not os.path.lexists(made)  # removed, with the file the handler wrote
        assert request.execution_id not in workspaces._leases and workspaces.active() == 0


@pytest.mark.parametrize("kind", ["process", "thread"])
async def test_a_workspace_the_handler_never_used_costs_no_filesystem_work(  # type: ignore[no-untyped-def]
    registry, workspaces, monkeypatch, kind
) -> None:
    async with pool(registry, workspaces, kind=kind, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        removals: list[str] = []
        rmdir = os.rmdir

        def spy(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            removals.append(os.fspath(path))
            return rmdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "rmdir", spy)
        request = req("echo", {"x": 1})
        result = await backend.execute(request)
        monkeypatch.undo()
        assert result.output == {"x": 1}
        assert "workspace_id" in result.metadata and result.metadata["workspace_id"] is None
        # The lease was closed without an rmdir of a directory that was never made.
        assert request.execution_id not in workspaces._leases and workspaces.active() == 0
        assert not [path for path in removals if request.execution_id in path]
        assert workspaces.host_dir is not None and list(workspaces.host_dir.iterdir()) == []
        # A later execution with a workspace is unaffected.
        used = await backend.execute(req("use_workspace"))
        assert not os.path.lexists(used.output["dir"]) and workspaces.active() == 0


async def test_a_workspace_made_through_a_platform_service_is_removed(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    # ctx.fs writes on the host, through the execution's platform session: the worker never
    # touched ctx.workspace, yet the directory exists and must go like any other.
    registry.register(
        {
            "id": "tests.fs_workspace",
            "root": str(registry.get(P).root),
            "handlers": [{"id": "call", "entry": "platform_calls:call"}],
        }
    )
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        request = ExecutionRequest(
            plugin_id="tests.fs_workspace",
            handler_id="call",
            input={"service": "fs", "method": "write", "args": ["note.txt", "hello"]},
        )
        result = await backend.execute(request)
        assert result.output == 5
        assert workspaces.active() == 0
        assert workspaces.host_dir is not None
        assert not os.path.lexists(workspaces.host_dir / request.execution_id)


@attrs.frozen
class Point:
    x: int
    y: int


@pytest.mark.parametrize(
    "bad",
    [
        # What the converter could make plain is refused all the same, as on every backend.
        pytest.param({1, 2}, id="set"),
        pytest.param(frozenset({"a"}), id="frozenset"),
        pytest.param(Point(1, 2), id="attrs"),
        pytest.param(object(), id="object"),
        pytest.param(2**70, id="int-too-big"),
        pytest.param({"x": object()}, id="nested-object"),
    ],
)
async def test_unserializable_input_is_an_invalid_request(registry, workspaces, bad) -> None:  # type: ignore[no-untyped-def]
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        pid = (await backend.execute(req("whoami"))).output["pid"]
        with pytest.raises(InvalidRequestError, match="input is not serializable"):
            await backend.execute(req("echo", bad))
        assert backend.stats().failed_by_code == {"INVALID_REQUEST": 1}
        assert workspaces.active() == 0
        # Nothing reached the worker: it still serves, the same one.
        assert (await backend.execute(req("whoami"))).output["pid"] == pid


async def test_a_context_value_the_converter_makes_plain_is_carried(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    # Input must be plain data; a context may hold values the converter unstructures (sent
    # the general way when the lean encoder refuses them).
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        result = await backend.execute(req("whoami", context={"at": Point(1, 2), "n": 1}))
        assert result.output["context"] == {"at": {"x": 1, "y": 2}, "n": 1}
        with pytest.raises(InvalidRequestError, match="cannot be sent"):
            await backend.execute(req("whoami", context={"x": object()}))
        assert workspaces.active() == 0


async def test_a_duplicate_execution_id_fails_before_taking_a_worker(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    from plugin_execution import WorkspaceError

    async with pool(registry, workspaces, min_workers=1, max_workers=1, max_queue=4) as backend:
        await full_strength(backend, 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                backend.execute, req("sleep_sync", {"seconds": 0.5}, execution_id="same")
            )
            await trio.sleep(0.1)
            with pytest.raises(WorkspaceError, match="already has a live workspace"):
                await backend.execute(req("whoami", execution_id="same"))
            assert backend.stats().details["queue_depth"] == 0  # it never queued
        # No slot was lost to it: the one worker still takes every execution.
        with trio.fail_after(10):
            for _ in range(3):
                await backend.execute(req("whoami"))


async def test_queued_callers_cancelled_leave_no_slot_behind(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(registry, workspaces, min_workers=1, max_workers=1, max_queue=10) as backend:
        await full_strength(backend, 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.execute, req("sleep_sync", {"seconds": 0.5}))
            await trio.sleep(0.1)
            with trio.move_on_after(0.1):  # these wait in the queue, then are cancelled
                async with trio.open_nursery() as queued:
                    for _ in range(5):
                        queued.start_soon(backend.execute, req("whoami"))
        stats = backend.stats()
        assert stats.details["queue_depth"] == 0 and stats.failed_by_code.get("ABORTED") == 5
        with trio.fail_after(10):
            for _ in range(3):
                await backend.execute(req("whoami"))
        assert backend.stats().details["workers"]["busy"] == 0


async def test_workers_never_see_the_hosts_environment(registry, workspaces, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Neither in ``os.environ`` nor in ``/proc/self/environ`` (the environment the process,
    or the zygote it was forked from, was started with), on the first workers (spawned while
    the zygote starts) and on their successors (forked)."""
    monkeypatch.setenv("HOST_SECRET_TOKEN", "correct horse battery staple")
    async with pool(
        registry, workspaces, min_workers=1, max_workers=1, max_executions_per_worker=2
    ) as backend:
        await full_strength(backend, 1)
        with trio.fail_after(30):
            while (
                backend._launcher.zygote.current is None
            ):  # let the zygote come up: later workers are forked
                await trio.sleep(0.02)
        pids = set()
        for _ in range(8):
            env = (await backend.execute(req("environment"))).output
            proc = (await backend.execute(req("proc_environ"))).output
            assert "HOST_SECRET_TOKEN" not in env and "correct horse" not in proc
            pids.add((await backend.execute(req("whoami"))).output["pid"])
        assert backend.stats().workers_recycled >= 3 and len(pids) >= 3


async def test_leaving_with_forked_workers_is_clean(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    """The zygote outlives the workers forked from it: stopping it first would kill them
    under their actors, which then report crashes out of the block."""
    for _ in range(5):
        async with pool(
            registry, workspaces, min_workers=2, max_workers=2, max_executions_per_worker=2
        ) as backend:
            with trio.fail_after(30):
                while backend._launcher.zygote.current is None:
                    await trio.sleep(0.02)
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(backend.execute, req("whoami"))
            await full_strength(backend, 2)  # their successors, forked, are serving
        stats = backend.stats()
        assert stats.worker_crashes == 0 and stats.failed == 0


async def test_queued_requests_go_out_whole_when_a_worker_frees(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    """A worker freed hands itself to the oldest queued caller and sends its request in
    the same step; requests bigger than a socket buffer are finished by their caller."""
    big = [os.urandom(12 << 20) for _ in range(3)]  # more than a socket buffer (4 MiB)
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        outputs: dict[int, object] = {}

        async def call(i: int, value: object) -> None:
            outputs[i] = (await backend.execute(req("echo", value))).output

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(12):
                    nursery.start_soon(call, i, big[i % 3] if i % 4 == 0 else i)
        assert outputs == {i: big[i % 3] if i % 4 == 0 else i for i in range(12)}
        stats = backend.stats()
        assert stats.worker_crashes == 0 and stats.details["queue_depth"] == 0


async def test_a_caller_cancelled_after_the_hand_over_stops_its_execution(
    registry, workspaces
) -> None:  # type: ignore[no-untyped-def]
    """Its request went out when the worker freed; cancelling the caller then sends Cancel,
    and kills the worker (a sync handler cannot be interrupted) after the grace."""
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        first = (await backend.execute(req("whoami"))).output["pid"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.execute, req("sleep_sync", {"seconds": 0.2}))
            await trio.sleep(0.05)
            with trio.move_on_after(1.0) as scope:  # queued, handed over at ~0.2 s, running
                await backend.execute(req("sleep_sync", {"seconds": 30}))
        assert scope.cancelled_caught
        await full_strength(backend, 1)
        assert (await backend.execute(req("whoami"))).output["pid"] != first
        assert backend.stats().failed_by_code.get("ABORTED") == 1


async def test_a_queued_request_that_cannot_be_sent_fails_its_own_caller(
    registry, workspaces
) -> None:  # type: ignore[no-untyped-def]
    """The hand-over cannot submit it (its input is not plain data): the caller, woken with
    the worker, submits it itself and gets INVALID_REQUEST; the worker goes on to the next
    queued request, the same process."""
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        pid = (await backend.execute(req("whoami"))).output["pid"]
        outcomes: dict[str, object] = {}

        async def call(name: str, request: ExecutionRequest) -> None:
            try:
                outcomes[name] = (await backend.execute(request)).output
            except InvalidRequestError as exc:
                outcomes[name] = exc

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "busy", req("sleep_sync", {"seconds": 0.3}))
                await trio.sleep(0.1)
                nursery.start_soon(call, "bad", req("echo", {1, 2}))  # queued
                await trio.sleep(0.05)
                nursery.start_soon(call, "next", req("whoami"))  # queued behind it
        assert isinstance(outcomes["bad"], InvalidRequestError)
        assert outcomes["next"]["pid"] == pid  # type: ignore[index]
        stats = backend.stats()
        assert stats.failed_by_code == {"INVALID_REQUEST": 1}
        assert stats.details["workers"]["busy"] == 0 and workspaces.active() == 0
