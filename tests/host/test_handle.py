"""The worker handle interface: why a worker ended, and the pool over any launcher.

``exit_cause`` is what backends decide on (a kill by the host is the work's fault, a SIGKILL
from outside or a zygote's death is not): each cause is produced for real here. The pool is
then run over a launcher of its own kind, written against the public entry point
``serve_worker`` the way a new kind of worker would be (a started child + a connected
socket + a kill function), to show the pool needs nothing else of a worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from plugin_execution import (
    ExecutionRequest,
    ExecutionTimeoutError,
    PluginRegistry,
    WorkerCrashedError,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.host import (
    ThreadLauncher,
    WorkerHandle,
    WorkerLauncher,
    WorkerProcess,
    open_worker_process,
    serve_worker,
)
from plugin_execution.host.process import worker_argv, worker_socketpair
from plugin_execution.host.zygote import open_zygote

P = "tests.sample"


async def lost(worker: WorkerHandle) -> None:
    with trio.fail_after(30):
        await worker.wait()


async def test_a_worker_that_runs_has_no_exit_cause_and_one_asked_to_stop_is_closed() -> None:
    async with open_worker_process() as worker:
        assert worker.exit_cause is None and worker.alive
    assert worker.exit_cause == "closed"


async def test_a_worker_killed_by_the_host_is_killed() -> None:
    async with open_worker_process() as worker:
        worker.kill()
        await lost(worker)
        assert worker.exit_cause == "killed"
        assert worker.crash_error().details["signal"] == signal.SIGKILL


async def test_a_worker_sigkilled_from_outside_is_outside() -> None:
    async with open_worker_process() as worker:
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        await lost(worker)
        assert worker.exit_cause == "outside"
        assert not worker.killed


async def test_a_worker_that_exits_on_its_own_exited() -> None:
    async with open_worker_process() as worker:
        await worker.connection.stream.send_all(b"\x00\x00\x00\x03\xc1\xc1\xc1")  # a bad frame
        await lost(worker)
        assert worker.exit_cause == "exited"
        assert worker.crash_error().details["exit_code"] == 76


async def test_a_worker_whose_zygote_died_is_orphaned() -> None:
    async with open_zygote() as zygote, open_worker_process(zygote=zygote) as worker:
        os.kill(zygote.pid, signal.SIGKILL)
        await lost(worker)
        assert worker.exit_cause == "orphaned"
        assert not worker.killed


async def test_a_thread_worker_has_no_pid_and_ends_closed() -> None:
    async with ThreadLauncher().open() as worker:
        assert worker.pid is None and not worker.spin_ok
        assert (await worker.ping()).in_flight == 0
    assert worker.exit_cause == "closed"


class Spawned:
    """A ``ChildProcess`` of our own making: a ``trio.Process`` that counts its kills."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.kills = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self) -> int:
        return await self.process.wait()

    def kill(self) -> None:
        self.kills += 1
        self.process.kill()


class OwnLauncher:
    """A launcher written against the public entry point only: it starts ``python -I`` on
    one end of a socketpair by itself and hands ``serve_worker`` the rest."""

    kind = "own"

    def __init__(self) -> None:
        self.started: list[WorkerProcess] = []
        self.children: list[Spawned] = []

    @asynccontextmanager
    async def open(self) -> AsyncIterator[WorkerProcess]:
        host, child = worker_socketpair()
        try:
            process = await trio.lowlevel.open_process(
                worker_argv(None, child.fileno()),
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env={"PATH": os.environ.get("PATH", "")},
            )
        except BaseException:
            host.close()
            raise
        finally:
            child.close()
        spawned = Spawned(process)
        self.children.append(spawned)
        async with serve_worker(spawned, host, None, kill=spawned.kill) as worker:
            self.started.append(worker)
            yield worker

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def health_details(self) -> dict[str, Any]:
        return {}


def req(handler: str, input: object = None) -> ExecutionRequest:
    return ExecutionRequest(plugin_id=P, handler_id=handler, input=input)


async def test_the_pool_serves_recycles_and_replaces_over_any_launcher(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    launcher = OwnLauncher()
    checked: WorkerLauncher = launcher  # it is one (mypy --strict tests/host/ checks it)
    async with create_execution_backend(
        type="worker-pool",
        registry=registry,
        workspace=workspaces,
        launcher=checked,
        min_workers=1,
        max_workers=1,
        max_executions_per_worker=3,
        cancel_grace=0.3,
    ) as backend:
        assert (await backend.health()).details["kind"] == "own"
        results = [await backend.execute(req("add", {"a": i, "b": 1})) for i in range(3)]
        assert [r.output for r in results] == [1, 2, 3]
        assert {r.worker_id for r in results} == {launcher.started[0].worker_id}
        again = await backend.execute(req("echo", "x"))  # recycled: a second worker
        assert again.output == "x" and again.worker_id == launcher.started[1].worker_id

        with pytest.raises(WorkerCrashedError):  # its work killed it: replaced, not restarted
            await backend.execute(req("crash", {"code": 3}))
        assert launcher.started[1].exit_cause == "exited"
        assert (await backend.execute(req("echo", "y"))).output == "y"

        slow = ExecutionRequest(
            plugin_id=P, handler_id="sleep_sync", input={"seconds": 30}, timeout=0.2
        )
        with pytest.raises(ExecutionTimeoutError):  # a sync handler ignores Cancel: killed
            await backend.execute(slow)
        killed = [w for w in launcher.started if w.exit_cause == "killed"]
        assert len(killed) == 1  # the host stopped it through the launcher's kill function
        assert sum(child.kills for child in launcher.children) >= 1
        assert (await backend.execute(req("echo", "z"))).output == "z"
    assert all(w.lost.is_set() for w in launcher.started)
    assert all(child.returncode is not None for child in launcher.children)
