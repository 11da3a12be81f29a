"""Streaming an execution: its events as they happen, then its result.

:class:`Execution` is what ``backend.open_execution(request)`` yields. :class:`ChannelSink`
is the event sink that feeds it from a handler, whichever thread the handler runs in.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from .errors import ExecutionError
from .types import ExecutionEvent, ExecutionResult

__all__ = ["ChannelSink", "Execution"]


class ChannelSink:
    """Delivers a handler's events into a trio memory channel.

    ``aemit`` waits for buffer space (backpressure). ``emit`` never blocks the event loop:
    from trio code it drops the event when the buffer is full (counted in ``dropped``);
    from a worker thread (a sync handler) it waits, which slows only that thread.
    """

    def __init__(self, execution_id: str, send: trio.MemorySendChannel[ExecutionEvent]) -> None:
        self._execution_id = execution_id
        self._send = send
        self._token = trio.lowlevel.current_trio_token()
        self.dropped = 0

    def _event(self, kind: str, data: Any) -> ExecutionEvent:
        return ExecutionEvent(
            execution_id=self._execution_id, kind=kind, data=data, timestamp=time.time()
        )

    def emit(self, kind: str, data: Any) -> None:
        event = self._event(kind, data)
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # a worker thread: wait for room
            try:
                trio.from_thread.run(self._send.send, event, trio_token=self._token)
            except (
                trio.RunFinishedError,
                trio.Cancelled,
                trio.ClosedResourceError,
                trio.BrokenResourceError,
            ):
                self.dropped += 1
            return
        try:
            self._send.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.dropped += 1

    def deliver_nowait(self, event: ExecutionEvent) -> None:
        """Forward an event that already exists (from a worker process); drop when full."""
        try:
            self._send.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.dropped += 1

    async def aemit(self, kind: str, data: Any) -> None:
        try:
            await self._send.send(self._event(kind, data))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.dropped += 1


class Execution:
    """A running execution, as seen by the caller who opened it.

    ``async for event in execution.events`` yields events until the execution ends;
    ``await execution.result()`` waits for the outcome. Leaving the ``open_execution`` block
    before the execution ends cancels it.
    """

    def __init__(self, execution_id: str, events: trio.MemoryReceiveChannel[ExecutionEvent]):
        self.execution_id = execution_id
        self.events = events
        self._done = trio.Event()
        self._result: ExecutionResult | None = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def result(self, *, raise_errors: bool = True) -> ExecutionResult:
        """Wait for the execution to end.

        Returns the result; on failure raises its :class:`ExecutionError` (or, with
        ``raise_errors=False``, returns a result with ``ok=False``). A checkpoint; cancelling
        the wait does not cancel the execution (leaving the block does).
        """
        await self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        if raise_errors and self._result.error is not None:
            raise self._result.error
        return self._result

    def _finish(self, result: ExecutionResult | None, error: BaseException | None) -> None:
        self._result, self._error = result, error
        self._done.set()

    def _fail(self, error: ExecutionError) -> None:
        self._finish(None, error)
