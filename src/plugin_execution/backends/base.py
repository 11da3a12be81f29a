"""ExecutionBackend: the one interface every backend implements.

The base class owns what every backend shares: the lifecycle (an async context manager with a
supervisor nursery), request resolution, the effective timeout, result/error shaping,
``raise_errors``, stats, and the streaming form. A backend implements :meth:`_run` (place and
run one job) and, if it owns resources, :meth:`_start` / :meth:`_stop`.

The parts live beside it, each one concept: :mod:`.job` (a request admitted as a job),
:mod:`._executing` (running one: in-flight bookkeeping, outcomes, stats, observers, tracing),
:mod:`._shutdown` (what shutdown waits for: executions in flight, attachments) and
:func:`plugin_execution.streaming.open_stream` (the streaming form).
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import trio

from .._groups import unwrap_all_of
from ..context import NULL_SINK
from ..errors import BackendClosedError, ExecutionError, InvalidRequestError
from ..platform import Platform, PlatformSession
from ..registry import PluginRegistry, ResolvedHandler
from ..run_many import Batches, MapResults, Requests, run_many
from ..stats import StatsRecorder
from ..streaming import ByteBudget, Execution, open_stream
from ..types import ExecutionRequest, ExecutionResult, ExecutionStats, HealthStatus
from ..workspace import WorkspaceManager
from ._executing import ExecutionObserver, Executor
from ._shutdown import Attachment, Attachments, InFlight, stop_in_order
from .job import Job

if TYPE_CHECKING:
    from ..channels.channel import Channel
    from ..context import EventSink

__all__ = ["Attachment", "ExecutionBackend", "Job"]

_State = Literal["new", "running", "closing", "closed"]

_MiB = 1024 * 1024


def _check_trio() -> None:
    """Raise a clear RuntimeError when entered outside trio (from asyncio, most likely)."""
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        raise RuntimeError(
            "this backend runs on trio, and no trio run is active here: from asyncio "
            "(FastAPI, aiohttp...), use plugin_execution.asyncio.create_execution_backend "
            "(docs/asyncio.md)"
        ) from None


def _check_request(request: object) -> None:
    """Raise a clear InvalidRequestError unless ``request`` is an ExecutionRequest."""
    if not isinstance(request, ExecutionRequest):
        raise InvalidRequestError(
            f"expected an ExecutionRequest, got a {type(request).__name__}: build one with "
            "ExecutionRequest(plugin_id=..., handler_id=..., input=...)"
        )


class ExecutionBackend(abc.ABC):
    """Runs plugin handlers. Use as ``async with backend: ...``.

    Entering starts the backend's background tasks in its own nursery; leaving stops them,
    and guarantees that no worker, thread, process, fd or workspace outlives the block.
    """

    name: ClassVar[str]

    def __init__(
        self,
        *,
        registry: PluginRegistry,
        platform: Platform | None = None,
        workspace: WorkspaceManager | None = None,
        max_event_bytes: int = 256 * _MiB,
        shutdown_timeout: float = 10.0,
    ) -> None:
        self.registry = registry
        #: Bytes of unread events all the backend's ``open_execution`` streams hold at most.
        self.event_bytes = ByteBudget(max_event_bytes)
        #: The services behind ``ctx`` (a default :class:`Platform` when none is given).
        self.platform = platform if platform is not None else Platform()
        self.workspaces = workspace if workspace is not None else WorkspaceManager()
        self._state: _State = "new"
        self._stack = AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self._stats = StatsRecorder(self.name)
        self._started_at = 0.0
        self._attachments = Attachments()
        #: How long shutdown waits for attachments (connections) to close.
        self.attachment_grace = 5.0
        #: How long leaving the block lets in-flight executions finish (see :meth:`shutdown`).
        self.shutdown_timeout = shutdown_timeout
        self._in_flight = InFlight()
        #: Cancel scopes a backend registers to be cancelled at the shutdown deadline.
        self._abort_scopes = self._in_flight.abort_scopes
        self._executor = Executor(self, self.name, self._stats, self._in_flight)
        self._batches: Batches | None = None  # how map runs batches here (None: one at a time)
        self._shut_down = trio.Event()

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start it. A failed start-up raises its ``ExecutionError`` (a pool's workers dying
        at start: ``WorkerCrashedError``), not a group of them (see ``unwrap_all_of``)."""
        if self._state != "new":
            raise BackendClosedError(f"{self.name} backend was already started; make a new one")
        _check_trio()
        self._state = "running"
        with unwrap_all_of(ExecutionError):
            try:
                await self._stack.enter_async_context(self.platform)
                await self._stack.enter_async_context(self.workspaces)
                await self._open(self._stack)
                self._nursery = await self._stack.enter_async_context(trio.open_nursery())
                await self._start(self._nursery)
            except BaseException:
                self._state = "closed"
                await self._stack.aclose()
                raise
        self._started_at = time.monotonic()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.shutdown()
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()
        finally:
            try:
                # Not __aexit__(*exc_info): a nursery would wrap the caller's own exception
                # in an ExceptionGroup. The caller's exception propagates unchanged.
                await self._stack.aclose()
            finally:
                self._state = "closed"

    async def shutdown(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work, then finish or stop what is in flight. Idempotent.

        One contract on every backend. From the first call on, ``execute`` raises
        :class:`BackendClosedError` and queued executions fail with it. With ``drain``,
        in-flight executions get up to ``timeout`` seconds (default
        :attr:`shutdown_timeout`) to finish; without, none. What is still running then is
        stopped the way the backend stops work (worker processes killed, async handlers
        cancelled, sync handler threads abandoned) and its caller gets
        :class:`BackendClosedError`, wherever that caller runs (a nursery outside the
        backend's block included). Returns only once every execution has its outcome:
        nothing completes after it, and workspaces outlive what used them. A second call
        waits for the first. Not cancellable: it runs shielded. Leaving the ``async with``
        block calls it with the defaults.
        """
        if self._state != "running":
            if self._state == "closing":
                with trio.CancelScope(shield=True):
                    await self._shut_down.wait()
            return
        self._state = "closing"
        limit = self.shutdown_timeout if timeout is None else timeout
        with trio.CancelScope(shield=True):
            try:
                await self._attachments.close(self.attachment_grace)
                await stop_in_order(
                    self, self._in_flight, drain=drain, limit=limit, timeout=timeout
                )
            finally:
                self._shut_down.set()

    def attach(self, attachment: Attachment) -> None:
        """Tie ``attachment`` to this running backend (raises BackendClosedError if it is
        not running). Shutdown calls its ``backend_closing()`` and waits (at most
        :attr:`attachment_grace` seconds) until it is :meth:`detach`-ed."""
        self._check_running()
        self._attachments.add(attachment)

    def detach(self, attachment: Attachment) -> None:
        """Undo :meth:`attach`; idempotent."""
        self._attachments.discard(attachment)

    async def _open(self, stack: AsyncExitStack) -> None:  # noqa: B027
        """Enter into ``stack`` what must outlive the background tasks: leaving the block
        cancels those first (the nursery of :meth:`_start`), then closes these in reverse
        order, each its own orderly way (a supervisor stopping its children, say)."""

    async def _start(self, nursery: trio.Nursery) -> None:  # noqa: B027
        """Start background tasks (workers, reapers) in ``nursery``."""

    async def _stop(self, *, drain: bool, timeout: float | None) -> None:  # noqa: B027
        """First step of :meth:`shutdown` (shielded): fail what is queued; a backend may
        drain and stop its own work here (within ``timeout``). What is still in flight
        afterwards is drained until the shutdown deadline, then aborted by the base."""

    def _abort_in_flight(self) -> None:  # noqa: B027
        """At the shutdown deadline, with executions still in flight: stop their work at
        once (kill their processes, failing them with BackendClosedError). The scopes in
        ``_abort_scopes`` are cancelled right after; whatever error an execution then ends
        with, its caller gets BackendClosedError."""

    async def _stopped(self, *, drain: bool, timeout: float | None) -> None:  # noqa: B027
        """Last step of :meth:`shutdown` (shielded), once every execution has ended."""

    @property
    def running(self) -> bool:
        return self._state == "running"

    def _check_running(self) -> None:
        if self._state != "running":
            why = {
                "new": "has not been started: use it inside 'async with backend:'",
                "closing": "is shutting down",
                "closed": "is closed",
            }[self._state]
            raise BackendClosedError(f"the {self.name} backend {why}")

    # -- executing ------------------------------------------------------------------------

    @abc.abstractmethod
    async def _run(self, job: Job) -> ExecutionResult:
        """Run one job to completion; raise an ExecutionError on failure.

        Must stop the work and raise ``job.timeout_error()`` once ``job.deadline`` passes,
        and stop the work when cancelled by the caller.
        """

    async def execute(
        self,
        request: ExecutionRequest,
        *,
        timeout: float | None = None,
        raise_errors: bool = True,
    ) -> ExecutionResult:
        """Run ``request`` and return its result.

        ``timeout`` (seconds) overrides the request's. On failure raises an
        :class:`ExecutionError` subclass, or with ``raise_errors=False`` returns a result
        with ``ok=False`` and ``error`` set. Cancelling the call cancels the execution
        wherever it runs, then raises :class:`trio.Cancelled` as usual. Something else than
        an :class:`ExecutionRequest` raises :class:`InvalidRequestError` either way.
        """
        if type(request) is not ExecutionRequest:
            _check_request(request)
        return await self._execute(request, timeout, NULL_SINK, raise_errors)

    async def run_channel(
        self,
        request: ExecutionRequest,
        target: ResolvedHandler,
        channel: Channel,
        *,
        timeout: float | None = None,
    ) -> ExecutionResult:
        """Run a session-style channel handler, ``target``'s ``handler(ctx, channel)``.

        ``target`` names the channel's entry (it need not be a handler of the registry);
        ``request`` carries the ids and the context (its input is ignored). The handler
        talks to the client through ``channel`` wherever it runs: in-process it gets
        ``channel`` itself, in a worker process a proxy whose messages are bridged over the
        worker protocol. Returns when the handler returns (``ok=True``); its failure is
        returned as ``ok=False`` with ``error`` set, never raised. ``timeout`` (``math.inf``
        for none) limits the whole session. Cancelling the call cancels the handler wherever
        it runs, then raises ``trio.Cancelled``. Used by ``mount_websocket_channels``.
        """
        return await self._execute(
            request, timeout, NULL_SINK, False, target=target, channel=channel
        )

    async def _execute(
        self,
        request: ExecutionRequest,
        timeout: float | None,
        sink: EventSink,
        raise_errors: bool,
        *,
        target: ResolvedHandler | None = None,
        channel: Channel | None = None,
        chain: tuple[tuple[str, str], ...] = (),
        parent: Job | None = None,
    ) -> ExecutionResult:
        """Every way of running something comes here (see :class:`._executing.Executor`)."""
        return await self._executor.execute(
            request, timeout, sink, raise_errors, target, channel, chain, parent
        )

    def _session(self, job: Job) -> PlatformSession:
        """The job's platform session: its permissions as resolved here, on the host."""
        return platform_session(self, job)

    async def _invoke(
        self,
        request: ExecutionRequest,
        *,
        timeout: float | None,
        chain: tuple[tuple[str, str], ...],
        parent: Job | None = None,
    ) -> ExecutionResult:
        """Run ``request`` for ``ctx.invoke``: like :meth:`execute`, remembering the chain of
        executions that led to it (for cycle and depth checks) and the invoking job
        (``parent``), whose capacity the invocation runs on when the backend has none free:
        an invocation never waits for capacity its own ancestors hold."""
        return await self._execute(request, timeout, NULL_SINK, True, chain=chain, parent=parent)

    def map(
        self,
        requests: Requests,
        *,
        concurrency: int = 64,
        ordered: bool = False,
        timeout: float | None = None,
    ) -> AbstractAsyncContextManager[MapResults]:
        """Run many requests: ``async with backend.map(requests) as results:`` then
        ``async for result in results``.

        ``requests`` is an iterable or an async iterable of :class:`ExecutionRequest`,
        consumed lazily: at most ``2 * concurrency`` requests are pulled and not yet consumed,
        so a source of millions costs no more memory than a few. ``concurrency`` executions
        run at once. Every request ends as one :class:`ExecutionResult` with its own
        ``execution_id``; a failure is ``ok=False`` with ``error`` set, never an exception.
        Results come as they finish, or in the order of ``requests`` with ``ordered=True``.
        ``timeout`` (seconds) overrides each request's own.

        Leaving the block before the end cancels the executions in flight and pulls nothing
        more from ``requests``; so does cancelling the task that iterates. An exception from
        ``requests`` itself (or an item that is not an ``ExecutionRequest``,
        :class:`InvalidRequestError`) propagates out of the block. Bad options raise
        :class:`InvalidRequestError` at entry.
        """
        return run_many(
            self,
            requests,
            concurrency=concurrency,
            ordered=ordered,
            timeout=timeout,
            batches=self._batches,
        )

    def open_execution(
        self,
        request: ExecutionRequest,
        *,
        timeout: float | None = None,
        buffer: int = 1024,
        buffer_bytes: int = 16 * _MiB,
    ) -> AbstractAsyncContextManager[Execution]:
        """Start ``request`` and stream it: ``async with backend.open_execution(r) as ex:``.

        ``ex.events`` yields the handler's events as they happen and ends with the
        execution; ``await ex.result()`` gives the outcome. Leaving the block before the
        execution ends cancels it; events still unread then are discarded. At most
        ``buffer`` events and ``buffer_bytes`` bytes of them wait unread (and all the
        backend's streams together hold at most ``max_event_bytes``): events wait for room
        when an in-process handler awaits ``ctx.emit``; other events past a bound are
        dropped, counted in the result's ``metadata["events_dropped"]``.
        """
        return self._open_execution(
            request, timeout=timeout, buffer=buffer, buffer_bytes=buffer_bytes
        )

    @asynccontextmanager
    async def _open_execution(
        self,
        request: ExecutionRequest,
        *,
        timeout: float | None = None,
        buffer: int = 1024,
        buffer_bytes: int = 16 * _MiB,
        target: ResolvedHandler | None = None,
    ) -> AsyncIterator[Execution]:
        """:meth:`open_execution` of a ``target`` given directly (not looked up in the
        registry), e.g. the events-style adapter of a WebSocket channel."""
        _check_request(request)
        self._check_running()

        def run(sink: EventSink) -> Awaitable[ExecutionResult]:
            return self._execute(request, timeout, sink, raise_errors=False, target=target)

        async with open_stream(
            request, run, buffer=buffer, buffer_bytes=buffer_bytes, total=self.event_bytes
        ) as execution:
            yield execution

    # -- observing ------------------------------------------------------------------------

    def stats(self) -> ExecutionStats:
        """Counters since start and latency percentiles over recent executions."""
        return self._stats.snapshot(**self._stats_details())

    def _stats_details(self) -> dict[str, Any]:
        return {}

    def add_observer(self, observer: ExecutionObserver) -> Callable[[], None]:
        """Call ``observer(plugin_id, handler_id, outcome, duration_s)`` as each execution
        ends (``outcome``: ``"ok"`` or the error code); returns a function that removes it.

        For per-plugin metrics (:mod:`plugin_execution.metrics`): called synchronously on
        the hot path, so it must be cheap; an exception it raises is logged and ignored.
        """
        return self._executor.add_observer(observer)

    async def health(self) -> HealthStatus:
        """Whether the backend can take work, with details. A checkpoint."""
        await trio.lowlevel.checkpoint()
        uptime = time.monotonic() - self._started_at if self._started_at else 0.0
        return self._stats.health(self._state, uptime, self._health_details())

    def _health_details(self) -> dict[str, Any]:
        return {}


def platform_session(backend: ExecutionBackend, job: Job) -> PlatformSession:
    """A job's platform session on ``backend``: what its ``ctx`` services are checked
    against (its permissions as resolved on the host, its workspace, its deadline)."""
    request = job.request
    workspace = job.workspace
    if workspace is None and backend.workspaces.host_dir is not None:
        workspace = f"{backend.workspaces.host_dir}/{request.execution_id}"
    return PlatformSession(
        backend.platform,
        execution_id=request.execution_id,
        plugin_id=request.plugin_id,
        handler_id=request.handler_id,
        permissions=job.target.permissions,
        root=job.target.root,
        workspace=workspace,
        deadline=job.deadline,
        context=request.context,
        backend=backend,
        chain=job.chain,
        job=job,
        on_denied=backend._stats.record_permission_denial,
    )
