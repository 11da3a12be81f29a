"""PlatformSession: one execution's standing with the platform, on the host.

The backend makes one per execution from the manifest it resolved on the host, so the
permissions a service checks are never ones a plugin sent. Every service call goes through
:meth:`PlatformSession.acall`; every refusal through :meth:`PlatformSession.deny`, which
counts it in the backend's ``stats().permission_denials``, logs it and raises
:class:`~plugin_execution.errors.PermissionDeniedError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import trio

from ..errors import AbortedError, ExecutionTimeoutError, PermissionDeniedError, clip_text
from ..permissions import Grants, grants_for

if TYPE_CHECKING:
    from ..manifest import Permissions
    from ..types import ExecutionRequest, ExecutionResult

__all__ = ["Dispatcher", "Invoker", "PlatformSession", "Subscription"]

log = logging.getLogger("plugin_execution.permissions")
#: The longest resource a denial names (message, log line, details), in characters.
_MAX_RESOURCE_CHARS = 9000

# What a session needs of the objects around it, as interfaces: the platform, its event
# subscriptions and the backend depend on sessions, so a session names none of them.


class Dispatcher(Protocol):
    """Where a session's calls go: the :class:`~plugin_execution.platform.Platform`."""

    async def dispatch(
        self,
        session: PlatformSession,
        service: str,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> Any: ...


class Subscription(Protocol):
    """An event subscription a session holds (a ``TopicSubscription``)."""

    async def receive(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Invoker(Protocol):
    """What ``ctx.invoke`` needs of the backend running the execution (an
    ``ExecutionBackend``); ``parent`` is the session's :attr:`PlatformSession.job`."""

    async def _invoke(
        self,
        request: ExecutionRequest,
        *,
        timeout: float | None,
        chain: tuple[tuple[str, str], ...],
        parent: Any = None,
    ) -> ExecutionResult: ...


class PlatformSession:
    """Who is calling (plugin, handler, execution), what they may do, and their workspace.

    It is also the ``platform`` caller an in-process :class:`ExecutionContext` uses:
    :meth:`acall` from the event loop, :meth:`call` from a sync handler's thread.
    """

    __slots__ = (
        "_closed",
        "_ensure",
        "_grants",
        "_token",
        "backend",
        "chain",
        "context",
        "deadline",
        "execution_id",
        "handler_id",
        "job",
        "on_denied",
        "permissions",
        "platform",
        "plugin_id",
        "root",
        "subscriptions",
        "workspace",
    )

    def __init__(
        self,
        platform: Dispatcher,
        *,
        execution_id: str,
        plugin_id: str,
        handler_id: str,
        permissions: Permissions,
        root: str | None = None,
        workspace: str | None = None,
        deadline: float = float("inf"),
        context: dict[str, Any] | None = None,
        backend: Invoker | None = None,
        chain: tuple[tuple[str, str], ...] = (),
        job: object | None = None,
        on_denied: Callable[[], None] | None = None,
    ) -> None:
        self.platform = platform
        self.execution_id = execution_id
        self.plugin_id = plugin_id
        self.handler_id = handler_id
        self.permissions = permissions
        self.root = root
        #: The execution's workspace directory (it may not exist until first written).
        self.workspace = workspace
        self.deadline = deadline
        self.context = context if context is not None else {}
        self.backend = backend
        #: ``(plugin_id, handler_id)`` of every execution that invoked this one, outermost first.
        self.chain = chain
        #: The backend's job of this execution: ``ctx.invoke`` runs on its capacity.
        self.job = job
        self.on_denied = on_denied
        self.subscriptions: dict[int, Subscription] = {}
        self._grants: Grants | None = None
        self._ensure: Callable[[], Path] | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._closed = False

    @property
    def grants(self) -> Grants:
        if self._grants is None:
            self._grants = grants_for(self.permissions, self.root)
        return self._grants

    def set_workspace_provider(self, ensure: Callable[[], Path]) -> None:
        """Use ``ensure`` (creates and returns the workspace) instead of a plain mkdir."""
        self._ensure = ensure

    def ensure_workspace(self) -> str:
        """Create the workspace directory if needed; return its path."""
        if self._ensure is not None:
            return str(self._ensure())
        if self.workspace is None:
            raise self.refuse("this execution has no workspace")
        try:
            os.mkdir(self.workspace, 0o700)
        except FileExistsError:
            pass
        return self.workspace

    def remaining(self) -> float:
        """Seconds left before the execution's deadline (``inf`` without one)."""
        return self.deadline - trio.current_time()

    # -- refusing -------------------------------------------------------------------------

    def past_deadline(self, what: str) -> ExecutionTimeoutError:
        """The error for host work done for this execution that outlived its deadline."""
        return ExecutionTimeoutError(
            f"{what} did not finish before the execution's deadline",
            execution_id=self.execution_id,
            plugin_id=self.plugin_id,
            handler_id=self.handler_id,
        )

    def deny(self, permission: str, resource: str, reason: str = "") -> NoReturn:
        """Count, log and raise a :class:`PermissionDeniedError` for ``resource``."""
        if self.on_denied is not None:
            self.on_denied()
        resource = clip_text(resource, _MAX_RESOURCE_CHARS)  # logged: never a frame's worth
        why = f": {reason}" if reason else ""
        message = (
            f"plugin {self.plugin_id!r} handler {self.handler_id!r} may not use "
            f"{resource!r}: it needs the {permission!r} permission{why}"
        )
        log.warning("permission denied: %s", message)
        raise PermissionDeniedError(
            message,
            execution_id=self.execution_id,
            plugin_id=self.plugin_id,
            handler_id=self.handler_id,
            details={"permission": permission, "resource": resource},
        )

    def refuse(self, message: str) -> AbortedError:
        return AbortedError(
            message,
            execution_id=self.execution_id,
            plugin_id=self.plugin_id,
            handler_id=self.handler_id,
        )

    # -- calling --------------------------------------------------------------------------

    async def acall(
        self, service: str, method: str, args: list[Any], kwargs: dict[str, Any]
    ) -> Any:
        """Run a platform service method for this execution (in the event loop)."""
        if self._closed:
            raise self.refuse(
                f"execution {self.execution_id!r} has ended; its platform calls are refused"
            )
        return await self.platform.dispatch(self, service, method, args, kwargs)

    def call(self, service: str, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """:meth:`acall` from a thread that is not the event loop's (a sync handler)."""
        if self._token is None:
            raise RuntimeError("this session was not bound to an event loop (bind_loop)")
        return trio.from_thread.run(
            self.acall, service, method, args, kwargs, trio_token=self._token
        )

    def bind_loop(self) -> None:
        """Remember the running trio loop, so that :meth:`call` works from threads."""
        self._token = trio.lowlevel.current_trio_token()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End the session: close its event subscriptions; later calls are refused."""
        self._closed = True
        self.job = None  # the job refers to its session: let both go without the cyclic GC
        while self.subscriptions:
            _, subscription = self.subscriptions.popitem()
            subscription.close()
