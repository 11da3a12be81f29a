"""PoolBatches: ``backend.map`` on the pool, several executions per worker slot.

``map`` asks :meth:`PoolBatches.size` how many requests each of its callers takes at a time.
A batch is admitted member by member (crash breaker, workspace), takes one worker slot from
the queue (the hand-over sends it in the step that frees the slot) and goes to the worker
in one frame (``host/batch.py``), where its members run one after another. So a batch holds
what one execution holds, and the pool's bounds stay as they are. Members the worker never
started (it was lost running an earlier one) and members with CPU or memory quotas (watched
one at a time) run again on their own, each as a single execution.

A batch is sized to take about :data:`BATCH_S` of a worker's time (measured as the batches
go, so slow handlers are sent one at a time): long enough that a frame and a wake-up cost
little per execution, short enough that results keep flowing.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Protocol, cast

import trio

from ... import tracing
from ...errors import ExecutionError, WorkerCrashedError
from ...host.batch import NOT_STARTED, Outcome
from ...types import ExecutionResult
from .queue import Waiter
from .slots import PoolParts, end_unused_lease

if TYPE_CHECKING:
    from ...host.batch import SubmittedBatch
    from ...host.handle import WorkerHandle
    from ...workspace import WorkspaceLease
    from .._executing import Executor
    from ..job import Job
    from .queue import WaitQueue
    from .slots import Worker

__all__ = ["BATCH_S", "MAX_BATCH", "PoolBatches", "PoolBatchesHost"]

#: The most executions in one batch, and the worker time a batch should take.
MAX_BATCH = 32
BATCH_S = 0.002


class PoolBatchesHost(PoolParts, Protocol):
    """What :class:`PoolBatches` uses of its backend (a ``WorkerPoolBackend``)."""

    kind: str
    _executor: Executor
    _queue: WaitQueue

    async def _run_job(self, job: Job, lender: Worker | None = None) -> ExecutionResult: ...


class PoolBatches:
    """``map``'s batches on one pool. See the module docstring."""

    def __init__(self, backend: PoolBatchesHost) -> None:
        self._backend = backend
        self._per_execution_s = 0.0  # a worker's time per member, as measured (0: unknown)

    def size(self, concurrency: int) -> int:
        """How many requests a caller of a ``map`` with ``concurrency`` takes at a time: 1
        (no batches) unless the callers outnumber the pool's slots well, so that a batch
        waits queued while another runs and every worker always has its next one."""
        backend = self._backend
        if backend.max_concurrent_per_plugin is not None:
            return 1  # a batch holds one slot: the cap counts executions, not batches
        if tracing.enabled():
            return 1  # a span per execution, each around its own run
        slots = backend.max_workers * backend.max_concurrency_per_worker
        return max(1, min(MAX_BATCH, concurrency // (2 * slots)))

    def take(self, wanted: int) -> int:
        """How many of ``wanted`` the next batch takes: fewer while handlers are slow."""
        if self._per_execution_s > 0:
            return max(1, min(wanted, int(BATCH_S / self._per_execution_s)))
        return min(wanted, 4)  # a first batch stays short: the handler may be slow

    async def execute(self, requests: list[Any], timeout: float | None) -> list[ExecutionResult]:
        """Run ``requests`` as one batch: a result each, in order, never an exception for a
        request's failure (see ``Executor.execute_batch``)."""
        return await self._backend._executor.execute_batch(requests, timeout, self._run)

    async def _run(self, jobs: list[Job]) -> list[ExecutionResult | ExecutionError]:
        backend = self._backend
        outcomes: list[Outcome] = [NOT_STARTED] * len(jobs)
        members: list[tuple[int, Job, WorkspaceLease, bool]] = []
        for index, job in enumerate(jobs):
            quotas = job.target.permissions.quotas
            if backend.kind == "process" and (quotas.memory_mb or quotas.cpu_s):
                continue  # watched, one at a time: runs on its own below
            plugin_id = job.request.plugin_id
            try:
                trial = backend._breaker.admit(plugin_id)
            except ExecutionError as exc:
                outcomes[index] = exc
                continue
            try:
                lease = backend.workspaces._reserve(job.request.execution_id)
            except ExecutionError as exc:  # a duplicate id
                backend._breaker.record(plugin_id, None, trial=trial)
                outcomes[index] = exc
                continue
            members.append((index, job, lease, trial))
        if members:
            for (index, *_), outcome in zip(members, await self._run_members(members), strict=True):
                outcomes[index] = outcome
        again = [index for index, outcome in enumerate(outcomes) if outcome is NOT_STARTED]
        if again:
            async with trio.open_nursery() as nursery:
                for index in again:
                    nursery.start_soon(self._run_alone, jobs, outcomes, index)
        done = [outcome for outcome in outcomes if outcome is not NOT_STARTED]
        assert len(done) == len(outcomes), "every member ran or failed"
        return cast("list[ExecutionResult | ExecutionError]", done)

    async def _run_alone(self, jobs: list[Job], outcomes: list[Outcome], index: int) -> None:
        try:
            outcomes[index] = await self._backend._run_job(jobs[index])
        except ExecutionError as exc:
            outcomes[index] = exc

    async def _run_members(
        self, members: list[tuple[int, Job, WorkspaceLease, bool]]
    ) -> list[Outcome]:
        """Run admitted members as one batch on one worker slot; settle and release each."""
        backend = self._backend
        queue = backend._queue
        batch: list[tuple[Job, str | None]] = [
            (job, os.fspath(lease)) for _, job, lease, _ in members
        ]
        # The batch queues as its member with the latest deadline: the others, should their
        # own pass meanwhile, end as TIMEOUT when their turn comes (as if queued alone).
        ticket = max((job for job, _ in batch), key=lambda job: job.deadline)
        try:
            got = await queue.acquire(ticket, None, None, batch)
        except BaseException as exc:
            for _, job, lease, trial in members:
                lease.release_unused()
                backend._breaker.record(job.request.plugin_id, None, trial=trial)
            if isinstance(exc, ExecutionError):
                return [ExecutionError.from_dict(exc.to_dict()) for _ in members]
            raise
        if isinstance(got, Waiter):
            worker, proc, submitted = got.worker, got.proc, got.pending
            assert worker is not None
        else:
            worker, proc, submitted = got, None, None
        worker.executions += len(batch)
        for job, _ in batch:
            job.slot = worker
            backend._usage[(job.request.plugin_id, job.request.handler_id)] += 1
        outcomes: list[Outcome] | None = None
        lost_at: int | None = None
        try:
            if submitted is None or proc is None:
                proc = worker.proc
                if proc is None:
                    raise WorkerCrashedError(f"worker {worker.name} stopped before it could run")
                submitted = queue.submit_batch(proc, batch)
            started = time.perf_counter()
            outcomes = await proc.collect_batch(submitted, backend=backend.name)
            lost_at = cast("SubmittedBatch", submitted).lost_at
            self._measured(time.perf_counter() - started, len(batch))
            return outcomes
        except ExecutionError:  # the worker was gone before the batch could go out
            outcomes = [NOT_STARTED] * len(batch)
            return outcomes
        finally:
            self._settle(worker, proc, members, outcomes, lost_at)
            queue.give_back(worker, ticket.request.plugin_id, executions=len(batch))
            ends: list[Outcome | None] = [None] * len(members) if outcomes is None else [*outcomes]
            for (_, job, lease, _), outcome in zip(members, ends, strict=True):
                if outcome is NOT_STARTED:
                    lease.release_unused()  # it runs again, with a lease of its own
                    continue
                result = outcome if isinstance(outcome, ExecutionResult) else None
                if not end_unused_lease(lease, job, result):
                    await lease.release()  # not cancellable; see WorkspaceLease.release

    def _settle(
        self,
        worker: Worker,
        proc: WorkerHandle | None,
        members: list[tuple[int, Job, WorkspaceLease, bool]],
        outcomes: list[Outcome] | None,
        lost_at: int | None,
    ) -> None:
        """Tell the crash breaker about each member: only the one running when the worker
        was lost may have killed it; the others ran to their answer, or never ran."""
        backend = self._backend
        for position, (_, job, _, trial) in enumerate(members):
            plugin_id = job.request.plugin_id
            outcome = None if outcomes is None else outcomes[position]
            if position == lost_at or isinstance(outcome, WorkerCrashedError):
                backend._settle(worker, proc, plugin_id, None, trial)
            elif outcome is None or outcome is NOT_STARTED:
                backend._breaker.record(plugin_id, None, trial=trial)
            else:
                backend._breaker.record(plugin_id, False, trial=trial)

    def _measured(self, seconds: float, count: int) -> None:
        each = seconds / count
        mean = self._per_execution_s
        self._per_execution_s = each if mean == 0 else 0.8 * mean + 0.2 * each
