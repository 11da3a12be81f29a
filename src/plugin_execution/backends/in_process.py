"""InProcessBackend: handlers awaited in the host's own trio loop.

The lowest-latency backend, for development and trusted plugins. Async handlers run in the
caller's task under a cancel scope; sync handlers run in a trio worker thread so they never
block the loop.

A thread cannot be killed: when a sync handler times out or is cancelled (or is still running
when a shutdown's drain ends), the caller gets its error at once, ``ctx.cancelled`` becomes
true, and the thread is left to finish. Leaving the backend block waits up to ``thread_grace``
seconds for such threads. Use a process backend for code that must really be stopped.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..context import ExecutionContext
from ..errors import (
    ExecutionError,
    ExecutionTimeoutError,
    HandlerContractError,
    WorkspaceError,
    handler_error,
)
from ..handlers import Handler, load_handler
from ..types import ExecutionResult, check_serializable
from ..workspace import WorkspaceLease, WorkspaceManager
from .base import ExecutionBackend, Job

if TYPE_CHECKING:
    from ..channels.channel import Channel

__all__ = ["InProcessBackend"]


def _the_callers(exc: BaseException) -> bool:
    """``exc`` ends the caller's task, not the handler: a cancellation, or Ctrl-C (trio
    raises ``KeyboardInterrupt`` in whatever code runs on the main thread, an async
    handler's included, so one from an async handler cannot be told from the user's); or
    a group of nothing else (a handler's nursery)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split((trio.Cancelled, KeyboardInterrupt))[1] is None
    return isinstance(exc, trio.Cancelled | KeyboardInterrupt)


class _LazyWorkspace:
    """The context's workspace provider: leases a directory only when a handler asks for one.

    Most handlers never touch their workspace; they then cost no lease and no syscall. A sync
    handler's thread may outlive its execution (timeouts abandon threads), so asking after
    :meth:`close` raises :class:`WorkspaceError` instead of leasing a directory nobody frees.
    """

    __slots__ = ("_closed", "_execution_id", "_lease", "_lock", "_manager")

    def __init__(self, manager: WorkspaceManager, execution_id: str) -> None:
        self._manager = manager
        self._execution_id = execution_id
        self._lease: WorkspaceLease | None = None
        self._closed = False
        self._lock = threading.Lock()

    def __call__(self) -> Path:
        with self._lock:
            if self._lease is None:
                if self._closed:
                    raise WorkspaceError(
                        f"execution {self._execution_id!r} has ended; its workspace is gone",
                        execution_id=self._execution_id,
                    )
                self._lease = self._manager.reserve(self._execution_id)
        return self._lease.ensure()

    async def close(self) -> None:
        """Remove the directory if one was leased. Not cancellable (see WorkspaceLease.release)."""
        with self._lock:
            self._closed = True
            lease = self._lease
        if lease is not None:
            await lease.release()


async def _run_session(handler: Handler, ctx: ExecutionContext, channel: Channel) -> None:
    """A session-style channel handler gets the host's channel itself: no copy, no hop."""
    if not handler.is_async:
        raise session_contract_error(handler.entry)
    await handler.call(ctx, channel)


def session_contract_error(entry: str) -> HandlerContractError:
    return HandlerContractError(
        f"channel entry {entry!r} is not an async function: a session-style channel handler "
        "is 'async def handler(ctx, channel)'",
        details={"entry": entry},
    )


def _abandoned(job: Job) -> ExecutionTimeoutError:
    """The timeout of a sync handler, which was not stopped: its thread runs on."""
    return ExecutionTimeoutError(
        f"execution exceeded its {job.timeout:g} s timeout; its sync handler could not be "
        "stopped (a thread cannot be killed): the thread was abandoned and runs on until the "
        "handler returns, its result discarded (ctx.cancelled is now true; a process backend "
        "kills such a handler)",
        details={"timeout_s": job.timeout, "abandoned": True},
    )


class InProcessBackend(ExecutionBackend):
    """Runs handlers in this process and this trio loop.

    Options: ``thread_grace`` [5 s]: how long leaving the block waits for abandoned sync
    handler threads; ``shutdown_timeout`` [10 s]: how long in-flight executions get to
    finish when the block is left (then async handlers are cancelled, threads abandoned).
    """

    name = "in-process"

    def __init__(self, *, thread_grace: float = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handlers: dict[tuple[str, str | None], Handler] = {}
        self._thread_grace = thread_grace
        self._threads_running = 0
        self._threads_idle = trio.Event()
        self._threads_idle.set()

    @property
    def thread_grace(self) -> float:
        """How long leaving the block waits for abandoned sync-handler threads, in seconds."""
        return self._thread_grace

    def _handler(self, job: Job) -> Handler:
        key = (job.target.entry, job.target.root)
        handler = self._handlers.get(key)
        if handler is None:
            handler = self._handlers[key] = load_handler(*key)
        return handler

    async def _run(self, job: Job) -> ExecutionResult:
        request = job.request
        check_serializable(request.input, "input")  # as a process backend would require
        handler = self._handler(job)
        workspace = _LazyWorkspace(self.workspaces, request.execution_id)
        ctx = ExecutionContext(
            execution_id=request.execution_id,
            plugin_id=request.plugin_id,
            handler_id=request.handler_id,
            context=request.context,
            sink=job.sink,
            workspace=workspace,
            platform=job.session,  # services are called directly, in this loop
            blocking=not handler.is_async,
        )
        job.session.set_workspace_provider(workspace)
        if not handler.is_async:
            job.session.bind_loop()  # the handler's thread calls back into this loop
        try:
            with trio.CancelScope(deadline=job.deadline) as scope:
                self._abort_scopes.add(scope)  # the shutdown's deadline cancels it too
                try:
                    if job.channel is not None:
                        await _run_session(handler, ctx, job.channel)
                        output = None
                    elif handler.is_async:
                        output = await handler.call(ctx, request.input)
                    else:
                        output = await self._run_in_thread(handler, ctx, request.input)
                except ExecutionError:
                    raise
                except BaseException as exc:
                    if _the_callers(exc):
                        raise
                    # SystemExit, GeneratorExit, a BaseException of its own: the handler's
                    # failure, never the host's exit.
                    raise handler_error(exc) from None
                finally:
                    ctx.cancel()
                    self._abort_scopes.discard(scope)
            if scope.cancelled_caught:
                raise job.timeout_error() if handler.is_async else _abandoned(job)
        finally:
            await workspace.close()
        output = handler.plain_output(output)
        check_serializable(output, "the handler's output")
        return ExecutionResult(
            execution_id=request.execution_id,
            ok=True,
            output=output,
            duration_s=time.perf_counter() - job.started,
            backend=self.name,
            metadata={"workspace_id": request.execution_id if ctx.workspace_used else None},
        )

    async def _run_in_thread(self, handler: Handler, ctx: ExecutionContext, input: Any) -> Any:
        """Run a sync handler in a thread; on cancellation, abandon it and count it."""
        if self._threads_running == 0:
            self._threads_idle = trio.Event()
        self._threads_running += 1
        token = trio.lowlevel.current_trio_token()

        def run() -> Any:
            try:
                return handler.call(ctx, input)
            except ExecutionError:
                raise
            except BaseException as exc:
                # Even KeyboardInterrupt: a signal never reaches this thread, so it is the
                # handler's own. Rendered here, where it was raised.
                raise handler_error(exc) from None
            finally:
                # Fire and forget: the count matters only to _stop, which runs in the loop.
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(self._thread_done)

        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)

    def _thread_done(self) -> None:
        self._threads_running -= 1
        if self._threads_running == 0:
            self._threads_idle.set()

    async def _stopped(self, *, drain: bool, timeout: float | None) -> None:
        """Wait for abandoned sync-handler threads (a thread cannot be stopped, only waited
        for): up to ``thread_grace`` seconds, or ``timeout`` if shorter; not at all without
        ``drain``. Async handlers were cancelled by then (see ``shutdown``)."""
        grace = self._thread_grace if timeout is None else min(timeout, self._thread_grace)
        with trio.move_on_after(grace if drain else 0):
            await self._threads_idle.wait()

    def _health_details(self) -> dict[str, Any]:
        return {"threads_running": self._threads_running}

    def _stats_details(self) -> dict[str, Any]:
        return {"threads_running": self._threads_running}
