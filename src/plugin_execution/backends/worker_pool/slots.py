"""The pool's records of its worker slots, and the settings its parts read.

A leaf of the pool's package: :mod:`.queue` and :mod:`.actors` both work on these records,
and read the pool's options through :class:`PoolOptions` (the backend is one), so neither
imports the other or the backend.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import attrs
import trio

if TYPE_CHECKING:
    from collections import Counter

    from ...host.handle import WorkerHandle
    from ...manifest import Permissions
    from ...types import ExecutionResult
    from ...workspace import WorkspaceLease, WorkspaceManager
    from .._breaker import CrashBreaker
    from ..job import Job

__all__ = [
    "PluginKey",
    "PoolOptions",
    "PoolParts",
    "Spare",
    "Worker",
    "WorkerState",
    "end_unused_lease",
    "on_lent_slot",
]

T = TypeVar("T")

WorkerState = Literal["starting", "idle", "busy", "draining", "stopped"]


class PoolOptions(Protocol):
    """The options of a pool (see ``WorkerPoolBackend``), read live by its parts."""

    min_workers: int
    max_workers: int
    idle_timeout: float
    max_concurrency_per_worker: int
    max_concurrent_per_plugin: int | None
    warmup_policy: Literal["none", "marked", "top_n"]
    warmup_top_n: int
    max_warm_handlers: int
    max_queue: int
    acquire_timeout: float
    max_executions_per_worker: int
    max_worker_uptime: float
    max_worker_memory_mb: float | None
    health_check_interval: float
    health_check_timeout: float
    cancel_grace: float
    shutdown_timeout: float


class PoolParts(PoolOptions, Protocol):
    """What the pool's parts that run executions (the sandboxed pool, map's batches) use
    of the backend itself (a ``WorkerPoolBackend``): its workspaces, its crash breaker and
    usage counts, its name, and how an execution's end is told to the breaker."""

    workspaces: WorkspaceManager
    _breaker: CrashBreaker
    _usage: Counter[tuple[str, str]]

    @property
    def name(self) -> str: ...

    def _settle(
        self,
        worker: Worker,
        proc: WorkerHandle | None,
        plugin_id: str,
        result: ExecutionResult | None,
        trial: bool,
        group: Any = None,  # a queue.Group (not imported: queue imports this module)
        pending: Any = None,
    ) -> None: ...


@attrs.frozen(cache_hash=True)
class PluginKey:
    """What a sandboxed worker is restricted to: one plugin (its id and files) with one set
    of permissions. Its handlers run only on workers of their key. (Its hash, of the whole
    permissions, is computed once: the queue looks keys up on every call.)"""

    plugin_id: str
    root: str | None
    permissions: Permissions


class Worker:
    """The pool's record of one worker slot: the handle it serves on now (``proc``), what
    runs there, and its recycling (``retire``, set by :meth:`drain`; a spare successor).
    ``plugin``: the one plugin it serves, on a sandboxed pool (None: any)."""

    __slots__ = (
        "executions",
        "idle",
        "last_used",
        "name",
        "permanent",
        "plugin",
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

    def __init__(self, name: str, permanent: bool, plugin: PluginKey | None = None) -> None:
        self.name = name
        self.permanent = permanent
        self.plugin = plugin
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
        self.spare: Spare | None = None  # its successor, started ahead of its recycling
        self.spare_wanted = trio.Event()

    def drain(self, reason: str) -> None:
        """Take no more work to this worker; its actor replaces it once it is idle."""
        if not self.retire.is_set():
            self.retire_reason = reason
            self.state = "draining"
            self.retire.set()


class Spare:
    """A worker started ahead for a slot: ``ready`` once it is up (``proc``) or failed
    (``proc`` None); ``done`` ends its life (the slot served on it and retired it);
    cancelling ``scope`` gives its process slot back to a worker that needs one."""

    __slots__ = ("done", "proc", "ready", "scope")

    def __init__(self) -> None:
        self.proc: WorkerHandle | None = None
        self.ready = trio.Event()
        self.done = trio.Event()
        self.scope = trio.CancelScope()


async def on_lent_slot(job: Job, run: Callable[[], Awaitable[T]]) -> T:
    """``await run()`` on the worker slot that ``job``'s caller (``ctx.invoke``) lends it,
    one of the caller's invocations at a time; waiting for the loan counts toward the job's
    deadline."""
    assert job.parent is not None
    lent = job.parent.lent_slot()
    with trio.CancelScope(deadline=job.deadline) as waiting:
        await lent.acquire()
    if waiting.cancelled_caught:
        raise job.timeout_error(" while its caller's worker was lent to another of its invocations")
    try:
        return await run()
    finally:
        lent.release()


def end_unused_lease(lease: WorkspaceLease, job: Job, result: ExecutionResult | None) -> bool:
    """Give back the workspace lease of ``job``, which ended with ``result`` (None: no
    result), when there is nothing to remove (the usual case: neither the worker, which says
    so, nor a platform service on the host, no session being needed, made the directory):
    done at once, True. Else False, and the caller awaits ``lease.release()``, which removes
    it (not cancellable: see ``WorkspaceLease.release``); hot paths save a coroutine."""
    if result is not None and result.metadata.get("workspace_id") is None and job.session_unused:
        lease.release_unused()
        return True
    return False
