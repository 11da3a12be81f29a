"""_groups: which exception groups are unwrapped for the caller, and which stay whole.

A backend's ``__aenter__`` raises the ``ExecutionError`` its start-up failed with, even when
several of its tasks failed that way at once; a group with anything else in it is a real
multi-error and reaches the caller whole.
"""

from __future__ import annotations

import pytest
import trio

from plugin_execution import ExecutionBackend, PluginRegistry, WorkerCrashedError
from plugin_execution._groups import unwrap_all_of
from plugin_execution.backends.job import Job
from plugin_execution.types import ExecutionResult


def crash(n: int) -> WorkerCrashedError:
    return WorkerCrashedError(f"worker {n} exited with status 1")


def test_a_group_of_one_kind_is_raised_as_its_first_with_the_others_noted() -> None:
    first, second, third = crash(1), crash(2), crash(3)
    with pytest.raises(WorkerCrashedError) as info, unwrap_all_of(WorkerCrashedError):
        raise ExceptionGroup("start-up", [first, ExceptionGroup("inner", [second, third])])
    assert info.value is first
    (note,) = info.value.__notes__
    assert note.startswith("2 more at the same time") and "worker 3" in note


def test_a_group_of_one_is_unwrapped_without_a_note() -> None:
    only = crash(1)
    with pytest.raises(WorkerCrashedError) as info, unwrap_all_of(WorkerCrashedError):
        raise ExceptionGroup("start-up", [only])
    assert info.value is only and not hasattr(only, "__notes__")


def test_a_group_with_anything_else_stays_whole() -> None:
    bug = RuntimeError("a bug")
    with pytest.raises(ExceptionGroup) as info, unwrap_all_of(WorkerCrashedError):
        raise ExceptionGroup("start-up", [crash(1), bug])
    assert info.value.exceptions[1] is bug
    assert not hasattr(info.value.exceptions[0], "__notes__")


class _FailsToStart(ExecutionBackend):
    """Two start-up tasks that fail at once: ``failures`` says with what."""

    name = "fails-to-start"

    def __init__(self, failures: list[Exception]) -> None:
        super().__init__(registry=PluginRegistry())
        self.failures = failures

    async def _start(self, nursery: trio.Nursery) -> None:
        async def fail(exc: Exception) -> None:
            raise exc

        async with trio.open_nursery() as starting:
            for exc in self.failures:
                starting.start_soon(fail, exc)

    async def _run(self, job: Job) -> ExecutionResult:
        raise AssertionError("never started")


async def test_a_backend_whose_start_up_fails_raises_the_execution_error() -> None:
    with pytest.raises(WorkerCrashedError, match="worker 1"):
        async with _FailsToStart([crash(1), crash(2)]):
            pass


async def test_a_backend_whose_start_up_fails_with_a_bug_too_raises_the_group() -> None:
    with pytest.raises(ExceptionGroup) as info:
        async with _FailsToStart([crash(1), ValueError("a bug")]):
            pass
    assert info.group_contains(ValueError) and info.group_contains(WorkerCrashedError)
