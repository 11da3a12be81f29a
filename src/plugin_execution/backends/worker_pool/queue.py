"""WaitQueue: the pool's dispatch: which worker runs an execution, or how long it waits.

An execution takes a worker with spare capacity at once, or queues (bounded:
``QueueFullError``) until one frees up (``acquire_timeout``: ``AcquireTimeoutError``; its
own deadline: its timeout). A worker freed by an execution goes to the oldest waiter in the
same step, which also submits the waiter's request (``hand_over``): the worker starts on it
while the waiter's task is still to be scheduled. This is every call's path under load:
no extra awaits, tasks or cancel scopes here.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..._deadlines import Deadlines
from ...errors import (
    AcquireTimeoutError,
    BackendClosedError,
    ExecutionError,
    QueueFullError,
    WorkerCrashedError,
)
from ...host.calls import LOST
from .slots import Worker

if TYPE_CHECKING:
    from ...host.batch import SubmittedBatch
    from ...host.handle import Submitted, WorkerHandle
    from ...stats import StatsRecorder
    from ...types import ExecutionResult
    from ..job import Job
    from .slots import PoolOptions

__all__ = ["Group", "NotStarted", "WaitQueue", "Waiter", "collect_handed"]

# How long a caller polls for its reply before parking, and its worker for the next request
# after answering (see host/connection.py and Execute.linger).
_SPIN_S = 100e-6
# Queued executions handed to a freed worker at once, as one batch (see hand_over_group): at
# most this many, and about this much of the worker's time (slow work goes one at a time).
GROUP_MAX = 16
GROUP_S = 0.002


class Waiter:
    """A queued execution: its task is parked until :meth:`wake` (a worker handed over,
    or none: given up, or the pool closing). Parked with trio's low-level primitives, not
    an Event: this is every call's path when callers outnumber workers.

    The hand-over also submits the request (``job`` to ``workspace``; ``pending``, on
    ``proc``), in the step that freed the worker: the worker starts on it while this task
    waits to be scheduled. ``workspace`` None: the caller submits it itself. ``batch``: the
    jobs (with their workspaces) of a batch holding this one slot, submitted in one frame
    (see ``host/batch.py``).
    """

    __slots__ = (
        "batch",
        "enqueued",
        "group",
        "job",
        "pending",
        "plugin_id",
        "proc",
        "task",
        "woken",
        "worker",
        "workspace",
    )

    def __init__(
        self, job: Job, workspace: str | None, batch: list[tuple[Job, str | None]] | None = None
    ) -> None:
        self.job = job
        self.workspace = workspace
        self.batch = batch
        self.group: Group | None = None  # handed over with others, as one batch
        self.plugin_id = job.request.plugin_id
        self.task = trio.lowlevel.current_task()
        self.woken = False
        self.worker: Worker | None = None
        self.proc: WorkerHandle | None = None
        self.pending: Submitted | None = None
        self.enqueued = time.perf_counter()

    def wake(self) -> None:
        if not self.woken:
            self.woken = True
            trio.lowlevel.reschedule(self.task)

    async def wait(self, queue: deque[Waiter]) -> None:
        """Park until woken; cancellable (leaving ``queue``) until then."""

        def abort(_: Any) -> trio.lowlevel.Abort:
            if self.woken:  # already rescheduled: let that wake-up stand
                return trio.lowlevel.Abort.FAILED
            self.woken = True
            if self in queue:
                queue.remove(self)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class NotStarted(Exception):
    """A queued execution handed over in a group never started: a member before it lost
    the worker (see :meth:`Group.unstarted`). Its caller queues it again."""


W = TypeVar("W", bound=Waiter)


class Group:
    """Queued executions handed to one worker slot together, as one batch (``submitted``,
    ``host/batch.py``): the slot is given back when the last of them ends (``left``)."""

    __slots__ = ("left", "submitted")

    def __init__(self, submitted: SubmittedBatch) -> None:
        self.submitted = submitted
        self.left = len(submitted.pendings)

    def unstarted(self, pending: Any) -> bool:
        """Whether the member ``pending`` never started on the worker: it was not sent, or
        a member before it had no answer when the worker was lost (the worker runs a batch
        in order and answers each member before it starts the next)."""
        batch = self.submitted
        index = batch.pendings.index(pending)
        if not batch.sent[index]:
            return pending.error is None  # not sent for room: it may go again
        return any(p.lost or p.value is LOST for p in batch.pendings[:index])


async def collect_handed(
    proc: WorkerHandle, pending: Any, group: Group | None, backend: str
) -> ExecutionResult:
    """The result of a request the hand-over submitted (alone, or in ``group``); raises
    what it failed with, or :class:`NotStarted`."""
    if group is None:
        return await proc.collect(pending, backend=backend, sent_now=False)
    index = group.submitted.pendings.index(pending)
    if not group.submitted.sent[index]:
        if pending.error is not None:
            raise pending.error  # it could not be sent (not plain data)
        raise NotStarted
    try:
        return await proc.collect(pending, backend=backend, sent_now=False)
    except WorkerCrashedError:
        if group.unstarted(pending):
            raise NotStarted from None
        raise


class WaitQueue:
    """The waiters for ``workers`` (the pool's records, shared with its actors), and the
    counts dispatch decides on. ``grow(queued)`` asks for another worker when callers wait;
    ``running()`` is False once the pool is closing."""

    def __init__(
        self,
        options: PoolOptions,
        workers: dict[str, Worker],
        stats: StatsRecorder,
        *,
        grow: Callable[[int], None],
        running: Callable[[], bool],
    ) -> None:
        self._options = options
        self._workers = workers
        self._stats = stats
        self._grow = grow
        self._running = running
        most = options.max_executions_per_worker
        # When a worker's successor is started: ~10% of its executions ahead.
        self.spare_at = most - max(1, most // 10)
        self.waiters: deque[Waiter] = deque()
        self.per_plugin: Counter[str] = Counter()
        self.in_use = 0  # executions on workers now (sum of their ``running``)
        self.idle = trio.Event()  # set when in_use drops to 0 (see drained)
        self.deadlines = Deadlines(self.give_up, self.still_queued)
        self._per_execution_s = 0.0  # a busy worker's time per execution, as measured

    def close(self) -> None:
        """Wake every waiter, workerless: they fail with ``BackendClosedError``."""
        while self.waiters:
            self.waiters.popleft().wake()

    async def drained(self) -> None:
        """Wait until no execution runs on any worker."""
        while self.in_use:
            self.idle = trio.Event()
            await self.idle.wait()

    def has_room(self, worker: Worker) -> bool:
        return (
            worker.state in ("idle", "busy")
            and worker.running < self._options.max_concurrency_per_worker
            and worker.proc is not None
            and worker.proc.alive
        )

    def plugin_has_room(self, plugin_id: str) -> bool:
        cap = self._options.max_concurrent_per_plugin
        return cap is None or self.per_plugin[plugin_id] < cap

    def free_worker(self) -> Worker | None:
        for worker in self._workers.values():
            if self.has_room(worker):
                return worker
        return None

    def lender_for(self, job: Job) -> Worker | None:
        """The worker of the execution that invoked ``job`` (``ctx.invoke``) when ``job``
        would have to queue: it then runs there, beside its waiting caller, instead of
        waiting for workers its own ancestors hold (a deadlock once they hold them all)."""
        parent = job.parent
        if parent is None or not isinstance(parent.slot, Worker):
            return None
        if not self.waiters and self.plugin_has_room(job.request.plugin_id) and self.free_worker():
            return None  # free capacity: taken at once, like anyone's
        return parent.slot

    def dispatch(self) -> None:
        """Hand free capacity to queued executions, oldest first (skipping capped plugins)."""
        if not self.waiters:
            return
        for waiter in list(self.waiters):
            if not self.plugin_has_room(waiter.plugin_id):
                continue
            worker = self.free_worker()
            if worker is None:
                break
            self.hand_over(worker, waiter)

    def hand_over(self, worker: Worker, waiter: Waiter) -> None:
        self.waiters.remove(waiter)
        self.take(worker, waiter.plugin_id)
        waiter.worker = worker
        proc = worker.proc
        if waiter.batch is not None and proc is not None:
            try:
                waiter.pending = self.submit_batch(proc, waiter.batch)
                waiter.proc = proc
            except ExecutionError:
                pass  # the worker is gone: the batch's caller finds out in its own task
        elif waiter.workspace is not None and proc is not None:
            try:
                waiter.pending = self.submit(proc, waiter.job, waiter.workspace)
                waiter.proc = proc
            except ExecutionError:
                pass  # the caller submits it again and gets the error in its own task
        waiter.wake()

    def submit(self, proc: WorkerHandle, job: Job, workspace: str) -> Submitted:
        # Every execution polls, not only one alone in flight: with callers queued, the
        # hand-over's next request finds its worker still awake (measured on 2 vCPUs, 8
        # and 64 callers: +15-25% calls/s; 2 callers: even).
        return proc.submit(
            job,
            workspace=workspace,
            cancel_grace=self._options.cancel_grace,
            linger=_SPIN_S if proc.spin_ok else 0.0,
        )

    def submit_batch(self, proc: WorkerHandle, jobs: list[tuple[Job, str | None]]) -> Any:
        """Submit a batch in one frame (no polling for its answers: they take a while)."""
        return proc.submit_batch(jobs, cancel_grace=self._options.cancel_grace)

    def take(self, worker: Worker, plugin_id: str) -> None:
        self.in_use += 1
        worker.running += 1
        worker.state = "busy"
        self.per_plugin[plugin_id] += 1

    def give_back(
        self, worker: Worker, plugin_id: str, group: Group | None = None, executions: int = 1
    ) -> None:
        """A slot of ``worker`` is free again after ``executions`` ran on it (a map's batch:
        its members; a group's: given back by each member, freed with the last)."""
        if not self.slot_freed(worker, group, executions):
            return
        self.release(worker, plugin_id)
        if self._options.max_concurrent_per_plugin is None:
            # Any free capacity elsewhere went to the queue already: only this worker's is
            # new. Under load this is every call, so no scan.
            while self.waiters and self.has_room(worker):
                if len(self.waiters) > 3 and GROUP_MAX > 1:
                    self.hand_over_group(worker)
                else:
                    self.hand_over(worker, self.waiters[0])
        else:
            self.dispatch()

    def slot_freed(self, worker: Worker, group: Group | None, executions: int) -> bool:
        """Whether a give-back frees the slot: a group's is freed with its last member.
        Then, while callers queue, the time since ``worker``'s last give-back (the work's:
        it was busy) goes into the per-execution estimate that sizes groups."""
        if group is not None:
            group.left -= 1
            if group.left:
                return False
            executions = len(group.submitted.pendings)
        if not self.waiters:
            return True
        each = (time.monotonic() - worker.last_used) / executions
        mean = self._per_execution_s
        self._per_execution_s = each if not mean else 0.9 * mean + 0.1 * each
        return True

    def group_size(self, queued: int) -> int:
        """How many of ``queued`` waiters a freed slot takes as one group: at most half of
        them and ``GROUP_MAX``, and about ``GROUP_S`` of the worker's time."""
        size = min(GROUP_MAX, queued // 2)
        mean = self._per_execution_s
        return min(size, int(GROUP_S / mean)) if mean else size

    def hand_over_group(self, worker: Worker) -> None:
        """Hand the first queued executions to ``worker`` as one batch (``host/batch.py``)
        on one slot, when callers queue: one frame and one wake-up of the worker for
        several, which then answers them in order. Only while the work is short (about
        ``GROUP_S`` of the worker for the batch), so a slow one keeps few waiting behind
        it; those behind a member that loses the worker never started and queue again."""
        waiters = self.waiters
        size = self.group_size(len(waiters))
        group: list[Waiter] = []
        for waiter in waiters:
            if len(group) == size or waiter.batch is not None or waiter.workspace is None:
                break
            group.append(waiter)
        proc = worker.proc
        if len(group) < 2 or proc is None:
            self.hand_over(worker, waiters[0])
            return
        try:
            submitted = self.submit_batch(proc, [(w.job, w.workspace) for w in group])
        except ExecutionError:  # the worker is gone: let the usual hand-over deal with it
            self.hand_over(worker, waiters[0])
            return
        for _ in group:
            waiters.popleft()
        self.take(worker, group[0].plugin_id)
        shared = Group(submitted)
        for waiter, pending in zip(group, submitted.pendings, strict=True):
            waiter.worker = worker
            waiter.proc = proc
            waiter.pending = pending
            waiter.group = shared
            waiter.wake()

    def release(self, worker: Worker, plugin_id: str) -> None:
        """The bookkeeping of an execution's slot on ``worker`` coming back: counts, idle
        state, recycling by executions and uptime. Who gets the slot next is the caller's."""
        worker.running -= 1
        worker.last_used = time.monotonic()
        self.per_plugin[plugin_id] -= 1
        if not worker.running:
            worker.idle.set()
            if worker.state == "busy":  # a dying worker is not idle: its actor replaces it
                proc = worker.proc
                worker.state = "idle" if proc is not None and proc.alive else "draining"
        if worker.executions >= self.spare_at:
            worker.spare_wanted.set()
        if worker.executions >= self._options.max_executions_per_worker:
            worker.drain("executions")
        elif time.monotonic() - worker.started_at > self._options.max_worker_uptime:
            worker.drain("uptime")
        self.in_use -= 1
        if not self.in_use:
            self.idle.set()

    async def acquire(
        self,
        job: Job,
        workspace: str | None,
        lender: Worker | None = None,
        batch: list[tuple[Job, str | None]] | None = None,
    ) -> Waiter | Worker:
        """A worker for ``job``: at once, or after waiting in the queue; then, the waiter,
        whose request the hand-over may have submitted already (see :class:`Waiter`).
        ``lender``: the worker of the invoking execution, whose slot ``job`` borrows.
        ``batch``: ``job`` stands for a batch of these, which takes one slot."""
        plugin_id = job.request.plugin_id
        if lender is not None:
            return self.take_lent(lender, plugin_id)
        if not self.waiters and self.plugin_has_room(plugin_id):
            worker = self.free_worker()
            if worker is not None:
                self.take(worker, plugin_id)
                self._stats.record_queue_wait(0.0)
                return worker
        self.check_room()
        waiter = Waiter(job, workspace, batch)
        self.waiters.append(waiter)
        self._grow(len(self.waiters))
        return await self.wait_queued(waiter, job)

    def take_lent(self, lender: Worker, plugin_id: str) -> Worker:
        """Take a slot of ``lender``, the invoking execution's worker, at once (a retired one
        stays retired: it only finishes its caller's work)."""
        draining = lender.state == "draining"
        self.take(lender, plugin_id)
        if draining:
            lender.state = "draining"
        self._stats.record_queue_wait(0.0)
        return lender

    def check_room(self) -> None:
        """Raise unless a new waiter may queue: not once the pool is closing (``close()``
        woke the last ones), not past ``max_queue`` (``QueueFullError``)."""
        if not self._running():
            raise BackendClosedError("the worker-pool backend is shutting down")
        if len(self.waiters) >= self._options.max_queue:
            self._stats.queue_full_rejections += 1
            raise QueueFullError(
                f"the pool's queue is full ({len(self.waiters)} waiting, capacity "
                f"{self._options.max_queue}); retry later or raise max_queue",
                details={"queue_size": len(self.waiters), "capacity": self._options.max_queue},
            )

    async def wait_queued(self, waiter: W, job: Job, of_plugin: bool = False) -> W:
        """Wait, queued, until ``waiter`` is handed a worker, and return it; raise why not:
        the pool closing, ``job``'s deadline, or ``acquire_timeout`` (no worker; ``of_plugin``:
        of ``job``'s plugin, as the sandboxed pool says)."""
        self.deadlines.add(
            min(job.deadline, trio.current_time() + self._options.acquire_timeout), waiter
        )
        await waiter.wait(self.waiters)  # woken by hand_over, give_up or close
        self._stats.record_queue_wait(time.perf_counter() - waiter.enqueued)
        if waiter.worker is not None:
            return waiter
        if not self._running():
            raise BackendClosedError("the worker-pool backend is shutting down")
        if trio.current_time() >= job.deadline:
            raise job.timeout_error(" while waiting for a worker")
        self._stats.acquire_timeouts += 1
        whose = f" of plugin {job.request.plugin_id!r}" if of_plugin else ""
        raise AcquireTimeoutError(
            f"no worker{whose} became free within {self._options.acquire_timeout:g} s "
            f"({len(self.waiters)} queued, {len(self._workers)} workers)"
        )

    def give_up(self, waiter: Waiter) -> None:
        """A queued execution's acquire timeout or deadline passed: wake it, workerless."""
        self.waiters.remove(waiter)
        waiter.wake()

    @staticmethod
    def still_queued(waiter: Waiter) -> bool:
        return not waiter.woken
