"""SubprocessBackend: a fresh child process per execution, for untrusted plugins.

Each execution gets its own worker child: its own session and process group, cwd = the
execution's workspace, an environment reduced to an allow-list (a minimal base plus the
variables the manifest's ``env.read`` grants), and resource limits (``setrlimit``) applied
before plugin code is imported. Nothing is shared between executions.

A timeout sends ``Cancel``, waits ``cancel_grace`` seconds, then SIGKILLs the whole process
group: even a tight CPU loop or a ``time.sleep`` in a sync handler is stopped.

With ``sandbox`` (on by default) the kernel enforces the manifest's permissions too: each
child drops root's capabilities, restricts itself with Landlock and seccomp, and runs under
bubblewrap, as far as this machine supports them (see ``plugin_execution.sandbox``).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import signal
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any, Literal

import attrs
import trio

from ..channels.bridge import run_session
from ..errors import (
    BackendClosedError,
    ExecutionError,
    ExecutionTimeoutError,
    WorkerCrashedError,
)
from ..host.handle import WorkerHandle
from ..host.launchers import ProcessLauncher
from ..host.limits import WorkerLimits
from ..host.process import WorkerProcess
from ..host.spare import ForkedAhead
from ..host.zygote import BASE_ENV, Zygote, ZygoteKeeper
from ..manifest import ChannelSpec, HandlerSpec, Permissions
from ..sandbox.policy import SandboxPolicy, check_layers
from ..sandbox.support import detect
from ..types import ExecutionResult, check_serializable
from ._breaker import CrashBreaker
from ._child_slots import ChildSlots
from .base import ExecutionBackend, Job

__all__ = ["SubprocessBackend"]

_log = logging.getLogger(__name__)


#: Variables every child gets (when the host has them): enough to run Python and locale.
def child_environment(
    permissions: Permissions, workspace: str, host_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The child's whole environment: the base, the granted variables, HOME/TMPDIR."""
    host_env = os.environ if host_env is None else host_env
    granted = permissions.env.read
    env = {}
    for name in BASE_ENV:
        value = host_env.get(name)
        if value is not None:
            env[name] = value
    if granted:  # (most plugins are granted none: then the host's variables are not walked)
        for name, value in host_env.items():
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in granted):
                env[name] = value
    env["HOME"] = env["TMPDIR"] = workspace
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return env


