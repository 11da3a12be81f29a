"""WorkerPoolBackend: executions flow through long-lived, warm, supervised worker actors.

Each worker actor is a child of a :mod:`~plugin_execution.supervisor` and owns one worker (a
process by default, or a thread). The dispatcher hands each execution to a worker with spare
capacity, or queues it (bounded: ``QueueFullError``) until one frees up (``acquire_timeout``:
``AcquireTimeoutError``). Time spent queued counts toward the execution's timeout.

Workers are grown to ``max_workers`` under load and shrunk back to ``min_workers`` after
``idle_timeout``; recycled after ``max_executions_per_worker``, ``max_worker_uptime`` or
``max_worker_memory_mb`` (RSS, measured by the health check) without failing any execution;
health-checked by ping every ``health_check_interval``. A worker that dies fails only the
executions it was running (``WorkerCrashedError``).

At no instant are more than ``max_workers`` worker processes alive, counting those starting,
stopping and started ahead for recycling (``details["workers_peak"]``). A worker killed by
the work it ran (a crash, a timeout, quota or health-check kill) is that work's failure: its
slot replaces it at once and the supervisor's restart intensity is not charged; a per-plugin
crash breaker (``_breaker``) refuses a plugin that keeps doing it. Workers failing on their
own (start-up, handshake, dying idle) are restarted by the supervisor, which gives up past
``max_restarts`` within ``restart_window``.
"""

from __future__ import annotations

import itertools
import os
import select
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Literal

import attrs
import trio

from .._deadlines import Deadlines
from .._groups import unwrap_single
from ..channels.bridge import run_session
from ..errors import (
    AcquireTimeoutError,
    BackendClosedError,
    ExecutionError,
    QueueFullError,
    WorkerCrashedError,
    WorkerUnhealthyError,
)
from ..host.handle import Submitted, WorkerHandle, WorkerLauncher
from ..host.launchers import ProcessLauncher, ThreadLauncher
from ..host.limits import WorkerLimits
from ..host.zygote import BASE_ENV, ZygoteKeeper
from ..manifest import Quotas
from ..supervisor import ChildSpec, Supervisor, open_supervisor
from ..types import ExecutionResult, HealthStatus
from ._breaker import CrashBreaker
from ._quota_watch import watch_quotas
from .base import ExecutionBackend, Job

__all__ = ["WorkerPoolBackend"]

WorkerState = Literal["starting", "idle", "busy", "draining", "stopped"]
# How long a caller polls for its reply before parking, and its worker for the next request
# after answering (see host/connection.py and Execute.linger).
_SPIN_S = 100e-6


class _Worker:
    """The pool's record of one worker actor."""

    __slots__ = (
        "executions",
        "idle",
        "last_used",
        "name",
        "permanent",
        "proc",
        "retire",
        "retire_reason",
        "running",
        "sessions",
        "spare",
        "spare_wanted",
        "started_at",
        "state",
    )

    def __init__(self, name: str, permanent: bool) -> None:
        self.name = name
        self.permanent = permanent
        self.state: WorkerState = "starting"
        self.proc: WorkerHandle | None = None
        self.running = 0
        self.sessions = 0  # channel sessions: they share the worker, taking no slot
        self.executions = 0
        self.started_at = time.monotonic()
        self.last_used = time.monotonic()
        self.retire = trio.Event()
        self.retire_reason = ""
        self.idle = trio.Event()
        self.spare: _Spare | None = None  # its successor, started ahead of its recycling
        self.spare_wanted = trio.Event()


class _Spare:
    """A worker started ahead for a slot: ``ready`` once it is up (``proc``) or failed
    (``proc`` None); ``done`` ends its life (the slot served on it and retired it);
    cancelling ``scope`` gives its process slot back to a worker that needs one."""

    __slots__ = ("done", "proc", "ready", "scope")

    def __init__(self) -> None:
        self.proc: WorkerHandle | None = None
        self.ready = trio.Event()
        self.done = trio.Event()
        self.scope = trio.CancelScope()


