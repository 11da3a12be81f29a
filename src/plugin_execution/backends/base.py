"""ExecutionBackend: the one interface every backend implements.

The base class owns what every backend shares: the lifecycle (an async context manager with a
supervisor nursery), request resolution, the effective timeout, result/error shaping,
``raise_errors``, stats, and the streaming form. A backend implements :meth:`_run` (place and
run one job) and, if it owns resources, :meth:`_start` / :meth:`_stop`.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Self

import attrs
import trio

from .. import tracing
from .._groups import unwrap_single
from ..context import NULL_SINK
from ..errors import (
    BackendClosedError,
    ExecutionError,
    ExecutionTimeoutError,
    format_traceback,
    safe_text,
)
from ..platform import Platform, PlatformSession
from ..registry import PluginRegistry, ResolvedHandler
from ..run_many import MapResults, Requests, run_many
from ..stats import StatsRecorder
from ..streaming import ByteBudget, ChannelSink, Execution, ExecutionEvents
from ..types import (
    DEFAULT_TIMEOUT_S,
    ExecutionEvent,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStats,
    HealthStatus,
    check_timeout,
)
from ..workspace import WorkspaceManager

if TYPE_CHECKING:
    from ..channels.channel import Channel
    from ..context import EventSink


class Attachment(Protocol):
    """Something that lives as long as the backend runs, such as a WebSocket connection
    served by it: :meth:`ExecutionBackend.shutdown` asks it to end, then waits for it to
    :meth:`~ExecutionBackend.detach`."""

    def backend_closing(self) -> None: ...


__all__ = ["Attachment", "ExecutionBackend", "Job"]

_State = Literal["new", "running", "closing", "closed"]

log = logging.getLogger("plugin_execution")

#: ``observer(plugin_id, handler_id, outcome, duration_s)``: see ``add_observer``.
ExecutionObserver = Callable[[str, str, str, float], None]
_MiB = 1024 * 1024


@attrs.define(slots=True, eq=False)
class Job:
    """One execution as a backend sees it: the request, resolved, with its limits."""

    request: ExecutionRequest
    target: ResolvedHandler
    timeout: float
    deadline: float  # trio clock
    sink: EventSink
    started: float  # time.perf_counter()
    #: The channel of a session-style channel handler (``handler(ctx, channel)``), else None.
    channel: Channel | None = None
    #: The backend running it, and the executions that led to it through ``ctx.invoke``.
    backend: ExecutionBackend | None = None
    chain: tuple[tuple[str, str], ...] = ()
    #: The execution whose ``ctx.invoke`` started this one (None: the caller's own).
    parent: Job | None = None
    #: The capacity the job holds while it runs (a backend's slot or worker), once placed;
    #: nested invocations may borrow it (see :meth:`lent_slot`).
    slot: Any = None
    _session: PlatformSession | None = None
    _lent: trio.Lock | None = None

    def lent_slot(self) -> trio.Lock:
        """Held by the nested invocation running on this job's :attr:`slot`: the job waits
        for it while invoking, so its capacity is lent to one of its invocations at a time
        (an invocation that finds free capacity of its own needs no loan)."""
        if self._lent is None:
            self._lent = trio.Lock()
        return self._lent

    @property
    def session(self) -> PlatformSession:
        """The execution's standing with the platform (permissions, workspace): what its
        ``ctx`` services are checked against, on the host. Made on first use: a handler
        that calls no service costs none."""
        session = self._session
        if session is None:
            assert self.backend is not None, "a job made by a backend has one"
            session = self._session = self.backend._session(self)
        return session

    @property
    def session_unused(self) -> bool:
        """No platform service was called for this execution (no session was made)."""
        return self._session is None

    def close_session(self) -> None:
        if self._session is not None:
            self._session.close()

    def timeout_error(self, what: str = "") -> ExecutionTimeoutError:
        return ExecutionTimeoutError(
            f"execution exceeded its {self.timeout:g} s timeout{what} and was stopped",
            details={"timeout_s": self.timeout},
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
        self._observers: list[ExecutionObserver] = []
        self._started_at = 0.0
        self._attached: set[Attachment] = set()
        self._detached = trio.Event()
        #: How long shutdown waits for attachments (connections) to close.
        self.attachment_grace = 5.0
        #: How long leaving the block lets in-flight executions finish (see :meth:`shutdown`).
        self.shutdown_timeout = shutdown_timeout
        # Every execution in flight (a token of its own) and the task it runs in. No cancel
        # scope per execution: one costs a pool call 10-20% of its throughput. At the
        # shutdown deadline each backend stops its own work (_abort_in_flight: processes
        # killed), and the scopes backends registered in _abort_scopes (the in-process
        # deadline scope) are cancelled.
        self._executions: dict[object, trio.lowlevel.Task] = {}
        self._abort_scopes: set[trio.CancelScope] = set()
        self._aborted = False
        self._executions_done = trio.Event()
        self._shut_down = trio.Event()

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise BackendClosedError(f"{self.name} backend was already started; make a new one")
        self._state = "running"
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
                await self._close_attachments()
                deadline = trio.current_time() + (limit if drain else 0.0)
                await self._stop(drain=drain, timeout=timeout)
                with trio.move_on_at(deadline):
                    await self._no_executions()
                if self._executions:
                    self._aborted = True
                    self._abort_in_flight()
                    for scope in self._abort_scopes:
                        scope.cancel()
                    await self._no_executions()
                await self._stopped(drain=drain, timeout=timeout)
            finally:
                self._shut_down.set()

    async def _no_executions(self) -> None:
        """Wait until no execution is in flight (each one's caller has its outcome), but
        for those of this very task: a handler that shuts its own backend down (in-process)
        must not wait for itself."""
        me = trio.lowlevel.current_task()
        while any(task is not me for task in self._executions.values()):
            self._executions_done = trio.Event()
            await self._executions_done.wait()

    def attach(self, attachment: Attachment) -> None:
        """Tie ``attachment`` to this running backend (raises BackendClosedError if it is
        not running). Shutdown calls its ``backend_closing()`` and waits (at most
        :attr:`attachment_grace` seconds) until it is :meth:`detach`-ed."""
        self._check_running()
        self._attached.add(attachment)

    def detach(self, attachment: Attachment) -> None:
        """Undo :meth:`attach`; idempotent."""
        self._attached.discard(attachment)
        if not self._attached:
            self._detached.set()

    async def _close_attachments(self) -> None:
        if not self._attached:
            return
        self._detached = trio.Event()
        for attachment in list(self._attached):
            attachment.backend_closing()
        with trio.move_on_after(self.attachment_grace):
            await self._detached.wait()

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

    def _job(
        self,
        request: ExecutionRequest,
        timeout: float | None,
        sink: EventSink,
        target: ResolvedHandler | None = None,
        channel: Channel | None = None,
        chain: tuple[tuple[str, str], ...] = (),
        parent: Job | None = None,
    ) -> Job:
        if target is None:
            target = self.registry.resolve(request.plugin_id, request.handler_id)
        if timeout is not None:
            check_timeout(None, None, timeout)
        limit = timeout if timeout is not None else request.timeout
        if limit is None:
            limit = getattr(target.spec, "timeout", None) or DEFAULT_TIMEOUT_S
        quota = target.permissions.quotas.timeout
        if quota is not None and quota < limit:
            limit = quota
        deadline = trio.current_time() + limit
        return Job(
            request,
            target,
            limit,
            deadline,
            sink,
            time.perf_counter(),
            channel,
            self,
            chain,
            parent,
        )

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
        wherever it runs, then raises :class:`trio.Cancelled` as usual.
        """
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
        """Every way of running something comes here: with a span around it when the host
        uses OpenTelemetry (:mod:`plugin_execution.tracing`)."""
        if not tracing.enabled():
            return await self._execute_untraced(
                request, timeout, sink, raise_errors, target, channel, chain, parent
            )
        with tracing.span(
            f"execute {request.plugin_id}/{request.handler_id}",
            {
                "plugin_id": request.plugin_id,
                "handler_id": request.handler_id,
                "execution_id": request.execution_id,
                "backend": self.name,
            },
        ) as span:
            result = await self._execute_untraced(
                request, timeout, sink, raise_errors, target, channel, chain, parent
            )
            if span is not None:
                span.set("worker_id", result.worker_id)
                if result.error is not None:
                    span.outcome(result.error.code, result.error.message)
            return result

    async def _execute_untraced(
        self,
        request: ExecutionRequest,
        timeout: float | None,
        sink: EventSink,
        raise_errors: bool,
        target: ResolvedHandler | None,
        channel: Channel | None,
        chain: tuple[tuple[str, str], ...],
        parent: Job | None,
    ) -> ExecutionResult:
        started = time.perf_counter()
        stats = self._stats
        stats.in_flight += 1
        token = object()
        try:
            self._check_running()
            job = self._job(request, timeout, sink, target, channel, chain, parent)
            executions = self._executions
            executions[token] = trio.lowlevel.current_task()
            try:
                result = await self._run(job)
            finally:
                job.close_session()
                del executions[token]
                if self._state != "running":
                    self._executions_done.set()  # shutdown is waiting for them
        except ExecutionError as exc:
            error = exc
            if self._aborted and not isinstance(exc, BackendClosedError):
                # Stopped by the shutdown's abort (a killed worker, a cancelled scope).
                error = BackendClosedError(
                    f"the {self.name} backend shut down before this execution finished; "
                    "it was stopped"
                )
        except trio.Cancelled:
            stats.record_failure("ABORTED", time.perf_counter() - started)
            self._observe(request, "ABORTED", time.perf_counter() - started)
            raise
        except Exception as exc:
            error = ExecutionError(
                f"internal error in the {self.name} backend: {type(exc).__name__}: "
                f"{safe_text(exc)}",
                details={"traceback": format_traceback(exc)},
            )
        else:
            stats.record_ok(result.duration_s)
            self._observe(request, "ok", result.duration_s)
            return result
        finally:
            stats.in_flight -= 1
        duration = time.perf_counter() - started
        error.with_ids(
            execution_id=request.execution_id,
            plugin_id=request.plugin_id,
            handler_id=request.handler_id,
        )
        stats.record_failure(error.code, duration, error.message)
        self._observe(request, error.code, duration)
        if raise_errors:
            raise error
        return ExecutionResult(
            execution_id=request.execution_id,
            ok=False,
            error=error,
            duration_s=duration,
            backend=self.name,
        )

    def _session(self, job: Job) -> PlatformSession:
        """The job's platform session: its permissions as resolved here, on the host."""
        request = job.request
        host = self.workspaces.host_dir
        return PlatformSession(
            self.platform,
            execution_id=request.execution_id,
            plugin_id=request.plugin_id,
            handler_id=request.handler_id,
            permissions=job.target.permissions,
            root=job.target.root,
            workspace=f"{host}/{request.execution_id}" if host is not None else None,
            deadline=job.deadline,
            context=request.context,
            backend=self,
            chain=job.chain,
            job=job,
            on_denied=self._stats.record_permission_denial,
        )

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
        return run_many(self, requests, concurrency=concurrency, ordered=ordered, timeout=timeout)

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
        self._check_running()
        send, receive = trio.open_memory_channel[tuple[ExecutionEvent, int]](buffer)
        sink = ChannelSink(
            request.execution_id, send, max_bytes=buffer_bytes, total=self.event_bytes
        )
        execution = Execution(request.execution_id, ExecutionEvents(receive, sink))

        async def run() -> None:
            async with send:
                try:
                    result = await self._execute(
                        request, timeout, sink, raise_errors=False, target=target
                    )
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
                    nursery.start_soon(run)
                    try:
                        yield execution
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            execution.events.close()  # what was not read gives its bytes back

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
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    def _observe(self, request: ExecutionRequest, outcome: str, duration_s: float) -> None:
        for observer in self._observers:
            try:
                observer(request.plugin_id, request.handler_id, outcome, duration_s)
            except Exception:
                log.exception("an execution observer failed")

    async def health(self) -> HealthStatus:
        """Whether the backend can take work, with details. A checkpoint."""
        await trio.lowlevel.checkpoint()
        details = {
            "state": self._state,
            "uptime_s": time.monotonic() - self._started_at if self._started_at else 0.0,
            "in_flight": self._stats.in_flight,
            "last_error": self._stats.last_error,
            **self._health_details(),
        }
        healthy = self._state == "running"
        return HealthStatus(
            healthy=healthy,
            backend=self.name,
            status="healthy" if healthy else "unhealthy",
            details=details,
        )

    def _health_details(self) -> dict[str, Any]:
        return {}


def _aborted(request: ExecutionRequest) -> ExecutionError:
    from ..errors import AbortedError

    return AbortedError(
        "the execution was cancelled by its caller",
        execution_id=request.execution_id,
        plugin_id=request.plugin_id,
        handler_id=request.handler_id,
    )
