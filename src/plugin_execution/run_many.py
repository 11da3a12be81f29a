"""Run many: ``backend.map(requests)``, the harness primitive.

A fixed number of caller tasks (``concurrency``) pull requests from the source one at a time,
so the source is consumed lazily and memory stays flat however long it is. On a backend that
runs batches (the worker pool: ``Batches``), fewer callers each pull several at a time and
run them as one batch, ``concurrency`` requests in flight in all. Every execution
ends as one :class:`ExecutionResult` (a failure is ``ok=False``, never an exception). Results
come as they finish, or in the order of the source with ``ordered=True``. A window of
permits bounds how far the callers may run ahead of the consumer: a result takes a permit
from the moment its request is pulled until the consumer has been given it, so at most
``window`` requests are pulled and not yet consumed, in either mode (in order, that bounds the
reorder buffer too). Leaving the block cancels what is in flight and pulls nothing more.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Protocol

import trio

from ._groups import unwrap_single
from .errors import InvalidRequestError
from .types import ExecutionRequest, ExecutionResult

__all__ = ["Batches", "Executor", "MapResults", "Requests", "run_many"]

Requests = Iterable[ExecutionRequest] | AsyncIterable[ExecutionRequest]


class Executor(Protocol):
    """What ``map`` needs of a backend (a protocol, so this module needs no backend)."""

    async def execute(
        self, request: ExecutionRequest, *, timeout: float | None = ..., raise_errors: bool = ...
    ) -> ExecutionResult: ...


class Batches(Protocol):
    """How a backend runs ``map``'s requests several at a time (the worker pool's
    ``PoolBatches``); a backend without one runs them one at a time."""

    def size(self, concurrency: int) -> int:
        """The most requests a caller takes at a time (1: no batches)."""
        ...

    def take(self, wanted: int) -> int:
        """How many of ``wanted`` the next batch takes."""
        ...

    async def execute(
        self, requests: list[ExecutionRequest], timeout: float | None
    ) -> list[ExecutionResult]:
        """A result per request, in order; a failure is ``ok=False``, never raised."""
        ...


class _Source:
    """The requests, pulled one at a time by any number of tasks, each numbered."""

    def __init__(self, requests: Requests) -> None:
        self._sync: Iterator[ExecutionRequest] | None = None
        self._async: AsyncIterator[ExecutionRequest] | None = None
        if isinstance(requests, AsyncIterable):
            self._async = aiter(requests)
        elif isinstance(requests, Iterable):
            self._sync = iter(requests)
        else:
            raise InvalidRequestError(
                f"map takes an iterable or an async iterable of ExecutionRequest, "
                f"not {type(requests).__name__}"
            )
        self._lock = trio.Lock()  # an async iterator must not be advanced concurrently
        self._count = 0
        self.exhausted = False

    async def take(self, count: int) -> list[tuple[int, ExecutionRequest]]:
        """Up to ``count`` requests, each with its index; fewer (or none) at the end. Not a
        checkpoint for an iterable (nothing awaited: no other task can advance it
        meanwhile, so it needs no lock); an async iterable is advanced under the lock."""
        if self._sync is not None:
            return self._pull(count)
        async with self._lock:
            return await self._pull_async(count)

    def _pull(self, count: int) -> list[tuple[int, ExecutionRequest]]:
        taken: list[tuple[int, ExecutionRequest]] = []
        source = self._sync
        assert source is not None
        while len(taken) < count and not self.exhausted:
            try:
                request = next(source)
            except StopIteration:
                self.exhausted = True
                break
            taken.append((self._counted(request), request))
        return taken

    async def _pull_async(self, count: int) -> list[tuple[int, ExecutionRequest]]:
        taken: list[tuple[int, ExecutionRequest]] = []
        source = self._async
        assert source is not None
        while len(taken) < count and not self.exhausted:
            try:
                request = await anext(source)
            except StopAsyncIteration:
                self.exhausted = True
                break
            taken.append((self._counted(request), request))
        return taken

    def _counted(self, request: object) -> int:
        """The index of ``request``, the next pulled; raises unless it is a request."""
        if type(request) is not ExecutionRequest and not isinstance(request, ExecutionRequest):
            raise InvalidRequestError(
                f"map's requests must be ExecutionRequest objects; item {self._count} "
                f"is a {type(request).__name__}"
            )
        index = self._count
        self._count += 1
        return index


class MapResults:
    """The results of a ``map``, as an async iterator (``async for result in results``)."""

    def __init__(
        self,
        receive: trio.MemoryReceiveChannel[list[tuple[int, ExecutionResult]]],
        window: trio.Semaphore,
        ordered: bool,
    ) -> None:
        self._receive = receive
        self._received: deque[tuple[int, ExecutionResult]] = deque()
        self._window = window
        self._ordered = ordered
        self._waiting: dict[int, ExecutionResult] = {}  # in order: those that came early
        self._next = 0

    def __aiter__(self) -> MapResults:
        return self

    async def __anext__(self) -> ExecutionResult:
        """The next result; waits for it. Ends when every request has been answered."""
        if self._ordered:
            while self._next not in self._waiting:
                index, result = await self._receive_one()
                self._waiting[index] = result
            result = self._waiting.pop(self._next)
            self._next += 1
        else:  # one of the batch received last, if any left, without a coroutine
            received = self._received
            _, result = received.popleft() if received else await self._receive_one()
        self._window.release()
        return result

    async def _receive_one(self) -> tuple[int, ExecutionResult]:
        # Results come a batch at a time; those of a batch need no trip through the scheduler.
        received = self._received
        if not received:
            try:
                received.extend(await self._receive.receive())
            except trio.EndOfChannel:
                raise StopAsyncIteration from None
        return received.popleft()


@asynccontextmanager
async def run_many(
    backend: Executor,
    requests: Requests,
    *,
    concurrency: int = 64,
    ordered: bool = False,
    timeout: float | None = None,
    batches: Batches | None = None,
) -> AsyncIterator[MapResults]:
    """See :meth:`ExecutionBackend.map <plugin_execution.ExecutionBackend.map>`. With
    ``batches``, each caller takes several requests at a time and runs them as a batch."""
    if type(concurrency) is not int or concurrency < 1:
        raise InvalidRequestError(f"concurrency must be a positive int, got {concurrency!r}")
    if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
        raise InvalidRequestError(f"timeout must be a positive number or None, got {timeout!r}")
    source = _Source(requests)
    # Ahead of the consumer: each caller's one in flight plus as many finished again, so
    # callers keep going while the consumer (or, in order, a slow head) catches up.
    window = trio.Semaphore(2 * concurrency)
    size = 1 if batches is None else batches.size(concurrency)
    send, receive = trio.open_memory_channel[list[tuple[int, ExecutionResult]]](math.inf)

    async def permits() -> int:
        """Permits of the window for the next pull: at least one (waited for), then as
        many more of the batch's as are free. Waits only when the window is full (a
        cancellation is noticed either way): a caller's loop has its schedule point in
        running what it pulled, and a run of requests that all fail at once stops at the
        window's bound."""
        try:
            window.acquire_nowait()
        except trio.WouldBlock:
            await window.acquire()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        wanted = 1 if batches is None or size == 1 else batches.take(size)
        taken = 1
        while taken < wanted:
            try:
                window.acquire_nowait()
            except trio.WouldBlock:
                break
            taken += 1
        return taken

    async def caller(results: trio.MemorySendChannel[list[tuple[int, ExecutionResult]]]) -> None:
        with results:  # sync close: no checkpoint that a cancellation could turn into Cancelled
            while True:
                count = await permits()
                pulled = await source.take(count)
                for _ in range(count - len(pulled)):
                    window.release()
                if not pulled:
                    return
                if batches is None or size == 1:
                    index, request = pulled[0]
                    result = await backend.execute(request, timeout=timeout, raise_errors=False)
                    results.send_nowait([(index, result)])
                    continue
                done = await batches.execute([request for _, request in pulled], timeout)
                results.send_nowait(
                    [(index, r) for (index, _), r in zip(pulled, done, strict=True)]
                )

    with unwrap_single():  # the body's own exception, or the source's, comes out bare
        # Channels close synchronously here: an async close is a checkpoint, and in the
        # cancelled nursery its Cancelled would replace (and so swallow) the body's exception.
        async with trio.open_nursery() as nursery:
            with receive:
                with send:  # the callers hold clones: the results end when the last one does
                    for _ in range(-(-concurrency // size)):
                        nursery.start_soon(caller, send.clone())
                try:
                    yield MapResults(receive, window, ordered)
                finally:
                    nursery.cancel_scope.cancel()