class _Waiter:
    """A queued execution: its task is parked until :meth:`wake` (a worker handed over,
    or none: given up, or the pool closing). Parked with trio's low-level primitives, not
    an Event: this is every call's path when callers outnumber workers.

    The hand-over also submits the request (``job`` to ``workspace``; ``pending``, on
    ``proc``), in the step that freed the worker: the worker starts on it while this task
    waits to be scheduled. ``workspace`` None: the caller submits it itself.
    """

    __slots__ = (
        "enqueued",
        "job",
        "pending",
        "plugin_id",
        "proc",
        "task",
        "woken",
        "worker",
        "workspace",
    )

    def __init__(self, job: Job, workspace: str | None) -> None:
        self.job = job
        self.workspace = workspace
        self.plugin_id = job.request.plugin_id
        self.task = trio.lowlevel.current_task()
        self.woken = False
        self.worker: _Worker | None = None
        self.proc: WorkerHandle | None = None
        self.pending: Submitted | None = None
        self.enqueued = time.perf_counter()

    def wake(self) -> None:
        if not self.woken:
            self.woken = True
            trio.lowlevel.reschedule(self.task)

    async def wait(self, queue: deque[_Waiter]) -> None:
        """Park until woken; cancellable (leaving ``queue``) until then."""

        def abort(_: Any) -> trio.lowlevel.Abort:
            if self.woken:  # already rescheduled: let that wake-up stand
                return trio.lowlevel.Abort.FAILED
            self.woken = True
            if self in queue:
                queue.remove(self)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class WorkerPoolBackend(ExecutionBackend):
    """Runs executions on a pool of warm, supervised workers. See the module docstring.

    Options (defaults in brackets): ``kind`` [``"process"``] or ``"thread"``;
    ``min_workers`` [2], ``max_workers`` [CPU count], ``idle_timeout`` [60 s];
    ``max_concurrency_per_worker`` [1], ``max_concurrent_per_plugin`` [unlimited];
    ``warmup`` [``"none"``] | ``"marked"`` | ``"top_n"`` with ``warmup_top_n`` [5] and
    ``max_warm_handlers`` [20]; ``max_queue`` [100], ``acquire_timeout`` [5 s];
    ``max_executions_per_worker`` [1000], ``max_worker_uptime`` [1800 s],
    ``max_worker_memory_mb`` [None]; ``health_check_interval`` [10 s],
    ``health_check_timeout`` [5 s]; ``cancel_grace`` [1 s]; ``shutdown_timeout`` [10 s];
    ``max_restarts`` [50] within ``restart_window`` [30 s] before the supervisor gives up
    (workers failing on their own only: not those killed by their work);
    ``crash_breaker_threshold`` [5] worker-killing executions in a row quarantine a plugin
    for ``crash_breaker_cooldown`` [30 s] (``PluginQuarantinedError``; 0 or None: off);
    ``memory_mb`` / ``open_files`` limits per worker; ``env``: extra environment variables
    for the workers (they get a minimal base environment, never the host's secrets).
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
        max_executions_per_worker: int = 1000,
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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        max_workers = max_workers if max_workers is not None else (os.cpu_count() or 2)
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
        self.kind = kind
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
        # When a worker's successor is started: ~10% of its executions ahead.
        self._spare_at = max_executions_per_worker - max(1, max_executions_per_worker // 10)
        self.max_worker_uptime = max_worker_uptime
        self.max_worker_memory_mb = max_worker_memory_mb
        self.health_check_interval = health_check_interval
        self.health_check_timeout = health_check_timeout
        self.cancel_grace = cancel_grace
        self.shutdown_timeout = shutdown_timeout
        self._max_restarts = max_restarts
        self._restart_window = restart_window
        self._breaker = CrashBreaker(crash_breaker_threshold, crash_breaker_cooldown)
        # Worker processes alive (starting to reaped, spares included): never above
        # max_workers; the most there ever were.
        self._process_slots = trio.Semaphore(max_workers)
        self._workers_peak = 0
        self._env = {name: os.environ[name] for name in BASE_ENV if name in os.environ}
        self._env.update(env or {})
        # What starts the workers: the pool knows them only as handles from here on.
        self._launcher: WorkerLauncher = ThreadLauncher()
        if kind == "process":
            self._launcher = ProcessLauncher(
                env=self._env,
                limits=WorkerLimits(address_space_mb=memory_mb, open_files=open_files),
                # ~2 ms a worker instead of ~20 ms for a fresh interpreter, which is what
                # recycling and growth cost the pool's throughput; while it is down,
                # workers are spawned.
                zygote=ZygoteKeeper(env=self._env, on_error=self._zygote_failed),
            )
        self._workers: dict[str, _Worker] = {}
        self._names = itertools.count(1)
        self._queue: deque[_Waiter] = deque()
        self._per_plugin: Counter[str] = Counter()
        self._usage: Counter[tuple[str, str]] = Counter()
        self._supervisor: Supervisor | None = None
        self._workers_killed = 0
        self._recent_restarts: deque[float] = deque(maxlen=1000)
        self._queue_deadlines = Deadlines(self._give_up, self._still_queued)
        self._idle = trio.Event()
        self._in_use = 0  # executions on workers now (sum of their ``running``)
        self._spin_peers = select.poll()  # the workers' sockets (see WorkerHandle.spin_with)
        self._last_check = 0.0

    # -- lifecycle ------------------------------------------------------------------------

    async def _open(self, stack: AsyncExitStack) -> None:
        # Outside the backend's nursery, whose cancellation on exit would otherwise hit
        # them all at once: the supervisor stops the workers in order, then the launcher's
        # zygote (entered first, left last) goes, which would kill any child it still had.
        await stack.enter_async_context(self._launcher_kept())
        self._supervisor = await stack.enter_async_context(
            open_supervisor(
                strategy="one_for_one",
                max_restarts=self._max_restarts,
                within=self._restart_window,
            )
        )

    async def _start(self, nursery: trio.Nursery) -> None:
        async with trio.open_nursery() as starting:
            for _ in range(self.min_workers):
                starting.start_soon(self._add_worker, True)
        nursery.start_soon(self._maintain)
        nursery.start_soon(self._queue_deadlines.run)

    async def _stop(self, *, drain: bool, timeout: float | None) -> None:
        """Fail the queue (BackendClosedError), let in-flight work finish within the
        timeout, then kill the workers still running something."""
        while self._queue:
            waiter = self._queue.popleft()
            waiter.wake()  # with no worker: BackendClosedError
        limit = self.shutdown_timeout if timeout is None else timeout
        with trio.move_on_after(limit if drain else 0):
            while self._in_use:
                self._idle = trio.Event()
                await self._idle.wait()
        for worker in self._workers.values():
            if worker.running and worker.proc is not None:
                worker.proc.kill(
                    BackendClosedError("the worker pool shut down before this execution finished")
                )

    # -- workers --------------------------------------------------------------------------

    def _new_worker(self, permanent: bool) -> _Worker:
        """A slot's record, counted against ``max_workers`` from now on."""
        worker = _Worker(f"worker-{next(self._names)}", permanent)
        self._workers[worker.name] = worker
        return worker

    async def _add_worker(self, permanent: bool, worker: _Worker | None = None) -> None:
        assert self._supervisor is not None
        if worker is None:
            worker = self._new_worker(permanent)
        spec = ChildSpec(
            name=worker.name,
            start=lambda task_status=trio.TASK_STATUS_IGNORED: self._actor(worker, task_status),
            restart="permanent" if permanent else "transient",
            shutdown_timeout=self.shutdown_timeout,
        )
        try:
            await self._supervisor.start_child(spec)
        except BaseException:
            self._workers.pop(worker.name, None)
            raise

    async def _actor(self, worker: _Worker, task_status: Any) -> None:
        """One worker slot's life: serve on a worker, replace it when it is retired.

        Recycling (executions, uptime, memory) and replacing a worker its work killed happen
        in here, so they never count as restarts; a worker lost on its own (while idle)
        raises, and the supervisor restarts the actor, meanwhile keeping its record (the
        slot stays counted against ``max_workers``). Returns when the pool shrinks this slot
        away. A worker nearing its ``max_executions_per_worker`` gets its successor started
        ahead (a spare, in ``spares``) when a process slot is free, so recycling leaves no
        gap the size of a process start.
        """
        self._workers[worker.name] = worker
        restarting = False
        try:
            with unwrap_single():
                async with trio.open_nursery() as spares:
                    while True:
                        reason = await self._serve_one(worker, task_status, spares)
                        task_status = trio.TASK_STATUS_IGNORED
                        if reason == "shrink":
                            spares.cancel_scope.cancel()
                            return
                        if reason == "killed":
                            self._workers_killed += 1
                        elif reason == "crashed":
                            self._stats.worker_crashes += 1
                            self._recent_restarts.append(time.monotonic())
                        else:
                            self._stats.workers_recycled += 1
        except Exception:
            restarting = True  # the supervisor restarts this slot (or gives up)
            raise
        finally:
            worker.proc = None
            if restarting and self._supervisor is not None and self.running:
                worker.state = "starting"
            else:
                worker.state = "stopped"
                self._workers.pop(worker.name, None)
            self._dispatch()

    async def _serve_one(self, worker: _Worker, task_status: Any, spares: trio.Nursery) -> str:
        """Start one worker (or take the spare), serve until it is retired (return why) or
        lost (raise)."""
        worker.state = "starting"
        worker.retire = trio.Event()
        worker.retire_reason = ""
        worker.spare_wanted = trio.Event()
        spare, worker.spare = worker.spare, None
        if spare is not None:
            try:
                await spare.ready.wait()  # sooner than starting another
                if spare.proc is not None and spare.proc.alive:
                    return await self._serve_on(worker, spare.proc, task_status, spares)
            finally:
                spare.done.set()  # served on and retired, or failed: start afresh
        async with self._open_worker() as proc:
            await self._warm(proc)
            return await self._serve_on(worker, proc, task_status, spares)

    async def _serve_on(
        self, worker: _Worker, proc: WorkerHandle, task_status: Any, spares: trio.Nursery
    ) -> str:
        worker.started_at = worker.last_used = time.monotonic()
        worker.executions = 0
        worker.proc = proc
        worker.state = "idle"
        task_status.started()
        self._dispatch()
        proc.spin_with(self._spin_peers)
        try:
            async with trio.open_nursery() as watch:
                watch.start_soon(_cancel_when, proc.lost, watch.cancel_scope)
                watch.start_soon(self._spare_when_wanted, worker, spares)
                await worker.retire.wait()
                while worker.running or worker.sessions:
                    worker.idle = trio.Event()
                    await worker.idle.wait()
                watch.cancel_scope.cancel()
        finally:
            proc.spin_alone()
        worker.proc = None
        if proc.lost.is_set() and worker.retire_reason != "shrink":
            if proc.killed:  # we stopped it (timeout, quota, health check): replace it
                return "killed"
            if (proc.exiting or proc.lost_running) and proc.exit_cause != "orphaned":
                return "crashed"  # its work killed it (even if due for recycling): replace it
            if not worker.retire.is_set():
                self._stats.worker_crashes += 1  # it died on its own: a restart
                self._recent_restarts.append(time.monotonic())
                raise proc.crash_error()
        return worker.retire_reason

    async def _spare_when_wanted(self, worker: _Worker, spares: trio.Nursery) -> None:
        await worker.spare_wanted.wait()
        spares.start_soon(self._keep_spare, worker)

    async def _keep_spare(self, worker: _Worker) -> None:
        """Start and warm a successor for ``worker``, if a process slot is free now (else
        the slot starts one the usual way when it needs it); hold it until done with."""
        try:
            self._process_slots.acquire_nowait()
        except trio.WouldBlock:
            return
        self._note_peak()
        spare = worker.spare = _Spare()
        try:
            with spare.scope:
                async with self._open_worker(slot_held=True) as proc:
                    await self._warm(proc)
                    if self._process_slots.statistics().tasks_waiting:
                        return  # a slot waits to start its worker: it needs this more
                    spare.proc = proc
                    spare.ready.set()
                    await spare.done.wait()
        except ExecutionError as exc:  # the slot starts one the usual way when it needs it
            self._stats.last_error = f"could not start a spare worker: {exc.message}"
        finally:
            spare.ready.set()
            if worker.spare is spare:
                worker.spare = None

    @asynccontextmanager
    async def _open_worker(self, *, slot_held: bool = False) -> AsyncIterator[WorkerHandle]:
        """Start a worker, once a process slot is free (``slot_held``: the caller took
        one); the slot is given back once the worker is reaped."""
        if not slot_held:
            await self._take_process_slot()
        try:
            async with self._launcher.open() as proc:
                yield proc
        finally:
            self._process_slots.release()

    async def _take_process_slot(self) -> None:
        """Wait for a process slot; spares not yet serving give theirs up, since a slot
        without a worker serves nobody while a spare waits for its recycling. (One still
        starting does once it is up: cancelled while the zygote forks it, it could be
        abandoned alive after its slot was given back.)"""
        slots = self._process_slots
        if slots.value == 0:
            for other in self._workers.values():
                if other.spare is not None and other.spare.proc is not None:
                    other.spare.scope.cancel()
        await slots.acquire()
        self._note_peak()

    def _note_peak(self) -> None:
        alive = self.max_workers - self._process_slots.value
        self._workers_peak = max(self._workers_peak, alive)

    @asynccontextmanager
    async def _launcher_kept(self) -> AsyncIterator[None]:
        """Run the launcher's background work (the zygote) while the pool is open; workers
        do not wait for it."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._launcher.run)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()

    def _zygote_failed(self, exc: WorkerCrashedError) -> None:
        self._stats.last_error = f"the pool's zygote failed: {exc.message}"

    async def _warm(self, proc: WorkerHandle) -> None:
        for plugin_id, handler_id in self._warm_set():
            try:
                target = self.registry.resolve(plugin_id, handler_id)
                await proc.warmup(plugin_id, handler_id, target.entry, target.root)
            except ExecutionError as exc:
                self._stats.last_error = f"warmup of {plugin_id}/{handler_id}: {exc.message}"

    def _warm_set(self) -> list[tuple[str, str]]:
        if self.warmup_policy == "marked":
            marked = [(m.id, h.id) for m in self.registry for h in m.handlers if h.warmup]
            return marked[: self.max_warm_handlers]
        if self.warmup_policy == "top_n":
            top = min(self.warmup_top_n, self.max_warm_handlers)
            return [key for key, _ in self._usage.most_common(top)]
        return []

    def _retire(self, worker: _Worker, reason: str) -> None:
        """Take no more work to ``worker``; its actor replaces it once it is idle."""
        if not worker.retire.is_set():
            worker.retire_reason = reason
            worker.state = "draining"
            worker.retire.set()

    async def _maintain(self) -> None:
        """Health checks, recycling by memory, and shrinking idle extra workers."""
        while True:
            await trio.sleep(min(self.health_check_interval, max(self.idle_timeout / 4, 0.05)))
            now = time.monotonic()
            live = [w for w in self._workers.values() if w.state in ("idle", "busy")]
            for worker in live:
                idle_for = now - worker.last_used
                if not worker.permanent and not worker.running and idle_for > self.idle_timeout:
                    self._retire(worker, "shrink")
            if now - self._last_check >= self.health_check_interval:
                self._last_check = now
                async with trio.open_nursery() as checks:
                    for worker in live:
                        checks.start_soon(self._check, worker)

    async def _check(self, worker: _Worker) -> None:
        proc = worker.proc
        if proc is None or not proc.alive:
            return
        with trio.move_on_after(self.health_check_timeout):
            try:
                pong = await proc.ping()
            except ExecutionError:
                return
            limit = self.max_worker_memory_mb
            if limit is not None and pong.rss_bytes > limit * 1024 * 1024:
                self._retire(worker, "memory")
            return
        proc.kill(
            WorkerUnhealthyError(
                f"worker {proc.worker_id} did not answer its health check within "
                f"{self.health_check_timeout:g} s and was replaced"
            )
        )

    # -- dispatching ----------------------------------------------------------------------

    def _has_room(self, worker: _Worker) -> bool:
        return (
            worker.state in ("idle", "busy")
            and worker.running < self.max_concurrency_per_worker
            and worker.proc is not None
            and worker.proc.alive
        )

    def _plugin_has_room(self, plugin_id: str) -> bool:
        cap = self.max_concurrent_per_plugin
        return cap is None or self._per_plugin[plugin_id] < cap

    def _free_worker(self) -> _Worker | None:
        for worker in self._workers.values():
            if self._has_room(worker):
                return worker
        return None

    def _dispatch(self) -> None:
        """Hand free capacity to queued executions, oldest first (skipping capped plugins)."""
        if not self._queue:
            return
        for waiter in list(self._queue):
            if not self._plugin_has_room(waiter.plugin_id):
                continue
            worker = self._free_worker()
            if worker is None:
                break
            self._hand_over(worker, waiter)

    def _hand_over(self, worker: _Worker, waiter: _Waiter) -> None:
        self._queue.remove(waiter)
        self._take(worker, waiter.plugin_id)
        waiter.worker = worker
        proc = worker.proc
        if waiter.workspace is not None and proc is not None:
            try:
                waiter.pending = self._submit(proc, waiter.job, waiter.workspace)
                waiter.proc = proc
            except ExecutionError:
                pass  # the caller submits it again and gets the error in its own task
        waiter.wake()

    def _submit(self, proc: WorkerHandle, job: Job, workspace: str) -> Submitted:
        # Every execution polls, not only one alone in flight: with callers queued, the
        # hand-over's next request finds its worker still awake (measured on 2 vCPUs, 8
        # and 64 callers: +15-25% calls/s; 2 callers: even).
        return proc.submit(
            job,
            workspace=workspace,
            cancel_grace=self.cancel_grace,
            linger=_SPIN_S if proc.spin_ok else 0.0,
        )

    def _take(self, worker: _Worker, plugin_id: str) -> None:
        self._in_use += 1
        worker.running += 1
        worker.state = "busy"
        self._per_plugin[plugin_id] += 1

    def _give_back(self, worker: _Worker, plugin_id: str) -> None:
        worker.running -= 1
        worker.last_used = time.monotonic()
        self._per_plugin[plugin_id] -= 1
        if not worker.running:
            worker.idle.set()
            if worker.state == "busy":  # a dying worker is not idle: its actor replaces it
                proc = worker.proc
                worker.state = "idle" if proc is not None and proc.alive else "draining"
        if worker.executions >= self._spare_at:
            worker.spare_wanted.set()
        if worker.executions >= self.max_executions_per_worker:
            self._retire(worker, "executions")
        elif time.monotonic() - worker.started_at > self.max_worker_uptime:
            self._retire(worker, "uptime")
        self._in_use -= 1
        if not self._in_use:
            self._idle.set()
        if self.max_concurrent_per_plugin is None:
            # Any free capacity elsewhere went to the queue already: only this worker's is
            # new. Under load this is every call, so no scan.
            while self._queue and self._has_room(worker):
                self._hand_over(worker, self._queue[0])
        else:
            self._dispatch()

    def _maybe_grow(self) -> None:
        workers = self._workers.values()
        if len(workers) >= self.max_workers and all(w.state != "stopped" for w in workers):
            return  # full size: the common case under load
        starting = sum(w.state == "starting" for w in self._workers.values())
        alive = sum(w.state != "stopped" for w in self._workers.values())
        if alive < self.max_workers and starting < len(self._queue) and self._nursery:
            # The record now, not when the task runs: callers queued in the same step
            # would otherwise each start one.
            self._nursery.start_soon(self._grow, self._new_worker(False))

    async def _grow(self, worker: _Worker) -> None:
        try:
            await self._add_worker(False, worker)
        except Exception as exc:  # the queue's acquire timeout reports the consequence
            self._stats.last_error = f"could not start a worker: {exc}"

    async def _acquire(
        self, job: Job, workspace: str | None, lender: _Worker | None = None
    ) -> _Waiter | _Worker:
        """A worker for ``job``: at once, or after waiting in the queue; then, the waiter,
        whose request the hand-over may have submitted already (see :class:`_Waiter`).
        ``lender``: the worker of the invoking execution, whose slot ``job`` borrows."""
        plugin_id = job.request.plugin_id
        if lender is not None:
            draining = lender.state == "draining"  # retired, finishing its caller's work
            self._take(lender, plugin_id)
            if draining:
                lender.state = "draining"
            self._stats.record_queue_wait(0.0)
            return lender
        if not self._queue and self._plugin_has_room(plugin_id):
            worker = self._free_worker()
            if worker is not None:
                self._take(worker, plugin_id)
                self._stats.record_queue_wait(0.0)
                return worker
        if len(self._queue) >= self.max_queue:
            self._stats.queue_full_rejections += 1
            raise QueueFullError(
                f"the pool's queue is full ({len(self._queue)} waiting, capacity "
                f"{self.max_queue}); retry later or raise max_queue",
                details={"queue_size": len(self._queue), "capacity": self.max_queue},
            )
        waiter = _Waiter(job, workspace)
        self._queue.append(waiter)
        self._maybe_grow()
        self._queue_deadlines.add(
            min(job.deadline, trio.current_time() + self.acquire_timeout), waiter
        )
        await waiter.wait(self._queue)  # woken by _hand_over, _give_up or _stop
        self._stats.record_queue_wait(time.perf_counter() - waiter.enqueued)
        if waiter.worker is not None:
            return waiter
        if not self.running:
            raise BackendClosedError("the worker-pool backend is shutting down")
        if trio.current_time() >= job.deadline:
            raise job.timeout_error(" while waiting for a worker")
        self._stats.acquire_timeouts += 1
        raise AcquireTimeoutError(
            f"no worker became free within {self.acquire_timeout:g} s "
            f"({len(self._queue)} queued, {len(self._workers)} workers)"
        )

    def _give_up(self, waiter: _Waiter) -> None:
        """A queued execution's acquire timeout or deadline passed: wake it, workerless."""
        self._queue.remove(waiter)
        waiter.wake()

    @staticmethod
    def _still_queued(waiter: _Waiter) -> bool:
        return not waiter.woken

    async def _run(self, job: Job) -> ExecutionResult:
        if job.channel is not None:
            return await self._run_session(job)
        lender = self._lender(job)
        if lender is None:
            return await self._run_job(job)
        assert job.parent is not None
        lent = job.parent.lent_slot()
        with trio.CancelScope(deadline=job.deadline) as waiting:
            await lent.acquire()
        if waiting.cancelled_caught:
            raise job.timeout_error(
                " while its caller's worker was lent to another of its invocations"
            )
        try:
            return await self._run_job(job, lender)
        finally:
            lent.release()

    def _lender(self, job: Job) -> _Worker | None:
        """The worker of the execution that invoked ``job`` (``ctx.invoke``) when ``job``
        would have to queue: it then runs there, beside its waiting caller, instead of
        waiting for workers its own ancestors hold (a deadlock once they hold them all)."""
        parent = job.parent
        if parent is None or not isinstance(parent.slot, _Worker):
            return None
        plugin_id = job.request.plugin_id
        if not self._queue and self._plugin_has_room(plugin_id) and self._free_worker():
            return None  # free capacity: taken at once, like anyone's
        return parent.slot

    async def _run_job(self, job: Job, lender: _Worker | None = None) -> ExecutionResult:
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
        self._stats.queued = len(self._queue) + 1
        try:
            got = await self._acquire(job, None if watched else workspace, lender)
        except BaseException:
            lease.release_unused()  # nothing was made
            self._breaker.record(request.plugin_id, None, trial=trial)
            raise
        if isinstance(got, _Waiter):
            worker, proc, pending = got.worker, got.proc, got.pending
            assert worker is not None
        else:
            worker, proc, pending = got, None, None
        job.slot = worker  # what its own invocations may borrow
        self._stats.queued = len(self._queue)
        self._usage[(request.plugin_id, request.handler_id)] += 1
        result = None
        try:
            worker.executions += 1
            if pending is not None and proc is not None:  # submitted at the hand-over
                result = await proc.collect(pending, backend=self.name, sent_now=False)
                return result
            proc = worker.proc
            if proc is None:
                raise WorkerCrashedError(f"worker {worker.name} stopped before it could run")
            if watched:
                result = await self._execute_watched(proc, job, workspace, quotas)
            else:
                pending = self._submit(proc, job, workspace)
                result = await proc.collect(pending, backend=self.name)
            return result
        finally:
            self._settle(worker, proc, request.plugin_id, result, trial)
            self._give_back(worker, request.plugin_id)
            if (
                result is not None
                and result.metadata.get("workspace_id") is None
                and job.session_unused
            ):
                # Neither the worker (it says so) nor a platform service on the host (no
                # session was needed) made the directory: nothing to remove.
                lease.release_unused()
            else:
                await lease.release()  # not cancellable; see WorkspaceLease.release

    def _settle(
        self,
        worker: _Worker,
        proc: WorkerHandle | None,
        plugin_id: str,
        result: ExecutionResult | None,
        trial: bool,
    ) -> None:
        """Tell the crash breaker whether this execution killed its worker; retire a worker
        that said it is exiting (no execution may follow on it)."""
        if result is not None:
            killed: bool | None = False
        elif proc is None or not self.running or proc.exit_cause in ("orphaned", "outside"):
            killed = None  # it never ran, the pool is closing, or not the plugin's doing
        else:
            killed = not proc.alive
            if proc.exiting and worker.proc is proc:
                self._retire(worker, "crashed")
        self._breaker.record(plugin_id, killed, trial=trial)

    async def _execute_watched(
        self, proc: WorkerHandle, job: Job, workspace: str, quotas: Quotas
    ) -> ExecutionResult:
        """Execute with the plugin's memory / CPU quotas sampled from the host (see
        ``_quota_watch``): a shared worker cannot take per-execution rlimits."""
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_quotas, proc, quotas)
                try:
                    return await proc.execute(
                        job, backend=self.name, workspace=workspace, cancel_grace=self.cancel_grace
                    )
                finally:
                    nursery.cancel_scope.cancel()

    async def _run_session(self, job: Job) -> ExecutionResult:
        """A channel session runs on the live worker with the fewest sessions, alongside
        its executions: a session mostly waits for messages, so it takes no execution slot
        (connection limits are the mount's). A worker retires only once its sessions end."""
        worker = await self._session_worker(job)
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

    async def _session_worker(self, job: Job) -> _Worker:
        give_up = min(job.deadline, trio.current_time() + self.acquire_timeout)
        while True:
            ready = [
                w
                for w in self._workers.values()
                if w.state in ("idle", "busy") and w.proc is not None and w.proc.alive
            ]
            if ready:
                return min(ready, key=lambda w: w.sessions)
            if not self.running:
                raise BackendClosedError("the worker-pool backend is shutting down")
            if trio.current_time() >= give_up:
                self._stats.acquire_timeouts += 1
                raise AcquireTimeoutError(
                    f"no worker was ready for a channel session within "
                    f"{self.acquire_timeout:g} s ({len(self._workers)} workers)"
                )
            if not self._workers and self._nursery is not None:
                self._nursery.start_soon(self._grow, self._new_worker(False))  # min_workers=0
            await trio.sleep(0.02)  # workers are being (re)started; bounded by give_up

    # -- observing ------------------------------------------------------------------------

    def _worker_states(self) -> dict[str, int]:
        states = Counter(w.state for w in self._workers.values() if w.state != "stopped")
        return {s: states.get(s, 0) for s in ("starting", "idle", "busy", "draining")}

    def _stats_details(self) -> dict[str, Any]:
        return {
            "workers": self._worker_states(),
            "workers_peak": self._workers_peak,
            "max_workers": self.max_workers,
            "crash_breaker": self._breaker.details(),
            "restarts": self._supervisor.restart_count if self._supervisor else 0,
            "workers_killed": self._workers_killed,
            "queue_depth": len(self._queue),
            "max_queue": self.max_queue,
        }

    def _health_details(self) -> dict[str, Any]:
        states = self._worker_states()
        return {
            "kind": self.kind,
            "workers_total": sum(states.values()),
            "workers_idle": states["idle"],
            "workers_busy": states["busy"],
            **self._stats_details(),
        }

    async def health(self) -> HealthStatus:
        """As every backend's, ``degraded`` when 3+ workers crashed in the last minute, the
        queue is full or a plugin is quarantined: still serving, but something needs a look."""
        status = await super().health()
        now = time.monotonic()
        recent = sum(1 for t in self._recent_restarts if now - t < 60)
        degraded = (
            recent >= 3 or len(self._queue) >= self.max_queue or bool(self._breaker.quarantined())
        )
        if status.healthy and degraded:
            status = attrs.evolve(
                status,
                status="degraded",
                details={**status.details, "restarts_last_minute": recent},
            )
        return status


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
