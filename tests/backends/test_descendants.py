"""Processes a handler starts and leaves behind never outlive their execution or worker.

Real forks (tests/plugins/lifecycle.py): a plain child ``sleep 300`` in the worker's process
group, and a ``setsid`` double fork whose grandchild is orphaned in a session of its own. On
the worker pool (process workers) and the subprocess backend (both start methods; with no
sandbox, since the sandbox's seccomp filter and pid namespace contain them on their own),
each must be dead when the execution ends, when its worker is killed (timeout) or crashes,
and when the backend's block is left. Bounds are generous: what is asserted is that they end,
except when the block is left: then they must have ended already, even a leftover whose
teardown takes the kernel a while (one holding much memory).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from plugin_execution import (
    BackendClosedError,
    ExecutionBackend,
    ExecutionRequest,
    ExecutionTimeoutError,
    PluginRegistry,
    WorkerCrashedError,
    WorkspaceManager,
    create_execution_backend,
)

PLUGINS = Path(__file__).parents[1] / "plugins"

P = "tests.lifecycle"
HOW = ["plain", "setsid"]


def running(pid: int, program: bytes = b"sleep") -> bool:
    """Whether ``pid`` is a live ``program`` (not a zombie, not another program)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    comm = stat[stat.find(b"(") + 1 : stat.rfind(b")")]
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return comm == program and state not in (b"Z", b"X")


def program_of(pid: int) -> bytes:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.find(b"(") + 1 : stat.rfind(b")")]


async def ends(pid: int, within: float = 20.0) -> bool:
    with trio.move_on_after(within):
        while running(pid):
            await trio.sleep(0.05)
    return not running(pid)


def recorded(path: Path) -> int:
    return int(path.read_text())


@pytest.fixture
def lifecycle() -> PluginRegistry:
    registry = PluginRegistry()
    registry.register(
        {
            "id": P,
            "root": str(PLUGINS),
            "handlers": [
                {"id": name, "entry": f"lifecycle:{name}"}
                for name in ("leave_child", "nap", "nap_sync")
            ],
        }
    )
    return registry


def leave(
    how: str, then: str = "return", record: Path | None = None, hold_mb: int = 0
) -> ExecutionRequest:
    input: dict[str, Any] = {"how": how, "then": then}
    if record is not None:
        input["record"] = str(record)
    if hold_mb:
        input["hold_mb"] = hold_mb
    return ExecutionRequest(plugin_id=P, handler_id="leave_child", input=input)


KINDS = ["worker-pool", "subprocess-spawn", "subprocess-zygote"]


def open_backend(kind: str, registry: PluginRegistry, workspaces: WorkspaceManager) -> Any:
    if kind == "worker-pool":
        return create_execution_backend(
            type="worker-pool",
            registry=registry,
            workspace=workspaces,
            min_workers=1,
            max_workers=1,
            cancel_grace=0.3,
        )
    return create_execution_backend(
        type="subprocess",
        registry=registry,
        workspace=workspaces,
        start_method=kind.removeprefix("subprocess-"),
        sandbox=False,
        cancel_grace=0.3,
    )


@pytest.fixture(params=KINDS)
async def backend(
    request: pytest.FixtureRequest, lifecycle: PluginRegistry, workspaces: WorkspaceManager
) -> AsyncIterator[ExecutionBackend]:
    async with open_backend(request.param, lifecycle, workspaces) as backend:
        yield backend


@pytest.mark.parametrize("how", HOW)
async def test_what_an_execution_left_is_dead_when_its_result_comes(
    backend: ExecutionBackend, how: str
) -> None:
    first = (await backend.execute(leave(how))).output
    assert not running(first)  # killed (and reaped) before the result was sent
    # the worker serves on, and cleans up after every execution
    second = (await backend.execute(leave(how))).output
    assert second != first and not running(second)


@pytest.mark.parametrize("how", HOW)
async def test_what_a_timed_out_execution_left_dies_with_its_worker(
    backend: ExecutionBackend, how: str, tmp_path: Path
) -> None:
    record = tmp_path / "pid"
    with pytest.raises(ExecutionTimeoutError):
        await backend.execute(leave(how, "sleep", record), timeout=3)
    assert await ends(recorded(record))


@pytest.mark.parametrize("how", HOW)
async def test_what_a_crashed_worker_left_dies_too(
    lifecycle: PluginRegistry, workspaces: WorkspaceManager, how: str, tmp_path: Path
) -> None:
    # A worker that dies on its own cannot clean up: its process group is killed by the
    # host, and its orphans go to the zygote it was forked from (a subreaper too), which
    # kills them. So this holds where workers are forked from a zygote: the pool once its
    # zygote is up, and the subprocess backend's zygote start method.
    for kind in ("worker-pool", "subprocess-zygote"):
        async with open_backend(kind, lifecycle, workspaces) as backend:
            if kind == "worker-pool":
                await forked_from_zygote(backend)
            record = tmp_path / f"{kind}.pid"
            with pytest.raises(WorkerCrashedError):
                await backend.execute(leave(how, "exit", record))
            assert await ends(recorded(record)), kind


async def forked_from_zygote(backend: Any) -> None:
    """Wait for the pool's zygote, then make the pool's one worker a fork of it."""
    with trio.fail_after(30):
        while backend._launcher.zygote.current is None:
            await trio.sleep(0.05)
    ours = {backend._launcher.zygote.current.pid}
    for _ in range(20):
        result = await backend.execute(
            ExecutionRequest(plugin_id=P, handler_id="nap_sync", input={"seconds": 0})
        )
        pid = int(result.worker_id.rsplit("-", 1)[1])
        if parent_of(pid) in ours:
            return
        backend._workers[next(iter(backend._workers))].proc.kill()  # replaced by a fork
        await trio.sleep(0.2)
    raise AssertionError("the pool never forked a worker from its zygote")


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


@pytest.mark.parametrize("hold_mb", [0, 256], ids=["sleep", "holding-256MiB"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", HOW)
async def test_nothing_an_execution_started_outlives_the_block(
    lifecycle: PluginRegistry,
    workspaces: WorkspaceManager,
    kind: str,
    how: str,
    hold_mb: int,
    tmp_path: Path,
) -> None:
    # Still running when the backend closes: the block's shutdown kills the worker, its
    # group, and what left the group, and waits until they have died. A process holding
    # 256 MiB takes the kernel ~20 ms to tear down after its SIGKILL (more under load):
    # the host, not its parent, must wait for that, not return as soon as it sent it.
    record = tmp_path / "pid"
    outcome: list[BaseException] = []

    async def call(backend: ExecutionBackend) -> None:
        try:
            await backend.execute(leave(how, "sleep", record, hold_mb), timeout=60)
        except BackendClosedError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as outer:
        async with open_backend(kind, lifecycle, workspaces) as backend:
            backend.shutdown_timeout = 0.5
            outer.start_soon(call, backend)
            with trio.fail_after(30):
                while not record.exists() or not record.read_text():
                    await trio.sleep(0.05)
            program = program_of(recorded(record))
            assert running(recorded(record), program)
        assert not running(recorded(record), program)  # dead already, not dying
    assert len(outcome) == 1
