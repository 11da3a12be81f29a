"""Streaming an execution: its events as they happen, then its result.

:class:`Execution` is what ``backend.open_execution(request)`` yields. :class:`ChannelSink`
is the event sink that feeds it from a handler, whichever thread the handler runs in.
:func:`open_stream` puts the two around one run of an execution.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from ._groups import unwrap_single
from .errors import AbortedError, ExecutionError
from .types import ExecutionEvent, ExecutionRequest, ExecutionResult

__all__ = [
    "ByteBudget",
    "ChannelSink",
    "Execution",
    "ExecutionEvents",
    "event_size",
    "open_stream",
]

_ITEM = 16  # bytes counted per value besides its characters or bytes


def event_size(data: Any) -> int:
    """About how many bytes ``data`` (an event's plain data) takes: the length of every
    ``str`` and ``bytes`` in it plus 16 per value. Linear in the number of values."""
    size = 0
    stack = [data]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is str or kind is bytes or kind is bytearray:
            size += len(value) + _ITEM
        elif kind is dict:
            size += _ITEM
            stack.extend(value)
            stack.extend(value.values())
        elif kind is list or kind is tuple:
            size += _ITEM
            stack.extend(value)
        else:
            size += _ITEM
    return size


class ByteBudget:
    """Bytes shared by several buffers: the events held for every stream of a backend."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a byte budget must be >= 1")
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


class ChannelSink:
    """Delivers a handler's events into a trio memory channel, bounded in count and bytes.

    At most ``buffer`` events (the channel's size) and ``max_bytes`` bytes of them (see
    :func:`event_size`) wait unread, and all the streams sharing ``total`` hold at most its
    limit. ``aemit`` waits for room in the buffer (backpressure); past ``total``, or for an
    event larger than ``max_bytes``, it drops instead. ``emit`` never blocks the event loop:
    from trio code it drops the event when there is no room (counted in ``dropped``); from a
    worker thread (a sync handler) it waits, which slows only that thread. Events from a
    worker process (``deliver_nowait``) are dropped when there is no room: the host never
    stops reading a worker's socket for a slow consumer.
    """

    def __init__(
        self,
        execution_id: str,
        send: trio.MemorySendChannel[tuple[ExecutionEvent, int]],
        *,
        max_bytes: int = 16 * 1024 * 1024,
        total: ByteBudget | None = None,
    ) -> None:
        self._execution_id = execution_id
        self._send = send
        self._token = trio.lowlevel.current_trio_token()
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self._total = total
        self._room = trio.lowlevel.ParkingLot()
        self.dropped = 0

    def _event(self, kind: str, data: Any) -> ExecutionEvent:
        return ExecutionEvent(
            execution_id=self._execution_id, kind=kind, data=data, timestamp=time.time()
        )

    def _reserve(self, size: int) -> bool:
        if self.queued_bytes + size > self.max_bytes:
            return False
        if self._total is not None and not self._total.take(size):
            return False
        self.queued_bytes += size
        return True

    def consumed(self, size: int) -> None:
        """An event of ``size`` bytes left the buffer (read, or discarded at the end)."""
        self.queued_bytes -= size
        if self._total is not None:
            self._total.give(size)
        self._room.unpark_all()

    def _put_nowait(self, event: ExecutionEvent) -> None:
        size = event_size(event.data) + len(event.kind)
        if not self._reserve(size):
            self.dropped += 1
            return
        try:
            self._send.send_nowait((event, size))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.consumed(size)
            self.dropped += 1

    async def _put(self, event: ExecutionEvent) -> None:
        size = event_size(event.data) + len(event.kind)
        while not self._reserve(size):
            if size > self.max_bytes or self.queued_bytes == 0:
                self.dropped += 1  # would never fit, or the total is what is short
                return
            await self._room.park()
        try:
            await self._send.send((event, size))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.consumed(size)
            self.dropped += 1
        except BaseException:
            self.consumed(size)
            raise

    def emit(self, kind: str, data: Any) -> None:
        event = self._event(kind, data)
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # a worker thread: wait for room
            try:
                trio.from_thread.run(self._put, event, trio_token=self._token)
            except (trio.RunFinishedError, trio.Cancelled):
                self.dropped += 1
            return
        self._put_nowait(event)

    def deliver_nowait(self, event: ExecutionEvent) -> None:
        """Forward an event that already exists (from a worker process); drop when full."""
        self._put_nowait(event)

    async def aemit(self, kind: str, data: Any) -> None:
        await self._put(self._event(kind, data))


class ExecutionEvents:
    """The events of a streamed execution: ``async for event in execution.events``.

    Iteration ends when the execution does. :meth:`receive` waits for the next event (a
    checkpoint) and raises ``trio.EndOfChannel`` after the last.
    """

    def __init__(
        self, receive: trio.MemoryReceiveChannel[tuple[ExecutionEvent, int]], sink: ChannelSink
    ) -> None:
        self._receive = receive
        self._sink = sink

    async def receive(self) -> ExecutionEvent:
        try:
            event, size = await self._receive.receive()
        except trio.ClosedResourceError:
            raise trio.EndOfChannel from None
        self._sink.consumed(size)
        return event

    def __aiter__(self) -> ExecutionEvents:
        return self

    async def __anext__(self) -> ExecutionEvent:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Discard the unread events (their bytes are given back); later reads end."""
        while True:
            try:
                _, size = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            self._sink.consumed(size)
        self._receive.close()


class Execution:
    """A running execution, as seen by the caller who opened it.

    ``async for event in execution.events`` yields events until the execution ends;
    ``await execution.result()`` waits for the outcome. Leaving the ``open_execution`` block
    before the execution ends cancels it.
    """

    def __init__(self, execution_id: str, events: ExecutionEvents):
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


@asynccontextmanager
async def open_stream(
    request: ExecutionRequest,
    run: Callable[[ChannelSink], Awaitable[ExecutionResult]],
    *,
    buffer: int,
    buffer_bytes: int,
    total: ByteBudget,
) -> AsyncIterator[Execution]:
    """Run ``run(sink)`` in a task of its own and yield the :class:`Execution` it feeds.

    ``run`` executes ``request`` with its events going to ``sink`` (at most ``buffer`` events
    and ``buffer_bytes`` bytes unread, within ``total``) and returns its result, failures
    included. Leaving the block cancels it if it is still running: its caller's
    :meth:`Execution.result` then raises :class:`AbortedError`. Events still unread on the
    way out are discarded and their bytes given back.
    """
    send, receive = trio.open_memory_channel[tuple[ExecutionEvent, int]](buffer)
    sink = ChannelSink(request.execution_id, send, max_bytes=buffer_bytes, total=total)
    execution = Execution(request.execution_id, ExecutionEvents(receive, sink))

    async def run_it() -> None:
        async with send:
            try:
                result = await run(sink)
            except trio.Cancelled:
                execution._fail(_aborted(request))
                raise
            if sink.dropped:
                result = attrs.evolve(
                    result, metadata={**result.metadata, "events_dropped": sink.dropped}
                )
            execution._finish(result, None)

    try:
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_it)
                try:
                    yield execution
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        execution.events.close()  # what was not read gives its bytes back


def _aborted(request: ExecutionRequest) -> ExecutionError:
    return AbortedError(
        "the execution was cancelled by its caller",
        execution_id=request.execution_id,
        plugin_id=request.plugin_id,
        handler_id=request.handler_id,
    )
