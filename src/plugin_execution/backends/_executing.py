"""Running one request on a backend, and recording how it ended.

Every way of running something (``execute``, ``run_channel``, ``open_execution``, ``map``,
``ctx.invoke``) comes to :meth:`Executor.execute`: the request is admitted as a job
(:func:`.job.admit`), counted in flight while the backend's ``_run`` places and runs it, and
its ending recorded in the stats and told to the observers (``add_observer``). A failure is
shaped into the caller's :class:`ExecutionError` (an unexpected exception becomes
``UNKNOWN_ERROR`` with its traceback; work stopped by the shutdown's abort becomes
``BACKEND_CLOSED``), raised or returned as an ``ok=False`` result. A span surrounds it all
when the host uses OpenTelemetry (:mod:`plugin_execution.tracing`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import trio

from .. import tracing
from ..context import NULL_SINK
from ..errors import BackendClosedError, ExecutionError, format_traceback, safe_text
from ..types import ExecutionRequest, ExecutionResult
from ._shutdown import InFlight
from .job import Job, SessionMaker, admit

if TYPE_CHECKING:
    from ..channels.channel import Channel
    from ..context import EventSink
    from ..registry import PluginRegistry, ResolvedHandler
    from ..stats import StatsRecorder

__all__ = ["ExecutionObserver", "Executor", "JobRunner"]

log = logging.getLogger("plugin_execution")

#: ``observer(plugin_id, handler_id, outcome, duration_s)``: see ``add_observer``.
ExecutionObserver = Callable[[str, str, str, float], None]


class JobRunner(SessionMaker, Protocol):
    """What the executor needs of its backend (an ``ExecutionBackend``)."""

    registry: PluginRegistry

    @property
    def running(self) -> bool: ...

    def _check_running(self) -> None: ...

    async def _run(self, job: Job) -> ExecutionResult: ...


class Executor:
    """Runs requests on ``backend`` (called ``name``) and records their endings in
    ``stats``; ``in_flight`` is what the backend's shutdown waits for."""

    def __init__(
        self,
        backend: JobRunner,
        name: str,
        stats: StatsRecorder,
        in_flight: InFlight,
    ) -> None:
        self._backend = backend
        self._name = name
        self._stats = stats
        self._in_flight = in_flight
        self._observers: list[ExecutionObserver] = []

    def add_observer(self, observer: ExecutionObserver) -> Callable[[], None]:
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    async def execute(
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
        """Run ``request``; see the module's docstring."""
        if not tracing.enabled():
            return await self._execute(
                request, timeout, sink, raise_errors, target, channel, chain, parent
            )
        with tracing.span(
            f"execute {request.plugin_id}/{request.handler_id}",
            {
                "plugin_id": request.plugin_id,
                "handler_id": request.handler_id,
                "execution_id": request.execution_id,
                "backend": self._name,
            },
        ) as span:
            result = await self._execute(
                request, timeout, sink, raise_errors, target, channel, chain, parent
            )
            if span is not None:
                span.set("worker_id", result.worker_id)
                if result.error is not None:
                    span.outcome(result.error.code, result.error.message)
            return result

    async def _execute(
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
        backend = self._backend
        in_flight = self._in_flight
        try:
            backend._check_running()
            job = admit(
                backend.registry, backend, request, timeout, sink, target, channel, chain, parent
            )
            in_flight.tasks[token] = trio.lowlevel.current_task()
            try:
                result = await backend._run(job)
            finally:
                job.close_session()
                in_flight.ended(token, closing=not backend.running)
        except ExecutionError as exc:
            error = exc
            if in_flight.aborted and not isinstance(exc, BackendClosedError):
                error = self._closed_error()
        except trio.Cancelled:
            stats.record_failure("ABORTED", time.perf_counter() - started)
            self._observe(request, "ABORTED", time.perf_counter() - started)
            raise
        except Exception as exc:
            error = self._internal_error(exc)
        else:
            stats.record_ok(result.duration_s)
            self._observe(request, "ok", result.duration_s)
            return result
        finally:
            stats.in_flight -= 1
        return self._failed(request, error, time.perf_counter() - started, raise_errors)

    async def execute_batch(
        self,
        requests: list[ExecutionRequest],
        timeout: float | None,
        run: Callable[[list[Job]], Awaitable[list[ExecutionResult | ExecutionError]]],
    ) -> list[ExecutionResult]:
        """Run ``requests`` together (``backend.map``'s batches): each admitted as
        :meth:`execute` admits one, ``run`` runs the jobs and says what came of each, and
        each ending is recorded and observed as one execution's. Returns a result per
        request, in order (a failure is ``ok=False``); cancelled, every member counts as
        ``ABORTED`` (its caller got nothing)."""
        backend = self._backend
        registry = backend.registry
        results: list[ExecutionResult | None] = [None] * len(requests)
        jobs: list[Job] = []
        places: list[int] = []
        now, started = trio.current_time(), time.perf_counter()  # all admitted at once
        for index, request in enumerate(requests):
            try:
                backend._check_running()
                jobs.append(
                    admit(registry, backend, request, timeout, NULL_SINK, now=now, started=started)
                )
            except ExecutionError as exc:
                results[index] = self._failed(request, exc, 0.0, False)
                continue
            places.append(index)
        if jobs:
            for index, outcome in zip(places, await self._run_batch(jobs, run), strict=True):
                results[index] = outcome
        return [result for result in results if result is not None]

    async def _run_batch(
        self,
        jobs: list[Job],
        run: Callable[[list[Job]], Awaitable[list[ExecutionResult | ExecutionError]]],
    ) -> list[ExecutionResult]:
        stats = self._stats
        backend = self._backend
        stats.in_flight += len(jobs)
        token = object()
        self._in_flight.tasks[token] = trio.lowlevel.current_task()
        try:
            outcomes = await run(jobs)
        except trio.Cancelled:
            for job in jobs:
                duration = time.perf_counter() - job.started
                stats.record_failure("ABORTED", duration)
                self._observe(job.request, "ABORTED", duration)
            raise
        except Exception as exc:
            outcomes = [self._internal_error(exc)] * len(jobs)
        finally:
            for job in jobs:
                job.close_session()
            self._in_flight.ended(token, closing=not backend.running)
            stats.in_flight -= len(jobs)
        results = []
        observers = self._observers
        for job, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, ExecutionResult):
                stats.record_ok(outcome.duration_s)
                if observers:
                    self._observe(job.request, "ok", outcome.duration_s)
                results.append(outcome)
                continue
            error = outcome
            if self._in_flight.aborted and not isinstance(outcome, BackendClosedError):
                error = self._closed_error()
            duration = time.perf_counter() - job.started
            results.append(self._failed(job.request, error, duration, False))
        return results

    def _internal_error(self, exc: Exception) -> ExecutionError:
        return ExecutionError(
            f"internal error in the {self._name} backend: {type(exc).__name__}: {safe_text(exc)}",
            details={"traceback": format_traceback(exc)},
        )

    def _closed_error(self) -> BackendClosedError:
        """Work stopped by the shutdown's abort (a killed worker, a cancelled scope)."""
        return BackendClosedError(
            f"the {self._name} backend shut down before this execution finished; it was stopped"
        )

    def _failed(
        self, request: ExecutionRequest, error: ExecutionError, duration: float, raise_: bool
    ) -> ExecutionResult:
        """Record ``error`` as the outcome of ``request``; raise it, or return it as a result."""
        error.with_ids(
            execution_id=request.execution_id,
            plugin_id=request.plugin_id,
            handler_id=request.handler_id,
        )
        outcome = self._stats.record_failure(error.code, duration, error.message)
        self._observe(request, outcome, duration)
        if raise_:
            raise error
        return ExecutionResult(
            execution_id=request.execution_id,
            ok=False,
            error=error,
            duration_s=duration,
            backend=self._name,
        )

    def _observe(self, request: ExecutionRequest, outcome: str, duration_s: float) -> None:
        for observer in self._observers:
            try:
                observer(request.plugin_id, request.handler_id, outcome, duration_s)
            except Exception:
                log.exception("an execution observer failed")
