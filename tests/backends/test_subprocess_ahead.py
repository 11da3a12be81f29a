"""The subprocess backend's child forked ahead (``start_method="zygote"``, ``fork_ahead``).

The zygote keeps one child forked ahead in a free child slot: it counts toward
``max_concurrent``, is used by the next execution, is replaced when it dies idle or with its
zygote, and is killed and reaped when the backend closes. No timing is asserted: only which
processes exist, with generous bounds for a shared machine.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable

import trio

from plugin_execution import (
    ExecutionRequest,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.backends.subprocess import SubprocessBackend

P = "tests.sample"


def req(handler: str, input: object = None) -> ExecutionRequest:
    return ExecutionRequest(plugin_id=P, handler_id=handler, input=input)


def _table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), fields[0].decode())
    return table


def _alive(pid: int) -> bool:
    state = _table().get(pid)
    return state is not None and state[1] != "Z"


async def _forked(backend: SubprocessBackend) -> set[int]:
    """The live processes the backend's zygote forked: its children running an execution
    (or being reaped), and the one forked ahead. Under bubblewrap the zygote's pid is bwrap's,
    and the zygote is bwrap's child."""
    zygote = (await backend.health()).details["zygote_pid"]
    if zygote is None:
        return set()
    table = _table()
    inner = {pid for pid, (ppid, _) in table.items() if ppid == zygote}
    if not _is_bwrap(zygote):
        inner = {zygote}
    return {pid for pid, (ppid, state) in table.items() if ppid in inner and state != "Z"}


def _is_bwrap(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.basename(f.read().split(b"\0")[0]) == b"bwrap"
    except OSError:
        return False


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    with trio.move_on_after(30):
        while not await check():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"still waiting for {what}")


def _backend(registry: PluginRegistry, workspaces: WorkspaceManager, **options: object):  # type: ignore[no-untyped-def]
    return create_execution_backend(
        type="subprocess",
        registry=registry,
        workspace=workspaces,
        start_method="zygote",
        **options,
    )


async def test_a_child_forked_ahead_runs_the_next_execution_within_the_slots(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async with _backend(registry, workspaces, max_concurrent=2) as backend:

        async def one_spare() -> bool:
            return len(await _forked(backend)) == 1

        await _until(one_spare, "a child forked ahead")
        (spare,) = await _forked(backend)
        result = await backend.execute(req("add", {"a": 1, "b": 2}))
        assert result.output == 3
        assert result.metadata["pid"] == spare  # it ran in the child forked ahead
        assert (await backend.health()).details["used_ahead"] == 1

        async def next_forked() -> bool:  # (the next one is forked once this one was taken)
            return bool((await backend.health()).details["forked_ahead"] >= 2)

        await _until(next_forked, "the next child forked ahead")

        # Two executions hold both slots: no child is forked ahead meanwhile.
        peak = 0
        ran = {spare}

        async def run() -> None:
            result = await backend.execute(req("sleep_sync", {"seconds": 0.5}))
            ran.add(result.metadata["pid"])

        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(run)
            with trio.move_on_after(0.4):
                while True:
                    peak = max(peak, len(await _forked(backend)))
                    await trio.sleep(0.005)
        assert 1 <= peak <= 2
        last: set[int] = set()

        async def a_new_one() -> bool:  # (the children that ran are reaped meanwhile)
            last.clear()
            last.update(await _forked(backend) - ran)
            return len(last) == 1

        await _until(a_new_one, "a child forked ahead again")
    assert not any(_alive(pid) for pid in last)  # killed and reaped with the backend


async def test_without_fork_ahead_no_child_waits(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async with _backend(registry, workspaces, fork_ahead=False) as backend:
        assert (await backend.execute(req("add", {"a": 1, "b": 1}))).output == 2

        async def none_left() -> bool:
            return not await _forked(backend)

        await _until(none_left, "the child reaped")
        await trio.sleep(0.2)
        assert not await _forked(backend)
        assert (await backend.health()).details["forked_ahead"] == 0


async def test_a_child_forked_ahead_that_dies_is_replaced(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async with _backend(registry, workspaces) as backend:
        first: set[int] = set()

        async def spare() -> bool:
            found = await _forked(backend)
            if len(found) == 1 and not found & first:
                first.update(found)
                return True
            return False

        await _until(spare, "a child forked ahead")
        (dead,) = first
        os.kill(dead, signal.SIGKILL)
        await _until(spare, "another child forked ahead")
        result = await backend.execute(req("add", {"a": 2, "b": 2}))
        assert result.output == 4 and result.metadata["pid"] != dead
        details = (await backend.health()).details
        assert details["crash_breaker"]["trips"] == 0


async def test_a_child_forked_ahead_dies_with_its_zygote(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    """Killed with it at once (the kernel's parent-death signal), even before the host sees
    the zygote go; the next zygote forks another."""
    async with _backend(registry, workspaces) as backend:

        async def one_spare() -> bool:
            return len(await _forked(backend)) == 1

        await _until(one_spare, "a child forked ahead")
        (spare,) = await _forked(backend)
        zygote = (await backend.health()).details["zygote_pid"]
        table = _table()
        inner = [pid for pid, (ppid, _) in table.items() if ppid == zygote]
        os.kill(inner[0] if _is_bwrap(zygote) else zygote, signal.SIGKILL)

        async def spare_gone() -> bool:
            return not _alive(spare)

        await _until(spare_gone, "the child forked ahead killed with its zygote")

        async def replaced() -> bool:
            details = (await backend.health()).details
            return details["zygote_pid"] not in (None, zygote) and len(await _forked(backend)) == 1

        await _until(replaced, "a new zygote and a child forked ahead by it")
        assert (await backend.execute(req("add", {"a": 3, "b": 3}))).output == 6


async def test_after_an_async_execution_children_forked_ahead_start_trio_while_they_wait(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    """The worker marks an async handler's result for the host alone (the caller's metadata
    has no such key); the backend then has its next children forked ahead run a trio loop
    once while they wait, until a sync handler's result comes. Handlers of either kind run
    in such a child as in any other."""
    async with _backend(registry, workspaces) as backend:
        assert backend._ahead_spec()["trio"] is False
        result = await backend.execute(req("echo", "first"))
        assert result.output == "first"
        assert "async" not in result.metadata
        assert backend._ahead_spec()["trio"] is True
        for handler, input, output in [
            ("echo", "second", "second"),  # its child was forked before the hint
            ("echo", "third", "third"),  # forked with it (unless forked on request)
            ("add", {"a": 1, "b": 2}, 3),
        ]:
            result = await backend.execute(req(handler, input))
            assert result.output == output
            assert "async" not in result.metadata
        assert backend._ahead_spec()["trio"] is False
