"""ExecutionContext: what a handler receives as ``ctx``.

The same class serves every backend. What differs is plugged in: an :class:`EventSink` that
carries events to the host (a trio channel in-process, protocol frames in a worker), and a
workspace provider that creates the execution's directory the first time it is used.

Standard library only at import time: worker children load this module at start-up.
"""

from __future__ import annotations

from .platform_client import (
    CacheClient,
    EnvClient,
    EventsClient,
    FetchClient,
    FsClient,
    InvokeClient,
    ShellClient,
    StorageClient,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from collections.abc import Callable, Mapping
    from pathlib import Path
    from typing import Any, Protocol

    from .platform_client import PlatformCaller
    from .types import ExecutionEvent

    class EventSink(Protocol):
        """Where a context's events go. ``emit`` never blocks the event loop for long."""

        def emit(self, kind: str, data: Any) -> None: ...

        def deliver_nowait(self, event: ExecutionEvent) -> None: ...

        async def aemit(self, kind: str, data: Any) -> None: ...


__all__ = ["NULL_SINK", "ExecutionContext", "NullSink"]


class NullSink:
    """Discards events: used when nobody streams the execution."""

    def emit(self, kind: str, data: Any) -> None:
        pass

    def deliver_nowait(self, event: ExecutionEvent) -> None:
        pass

    async def aemit(self, kind: str, data: Any) -> None:
        pass


NULL_SINK = NullSink()


def _event_logger(ctx: ExecutionContext) -> logging.LoggerAdapter:  # type: ignore[type-arg]
    """A logger whose records are also streamed to the host as ``log`` events.

    Built on first use: ``logging`` costs a fresh worker child ~10 ms to import.
    """
    import logging

    sink = ctx._sink

    class EventLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
        def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
            if level >= logging.INFO or self.isEnabledFor(level):
                text = str(msg) % args if args else str(msg)
                sink.emit("log", {"level": logging.getLevelName(level), "message": text})
            super().log(level, msg, *args, **kwargs)

    base = logging.getLogger(f"plugin_execution.plugins.{ctx.plugin_id}")
    return EventLogger(base, {"execution_id": ctx.execution_id, "plugin_id": ctx.plugin_id})


class ExecutionContext:
    """The handler's view of its execution.

    - ``execution_id``, ``plugin_id``, ``handler_id``: who is running.
    - ``context``: the request's context descriptor (host type, request/trace/tenant ids...).
    - ``workspace``: a private directory for this execution, created on first use and
      removed when the execution ends.
    - ``logger``: a standard logger; its records also stream to the caller as ``log`` events.
    - ``await ctx.emit(kind, data)``: send a custom event to whoever streams the execution;
      it waits when the stream's buffer is full (backpressure).
    - ``ctx.progress(done, total)``: report progress; never blocks an async handler.
    - ``ctx.cancelled``: becomes true when the execution is being cancelled, so a
      synchronous handler (which cannot be interrupted) can stop early.
    - platform services, each checked against the handler's permissions on the host:
      ``ctx.fs``, ``ctx.env``, ``ctx.cache``, ``ctx.storage``, ``ctx.events``,
      ``ctx.fetch``, ``ctx.shell``, ``ctx.invoke`` (see :mod:`.platform_client`). In an
      async handler their methods are awaited; in a sync handler they block and return.
    """

    __slots__ = (
        "_cancelled",
        "_logger",
        "_platform",
        "_sink",
        "_workspace",
        "_workspace_provider",
        "blocking",
        "context",
        "execution_id",
        "handler_id",
        "plugin_id",
    )

    def __init__(
        self,
        *,
        execution_id: str,
        plugin_id: str,
        handler_id: str,
        context: Mapping[str, Any] | None = None,
        sink: EventSink = NULL_SINK,
        workspace: Callable[[], Path] | None = None,
        platform: PlatformCaller | None = None,
        blocking: bool = False,
    ) -> None:
        self.execution_id = execution_id
        self.plugin_id = plugin_id
        self.handler_id = handler_id
        self.context: Mapping[str, Any] = context if context is not None else {}
        self._sink = sink
        self._workspace_provider = workspace
        self._workspace: Path | None = None
        self._logger: logging.LoggerAdapter | None = None  # type: ignore[type-arg]
        self._cancelled = False
        self._platform = platform
        #: True for a sync handler: platform service methods block instead of returning
        #: awaitables. Set by the runtime that knows the handler's shape.
        self.blocking = blocking

    @classmethod
    def _positional(
        cls,
        execution_id: str,
        plugin_id: str,
        handler_id: str,
        context: Mapping[str, Any],
        sink: EventSink,
        workspace: Callable[[], Path] | None,
        platform: PlatformCaller | None,
        blocking: bool,
    ) -> ExecutionContext:
        """``ExecutionContext(...)`` with every argument given, by position: what a worker
        makes for each execution, where binding eight keywords cost ~0.3 us more. The same
        object (a test holds the two constructors to the same slots)."""
        self = cls.__new__(cls)
        self.execution_id = execution_id
        self.plugin_id = plugin_id
        self.handler_id = handler_id
        self.context = context
        self._sink = sink
        self._workspace_provider = workspace
        self._workspace = None
        self._logger = None
        self._cancelled = False
        self._platform = platform
        self.blocking = blocking
        return self

    @property
    def workspace(self) -> Path:
        """This execution's private directory (mode 0700), created on first access."""
        if self._workspace is None:
            if self._workspace_provider is None:
                raise RuntimeError("this execution has no workspace")
            self._workspace = self._workspace_provider()
        return self._workspace

    @property
    def workspace_used(self) -> bool:
        return self._workspace is not None

    @property
    def logger(self) -> logging.LoggerAdapter:  # type: ignore[type-arg]
        if self._logger is None:
            self._logger = _event_logger(self)
        return self._logger

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Mark the execution as being cancelled (called by the runtime, not by handlers)."""
        self._cancelled = True

    # -- platform services ----------------------------------------------------------------

    def _caller(self) -> PlatformCaller:
        if self._platform is None:
            raise RuntimeError(
                "this context has no platform: platform services are available to handlers "
                "run by a backend"
            )
        return self._platform

    @property
    def fs(self) -> FsClient:
        """Files: the workspace, the plugin's own files, and ``fs.read`` / ``fs.write``."""
        return FsClient(self._caller(), self.blocking)

    @property
    def env(self) -> EnvClient:
        """Environment variables granted by ``env.read``."""
        return EnvClient(self._caller(), self.blocking)

    @property
    def cache(self) -> CacheClient:
        """A key/value cache with TTL (``platform = ["cache"]``)."""
        return CacheClient(self._caller(), self.blocking)

    @property
    def storage(self) -> StorageClient:
        """Blob storage kept by the host (``platform = ["storage"]``)."""
        return StorageClient(self._caller(), self.blocking)

    @property
    def events(self) -> EventsClient:
        """Publish/subscribe on topics (``platform = ["events:TOPIC"]``)."""
        return EventsClient(self._caller(), self.blocking)

    @property
    def fetch(self) -> FetchClient:
        """HTTP requests to URLs granted by ``network.fetch``."""
        return FetchClient(self._caller(), self.blocking)

    @property
    def shell(self) -> ShellClient:
        """Commands granted by ``shell.allow``."""
        return ShellClient(self._caller(), self.blocking)

    @property
    def invoke(self) -> InvokeClient:
        """Other plugins' handlers, for plugin ids in ``invoke.allow``."""
        return InvokeClient(self._caller(), self.blocking)

    async def emit(self, kind: str, data: Any = None) -> None:
        """Stream a custom event. Waits while the consumer's buffer is full."""
        await self._sink.aemit(kind, data)

    def emit_nowait(self, kind: str, data: Any = None) -> None:
        """Stream an event from synchronous code; see :meth:`emit`."""
        self._sink.emit(kind, data)

    def progress(self, done: float, total: float | None = None) -> None:
        """Report progress as a ``progress`` event ``{"done": done, "total": total}``."""
        self._sink.emit("progress", {"done": done, "total": total})

    def __repr__(self) -> str:
        return (
            f"<ExecutionContext {self.plugin_id}/{self.handler_id} "
            f"execution_id={self.execution_id}>"
        )
