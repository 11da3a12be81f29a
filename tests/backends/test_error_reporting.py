"""Reporting a handler's failure never fails, on every backend (issue 14, item 4).

Each handler of ``tests/plugins/bad_errors.py`` raises something hard to report: an
exception whose ``__str__``/``__repr__`` raise (even ``SystemExit``), 10 MB messages and
args, ``BaseException``\\ s that would end a process, a traceback the ``traceback`` module
cannot format, cyclic contexts. Every one must reach the caller as ``HANDLER_ERROR`` with
what could be rendered, bounded in size, and the worker that ran it must serve the next
execution (same ``worker_id`` on the pool).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from plugin_execution import (
    ExecutionRequest,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.backends.base import ExecutionBackend
from plugin_execution.errors import MAX_MESSAGE_CHARS, MAX_TEXT_CHARS, ExecutionError

P = "tests.errors"
PLUGINS = Path(__file__).parents[1] / "plugins"
CASES = [
    "str_raises",
    "str_and_repr_raise",
    "str_raises_system_exit",
    "str_not_a_string",
    "unserialisable_args",
    "huge_message",
    "huge_args",
    "system_exit",
    "keyboard_interrupt",
    "generator_exit",
    "own_base_exception",
    "sourceless_frame",
    "sourceless_cause",
    "cause_that_cannot_render",
    "cyclic_context",
    "group",
    "recursion",
]
#: What the message says of the exception, where it can say something.
MESSAGES = {
    "str_raises": "StrRaises: StrRaises()",  # its repr, then
    "str_and_repr_raise": "StrAndReprRaise: <StrAndReprRaise object: str() and repr() failed>",
    "str_raises_system_exit": "<StrRaisesSystemExit object: str() and repr() failed>",
    "system_exit": "SystemExit: 3",
    "own_base_exception": "OwnBaseException: mine",
    "sourceless_frame": "ValueError: raised where no source can be found",
    "cyclic_context": "ValueError: first",
    "recursion": "RecursionError: maximum recursion depth exceeded",
}
REMOTE_TYPES = {
    "str_raises": "bad_errors.StrRaises",
    "own_base_exception": "bad_errors.OwnBaseException",
    "system_exit": "builtins.SystemExit",
    "generator_exit": "builtins.GeneratorExit",
}


@pytest.fixture
def errors_registry(registry: PluginRegistry) -> PluginRegistry:
    registry.register(
        {
            "id": P,
            "root": str(PLUGINS),
            "handlers": {
                "raise_sync": {"entry": "bad_errors:raise_sync"},
                "raise_async": {"entry": "bad_errors:raise_async"},
                "pid": {"entry": "bad_errors:pid"},
                "bad_warmup": {"entry": "bad_errors:BadWarmup", "warmup": True},
                "bad_import": {"entry": "bad_import:run"},
            },
        }
    )
    return registry


OPTIONS: dict[str, dict[str, Any]] = {
    "in-process": {"type": "in-process"},
    "worker-pool": {"type": "worker-pool", "min_workers": 1, "max_workers": 1},
    "thread-pool": {"type": "worker-pool", "min_workers": 1, "max_workers": 1, "kind": "thread"},
    "subprocess": {"type": "subprocess"},
}


@pytest.fixture(params=sorted(OPTIONS))
async def backend(
    request: pytest.FixtureRequest, errors_registry: PluginRegistry, workspaces: WorkspaceManager
) -> AsyncIterator[ExecutionBackend]:
    async with create_execution_backend(
        registry=errors_registry, workspace=workspaces, **OPTIONS[request.param]
    ) as backend:
        yield backend


def req(handler: str, input: object = None) -> ExecutionRequest:
    return ExecutionRequest(plugin_id=P, handler_id=handler, input=input)


def problems_with(case: str, error: ExecutionError | None) -> list[str]:
    """What is wrong with the error ``case`` was reported as (nothing: an empty list)."""
    if error is None:
        return [f"{case}: succeeded"]
    found = []
    if error.code != "HANDLER_ERROR":
        found.append(f"{case}: {error.code} {error.message[:300]!r}")
    if len(error.message) > MAX_MESSAGE_CHARS + 200:
        found.append(f"{case}: a message of {len(error.message)} characters")
    traceback = error.details.get("remote_traceback")
    if not isinstance(traceback, str) or len(traceback) > MAX_TEXT_CHARS:
        found.append(f"{case}: traceback {type(traceback).__name__} of {len(traceback or '')}")
    if case in REMOTE_TYPES and error.details.get("remote_type") != REMOTE_TYPES[case]:
        found.append(f"{case}: remote_type {error.details.get('remote_type')!r}")
    expected = MESSAGES.get(case)
    if expected is not None and expected not in error.message:
        found.append(f"{case}: message {error.message[:300]!r} lacks {expected!r}")
    return found


async def same_worker(backend: ExecutionBackend, worker_id: str | None) -> list[str]:
    """The worker that ran the failure serves the next execution (the pool has one)."""
    after = await backend.execute(req("pid"))
    if backend.name == "worker-pool" and after.worker_id != worker_id:
        return [f"worker {worker_id} was replaced by {after.worker_id}"]
    return []


@pytest.mark.parametrize("handler", ["raise_sync", "raise_async"])
async def test_every_failure_is_a_handler_error_and_the_worker_lives_on(
    backend: ExecutionBackend, handler: str
) -> None:
    worker_id = (await backend.execute(req("pid"))).worker_id
    found = []
    for case in CASES:
        if (case, backend.name, handler) == ("keyboard_interrupt", "in-process", "raise_async"):
            continue  # the caller's own, on purpose: see the test below
        with trio.fail_after(60):
            result = await backend.execute(req(handler, {"case": case}), raise_errors=False)
            found += problems_with(case, result.error)
            found += await same_worker(backend, worker_id)
    assert not found, "\n".join(found)


async def test_huge_messages_are_cut_in_the_middle(backend: ExecutionBackend) -> None:
    result = await backend.execute(req("raise_sync", {"case": "huge_message"}), raise_errors=False)
    assert result.error is not None
    message = result.error.message
    assert message.startswith("handler raised ValueError: xxx") and message.endswith("xxx")
    assert "characters cut]" in message and len(message) <= MAX_MESSAGE_CHARS + 100
    traceback = result.error.details["remote_traceback"]
    assert "Traceback (most recent call last)" in traceback
    assert "characters cut]" in traceback and len(traceback) <= MAX_TEXT_CHARS


async def test_a_traceback_that_cannot_be_formatted_still_lists_the_frames(
    backend: ExecutionBackend,
) -> None:
    result = await backend.execute(
        req("raise_sync", {"case": "sourceless_frame"}), raise_errors=False
    )
    assert result.error is not None and result.error.code == "HANDLER_ERROR"
    traceback = result.error.details["remote_traceback"]
    assert 'File "/nonexistent/sourceless.py", line 2, in fail' in traceback
    assert "the traceback module failed on this exception: RuntimeError" in traceback


async def test_an_execution_error_with_unsendable_details_keeps_its_code(
    backend: ExecutionBackend,
) -> None:
    result = await backend.execute(req("raise_sync", {"case": "bad_details"}), raise_errors=False)
    assert result.error is not None and result.error.code == "VALIDATION_ERROR"
    assert result.error.message == "details that cannot be sent"
    if backend.name != "in-process":  # across a process boundary: plain data, bounded
        details = result.error.details
        assert details["object"].startswith("<object object at")
        assert len(details["huge"]) <= MAX_TEXT_CHARS
        assert details["set"] == "{1, 2}" and details["3"] == "int key"
    await backend.execute(req("pid"))


async def test_an_import_that_raises_the_unrenderable_is_handler_not_found(
    backend: ExecutionBackend,
) -> None:
    result = await backend.execute(req("bad_import"), raise_errors=False)
    assert result.error is not None and result.error.code == "HANDLER_NOT_FOUND"
    assert "StrRaisesSystemExit: <StrRaisesSystemExit object" in result.error.message
    await backend.execute(req("pid"))


async def test_a_warmup_hook_that_raises_the_unrenderable_leaves_the_pool_serving(
    errors_registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    async with create_execution_backend(
        type="worker-pool",
        registry=errors_registry,
        workspace=workspaces,
        min_workers=1,
        max_workers=1,
        warmup="marked",
    ) as backend:
        with trio.fail_after(60):
            while "bad_warmup" not in str((await backend.health()).details["last_error"]):
                await trio.sleep(0.02)
        last_error = (await backend.health()).details["last_error"]
        assert "StrRaisesSystemExit object: str() and repr() failed" in last_error
        first = await backend.execute(req("bad_warmup"))
        assert first.output == "ran"
        assert (await backend.execute(req("pid"))).worker_id == first.worker_id


async def test_in_process_an_async_handlers_keyboard_interrupt_is_the_callers(
    errors_registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    # trio raises Ctrl-C's KeyboardInterrupt in whatever runs on the main thread, an async
    # handler included: the backend cannot tell it from the handler's own, so lets it go.
    async with create_execution_backend(
        type="in-process", registry=errors_registry, workspace=workspaces
    ) as backend:
        with pytest.raises(KeyboardInterrupt):
            await backend.execute(req("raise_async", {"case": "keyboard_interrupt"}))
        await backend.execute(req("pid"))
