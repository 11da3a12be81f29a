"""InProcessBackend: handlers awaited in the host's own trio loop.

The lowest-latency backend, for development and trusted plugins. Async handlers run in the
caller's task under a cancel scope; sync handlers run in a trio worker thread so they never
block the loop.

A thread cannot be killed: when a sync handler times out or is cancelled, the caller gets
its error at once, ``ctx.cancelled`` becomes true, and the thread is left to finish. Leaving
the backend block waits up to ``thread_grace`` seconds for such threads. Use a process backend
for code that must really be stopped.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import msgpack
import trio

from ..context import ExecutionContext
from ..errors import ExecutionError, HandlerError, InvalidRequestError
from ..handlers import Handler, load_handler
from ..types import ExecutionResult
from .base import ExecutionBackend, Job

__all__ = ["InProcessBackend"]


def _check_serializable(value: Any, what: str) -> None:
    try:
        msgpack.packb(value, use_bin_type=True)
    except Exception as exc:
        raise InvalidRequestError(
            f"{what} is not serializable (plain data only: dict, list, str, bytes, int, "
            f"float, bool, None): {type(exc).__name__}: {exc}"
        ) from None


def handler_error(exc: BaseException) -> HandlerError:
    """Wrap what a handler raised, keeping its type name and traceback text."""
    kind = type(exc)
    return HandlerError(
        f"handler raised {kind.__name__}: {exc}",
        details={
            "remote_type": f"{kind.__module__}.{kind.__qualname__}",
            "remote_traceback": "".join(traceback.format_exception(exc)),
        },
    )


class InProcessBackend(ExecutionBackend):
    """Runs handlers in this process and this trio loop."""

    name = "in-process"

    def __init__(self, *, thread_grace: float = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handlers: dict[tuple[str, str | None], Handler] = {}
        self._thread_grace = thread_grace
        self._threads_running = 0
        self._threads_idle = trio.Event()
        self._threads_idle.set()

    def _handler(self, job: Job) -> Handler:
        key = (job.target.entry, job.target.root)
        handler = self._handlers.get(key)
        if handler is None:
            handler = self._handlers[key] = load_handler(*key)
        return handler

    async def _run(self, job: Job) -> ExecutionResult:
        request = job.request
        handler = self._handler(job)
        _check_serializable(request.input, "input")
        lease = self.workspaces.reserve(request.execution_id)
        ctx = ExecutionContext(
            execution_id=request.execution_id,
            plugin_id=request.plugin_id,
            handler_id=request.handler_id,
            context=request.context,
            sink=job.sink,
            workspace=lease.ensure,
        )
        try:
            with trio.CancelScope(deadline=job.deadline) as scope:
                try:
                    if handler.is_async:
                        output = await handler.call(ctx, request.input)
                    else:
                        output = await self._run_in_thread(handler, ctx, request.input)
                except ExecutionError:
                    raise
                except Exception as exc:
                    raise handler_error(exc) from None
                finally:
                    ctx.cancel()
            if scope.cancelled_caught:
                raise job.timeout_error()
        finally:
            with trio.CancelScope(shield=True):
                await lease.release()
        output = handler.plain_output(output)
        _check_serializable(output, "the handler's output")
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
            finally:
                try:
                    trio.from_thread.run_sync(self._thread_done, trio_token=token)
                except trio.RunFinishedError:
                    pass

        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)

    def _thread_done(self) -> None:
        self._threads_running -= 1
        if self._threads_running == 0:
            self._threads_idle.set()

    async def _stop(self) -> None:
        with trio.move_on_after(self._thread_grace):
            await self._threads_idle.wait()

    def _health_details(self) -> dict[str, Any]:
        return {"threads_running": self._threads_running}

    def _stats_details(self) -> dict[str, Any]:
        return {"threads_running": self._threads_running}
