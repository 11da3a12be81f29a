"""Per-plugin placement: the sandboxed pool's queue and worker slots.

On a sandboxed pool every worker belongs to one :class:`~.slots.PluginKey` (a plugin, with
one set of permissions) from its start: its kernel sandbox is made from that plugin's grants,
and only that plugin's executions are handed to it. :class:`PluginQueue` and
:class:`PluginActors` are the pool's :class:`~.queue.WaitQueue` and
:class:`~.actors.WorkerActors` with that rule; the unsandboxed pool never runs this code.

- Workers are started on demand, for the plugin that waits (``min_workers`` are not started
  ahead: a worker belongs to no plugin before its first call), and retired after
  ``idle_timeout`` idle.
- At most ``max_workers`` are alive in total, whatever the number of plugins. A plugin that
  waits and has no worker gets a slot: a free one, or an idle worker of a plugin nobody waits
  for is retired for it; when every worker is busy, the plugin with the most workers gives
  one up (retired once its execution ends) as soon as the waiting one has queued for
  :data:`SWITCH_AFTER_S`: a plugin waits a bounded time, and workers are not traded on every
  call when more plugins than workers are busy.
- Executions of one plugin are handed to its workers oldest first, as on any pool; when more
  than three of a plugin's callers queue, a freed worker of that plugin gets the oldest of them
  as one group (one ``batch`` frame, see ``WaitQueue.hand_over_group``).
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from ...errors import ExecutionError
from .actors import WorkerActors
from .queue import GROUP_MAX, Group, Waiter, WaitQueue
from .slots import PluginKey, Worker

if TYPE_CHECKING:
    from ...host.handle import WorkerHandle
    from ...workspace import WorkspaceLease
    from ..job import Job

__all__ = ["SERVE_AT_LEAST_S", "SWITCH_AFTER_S", "PluginActors", "PluginQueue", "key_of"]

#: How long the oldest caller of a plugin without a worker waits, every worker being busy
#: with other plugins, before one of them is retired for it: about what starting a sandboxed
#: worker costs, so that at most about half the time goes to starting workers.
SWITCH_AFTER_S = 0.05
#: How long a worker serves its plugin before it may be retired for another that waits: a
#: worker's start (tens of ms, under bubblewrap) then costs a fraction of what it serves.
SERVE_AT_LEAST_S = 0.25
#: After a worker of a plugin failed to start, how long until another is tried for it.
RETRY_START_S = 1.0

_keys: dict[int, tuple[object, PluginKey]] = {}


def key_of(job: Job) -> PluginKey:
    """The placement key of ``job``: its plugin, root and permissions (cached per resolved
    handler, which the registry keeps until the plugin is registered again)."""
    target = job.target
    cached = _keys.get(id(target))
    if cached is not None and cached[0] is target:
        return cached[1]
    key = PluginKey(job.request.plugin_id, target.root, target.permissions)
    if len(_keys) > 4096:
        _keys.clear()
    _keys[id(target)] = (target, key)
    return key


class PluginWaiter(Waiter):
    """A queued execution that only a worker of ``key`` may take. The hand-over may reserve
    its workspace (``lease``, under the worker's directory) and submit it, as on any pool."""

    __slots__ = ("key", "lease", "submit")

    def __init__(self, job: Job, key: PluginKey, *, submit: bool) -> None:
        super().__init__(job, None)
        self.key = key
        self.submit = submit
        self.lease: WorkspaceLease | None = None


class PluginQueue(WaitQueue):
    """The wait queue of a sandboxed pool: an execution goes to a worker of its plugin.
    ``actors`` start and retire workers for the plugins that wait (see the module);
    ``workspace_for(worker, job)``: the lease of ``job``'s workspace under ``worker``'s
    directory, for the hand-over to submit (None: the caller does it)."""

    def __init__(
        self,
        *args: Any,
        actors: PluginActors,
        workspace_for: Callable[[Worker, Job], WorkspaceLease | None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._actors = actors
        self._workspace_for = workspace_for
        #: The waiters of each plugin, oldest first (as in ``waiters``; woken ones are
        #: dropped when met).
        self._by_key: dict[PluginKey, deque[PluginWaiter]] = {}
        self._started: dict[PluginKey, float] = {}  # when each plugin last got a worker

    def lender_for(self, job: Job) -> Worker | None:
        """As the pool's (``ctx.invoke``): the invoking execution's worker when it serves
        ``job``'s plugin too and no other worker of that plugin is free."""
        parent = job.parent
        if parent is None or not isinstance(parent.slot, Worker):
            return None
        slot = parent.slot
        if slot.plugin == key_of(job) and self.free_worker_for(slot.plugin) is None:
            return slot  # as on any pool: never wait for what its callers hold
        return None

    def free_worker_for(self, key: PluginKey) -> Worker | None:
        for worker in self._workers.values():
            if (worker.plugin is key or worker.plugin == key) and self.has_room(worker):
                return worker
        return None

    def _head(self, key: PluginKey) -> PluginWaiter | None:
        """The oldest waiter of ``key`` still queued."""
        queue = self._by_key.get(key)
        while queue:
            if not queue[0].woken:
                return queue[0]
            queue.popleft()
        self._by_key.pop(key, None)
        return None

    def hand_over(self, worker: Worker, waiter: Waiter) -> None:
        assert isinstance(waiter, PluginWaiter)
        if waiter.submit:
            try:
                waiter.lease = self._workspace_for(worker, waiter.job)
            except ExecutionError:
                waiter.lease = None  # the caller reserves it again and gets the error itself
            if waiter.lease is not None:
                waiter.workspace = os.fspath(waiter.lease)
        super().hand_over(worker, waiter)

    def close(self) -> None:
        self._by_key.clear()
        super().close()

    def dispatch(self) -> None:
        """Hand each free worker to the oldest waiters of its plugin; then see to the
        plugins still waiting (start, or make room for, their workers)."""
        if not self.waiters:
            return
        for worker in list(self._workers.values()):
            if worker.plugin is not None:
                self._feed(worker)
        if self.waiters:
            self._place()

    def _feed(self, worker: Worker) -> None:
        """Hand ``worker`` to its plugin's oldest waiters while it has room (several as one
        group when more than three wait and no per-plugin cap counts them)."""
        key = worker.plugin
        assert key is not None
        queue = self._by_key.get(key)  # looked up once: every give-back under load comes here
        if queue is None:
            return
        grouping = self._options.max_concurrent_per_plugin is None and GROUP_MAX > 1
        while self.has_room(worker):
            while queue and queue[0].woken:  # cancelled ones are dropped when met
                queue.popleft()
            if not queue:
                if self._by_key.get(key) is queue:
                    del self._by_key[key]
                return
            waiter = queue[0]
            if not self.plugin_has_room(waiter.plugin_id):
                return
            if grouping and len(queue) > 3 and self._hand_over_group(worker, queue):
                continue
            queue.popleft()
            self.hand_over(worker, waiter)

    def _hand_over_group(self, worker: Worker, queue: deque[PluginWaiter]) -> bool:
        """:meth:`WaitQueue.hand_over_group` for the oldest waiters of ``worker``'s plugin
        (``queue``), their workspaces reserved under the worker's directory. False when no
        group of two or more can go (the usual hand-over then takes the oldest alone)."""
        proc = worker.proc
        size = self.group_size(len(queue))
        group: list[PluginWaiter] = []
        for waiter in queue:
            if len(group) == size or not waiter.submit:
                break
            if not waiter.woken:  # a cancelled one is dropped when met
                group.append(waiter)
        if len(group) < 2 or proc is None:
            return False
        leases: list[WorkspaceLease] = []
        submitted = None
        try:
            for waiter in group:
                lease = self._workspace_for(worker, waiter.job)
                if lease is None:  # no worker process serves the directory now
                    break
                leases.append(lease)
            else:
                jobs: list[tuple[Job, str | None]] = [
                    (w.job, os.fspath(lease)) for w, lease in zip(group, leases, strict=True)
                ]
                submitted = self.submit_batch(proc, jobs)
        except ExecutionError:  # a duplicate id, the worker gone: one at a time says so
            pass
        if submitted is None:
            for lease in leases:
                lease.release_unused()
            return False
        waiters = self.waiters
        for waiter in group:  # the oldest: at the front of both, unless cancelled ones are
            if queue[0] is waiter:
                queue.popleft()
            else:
                queue.remove(waiter)
            if waiters[0] is waiter:
                waiters.popleft()
            else:
                waiters.remove(waiter)
        self.take(worker, group[0].plugin_id)
        shared = Group(submitted)
        for waiter, lease, pending in zip(group, leases, submitted.pendings, strict=True):
            waiter.lease = lease
            waiter.workspace = os.fspath(lease)
            waiter.worker = worker
            waiter.proc = proc
            waiter.pending = pending
            waiter.group = shared
            waiter.wake()
        return True

    def give_back(
        self, worker: Worker, plugin_id: str, group: Group | None = None, executions: int = 1
    ) -> None:
        if not self.slot_freed(worker, group, executions):
            return
        self.release(worker, plugin_id)
        if not self.waiters:
            return
        if self._options.max_concurrent_per_plugin is not None:
            self.dispatch()
            return
        self._feed(worker)  # its own plugin's callers first: no scan when only they wait
        if self._by_key and (len(self._by_key) > 1 or worker.plugin not in self._by_key):
            self._place()  # other plugins wait

    async def acquire(
        self,
        job: Job,
        workspace: str | None,
        lender: Worker | None = None,
        batch: list[tuple[Job, str | None]] | None = None,
    ) -> Waiter | Worker:
        """A worker of ``job``'s plugin: at once, or after waiting in the queue (see
        :meth:`WaitQueue.acquire`). ``workspace``: anything but None lets the hand-over
        reserve and submit (see :class:`PluginWaiter`). ``lender``: of the same plugin only.
        ``batch``: not here (a sandboxed pool runs ``map`` one execution at a time)."""
        assert batch is None, "a sandboxed pool takes no batches"
        plugin_id = job.request.plugin_id
        key = key_of(job)
        if lender is not None and (lender.plugin is key or lender.plugin == key):
            return self.take_lent(lender, plugin_id)
        if self._head(key) is None and self.plugin_has_room(plugin_id):
            worker = self.free_worker_for(key)
            if worker is not None:
                self.take(worker, plugin_id)
                self._stats.record_queue_wait(0.0)
                return worker
        self.check_room()
        waiter = PluginWaiter(job, key, submit=workspace is not None)
        self.waiters.append(waiter)
        queue = self._by_key.get(key)
        if queue is None:
            queue = self._by_key[key] = deque()
        queue.append(waiter)
        if not self._served_alone(key):
            self._place()
        return await self.wait_queued(waiter, job, of_plugin=True)

    def _served_alone(self, key: PluginKey) -> bool:
        """Whether ``key``'s plugin is the only one waiting, has a worker, and every worker
        slot is taken: then :meth:`_place` has nothing to do (the common case under load,
        met by every queued call: one pass over the workers, nothing built)."""
        if len(self._by_key) != 1:
            return False
        alive = 0
        served = False
        for worker in self._workers.values():
            state = worker.state
            if state != "stopped":
                alive += 1
                if state != "draining" and (worker.plugin is key or worker.plugin == key):
                    served = True
        return served and alive >= self._options.max_workers

    def _place(self) -> None:
        """Workers for the plugins that wait: one more for each whose waiters outnumber its
        workers, while there is room; else room is made (see the module)."""
        if not self._running():
            return
        workers = [w for w in self._workers.values() if w.state != "stopped"]
        room = self._options.max_workers - len(workers)
        if room <= 0:  # the common case under load: every waiting plugin has its workers
            served = {w.plugin for w in workers if w.state != "draining"}
            if all(key in served for key in list(self._by_key) if self._head(key) is not None):
                return  # (a frequent case under load: no Counter, no dict of heads)
        serving = Counter(w.plugin for w in workers if w.state != "draining")
        heads = {key: head for key in list(self._by_key) if (head := self._head(key))}
        starting = Counter(w.plugin for w in workers if w.state == "starting")
        started = self._started
        # Plugins with no worker first, the one given a worker longest ago (or never) first:
        # by oldest waiter alone, a retired worker's slot would go straight back.
        order = sorted(
            heads, key=lambda k: (serving[k] > 0, started.get(k, 0.0), heads[k].enqueued)
        )
        for key in order:
            count = len(self._by_key[key])
            if room > 0 and starting[key] < count and serving[key] < count:
                if not self._actors.start_for(key):
                    continue
                if len(started) > 4096:
                    started.clear()
                started[key] = time.perf_counter()
                room -= 1
                serving[key] += 1
        failed, now = self._actors.failed, time.monotonic()
        starved = [
            k for k in order if not serving[k] and now - failed.get(k, -1e9) >= RETRY_START_S
        ]
        if starved:
            victim = self._victim(workers, serving, heads[starved[0]].enqueued)
            if victim is not None:
                victim.drain("shrink")  # its slot is freed once it is idle

    def _victim(
        self, workers: list[Worker], serving: Counter[PluginKey | None], since: float
    ) -> Worker | None:
        """The worker to retire for a plugin that waits with none of its own: an idle one
        nobody of its plugin waits for; else, once ``since`` is :data:`SWITCH_AFTER_S` ago,
        the longest-serving of the plugin with the most workers among those that served
        :data:`SERVE_AT_LEAST_S`. None while a slot is already being freed."""
        if any(w.state == "draining" and w.retire_reason == "shrink" for w in workers):
            return None
        candidates = [w for w in workers if w.state in ("idle", "busy")]
        for worker in candidates:
            if not worker.running and not worker.sessions and worker.plugin not in self._by_key:
                return worker
        if time.perf_counter() - since < SWITCH_AFTER_S:
            return None
        now = time.monotonic()
        candidates = [w for w in candidates if now - w.started_at >= SERVE_AT_LEAST_S]
        if not candidates:
            return None
        return max(candidates, key=lambda w: (serving[w.plugin], -w.running, -w.started_at))


class PluginActors(WorkerActors):
    """The worker slots of a sandboxed pool: each is started for one plugin (``launch``
    starts its worker, sandboxed for that plugin), and serves only it."""

    def __init__(
        self,
        *args: Any,
        launch: Callable[[Worker], AsyncIterator[WorkerHandle]],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._launch = asynccontextmanager(launch)
        #: When a worker of each plugin last failed to start (cleared by one that starts).
        self.failed: dict[PluginKey, float] = {}

    def launch(self, worker: Worker) -> Any:
        return self._launch(worker)

    def serves(self, worker: Worker, job: Job) -> bool:
        key = key_of(job)
        return worker.plugin is key or worker.plugin == key

    def start_for(self, key: PluginKey) -> bool:
        """Start a (transient) worker for ``key``'s plugin, counted from now on; not within
        :data:`RETRY_START_S` of one that failed to start (its sandbox, say): False."""
        failed = self.failed.get(key)
        if failed is not None and time.monotonic() - failed < RETRY_START_S:
            return False
        if self.nursery is not None:
            worker = self.new_worker(False)
            worker.plugin = key
            self.nursery.start_soon(self._started_for, worker, key)
        return True

    async def _started_for(self, worker: Worker, key: PluginKey) -> None:
        try:
            await self.add_worker(False, worker)
        except Exception as exc:  # its waiters' acquire timeout reports the consequence
            self._stats.last_error = f"could not start a worker for {key.plugin_id!r}: {exc}"
            if len(self.failed) > 4096:
                self.failed.clear()
            self.failed[key] = time.monotonic()
        else:
            self.failed.pop(key, None)

    def start_extra(self, job: Job) -> None:
        if len(self.workers) < self._options.max_workers:
            self.start_for(key_of(job))

    def grow(self, queued: int) -> None:
        """Growth is per plugin here (:meth:`PluginQueue._place`)."""
