"""HostThreads: the host's file work for plugins runs on threads bounded per plugin and in
total, apart from trio's default limiter, and gives up at the execution's deadline."""

from __future__ import annotations

import threading

import pytest
import trio

from plugin_execution import ExecutionTimeoutError, Permissions
from plugin_execution.platform import Platform, PlatformSession
from plugin_execution.platform._limits import HostThreads


def session(plugin_id: str, deadline: float = float("inf")) -> PlatformSession:
    return Platform().session(
        execution_id=f"e-{plugin_id}",
        plugin_id=plugin_id,
        handler_id="h",
        permissions=Permissions(),
        deadline=deadline,
    )


async def test_a_plugin_that_blocks_its_threads_blocks_only_its_own() -> None:
    threads = HostThreads(per_plugin=2, total=3)
    release = threading.Event()
    started: list[str] = []

    def block(name: str) -> str:
        started.append(name)
        release.wait(30)
        return name

    async with trio.open_nursery() as nursery:
        for i in range(3):  # the third waits for one of the plugin's 2 slots
            nursery.start_soon(threads.run_sync, session("hog"), "block", block, f"hog-{i}")
        while len(started) < 2:
            await trio.sleep(0.01)
        await trio.sleep(0.1)  # time for a third thread to start, were it allowed to
        assert threads.in_use("hog") == 2 and len(started) == 2
        # another plugin still gets the third (last) thread of the total, and trio's own
        # default limiter was never touched
        assert await threads.run_sync(session("other"), "quick", lambda: "ok") == "ok"
        assert trio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
        release.set()
    assert sorted(started) == ["hog-0", "hog-1", "hog-2"]
    assert threads.in_use("hog") == 0 and threads._plugins == {}


async def test_the_total_bounds_every_plugin_together() -> None:
    threads = HostThreads(per_plugin=2, total=2)
    release = threading.Event()
    done: list[str] = []

    async def call(plugin: str) -> None:
        done.append(await threads.run_sync(session(plugin), "x", release.wait, 30) and plugin)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "a")
        nursery.start_soon(call, "b")
        while threads.total.borrowed_tokens < 2:
            await trio.sleep(0.01)
        nursery.start_soon(call, "c")
        await trio.sleep(0.2)
        # c holds its own plugin's slot (it never takes one of the total while waiting for
        # its plugin's) and waits for the total
        assert done == [] and threads.total.borrowed_tokens == 2
        assert threads.total.statistics().tasks_waiting == 1
        release.set()
    assert sorted(done) == ["a", "b", "c"]


async def test_past_the_deadline_the_call_fails_and_the_stuck_thread_keeps_its_slot() -> None:
    threads = HostThreads(per_plugin=1, total=4)
    release = threading.Event()
    stuck = session("stuck", deadline=trio.current_time() + 0.3)
    with pytest.raises(ExecutionTimeoutError) as info:
        await threads.run_sync(stuck, "ctx.fs on 'x'", release.wait, 30)
    assert "deadline" in info.value.message and info.value.plugin_id == "stuck"
    assert threads.in_use("stuck") == 1  # the abandoned thread still counts
    # a later call of the same plugin waits for that slot, and also gives up at its deadline
    with pytest.raises(ExecutionTimeoutError):
        await threads.run_sync(
            session("stuck", deadline=trio.current_time() + 0.3), "y", lambda: None
        )
    release.set()
    while threads.in_use("stuck"):
        await trio.sleep(0.01)
    assert threads._plugins == {}
    assert await threads.run_sync(session("stuck"), "z", lambda: 7) == 7


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        HostThreads(per_plugin=5, total=4)
    with pytest.raises(ValueError):
        HostThreads(per_plugin=0)
