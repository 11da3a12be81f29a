"""WorkerActors: the pool's supervised worker slots, each serving on one worker handle.

Each slot is an actor under a :mod:`~plugin_execution.supervisor`: it starts a worker
through the pool's launcher, serves on it until it is retired (recycling: executions,
uptime, memory; shrinking when idle) or lost, and starts the next. A worker its work
killed is replaced here, without a restart; a worker lost on its own raises, and the
supervisor restarts the slot (or gives up past its restart intensity). A worker nearing its
``max_executions_per_worker`` gets a successor started ahead (a spare). Health checks ping
every worker; one that does not answer is killed.

At no instant are more than ``max_workers`` workers alive, counting those starting,
stopping and spares (``process slots``). Workers are known only through
:class:`~plugin_execution.host.handle.WorkerHandle`: nothing here knows processes.
"""

from __future__ import annotations

import itertools
import select
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from ..._groups import unwrap_single
from ...errors import (
    AcquireTimeoutError,
    BackendClosedError,
    ExecutionError,
    WorkerUnhealthyError,
)
from ...supervisor import ChildSpec, Supervisor
from .slots import Spare, Worker

if TYPE_CHECKING:
    from ...host.handle import WorkerHandle, WorkerLauncher
    from ...registry import PluginRegistry
    from ...stats import StatsRecorder
    from ..job import Job
    from .slots import PoolOptions

__all__ = ["WorkerActors"]


