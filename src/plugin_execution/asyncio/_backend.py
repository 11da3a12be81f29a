"""The asyncio face of an execution backend: the same methods, awaited from asyncio.

Each object here wraps its trio counterpart and forwards every awaitable call through the
loop's guest run (:mod:`._guest`); results and ``ExecutionError`` subclasses come back as the
trio API gives them. Cancelling the asyncio task that awaits cancels the trio side exactly as
a trio cancel scope would, and the ``CancelledError`` is raised only once the trio side has
finished (the execution stopped, counted ``ABORTED``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import plugin_execution as _trio_api
from plugin_execution import BackendClosedError, ExecutionRequest, HealthStatus

from . import _guest

if TYPE_CHECKING:
    from plugin_execution import (
        ExecutionBackend,
        ExecutionEvent,
        ExecutionResult,
        ExecutionStats,
        PluginRegistry,
        WorkspaceManager,
    )

__all__ = [
    "AsyncioBackend",
    "Execution",
    "ExecutionEvents",
    "MapResults",
    "create_execution_backend",
]

_MiB = 1024 * 1024


def create_execution_backend(
    *,
    type: str = "auto",
    registry: PluginRegistry,
    platform: Any = None,
    workspace: WorkspaceManager | str | Path | None = None,
    **backend_options: Any,
) -> AsyncioBackend:
    """Make a backend for an asyncio program: ``async with create_execution_backend(...) as b``.

    The same options as :func:`plugin_execution.create_execution_backend` (and the same
    :class:`~plugin_execution.InvalidRequestError` for a bad one). Entering it starts trio as
    a guest on the running asyncio loop, shared by every backend of that loop, and starts
    the backend there; leaving it shuts the backend down, and the last backend of the loop
    to leave ends the guest run: nothing of it outlives the block.
    """
    return AsyncioBackend(
        _trio_api.create_execution_backend(
            type=type, registry=registry, platform=platform, workspace=workspace, **backend_options
        )
    )


class AsyncioBackend:
    """An :class:`~plugin_execution.ExecutionBackend` used from asyncio. See
    :func:`create_execution_backend`.

    ``backend`` is the trio backend it runs (for what takes one, such as
    :class:`~plugin_execution.asyncio.ASGIChannels`); its own methods must be called from
    trio code, not from asyncio.
    """

    def __init__(self, backend: ExecutionBackend) -> None:
        self.backend = backend
        self._run: _guest.GuestRun | None = None
        self._held: _guest.Held[ExecutionBackend] | None = None

    @property
    def name(self) -> str:
        """The backend type's name: ``in-process``, ``worker-pool`` or ``subprocess``."""
        return self.backend.name

    @property
    def running(self) -> bool:
        """True inside the ``async with`` block, until the backend begins shutting down."""
        return self._run is not None and self.backend.running

    async def __aenter__(self) -> Self:
        if self._held is not None:
            raise BackendClosedError(
                f"{self.backend.name} backend was already started; make a new one"
            )
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "this backend runs on asyncio, and no asyncio loop is running here: from "
                "trio, use plugin_execution.create_execution_backend"
            ) from None
        run = await _guest.acquire()
        try:
            self._held = await run.enter(self.backend)
        except BaseException:
            await _guest.release(run)
            raise
        self._run = run
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        run, held = self._run, self._held
        if run is None or held is None:
            return
        self._run = None
        try:
            await held.exit(cancellable=False)  # the shutdown runs to its end, as in trio
        finally:
            await _guest.release(run)

    def _guest_run(self) -> _guest.GuestRun:
        run = self._run
        if run is None:
            why = "is closed" if self._held is not None else "has not been started"
            raise BackendClosedError(
                f"the {self.backend.name} backend {why}: use it inside "
                "'async with backend:' on the asyncio loop"
            )
        return run

    # -- executing --------------------------------------------------------------------------

    async def execute(
        self,
        request: ExecutionRequest,
        *,
        timeout: float | None = None,
        raise_errors: bool = True,
    ) -> ExecutionResult:
        """Run ``request`` and return its result, as
        :meth:`ExecutionBackend.execute <plugin_execution.ExecutionBackend.execute>` does.

        On failure raises the :class:`~plugin_execution.ExecutionError` subclass (or with
        ``raise_errors=False`` returns ``ok=False``). Cancelling the awaiting task (``task.
        cancel()``, ``asyncio.wait_for``, ``asyncio.timeout``, a client disconnect in a web
        framework) cancels the execution wherever it runs (a worker process is killed; the
        stats count it ``ABORTED``) and raises ``CancelledError`` once it has stopped.
        """
        run = self._guest_run()
        execute = self.backend.execute
        return await run.run(partial(execute, request, timeout=timeout, raise_errors=raise_errors))

    def open_execution(
        self,
        request: ExecutionRequest,
        *,
        timeout: float | None = None,
        buffer: int = 1024,
        buffer_bytes: int = 16 * _MiB,
    ) -> AbstractAsyncContextManager[Execution]:
        """Start ``request`` and stream it: ``async with backend.open_execution(r) as ex:``,
        then ``async for event in ex.events`` and ``await ex.result()``.

        As :meth:`ExecutionBackend.open_execution
        <plugin_execution.ExecutionBackend.open_execution>`: leaving the block before the
        execution ended (an exception, a ``break``, a cancelled task) cancels it, and the
        block is left once it has stopped.
        """
        return self._open_execution(
            request, timeout=timeout, buffer=buffer, buffer_bytes=buffer_bytes
        )

    @asynccontextmanager
    async def _open_execution(
        self, request: ExecutionRequest, **options: Any
    ) -> AsyncIterator[Execution]:
        run = self._guest_run()
        held = await run.enter(self.backend.open_execution(request, **options))
        try:
            yield Execution(run, held.value)
        finally:
            await held.exit()

    def map(
        self,
        requests: Any,
        *,
        concurrency: int = 64,
        ordered: bool = False,
        timeout: float | None = None,
    ) -> AbstractAsyncContextManager[MapResults]:
        """Run many requests: ``async with backend.map(requests) as results:`` then
        ``async for result in results``, as :meth:`ExecutionBackend.map
        <plugin_execution.ExecutionBackend.map>` does.

        ``requests`` is an iterable, or an asyncio async iterable (an async generator, say),
        pulled lazily from the asyncio side. Leaving the block early cancels what is in
        flight.
        """
        return self._map(requests, concurrency=concurrency, ordered=ordered, timeout=timeout)

    @asynccontextmanager
    async def _map(self, requests: Any, **options: Any) -> AsyncIterator[MapResults]:
        run = self._guest_run()
        if isinstance(requests, AsyncIterable):
            requests = _AsyncioSource(run, requests)
        held = await run.enter(self.backend.map(requests, **options))
        try:
            yield MapResults(run, held.value)
        finally:
            await held.exit()

    # -- observing and stopping -------------------------------------------------------------

    def stats(self) -> ExecutionStats:
        """Counters since start and latency percentiles over recent executions."""
        return self.backend.stats()

    async def health(self) -> HealthStatus:
        """Whether the backend can take work, with details."""
        if self._run is None:
            return HealthStatus(
                healthy=False,
                backend=self.backend.name,
                status="unhealthy",
                details={"state": "closed" if self._held is not None else "new"},
            )
        return await self._run.run(self.backend.health)

    async def shutdown(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work, then finish or stop what is in flight, as
        :meth:`ExecutionBackend.shutdown <plugin_execution.ExecutionBackend.shutdown>`.
        Idempotent. Not cancellable: a cancelled caller still waits for it to end."""
        run = self._run
        if run is None:
            return
        call = run.start_call(partial(self.backend.shutdown, drain=drain, timeout=timeout))
        await _guest.wait_uncancelled(call.future)
        call.future.result()


class ExecutionEvents:
    """The events of a streamed execution: ``async for event in execution.events``.

    Iteration ends when the execution does; each step is a cancellable wait (cancelling it
    loses no event).
    """

    def __init__(self, run: _guest.GuestRun, events: AsyncIterator[ExecutionEvent]) -> None:
        self._run = run
        self._events = events

    def __aiter__(self) -> ExecutionEvents:
        return self

    async def __anext__(self) -> ExecutionEvent:
        return await self._run.run(self._events.__anext__)


class Execution:
    """A running execution opened from asyncio: ``events`` and ``await result()``, as
    :class:`plugin_execution.Execution`."""

    def __init__(self, run: _guest.GuestRun, execution: _trio_api.Execution) -> None:
        self._run = run
        self._execution = execution
        self.execution_id = execution.execution_id
        self.events = ExecutionEvents(run, execution.events)

    @property
    def done(self) -> bool:
        return self._execution.done

    async def result(self, *, raise_errors: bool = True) -> ExecutionResult:
        """Wait for the execution to end; returns its result or raises its error (or, with
        ``raise_errors=False``, returns ``ok=False``). Cancelling the wait does not cancel
        the execution (leaving the block does)."""
        return await self._run.run(partial(self._execution.result, raise_errors=raise_errors))


class MapResults:
    """The results of a ``map`` opened from asyncio: ``async for result in results``."""

    def __init__(self, run: _guest.GuestRun, results: _trio_api.MapResults) -> None:
        self._run = run
        self._results = results

    def __aiter__(self) -> MapResults:
        return self

    async def __anext__(self) -> ExecutionResult:
        return await self._run.run(self._results.__anext__)


class _AsyncioSource:
    """An asyncio async iterable of requests, as trio's ``map`` pulls it: each step runs as
    an asyncio task (the iterable may await asyncio things)."""

    def __init__(self, run: _guest.GuestRun, requests: AsyncIterable[ExecutionRequest]) -> None:
        self._run = run
        self._iterator = aiter(requests)

    def __aiter__(self) -> _AsyncioSource:
        return self

    async def __anext__(self) -> ExecutionRequest:
        return await self._run.call_asyncio(_next(self._iterator))


def _next(iterator: AsyncIterator[ExecutionRequest]) -> Coroutine[Any, Any, ExecutionRequest]:
    async def step() -> ExecutionRequest:
        return await anext(iterator)

    return step()
