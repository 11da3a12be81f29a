"""Job: one execution as a backend sees it, and how a request becomes one (admission).

:func:`admit` resolves the request against the registry and settles its effective timeout
(the caller's, else the request's, else the handler's, else the default; never beyond the
plugin's ``quotas.timeout``) and its deadline on the trio clock. A :class:`Job` then carries
that through the backend and the worker handle to the wire; its platform session (what its
``ctx`` services are checked against) is made on first use by the backend that runs it.

Kept apart from :mod:`.base` so that the host side of the worker protocol, which handles jobs,
does not depend on the backend interface.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from ..errors import ExecutionTimeoutError
from ..types import DEFAULT_TIMEOUT_S, check_timeout

if TYPE_CHECKING:
    from ..channels.channel import Channel
    from ..context import EventSink
    from ..platform.session import PlatformSession
    from ..registry import PluginRegistry, ResolvedHandler
    from ..types import ExecutionRequest

__all__ = ["Job", "SessionMaker", "admit"]


class SessionMaker(Protocol):
    """What a job needs of the backend running it: its platform session, made on demand
    (an :class:`~plugin_execution.backends.base.ExecutionBackend`)."""

    def _session(self, job: Job) -> PlatformSession: ...


@attrs.define(slots=True, eq=False)
class Job:
    """One execution as a backend sees it: the request, resolved, with its limits."""

    request: ExecutionRequest
    target: ResolvedHandler
    timeout: float
    deadline: float  # trio clock
    sink: EventSink
    started: float  # time.perf_counter()
    #: The channel of a session-style channel handler (``handler(ctx, channel)``), else None.
    channel: Channel | None = None
    #: The backend running it, and the executions that led to it through ``ctx.invoke``.
    backend: SessionMaker | None = None
    chain: tuple[tuple[str, str], ...] = ()
    #: The execution whose ``ctx.invoke`` started this one (None: the caller's own).
    parent: Job | None = None
    #: The capacity the job holds while it runs (a backend's slot or worker), once placed;
    #: nested invocations may borrow it (see :meth:`lent_slot`).
    slot: Any = None
    #: Its workspace, where the backend put it somewhere of its own (the sandboxed pool:
    #: under its worker's directory); None: the backend's workspace directory. What its
    #: platform session (``ctx.fs``, ``ctx.shell``) takes for the workspace.
    workspace: str | None = None
    _session: PlatformSession | None = None
    _lent: trio.Lock | None = None

    def lent_slot(self) -> trio.Lock:
        """Held by the nested invocation running on this job's :attr:`slot`: the job waits
        for it while invoking, so its capacity is lent to one of its invocations at a time
        (an invocation that finds free capacity of its own needs no loan)."""
        if self._lent is None:
            self._lent = trio.Lock()
        return self._lent

    @property
    def session(self) -> PlatformSession:
        """The execution's standing with the platform (permissions, workspace): what its
        ``ctx`` services are checked against, on the host. Made on first use: a handler
        that calls no service costs none."""
        session = self._session
        if session is None:
            assert self.backend is not None, "a job made by a backend has one"
            session = self._session = self.backend._session(self)
        return session

    @property
    def session_unused(self) -> bool:
        """No platform service was called for this execution (no session was made)."""
        return self._session is None

    def close_session(self) -> None:
        if self._session is not None:
            self._session.close()

    def timeout_error(self, what: str = "") -> ExecutionTimeoutError:
        return ExecutionTimeoutError(
            f"execution exceeded its {self.timeout:g} s timeout{what} and was stopped",
            details={"timeout_s": self.timeout},
        )


def admit(
    registry: PluginRegistry,
    backend: SessionMaker,
    request: ExecutionRequest,
    timeout: float | None,
    sink: EventSink,
    target: ResolvedHandler | None = None,
    channel: Channel | None = None,
    chain: tuple[tuple[str, str], ...] = (),
    parent: Job | None = None,
    *,
    now: float | None = None,
    started: float | None = None,
) -> Job:
    """The job of ``request`` on ``backend``: resolved in ``registry`` unless ``target`` is
    given, with its effective timeout and deadline. Raises what resolution raises
    (``PLUGIN_NOT_FOUND``, ``HANDLER_NOT_FOUND``) and ``InvalidRequestError`` for a bad
    ``timeout``. ``now`` (trio clock) and ``started`` (``time.perf_counter()``): the
    moment of admission, when the caller admits several at once."""
    if target is None:
        target = registry.resolve(request.plugin_id, request.handler_id)
    if timeout is not None:
        check_timeout(None, None, timeout)
    limit = timeout if timeout is not None else request.timeout
    if limit is None:
        limit = getattr(target.spec, "timeout", None) or DEFAULT_TIMEOUT_S
    quota = target.permissions.quotas.timeout
    if quota is not None and quota < limit:
        limit = quota
    deadline = (trio.current_time() if now is None else now) + limit
    return Job(
        request,
        target,
        limit,
        deadline,
        sink,
        time.perf_counter() if started is None else started,
        channel,
        backend,
        chain,
        parent,
    )
