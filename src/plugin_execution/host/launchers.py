"""Launchers: what starts worker handles of one kind, for the backends.

A backend holds one launcher and knows nothing else about how its workers come to be:
``async with launcher.open() as handle`` gives a started worker, and ``launcher.run()``
keeps what the launcher's workers share (implements
:class:`~plugin_execution.host.handle.WorkerLauncher`).

- :class:`ProcessLauncher`: worker child processes, forked by a kept zygote while it is up
  (~2 ms a worker), else spawned (a fresh ``python -I``, ~20 ms); per-worker options (cwd,
  environment, limits, sandbox) for the subprocess backend's one child per execution.
- :class:`ThreadLauncher`: workers on threads of the host (the pool's ``kind="thread"``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from ..errors import WorkerCrashedError
from .process import WorkerProcess, open_worker_process

if TYPE_CHECKING:
    from ..sandbox.policy import ChildSandbox
    from .limits import WorkerLimits
    from .spare import ForkedAhead
    from .zygote import ZygoteKeeper

__all__ = ["ProcessLauncher", "ThreadLauncher"]


class ProcessLauncher:
    """Starts worker processes: forked by ``zygote`` (a :class:`ZygoteKeeper`, which
    :meth:`run` keeps) while it is up, else spawned. ``env``, ``limits``, ``start_timeout``
    and ``close_grace`` are the defaults of :meth:`open`; ``sweep_group``: once a worker is
    reaped, kill what is left of its process group (processes its handlers started)."""

    kind = "process"

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        limits: WorkerLimits | None = None,
        zygote: ZygoteKeeper | None = None,
        start_timeout: float = 30.0,
        close_grace: float = 2.0,
        sweep_group: bool = False,
    ) -> None:
        self.env = env
        self.limits = limits
        self.zygote = zygote
        self.start_timeout = start_timeout
        self.close_grace = close_grace
        self.sweep_group = sweep_group

    @asynccontextmanager
    async def open(
        self,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        limits: WorkerLimits | None = None,
        sandbox: ChildSandbox | None = None,
        forked: bool | None = None,
        start_timeout: float | None = None,
        handshake: bool = True,
        ahead: ForkedAhead | None = None,
    ) -> AsyncIterator[WorkerProcess]:
        """Start a worker and yield it once it said ``Hello`` (``handshake`` False: at once,
        its first request overlapping its start; see ``serve_worker``); on exit it is shut down
        (killed after ``close_grace``) and reaped. ``forked``: None, by the zygote while it
        is up, else spawned; True, by the zygote only (a ``sandbox`` made for a forked
        child must not be spawned); False, spawned. ``ahead``: a child its zygote forked
        ahead (see :mod:`.spare`), used instead. Raises ``WorkerCrashedError`` when it
        fails to start."""
        zygote = None
        if ahead is not None:
            zygote = ahead.zygote
        elif forked is not False and self.zygote is not None:
            zygote = self.zygote.live()
        if forked and zygote is None:
            raise WorkerCrashedError("the zygote is gone: no worker could be forked")
        async with open_worker_process(
            cwd=cwd,
            env=self.env if env is None else env,
            limits=self.limits if limits is None else limits,
            zygote=zygote,
            start_timeout=self.start_timeout if start_timeout is None else start_timeout,
            close_grace=self.close_grace,
            sandbox=sandbox,
            sweep_group=self.sweep_group,
            handshake=handshake,
            ahead=ahead,
        ) as worker:
            yield worker

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the zygote (see :class:`ZygoteKeeper`); without one, nothing to keep."""
        if self.zygote is None:
            task_status.started()
            return
        await self.zygote.run(task_status=task_status)

    def health_details(self) -> dict[str, Any]:
        if self.zygote is None:
            return {}
        live = self.zygote.live()
        return {
            "zygote_pid": live.pid if live is not None else None,
            "zygote_restarts": self.zygote.restarts,
        }


class ThreadLauncher:
    """Starts workers on threads of the host process (see :mod:`.thread`)."""

    kind = "thread"

    def __init__(self, *, start_timeout: float = 30.0, close_grace: float = 2.0) -> None:
        self.start_timeout = start_timeout
        self.close_grace = close_grace

    @asynccontextmanager
    async def open(self) -> AsyncIterator[WorkerProcess]:
        """Start a worker thread and yield its handle; stop it on exit."""
        from .thread import open_worker_thread  # the worker runtime: only when used

        async with open_worker_thread(
            start_timeout=self.start_timeout, close_grace=self.close_grace
        ) as worker:
            yield worker

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing is shared between thread workers."""
        task_status.started()

    def health_details(self) -> dict[str, Any]:
        return {}
