"""WorkerPoolBackend: the pool's glue: options, lifecycle, and one execution's path.

An execution is admitted by the crash breaker, gets a workspace, takes a worker from the
:class:`~.queue.WaitQueue` (or borrows its invoking execution's), and runs on that worker's
handle; sessions (channels) run on the live worker with the fewest. The workers themselves
are kept by :class:`~.actors.WorkerActors`. See the package docstring for the behaviour.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, suppress
from functools import partial
from typing import Any, Literal

import attrs
import trio

from ...channels.bridge import run_session
from ...errors import (
    BackendClosedError,
    WorkerCrashedError,
)
from ...host.handle import WorkerHandle, WorkerLauncher
from ...host.launchers import ProcessLauncher, ThreadLauncher
from ...host.limits import WorkerLimits
from ...host.zygote import BASE_ENV, ZygoteKeeper
from ...sandbox.policy import check_layers
from ...supervisor import open_supervisor
from ...types import ExecutionResult, HealthStatus
from .._breaker import CrashBreaker
from .._quota_watch import execute_watched
from ..base import ExecutionBackend, Job
from .actors import WorkerActors
from .batches import PoolBatches
from .queue import Group, NotStarted, Waiter, WaitQueue, collect_handed
from .sandboxed import SandboxedPool
from .slots import Worker, end_unused_lease, on_lent_slot

__all__ = ["WorkerPoolBackend"]

#: How an execution runs on a worker slot (``lender``: a borrowed one).
RunOnWorker = Callable[[Job, Worker | None], Awaitable[ExecutionResult]]


class WorkerPoolBackend(ExecutionBackend):
    """Runs executions on a pool of warm, supervised workers. See the module docstring.

    Options (defaults in brackets): ``kind`` [``"process"``] or ``"thread"``;
    ``min_workers`` [2], ``max_workers`` [CPU count], ``idle_timeout`` [60 s];
    ``max_concurrency_per_worker`` [1], ``max_concurrent_per_plugin`` [unlimited];
    ``warmup`` [``"none"``] | ``"marked"`` | ``"top_n"`` with ``warmup_top_n`` [5] and
    ``max_warm_handlers`` [20]; ``max_queue`` [100], ``acquire_timeout`` [5 s];
    ``max_executions_per_worker`` [10000], ``max_worker_uptime`` [1800 s],
    ``max_worker_memory_mb`` [None]; ``health_check_interval`` [10 s],
    ``health_check_timeout`` [5 s]; ``cancel_grace`` [1 s]; ``shutdown_timeout`` [10 s];
    ``max_restarts`` [50] within ``restart_window`` [30 s] before the supervisor gives up
    (workers failing on their own only: not those killed by their work);
    ``crash_breaker_threshold`` [5] worker-killing executions in a row quarantine a plugin
    for ``crash_breaker_cooldown`` [30 s] (``PluginQuarantinedError``; 0 or None: off);
    ``memory_mb`` / ``open_files`` limits per worker (``open_files`` 1024 when sandboxed,
    else none, unless given); ``env``: extra environment variables
    for the workers (they get a minimal base environment, never the host's secrets);
    ``launcher``: a :class:`~plugin_execution.host.handle.WorkerLauncher` starting the
    workers instead (another kind of worker; ``kind``, ``env`` and the limits then do not
    apply). ``sandbox`` [False]: as the subprocess backend's (``True``, the layers required);
    on, each process worker serves one plugin, in its kernel sandbox (docs/sandbox.md).
    """

    name = "worker-pool"

    def __init__(
        self,
        *,
        kind: Literal["process", "thread"] = "process",
        min_workers: int = 2,
        max_workers: int | None = None,
        idle_timeout: float = 60.0,
        max_concurrency_per_worker: int = 1,
        max_concurrent_per_plugin: int | None = None,
        warmup: Literal["none", "marked", "top_n"] = "none",
        warmup_top_n: int = 5,
        max_warm_handlers: int = 20,
        max_queue: int = 100,
        acquire_timeout: float = 5.0,
        max_executions_per_worker: int = 10_000,
        max_worker_uptime: float = 1800.0,
        max_worker_memory_mb: float | None = None,
        health_check_interval: float = 10.0,
        health_check_timeout: float = 5.0,
        cancel_grace: float = 1.0,
        shutdown_timeout: float = 10.0,
        max_restarts: int = 50,
        restart_window: float = 30.0,
        crash_breaker_threshold: int | None = 5,
        crash_breaker_cooldown: float = 30.0,
        memory_mb: int | None = None,
        open_files: int | None = None,
        env: dict[str, str] | None = None,
        launcher: WorkerLauncher | None = None,
        sandbox: bool | Iterable[str] = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        max_workers = max_workers if max_workers is not None else (os.cpu_count() or 2)
        _check_options(
            kind, min_workers, max_workers, warmup, max_concurrency_per_worker, max_queue
        )
        sandbox = check_layers(sandbox)
        self._sandboxed = _check_sandbox(sandbox, kind, launcher)
        self.kind: str = kind if launcher is None else launcher.kind
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.idle_timeout = idle_timeout
        self.max_concurrency_per_worker = max_concurrency_per_worker
        self.max_concurrent_per_plugin = max_concurrent_per_plugin
        self.warmup_policy = warmup
        self.warmup_top_n = warmup_top_n
        self.max_warm_handlers = max_warm_handlers
        self.max_queue = max_queue
        self.acquire_timeout = acquire_timeout
        self.max_executions_per_worker = max_executions_per_worker
        self.max_worker_uptime = max_worker_uptime
        self.max_worker_memory_mb = max_worker_memory_mb
        self.health_check_interval = health_check_interval
        self.health_check_timeout = health_check_timeout
        self.cancel_grace = cancel_grace
        self.shutdown_timeout = shutdown_timeout
        self._max_restarts = max_restarts
        self._restart_window = restart_window
        self._breaker = CrashBreaker(crash_breaker_threshold, crash_breaker_cooldown)
        self._env = {name: os.environ[name] for name in BASE_ENV if name in os.environ}
        self._env.update(env or {})
        # What starts the workers: the pool knows them only as handles from here on.
        self._launcher: WorkerLauncher = launcher or ThreadLauncher()
        if launcher is None and kind == "process" and not self._sandboxed:
            self._launcher = ProcessLauncher(
                env=self._env,
                limits=WorkerLimits(address_space_mb=memory_mb, open_files=open_files),
                # ~2 ms a worker instead of ~20 ms for a fresh interpreter, which is what
                # recycling and growth cost the pool's throughput; while it is down,
                # workers are spawned.
                zygote=ZygoteKeeper(env=self._env, on_error=self._zygote_failed),
            )
        self._usage: Counter[tuple[str, str]] = Counter()
        if self._sandboxed:  # its own launcher, actors and queue: workers per plugin
            parts = self._sandboxed_pool = SandboxedPool(
                self, sandbox, memory_mb, open_files, env or {}
            )
            self._launcher = parts.launcher
            self._actors: WorkerActors = parts.actors
            self._queue: WaitQueue = parts.queue
            self._workers = self._actors.workers
            self._run_on_worker: RunOnWorker = parts.run_job
            return
        self._actors = WorkerActors(
            self,
            self._launcher,
            self._stats,
            self.registry,
            self._usage,
            dispatch=self._dispatch,
            running=self._is_running,
        )
        self._workers = self._actors.workers
        self._queue = WaitQueue(
            self, self._workers, self._stats, grow=self._actors.grow, running=self._is_running
        )
        self._batches = PoolBatches(self)
        self._run_on_worker = self._run_job

    async def _open(self, stack: AsyncExitStack) -> None:
        # Outside the backend's nursery, whose cancellation on exit would otherwise hit
        # them all at once: the supervisor stops the workers in order, then the launcher's
        # zygote (entered first, left last) goes, which would kill any child it still had.
        await stack.enter_async_context(self._actors.launcher_kept())
        self._actors.supervisor = await stack.enter_async_context(
            open_supervisor(
                strategy="one_for_one",
                max_restarts=self._max_restarts,
                within=self._restart_window,
            )
        )

    async def _start(self, nursery: trio.Nursery) -> None:
        self._actors.nursery = nursery
        if self._sandboxed:
            await self._sandboxed_pool.start()  # workers start with their plugin's first call
        async with trio.open_nursery() as starting:
            for _ in range(0 if self._sandboxed else self.min_workers):
                starting.start_soon(self._actors.add_worker, True)
        nursery.start_soon(self._actors.maintain)
        nursery.start_soon(self._queue.deadlines.run)

    async def _stop(self, *, drain: bool, timeout: float | None) -> None:
        """Fail the queue (BackendClosedError), let in-flight work finish within the
        timeout, then kill the workers still running something."""
        self._queue.close()  # with no worker: BackendClosedError
        limit = self.shutdown_timeout if timeout is None else timeout
        with trio.move_on_after(limit if drain else 0):
            await self._queue.drained()
        self._actors.kill_busy(
            BackendClosedError("the worker pool shut down before this execution finished")
        )

    def _zygote_failed(self, exc: WorkerCrashedError) -> None:
        self._stats.last_error = f"the pool's zygote failed: {exc.message}"

    def _is_running(self) -> bool:
        return self.running

    def _dispatch(self) -> None:
        self._queue.dispatch()

    async def _run(self, job: Job) -> ExecutionResult:
        if job.channel is not None:
            if self._sandboxed:
                return await self._sandboxed_pool.run_channel_session(job)
            return await self._run_session(job)
        # _run_job, or the sandboxed pool's run_job: called from here on either pool, so
        # that neither pays a coroutine more per call.
        run = self._run_on_worker
        lender = self._queue.lender_for(job)
        while lender is None:
            with suppress(NotStarted):  # handed over behind a member that lost the worker
                return await run(job, None)
        return await on_lent_slot(job, partial(run, job, lender))

    async def _run_job(self, job: Job, lender: Worker | None = None) -> ExecutionResult:
        await trio.lowlevel.checkpoint_if_cancelled()  # the answer may come without a wait
        request = job.request
        trial = self._breaker.admit(request.plugin_id)  # PluginQuarantinedError: refused
        try:
            lease = self.workspaces._reserve(request.execution_id)  # a duplicate id fails here
        except BaseException:
            self._breaker.record(request.plugin_id, None, trial=trial)
            raise
        workspace = os.fspath(lease)
        quotas = job.target.permissions.quotas
        watched = self.kind == "process" and bool(quotas.memory_mb or quotas.cpu_s)
        self._stats.queued = len(self._queue.waiters) + 1
        try:
            got = await self._queue.acquire(job, None if watched else workspace, lender)
        except BaseException:
            lease.release_unused()  # nothing was made
            self._breaker.record(request.plugin_id, None, trial=trial)
            raise
        group = None
        if isinstance(got, Waiter):
            worker, proc, pending, group = got.worker, got.proc, got.pending, got.group
            assert worker is not None
        else:
            worker, proc, pending = got, None, None
        job.slot = worker  # what its own invocations may borrow
        self._stats.queued = len(self._queue.waiters)
        self._usage[(request.plugin_id, request.handler_id)] += 1
        result = None
        try:
            worker.executions += 1
            if pending is not None and proc is not None:  # submitted at the hand-over
                result = await collect_handed(proc, pending, group, self.name)
                return result
            proc = worker.proc
            if proc is None:
                raise WorkerCrashedError(f"worker {worker.name} stopped before it could run")
            if watched:
                result = await execute_watched(
                    proc,
                    job,
                    quotas,
                    backend=self.name,
                    workspace=workspace,
                    cancel_grace=self.cancel_grace,
                )
            else:
                pending = self._queue.submit(proc, job, workspace)
                result = await proc.collect(pending, backend=self.name)
            return result
        finally:
            # A member with a result started (the worker answers in order): no need to look
            # at the group's other members.
            self._settle(worker, proc, request.plugin_id, result, trial, group, pending)
            self._queue.give_back(worker, request.plugin_id, group)
            if not end_unused_lease(lease, job, result):
                await lease.release()  # not cancellable; see WorkspaceLease.release

    def _settle(
        self,
        worker: Worker,
        proc: WorkerHandle | None,
        plugin_id: str,
        result: ExecutionResult | None,
        trial: bool,
        group: Group | None = None,
        pending: Any = None,
    ) -> None:
        """Tell the crash breaker whether this execution killed its worker; retire a worker
        that said it is exiting (no execution may follow on it). ``group``: the group it was
        handed over in (``pending``: its member), where it may never have started."""
        if result is not None:
            killed: bool | None = False
        elif group is not None and group.unstarted(pending):
            killed = None  # behind a member that lost the worker: it never ran
        elif proc is None or not self.running or proc.exit_cause in ("orphaned", "outside"):
            killed = None  # it never ran, the pool is closing, or not the plugin's doing
        else:
            killed = not proc.alive
            if proc.exiting and worker.proc is proc:
                worker.drain("crashed")
        self._breaker.record(plugin_id, killed, trial=trial)

    async def _run_session(self, job: Job) -> ExecutionResult:
        """A channel session runs on the live worker with the fewest sessions, alongside
        its executions: a session mostly waits for messages, so it takes no execution slot
        (connection limits are the mount's). A worker retires only once its sessions end."""
        worker = await self._actors.session_worker(job)
        worker.sessions += 1
        lease = self.workspaces.reserve(job.request.execution_id)
        try:
            assert worker.proc is not None
            return await run_session(
                worker.proc,
                job,
                backend=self.name,
                workspace=os.fspath(lease),
                cancel_grace=self.cancel_grace,
            )
        finally:
            worker.sessions -= 1
            if not worker.running and not worker.sessions:
                worker.idle.set()
            await lease.release()  # not cancellable; see WorkspaceLease.release

    def _stats_details(self) -> dict[str, Any]:
        return {
            "workers": self._actors.states(),
            "workers_peak": self._actors.peak,
            "max_workers": self.max_workers,
            "crash_breaker": self._breaker.details(),
            "restarts": self._actors.supervisor.restart_count if self._actors.supervisor else 0,
            "workers_killed": self._actors.killed,
            "queue_depth": len(self._queue.waiters),
            "max_queue": self.max_queue,
        }

    def _health_details(self) -> dict[str, Any]:
        states = self._actors.states()
        return {
            "kind": self.kind,
            "workers_total": sum(states.values()),
            "workers_idle": states["idle"],
            "workers_busy": states["busy"],
            **self._stats_details(),
            **({"sandbox": self._sandboxed_pool.report()} if self._sandboxed else {}),
        }

    async def health(self) -> HealthStatus:
        """As every backend's, ``degraded`` when 3+ workers crashed in the last minute, the
        queue is full or a plugin is quarantined: still serving, but something needs a look."""
        status = await super().health()
        now = time.monotonic()
        recent = sum(1 for t in self._actors.recent_restarts if now - t < 60)
        degraded = (
            recent >= 3
            or len(self._queue.waiters) >= self.max_queue
            or bool(self._breaker.quarantined())
        )
        if status.healthy and degraded:
            status = attrs.evolve(
                status,
                status="degraded",
                details={**status.details, "restarts_last_minute": recent},
            )
        return status


def _check_sandbox(sandbox: bool | tuple[str, ...], kind: str, launcher: object) -> bool:
    """Whether the pool is sandboxed (its workers per plugin); only process workers of its
    own launcher can be."""
    if sandbox is not False and (kind != "process" or launcher is not None):
        raise ValueError("sandbox applies to process workers started by the pool only")
    return sandbox is not False


def _check_options(
    kind: str,
    min_workers: int,
    max_workers: int,
    warmup: str,
    max_concurrency_per_worker: int,
    max_queue: int,
) -> None:
    """Refuse options that make no pool, saying why (``ValueError``)."""
    if kind not in ("process", "thread"):
        raise ValueError(f"kind must be 'process' or 'thread', not {kind!r}")
    if not 0 <= min_workers <= max_workers or max_workers < 1:
        raise ValueError(
            f"need 0 <= min_workers <= max_workers and max_workers >= 1; "
            f"got min_workers={min_workers}, max_workers={max_workers}"
        )
    if warmup not in ("none", "marked", "top_n"):
        raise ValueError(f"warmup must be 'none', 'marked' or 'top_n', not {warmup!r}")
    if max_concurrency_per_worker < 1 or max_queue < 0:
        raise ValueError("max_concurrency_per_worker must be >= 1 and max_queue >= 0")
