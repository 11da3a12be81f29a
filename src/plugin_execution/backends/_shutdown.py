"""A backend's shutdown: the order of its steps, and what it waits for.

:func:`stop_in_order` runs the backend's shutdown hooks around the wait for its executions.

:class:`InFlight` knows every execution running on the backend (a token of its own and the
task it runs in), so that shutdown can wait until each caller has its outcome, and remembers
whether shutdown had to abort them. :class:`Attachments` holds what lives as long as the
backend runs (a WebSocket connection it serves): shutdown asks each to end and waits a grace
period for them to detach.
"""

from __future__ import annotations

from typing import Protocol

import trio

__all__ = ["Attachment", "Attachments", "InFlight", "Stoppable", "stop_in_order"]


class Attachment(Protocol):
    """Something that lives as long as the backend runs, such as a WebSocket connection
    served by it: :meth:`ExecutionBackend.shutdown` asks it to end, then waits for it to
    :meth:`~ExecutionBackend.detach`."""

    def backend_closing(self) -> None: ...


class InFlight:
    """The executions in flight, each a token and the task it runs in.

    No cancel scope per execution: one costs a pool call 10-20% of its throughput. At the
    shutdown deadline each backend stops its own work (``_abort_in_flight``: processes
    killed), and the scopes in :attr:`abort_scopes` (the in-process deadline scope) are
    cancelled.
    """

    __slots__ = ("_done", "abort_scopes", "aborted", "tasks")

    def __init__(self) -> None:
        self.tasks: dict[object, trio.lowlevel.Task] = {}
        self.abort_scopes: set[trio.CancelScope] = set()
        #: Shutdown stopped what was in flight: whatever those executions end with, their
        #: callers get BackendClosedError.
        self.aborted = False
        self._done = trio.Event()

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def ended(self, token: object, *, closing: bool) -> None:
        """The execution of ``token`` has its outcome; ``closing``: shutdown may wait for it."""
        del self.tasks[token]
        if closing:
            self._done.set()

    async def wait_none(self) -> None:
        """Wait until no execution is in flight (each one's caller has its outcome), but
        for those of this very task: a handler that shuts its own backend down (in-process)
        must not wait for itself."""
        me = trio.lowlevel.current_task()
        while any(task is not me for task in self.tasks.values()):
            self._done = trio.Event()
            await self._done.wait()

    def cancel_scopes(self) -> None:
        for scope in self.abort_scopes:
            scope.cancel()


class Attachments:
    """What must end before the backend shuts down, and the event of the last leaving."""

    def __init__(self) -> None:
        self._attached: set[Attachment] = set()
        self._detached = trio.Event()

    def add(self, attachment: Attachment) -> None:
        self._attached.add(attachment)

    def discard(self, attachment: Attachment) -> None:
        self._attached.discard(attachment)
        if not self._attached:
            self._detached.set()

    async def close(self, grace: float) -> None:
        """Ask every attachment to end; wait at most ``grace`` seconds for all to detach."""
        if not self._attached:
            return
        self._detached = trio.Event()
        for attachment in list(self._attached):
            attachment.backend_closing()
        with trio.move_on_after(grace):
            await self._detached.wait()


class Stoppable(Protocol):
    """The shutdown hooks of a backend (see ``ExecutionBackend``)."""

    async def _stop(self, *, drain: bool, timeout: float | None) -> None: ...

    def _abort_in_flight(self) -> None: ...

    async def _stopped(self, *, drain: bool, timeout: float | None) -> None: ...


async def stop_in_order(
    backend: Stoppable, in_flight: InFlight, *, drain: bool, limit: float, timeout: float | None
) -> None:
    """Stop ``backend``'s work (call shielded): its ``_stop`` first, then drain what is in
    flight for up to ``limit`` seconds from now (none without ``drain``), then abort what is
    left (the backend's ``_abort_in_flight``, then the abort scopes) and wait for every
    execution to have its outcome; last its ``_stopped``."""
    deadline = trio.current_time() + (limit if drain else 0.0)
    await backend._stop(drain=drain, timeout=timeout)
    with trio.move_on_at(deadline):
        await in_flight.wait_none()
    if in_flight:
        in_flight.aborted = True
        backend._abort_in_flight()
        in_flight.cancel_scopes()
        await in_flight.wait_none()
    await backend._stopped(drain=drain, timeout=timeout)