class WorkerActors:
    """The worker slots of one pool (``workers``, by name). ``dispatch()`` is called when
    a worker may have capacity for the queue; ``running()`` is False once the pool closes."""

    def __init__(
        self,
        options: PoolOptions,
        launcher: WorkerLauncher,
        stats: StatsRecorder,
        registry: PluginRegistry,
        usage: Counter[tuple[str, str]],
        *,
        dispatch: Callable[[], None],
        running: Callable[[], bool],
    ) -> None:
        self._options = options
        self._launcher = launcher
        self._stats = stats
        self._registry = registry
        self._usage = usage
        self._dispatch = dispatch
        self._running = running
        self.workers: dict[str, Worker] = {}
        self.supervisor: Supervisor | None = None
        self.nursery: trio.Nursery | None = None  # where extra workers are started
        self._names = itertools.count(1)
        # Workers alive (starting to reaped, spares included): never above max_workers;
        # the most there ever were.
        self._process_slots = trio.Semaphore(options.max_workers)
        self.peak = 0
        self.killed = 0  # workers killed by the pool (their work's doing)
        self.recent_restarts: deque[float] = deque(maxlen=1000)
        self._spin_peers = select.poll()  # the workers' sockets (see WorkerHandle.spin_with)
        self._last_check = 0.0

    async def session_worker(self, job: Job) -> Worker:
        """The live worker with the fewest channel sessions, once there is one (bounded by
        the acquire timeout and the job's deadline)."""
        give_up = min(job.deadline, trio.current_time() + self._options.acquire_timeout)
        while True:
            ready = [
                w
                for w in self.workers.values()
                if w.state in ("idle", "busy")
                and w.proc is not None
                and w.proc.alive
                and self.serves(w, job)
            ]
            if ready:
                return min(ready, key=lambda w: w.sessions)
            if not self._running():
                raise BackendClosedError("the worker-pool backend is shutting down")
            if trio.current_time() >= give_up:
                self._stats.acquire_timeouts += 1
                raise AcquireTimeoutError(
                    f"no worker was ready for a channel session within "
                    f"{self._options.acquire_timeout:g} s ({len(self.workers)} workers)"
                )
            if not any(self.serves(w, job) for w in self.workers.values()):
                self.start_extra(job)  # min_workers=0, or none for its plugin yet
            await trio.sleep(0.02)  # workers are being (re)started; bounded by give_up

    def kill_busy(self, error: ExecutionError) -> None:
        """Kill every worker running an execution; those executions fail with ``error``."""
        for worker in self.workers.values():
            if worker.running and worker.proc is not None:
                worker.proc.kill(error)

    def serves(self, worker: Worker, job: Job) -> bool:
        """Whether ``worker`` may run ``job`` (any worker any job; see the sandboxed pool)."""
        return True

    def start_extra(self, job: Job) -> None:
        """Start one more (transient) worker now, e.g. for a channel session with none."""
        if self.nursery is not None:
            self.nursery.start_soon(self._grown, self.new_worker(False))

    @asynccontextmanager
    async def launcher_kept(self) -> AsyncIterator[None]:
        """Run the launcher's background work (the zygote) while the pool is open; workers
        do not wait for it."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._launcher.run)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()

    def new_worker(self, permanent: bool) -> Worker:
        """A slot's record, counted against ``max_workers`` from now on."""
        worker = Worker(f"worker-{next(self._names)}", permanent)
        self.workers[worker.name] = worker
        return worker

    async def add_worker(self, permanent: bool, worker: Worker | None = None) -> None:
        assert self.supervisor is not None
        if worker is None:
            worker = self.new_worker(permanent)
        spec = ChildSpec(
            name=worker.name,
            start=lambda task_status=trio.TASK_STATUS_IGNORED: self._actor(worker, task_status),
            restart="permanent" if permanent else "transient",
            shutdown_timeout=self._options.shutdown_timeout,
        )
        try:
            await self.supervisor.start_child(spec)
        except BaseException:
            self.workers.pop(worker.name, None)
            raise

    async def _actor(self, worker: Worker, task_status: Any) -> None:
        """One worker slot's life: serve on a worker, replace it when it is retired.

        Recycling (executions, uptime, memory) and replacing a worker its work killed happen
        in here, so they never count as restarts; a worker lost on its own (while idle)
        raises, and the supervisor restarts the actor, meanwhile keeping its record (the
        slot stays counted against ``max_workers``). Returns when the pool shrinks this slot
        away. A worker nearing its ``max_executions_per_worker`` gets its successor started
        ahead (a spare, in ``spares``) when a process slot is free, so recycling leaves no
        gap the size of a process start.
        """
        self.workers[worker.name] = worker
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
                            self.killed += 1
                        elif reason == "crashed":
                            self._stats.worker_crashes += 1
                            self.recent_restarts.append(time.monotonic())
                        else:
                            self._stats.workers_recycled += 1
        except Exception:
            restarting = True  # the supervisor restarts this slot (or gives up)
            raise
        finally:
            worker.proc = None
            if restarting and self.supervisor is not None and self._running():
                worker.state = "starting"
            else:
                worker.state = "stopped"
                self.workers.pop(worker.name, None)
            self._dispatch()

    async def _serve_one(self, worker: Worker, task_status: Any, spares: trio.Nursery) -> str:
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
        async with self._open_worker(worker) as proc:
            await self._warm(proc, worker)
            return await self._serve_on(worker, proc, task_status, spares)

    async def _serve_on(
        self, worker: Worker, proc: WorkerHandle, task_status: Any, spares: trio.Nursery
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
                self.recent_restarts.append(time.monotonic())
                raise proc.crash_error()
        return worker.retire_reason

    async def _spare_when_wanted(self, worker: Worker, spares: trio.Nursery) -> None:
        await worker.spare_wanted.wait()
        spares.start_soon(self._keep_spare, worker)

    async def _keep_spare(self, worker: Worker) -> None:
        """Start and warm a successor for ``worker``, if a process slot is free now (else
        the slot starts one the usual way when it needs it); hold it until done with."""
        try:
            self._process_slots.acquire_nowait()
        except trio.WouldBlock:
            return
        self._note_peak()
        spare = worker.spare = Spare()
        try:
            with spare.scope:
                async with self._open_worker(worker, slot_held=True) as proc:
                    await self._warm(proc, worker)
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
    async def _open_worker(
        self, worker: Worker, *, slot_held: bool = False
    ) -> AsyncIterator[WorkerHandle]:
        """Start a worker for ``worker``'s slot, once a process slot is free (``slot_held``:
        the caller took one); the slot is given back once the worker is reaped."""
        if not slot_held:
            await self._take_process_slot()
        try:
            async with self.launch(worker) as proc:
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
            for other in self.workers.values():
                if other.spare is not None and other.spare.proc is not None:
                    other.spare.scope.cancel()
        await slots.acquire()
        self._note_peak()

    def _note_peak(self) -> None:
        alive = self._options.max_workers - self._process_slots.value
        self.peak = max(self.peak, alive)

    def launch(self, worker: Worker) -> AbstractAsyncContextManager[WorkerHandle]:
        """Start the worker of ``worker``'s slot (the launcher's; see the sandboxed pool)."""
        return self._launcher.open()

    async def _warm(self, proc: WorkerHandle, worker: Worker) -> None:
        for plugin_id, handler_id in self._warm_set():
            if worker.plugin is not None and worker.plugin.plugin_id != plugin_id:
                continue
            try:
                target = self._registry.resolve(plugin_id, handler_id)
                await proc.warmup(plugin_id, handler_id, target.entry, target.root)
            except ExecutionError as exc:
                self._stats.last_error = f"warmup of {plugin_id}/{handler_id}: {exc.message}"

    def _warm_set(self) -> list[tuple[str, str]]:
        if self._options.warmup_policy == "marked":
            marked = [(m.id, h.id) for m in self._registry for h in m.handlers if h.warmup]
            return marked[: self._options.max_warm_handlers]
        if self._options.warmup_policy == "top_n":
            top = min(self._options.warmup_top_n, self._options.max_warm_handlers)
            return [key for key, _ in self._usage.most_common(top)]
        return []

    async def maintain(self) -> None:
        """Health checks, recycling by memory, and shrinking idle extra workers."""
        while True:
            await trio.sleep(
                min(self._options.health_check_interval, max(self._options.idle_timeout / 4, 0.05))
            )
            now = time.monotonic()
            live = [w for w in self.workers.values() if w.state in ("idle", "busy")]
            for worker in live:
                idle_for = now - worker.last_used
                if (
                    not worker.permanent
                    and not worker.running
                    and idle_for > self._options.idle_timeout
                ):
                    worker.drain("shrink")
            if now - self._last_check >= self._options.health_check_interval:
                self._last_check = now
                async with trio.open_nursery() as checks:
                    for worker in live:
                        checks.start_soon(self._check, worker)

    async def _check(self, worker: Worker) -> None:
        proc = worker.proc
        if proc is None or not proc.alive:
            return
        with trio.move_on_after(self._options.health_check_timeout):
            try:
                pong = await proc.ping()
            except ExecutionError:
                return
            limit = self._options.max_worker_memory_mb
            if limit is not None and pong.rss_bytes > limit * 1024 * 1024:
                worker.drain("memory")
            return
        proc.kill(
            WorkerUnhealthyError(
                f"worker {proc.worker_id} did not answer its health check within "
                f"{self._options.health_check_timeout:g} s and was replaced"
            )
        )

    def grow(self, queued: int) -> None:
        """Start another worker for ``queued`` waiting callers, if there is room and not
        enough are starting already."""
        workers = self.workers.values()
        if len(workers) >= self._options.max_workers and all(w.state != "stopped" for w in workers):
            return  # full size: the common case under load
        starting = sum(w.state == "starting" for w in self.workers.values())
        alive = sum(w.state != "stopped" for w in self.workers.values())
        if alive < self._options.max_workers and starting < queued and self.nursery:
            # The record now, not when the task runs: callers queued in the same step
            # would otherwise each start one.
            self.nursery.start_soon(self._grown, self.new_worker(False))

    async def _grown(self, worker: Worker) -> None:
        try:
            await self.add_worker(False, worker)
        except Exception as exc:  # the queue's acquire timeout reports the consequence
            self._stats.last_error = f"could not start a worker: {exc}"

    def states(self) -> dict[str, int]:
        states = Counter(w.state for w in self.workers.values() if w.state != "stopped")
        return {s: states.get(s, 0) for s in ("starting", "idle", "busy", "draining")}


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