class SubprocessBackend(ExecutionBackend):
    """Runs every execution in a fresh, isolated child process.

    Options:

    - ``start_method``: ``"spawn"`` (a fresh ``python -I``, the default) or ``"zygote"``
      (a pre-warmed helper forks each child: faster start, same isolation between runs).
    - ``cancel_grace``: seconds between ``Cancel`` and SIGKILL (default 0.5).
    - ``shutdown_timeout``: seconds in-flight executions get to finish when the block is left
      (default 10); the children still running then are killed (see ``shutdown``).
    - ``memory_mb`` (address space, default 4096), ``open_files`` (default 256),
      ``file_size_mb`` (default 1024): per-child limits; a plugin's quotas lower
      ``memory_mb`` and set the CPU-seconds limit (default: the timeout, rounded up, + 1).
    - ``max_concurrent``: child slots (default 64); more executions wait. A nested
      ``ctx.invoke`` that finds no free slot runs on its caller's, so a chain of invocations
      needs one slot (and has up to ``max_invoke_depth + 1`` children alive).
    - ``max_processes``: ``RLIMIT_NPROC`` per child (default None: not set). The kernel counts
      every process and thread of the child's user, and never enforces it for root.
    - ``sandbox``: ``True`` (default): every kernel layer this machine supports (``health()``
      reports the ones it lacks, and why); ``False``: none; or the layers required, e.g.
      ``("landlock", "seccomp")``: entering the backend fails if one is missing. Layers:
      ``capabilities``, ``landlock``, ``bubblewrap``, ``seccomp`` (docs/sandbox.md).
    - ``crash_breaker_threshold`` (default 5) executions in a row whose child crashed
      quarantine their plugin for ``crash_breaker_cooldown`` seconds (default 30):
      ``PluginQuarantinedError``, no child started. 0 or None: off. See docs/backends.md.
    - ``fork_ahead`` (default True; zygote only): the zygote keeps one child forked ahead
      of the next execution, in a free slot (one idle process more while a slot is free);
      the execution then sends it its setup instead of waiting for a fork. False: fork
      each child on request.
    """

    name = "subprocess"

    def __init__(
        self,
        *,
        start_method: Literal["spawn", "zygote"] = "spawn",
        cancel_grace: float = 0.5,
        memory_mb: int = 4096,
        open_files: int = 256,
        file_size_mb: int = 1024,
        max_concurrent: int = 64,
        start_timeout: float = 30.0,
        max_processes: int | None = None,
        sandbox: bool | Iterable[str] = True,
        crash_breaker_threshold: int | None = 5,
        crash_breaker_cooldown: float = 30.0,
        fork_ahead: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if start_method not in ("spawn", "zygote"):
            raise ValueError(f"start_method must be 'spawn' or 'zygote', not {start_method!r}")
        self._sandbox_option = check_layers(sandbox)
        self._sandbox: SandboxPolicy | None = None
        self.start_method = start_method
        self.cancel_grace = cancel_grace
        #: Every child's rlimits; a plugin's quotas may lower them (see child_limits).
        self._limits = WorkerLimits(
            address_space_mb=memory_mb,
            open_files=open_files,
            file_size_mb=file_size_mb,
            processes=max_processes,
        )
        self._start_timeout = start_timeout
        self._live: set[WorkerHandle] = set()  # children running an execution
        # Executions whose child is still being reaped, by id: a next one with the same id
        # waits for its workspace to be removed.
        self._reaping: dict[str, trio.Event] = {}
        self._breaker = CrashBreaker(crash_breaker_threshold, crash_breaker_cooldown)
        self._children = 0
        keeper = None
        if start_method == "zygote":
            keeper = ZygoteKeeper(
                wrapper=self._zygote_wrapper,
                start_timeout=start_timeout,
                first_delay=0.05,
                max_delay=5.0,
            )
        # One fresh worker per execution: spawned, or forked by the zygote it keeps.
        self._launcher = ProcessLauncher(zygote=keeper, close_grace=cancel_grace, sweep_group=True)
        self._slots = ChildSlots(
            max_concurrent, zygotes=keeper if fork_ahead else None, running=lambda: self.running
        )
        self.spawned_instead_of_zygote = 0
        # The last execution's handler was async: the next child forked ahead then starts
        # a trio loop once while it waits (see bootstrap.prepare), off the next one's path.
        self._last_async = False

    async def _start(self, nursery: trio.Nursery) -> None:
        support = await trio.to_thread.run_sync(detect)  # once per process, then cached
        self._sandbox = SandboxPolicy(self._sandbox_option, support)
        if self._sandbox.missing:
            _log.warning(
                "subprocess backend: sandbox layers not available on this machine: %s",
                "; ".join(f"{name} ({why})" for name, why in self._sandbox.missing.items()),
            )
        if self.start_method == "zygote":
            await nursery.start(self._launcher.run)
            if self._slots.zygotes is not None:
                nursery.start_soon(self._slots.keep_ahead, self._ahead_spec)

    def _ahead_spec(self) -> dict[str, Any]:
        """What the next child forked ahead does while it waits (``bootstrap.prepare``)."""
        assert self._sandbox is not None
        return {**self._sandbox.ahead(), "trio": self._last_async}

    @property
    def zygote_restarts(self) -> int:
        keeper = self._launcher.zygote
        return keeper.restarts if keeper is not None else 0

    def _fits_zygote(self, job: Job) -> bool:
        """Whether ``job``'s child may be forked by the zygote (see :meth:`_forked`)."""
        assert self._sandbox is not None
        target = job.target
        keeper = self._launcher.zygote
        return keeper is not None and self._sandbox.fits_zygote(target.permissions, target.root)

    async def _forked(self, job: Job) -> bool:
        """Whether ``job``'s child is forked by the zygote (once it is up, within the job's
        deadline) rather than spawned."""
        keeper = self._launcher.zygote
        if keeper is None:
            return False
        assert self._sandbox is not None
        if not self._sandbox.fits_zygote(job.target.permissions, job.target.root):
            # Under bubblewrap the zygote's view of the file system was fixed when it started;
            # a plugin whose files it does not show gets a spawned child of its own.
            self.spawned_instead_of_zygote += 1
            return False
        with trio.CancelScope(deadline=job.deadline):
            await keeper.ready.wait()
            return True
        raise job.timeout_error(" while the zygote was being restarted")

    async def _run(self, job: Job) -> ExecutionResult:
        """Run the job unless its plugin is quarantined; tell the crash breaker whether
        its child crashed (a kill while the backend closes is no verdict). Channel sessions
        are neither refused nor counted."""
        if job.channel is not None:
            return await self._run_admitted(job)
        plugin_id = job.request.plugin_id
        trial = self._breaker.admit(plugin_id)  # PluginQuarantinedError: refused
        killed: bool | None = None
        try:
            result = await self._run_admitted(job)
            killed = False
            return result
        except WorkerCrashedError as exc:
            # SIGKILLed from outside (an operator, the OOM killer): not known to be its doing.
            outside = exc.details.get("signal") == signal.SIGKILL
            killed = True if self.running and not outside else None
            raise
        except ExecutionError:
            killed = False
            raise
        finally:
            self._breaker.record(plugin_id, killed, trial=trial)

    async def _run_admitted(self, job: Job) -> ExecutionResult:
        """Run the job in a child of its own, in a task of the backend's, and return its
        result as soon as it comes: the child is shut down and reaped, its process group
        swept and its workspace removed after, in that task (the backend's block waits for
        it). Cancelled, the caller cancels that task and waits for it to end (the child
        stopped, killed after the cancel grace, and reaped), as before.
        """
        check_serializable(job.request.input, "input")  # before any child is started
        handoff = _Handoff(job)
        # A child costs milliseconds: a scope of its own for the shutdown to cancel is cheap
        # here (it also stops a child still starting, which _abort_in_flight cannot kill).
        with trio.CancelScope() as scope:
            self._abort_scopes.add(scope)
            try:
                assert self._nursery is not None
                self._nursery.start_soon(self._child_task, handoff)
                try:
                    await handoff.ready.wait()
                finally:
                    if not handoff.ready.is_set():
                        handoff.scope.cancel()
                        with trio.CancelScope(shield=True):
                            await handoff.ready.wait()
                return handoff.unwrap()
            finally:
                self._abort_scopes.discard(scope)
        raise BackendClosedError("the subprocess backend shut down before this execution ended")

    async def _child_task(self, handoff: _Handoff) -> None:
        """Wait for a slot, start a child, run the job in it (every wait counts toward its
        deadline), hand the outcome over; then reap the child and remove its workspace,
        holding the job no more (its input may be big)."""
        job = handoff.job
        assert job is not None
        execution_id = job.request.execution_id
        try:
            with handoff.scope:
                async with self._slots.hold(job, ahead=self._fits_zygote(job)) as ahead:
                    forked = ahead is not None or await self._forked(job)
                    del job  # _run_in_child takes it from the handoff
                    previous = self._reaping.get(execution_id)
                    if previous is not None:  # the same id's last child is still reaped
                        await previous.wait()
                    self._reaping[execution_id] = reaped = trio.Event()
                    try:
                        async with self.workspaces.lease(execution_id) as lease:
                            while True:
                                try:
                                    await self._run_in_child(str(lease.dir), forked, handoff, ahead)
                                    break
                                except _ZygoteLost:
                                    # The zygote died before the child said Hello: the
                                    # backend's failure, not the plugin's, and nothing of it
                                    # ran. Wait for the next zygote (within the deadline).
                                    assert handoff.job is not None  # not handed over yet
                                    ahead = None
                                    forked = await self._forked(handoff.job)
                    finally:
                        del self._reaping[execution_id]
                        reaped.set()
        except Exception as exc:
            if handoff.ready.is_set():  # shutting the child down failed: not the caller's
                _log.exception("subprocess backend: a child's clean-up failed")
            handoff.fail(exc)
        finally:
            handoff.fail(BackendClosedError("the execution was stopped before it ended"))

    async def _run_in_child(
        self, workspace: str, forked: bool, handoff: _Handoff, ahead: ForkedAhead | None
    ) -> None:
        job = handoff.job
        assert job is not None
        self._children += 1
        worker: WorkerProcess | None = None
        env = child_environment(job.target.permissions, workspace)
        assert self._sandbox is not None
        sandbox = self._sandbox.for_child(
            job.target.permissions,
            workspace=workspace,
            root=job.target.root,
            env=env,
            zygote=forked,
        )
        keeper = self._launcher.zygote
        zygote: Zygote | None = keeper.live() if keeper is not None and forked else None
        if ahead is not None:
            zygote = ahead.zygote
        try:
            async with self._launcher.open(
                cwd=workspace,
                env=env,
                limits=child_limits(job, self._limits),
                sandbox=sandbox,
                forked=forked,
                start_timeout=max(
                    0.0, min(self._start_timeout, job.deadline - trio.current_time())
                ),
                handshake=False,
                ahead=ahead,
            ) as worker:
                run = worker.execute if job.channel is None else partial(run_session, worker)
                self._live.add(worker)
                try:
                    result = await run(
                        job, backend=self.name, workspace=workspace, cancel_grace=self.cancel_grace
                    )
                finally:
                    self._live.discard(worker)
                self._last_async = worker.calls.last_async
                metadata = {**result.metadata, "sandbox": list(sandbox.layers)}
                handoff.succeed(attrs.evolve(result, metadata=metadata))
                del job, result, run
        except (WorkerCrashedError, ExecutionTimeoutError) as exc:
            if handoff.ready.is_set():
                raise
            job = handoff.job  # not handed over yet: still there
            assert job is not None
            started = worker is not None and worker.greeted
            if not started and trio.current_time() >= job.deadline:
                handoff.fail(job.timeout_error(" before its child process started"))
                return
            lost = zygote is None or zygote.lost.is_set()
            if not started and forked and lost and isinstance(exc, WorkerCrashedError):
                raise _ZygoteLost from exc
            if isinstance(exc, WorkerCrashedError):
                _explain_crash(exc)
            raise
        finally:
            self._children -= 1

    async def _stop(self, *, drain: bool, timeout: float | None) -> None:
        """Fail the executions still waiting for a child slot: they never started."""
        self._slots.cancel_waiting()

    def _abort_in_flight(self) -> None:
        """Kill every child still running an execution; its caller gets BackendClosedError.
        The child's execution then ends its usual way: reaped, its group killed, and only
        then its workspace removed."""
        for worker in self._live:
            worker.kill(
                BackendClosedError(
                    "the subprocess backend shut down before this execution finished; "
                    "its child process was killed"
                )
            )

    # -- sandbox ------------------------------------------------------------------------------

    def _zygote_wrapper(self) -> list[str]:
        """bubblewrap around the zygote: it shows what the plugins registered now may touch."""
        assert self._sandbox is not None
        plugins = []
        for manifest in self.registry:
            specs: list[HandlerSpec | ChannelSpec] = [*manifest.handlers, *manifest.channels]
            plugins += [(manifest.permissions_for(spec), manifest.root) for spec in specs]
        return self._sandbox.zygote_wrapper(str(self.workspaces.host_dir), plugins)

    def _health_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {
            "active_subprocesses": self._children,
            "start_method": self.start_method,
            "crash_breaker": self._breaker.details(),
        }
        if self.start_method == "zygote":
            details.update(self._launcher.health_details())
            details["spawned_instead_of_zygote"] = self.spawned_instead_of_zygote
            details["forked_ahead"] = self._slots.forked_ahead
            details["used_ahead"] = self._slots.used_ahead
        if self._sandbox is not None:
            details["sandbox"] = self._sandbox.report(self.start_method)
        return details

    def _stats_details(self) -> dict[str, Any]:
        return {"active_subprocesses": self._children, "crash_breaker": self._breaker.details()}


def child_limits(job: Job, base: WorkerLimits) -> WorkerLimits:
    """The rlimits of ``job``'s child: the backend's ``base``, the plugin's memory quota when
    lower, and a CPU-time limit (its quota, else the timeout plus a second: the kernel then
    stops a handler that spins past its deadline even if the host could not)."""
    quotas = job.target.permissions.quotas
    memory = base.address_space_mb
    if quotas.memory_mb is not None:
        memory = quotas.memory_mb if memory is None else min(memory, quotas.memory_mb)
    cpu = quotas.cpu_s
    if cpu is None and math.isfinite(job.timeout):  # a channel session may be unlimited
        cpu = math.ceil(job.timeout) + 1
    return WorkerLimits(
        address_space_mb=memory,
        cpu_s=cpu,
        open_files=base.open_files,
        file_size_mb=base.file_size_mb,
        processes=base.processes,
    )


class _ZygoteLost(Exception):
    """A child to be forked never said Hello because the zygote died meanwhile."""


#: Signals the kernel sends when a resource limit is hit, and the reason they stand for.
_LIMIT_SIGNALS = {int(signal.SIGXCPU): "cpu_limit", int(signal.SIGXFSZ): "file_size_limit"}


def _explain_crash(exc: WorkerCrashedError) -> None:
    """Name the limit a child was killed for (``details["reason"]``), when a signal says so."""
    number = exc.details.get("signal")
    reason = _LIMIT_SIGNALS.get(number) if isinstance(number, int) else None
    if reason is not None and "reason" not in exc.details:
        exc.details["reason"] = reason
        what = "CPU time" if reason == "cpu_limit" else "file size"
        exc.message += f": it exceeded its {what} limit"


class _Handoff:
    """The outcome of an execution, handed from the task that runs its child to the
    caller; ``scope`` is that task's (the caller cancels it when it is cancelled)."""

    def __init__(self, job: Job) -> None:
        #: Until the outcome is handed over (then None: see ``SubprocessBackend._child_task``).
        self.job: Job | None = job
        self.ready = trio.Event()
        self.scope = trio.CancelScope()
        self._result: ExecutionResult | None = None
        self._error: Exception | None = None

    def succeed(self, result: ExecutionResult) -> None:
        self.job = None
        if not self.ready.is_set():
            self._result = result
            self.ready.set()

    def fail(self, error: Exception) -> None:
        self.job = None
        if not self.ready.is_set():
            self._error = error
            self.ready.set()

    def unwrap(self) -> ExecutionResult:
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result
