"""The sandboxed pool: warm workers, each in the kernel sandbox of the one plugin it serves.

With ``sandbox`` on, :class:`~.backend.WorkerPoolBackend` keeps its workers per plugin (see
:mod:`.placement`) and starts each the way the subprocess backend starts a child, restricted
to its plugin's grants before any plugin code is imported: capabilities dropped, Landlock
(read: the interpreter, the plugin's root, ``fs.read``; write: the worker's own directory and
``fs.write``; execute: ``shell.allow``; TCP: ``network.connect``), seccomp (no leaving the
process group; no fork or exec without ``shell.allow``), bubblewrap's namespaces, an
environment of the base variables, the granted ``env.read`` ones and the pool's ``env``
option, and rlimits (the plugin's ``quotas.memory_mb`` as its address space).

Each worker gets a directory of its own (a lease of the pool's workspace manager, its cwd,
``HOME`` and ``TMPDIR``); its executions' workspaces are made under it, the only place it may
write besides ``fs.write``. What persists between executions on one worker (memory, threads,
files in that directory) is therefore only ever its own plugin's; the directory is removed
when the worker is retired. :class:`SandboxedPool` holds it all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ...channels.bridge import run_session
from ...errors import WorkerCrashedError
from ...host.launchers import ProcessLauncher
from ...host.limits import WorkerLimits
from ...sandbox.policy import SandboxPolicy
from ...sandbox.support import detect
from ...workspace import validate_execution_id
from .._quota_watch import execute_watched
from ..subprocess import child_environment
from .placement import PluginActors, PluginQueue, PluginWaiter
from .queue import collect_handed
from .slots import PoolParts, Worker, end_unused_lease

if TYPE_CHECKING:
    from ...host.handle import WorkerHandle
    from ...registry import PluginRegistry
    from ...stats import StatsRecorder
    from ...types import ExecutionResult
    from ...workspace import WorkspaceLease
    from ..job import Job

__all__ = ["SandboxedPool", "SandboxedPoolHost"]

_log = logging.getLogger(__name__)


class SandboxedPoolHost(PoolParts, Protocol):
    """What :class:`SandboxedPool` uses of its backend (a ``WorkerPoolBackend``)."""

    registry: PluginRegistry
    _stats: StatsRecorder

    def _dispatch(self) -> None: ...

    def _is_running(self) -> bool: ...


#: ``RLIMIT_NOFILE`` of a sandboxed worker when the pool's ``open_files`` is not given: an
#: untrusted plugin's process may not take as many fds as the host's own limit allows. Above
#: the subprocess backend's 256 per child: a warm worker serves executions one after another
#: and, with ``max_concurrency_per_worker``, several at once.
SANDBOXED_OPEN_FILES = 1024


class SandboxedPool:
    """The sandboxed pool's own parts, made by :class:`~.backend.WorkerPoolBackend` when
    ``sandbox`` is on (the unsandboxed pool has none of it): its launcher (spawned workers,
    each in the sandbox of its plugin: no zygote, whose children share its view), actors and
    queue, the path of an execution (``run_job``) and of a channel session, and how a worker
    starts."""

    def __init__(
        self,
        backend: SandboxedPoolHost,
        sandbox: bool | tuple[str, ...],
        memory_mb: int | None,
        open_files: int | None,
        env: dict[str, str],
    ) -> None:
        self.backend = backend
        self._sandbox_option = sandbox
        self._sandbox: SandboxPolicy | None = None
        self._memory_mb = memory_mb
        self._open_files = SANDBOXED_OPEN_FILES if open_files is None else open_files
        self._pool_env = env
        #: Each live worker's own directory and the layers it runs under.
        self._homes: dict[WorkerHandle, tuple[str, tuple[str, ...]]] = {}
        self.launcher = ProcessLauncher(close_grace=backend.cancel_grace, sweep_group=True)
        self.actors = PluginActors(
            backend,
            self.launcher,
            backend._stats,
            backend.registry,
            backend._usage,
            dispatch=backend._dispatch,
            running=backend._is_running,
            launch=self._launch_sandboxed,
        )
        self.queue = PluginQueue(
            backend,
            self.actors.workers,
            backend._stats,
            grow=self.actors.grow,
            running=backend._is_running,
            actors=self.actors,
            workspace_for=self._workspace_for,
        )

    async def start(self) -> None:
        support = await trio.to_thread.run_sync(detect)  # once per process, then cached
        self._sandbox = SandboxPolicy(self._sandbox_option, support)  # a missing layer raises
        if self._sandbox.missing:
            _log.warning(
                "worker pool: sandbox layers not available on this machine: %s",
                "; ".join(f"{name} ({why})" for name, why in self._sandbox.missing.items()),
            )

    def report(self) -> dict[str, Any]:
        if self._sandbox is None:
            return {}
        report = self._sandbox.report("spawn")
        report["placement"] = "per plugin: each worker serves one plugin, sandboxed for it"
        return report

    # -- a worker ---------------------------------------------------------------------------

    async def _launch_sandboxed(self, worker: Worker) -> AsyncIterator[WorkerHandle]:
        """Start ``worker``'s process in the sandbox of its plugin, with a directory of its
        own (removed once it is reaped)."""
        key = worker.plugin
        assert key is not None and self._sandbox is not None
        lease = await self.backend.workspaces.acquire(
            f".worker-{worker.name}-{os.urandom(4).hex()}"
        )
        home = os.fspath(lease)
        try:
            env = child_environment(key.permissions, home)
            env.update(self._pool_env)
            sandbox = self._sandbox.for_child(
                key.permissions, workspace=home, root=key.root, env=env, zygote=False
            )
            memory = [m for m in (self._memory_mb, key.permissions.quotas.memory_mb) if m]
            limits = WorkerLimits(
                address_space_mb=min(memory) if memory else None, open_files=self._open_files
            )
            async with self.launcher.open(
                cwd=home, env=env, limits=limits, sandbox=sandbox, forked=False
            ) as proc:
                self._homes[proc] = (home, sandbox.layers)
                try:
                    yield proc
                finally:
                    del self._homes[proc]
        finally:
            await lease.release()

    # -- an execution -----------------------------------------------------------------------

    def _workspace_for(self, worker: Worker, job: Job) -> WorkspaceLease | None:
        """The lease of ``job``'s workspace under ``worker``'s directory (None: no worker
        process serves there now)."""
        home = self._homes.get(worker.proc) if worker.proc is not None else None
        if home is None:
            return None
        lease = self.backend.workspaces._reserve(job.request.execution_id, home[0])
        job.workspace = os.fspath(lease)  # the host's ctx.fs and ctx.shell work there too
        return lease

    async def run_job(self, job: Job, lender: Worker | None = None) -> ExecutionResult:
        """As the pool's ``_run_job``, on a worker of the job's plugin (``lender``: the one
        the queue's ``lender_for`` gave); the workspace lies under the worker's directory, so
        it is reserved once the worker is known; ``metadata["sandbox"]``: the worker's
        layers."""
        await trio.lowlevel.checkpoint_if_cancelled()
        request = job.request
        trial = self.backend._breaker.admit(request.plugin_id)  # PluginQuarantinedError: refused
        quotas = job.target.permissions.quotas
        watched = bool(quotas.memory_mb or quotas.cpu_s)
        stats = self.backend._stats
        stats.queued = len(self.queue.waiters) + 1  # as the pool counts its queue
        try:
            got: Any = await self.queue.acquire(  # a PluginWaiter or a Worker
                job, None if watched else "", lender
            )
        except BaseException:
            self.backend._breaker.record(request.plugin_id, None, trial=trial)
            raise
        stats.queued = len(self.queue.waiters)
        group = None
        if isinstance(got, PluginWaiter):
            worker, proc, pending, lease = got.worker, got.proc, got.pending, got.lease
            group = got.group
            assert worker is not None
        else:
            worker, proc, pending, lease = got, None, None, None
        job.slot = worker  # what its own invocations may borrow
        self.backend._usage[(request.plugin_id, request.handler_id)] += 1
        result = None
        try:
            worker.executions += 1
            if pending is not None and proc is not None:  # submitted at the hand-over
                layers = self._homes[proc][1]
                result = await collect_handed(proc, pending, group, self.backend.name)
            else:
                proc = worker.proc
                if lease is None and proc is not None:
                    lease = self._workspace_for(worker, job)
                if proc is None or lease is None:
                    raise WorkerCrashedError(f"worker {worker.name} stopped before it could run")
                layers = self._homes[proc][1]
                if watched:
                    result = await execute_watched(
                        proc,
                        job,
                        quotas,
                        backend=self.backend.name,
                        workspace=os.fspath(lease),
                        cancel_grace=self.backend.cancel_grace,
                    )
                else:
                    pending = self.queue.submit(proc, job, os.fspath(lease))
                    result = await proc.collect(pending, backend=self.backend.name)
            result.metadata["sandbox"] = list(layers)  # a dict of its own: no copy
            return result
        finally:
            self.backend._settle(worker, proc, request.plugin_id, result, trial, group, pending)
            self.queue.give_back(worker, request.plugin_id, group)
            if lease is not None and not end_unused_lease(lease, job, result):
                await lease.release()  # not cancellable; see WorkspaceLease.release

    async def run_channel_session(self, job: Job) -> ExecutionResult:
        """A channel session on a live worker of its plugin (see the pool's
        ``_run_session``), its workspace under that worker's directory."""
        actors: PluginActors = self.actors
        worker = await actors.session_worker(job)
        proc = worker.proc
        if proc is None or proc not in self._homes:
            raise WorkerCrashedError(f"worker {worker.name} stopped before it could run")
        worker.sessions += 1
        home, _ = self._homes[proc]
        lease = self.backend.workspaces._reserve(
            validate_execution_id(job.request.execution_id), home
        )
        job.workspace = os.fspath(lease)
        try:
            return await run_session(
                proc,
                job,
                backend=self.backend.name,
                workspace=os.fspath(lease),
                cancel_grace=self.backend.cancel_grace,
            )
        finally:
            worker.sessions -= 1
            if not worker.running and not worker.sessions:
                worker.idle.set()
            await lease.release()
