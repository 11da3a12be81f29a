"""Structured execution errors with stable codes and a lossless wire form.

Every failure a caller can see is an :class:`ExecutionError` subclass carrying a stable
``code``, the ids of the execution it belongs to, a human message and free-form ``details``
(exit codes, queue sizes, remote tracebacks...). ``to_dict()`` / ``ExecutionError.from_dict()``
round-trip an error across a process boundary to the same subclass.

This module imports only the standard library: worker children load it at start-up.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar

__all__ = [
    "AbortedError",
    "AcquireTimeoutError",
    "BackendClosedError",
    "ExecutionError",
    "ExecutionTimeoutError",
    "HandlerContractError",
    "HandlerError",
    "HandlerNotFoundError",
    "InvalidRequestError",
    "ManifestError",
    "PermissionDeniedError",
    "PluginNotFoundError",
    "PluginQuarantinedError",
    "QueueFullError",
    "ValidationError",
    "WorkerCrashedError",
    "WorkerUnhealthyError",
    "WorkspaceError",
]

_BY_CODE: dict[str, type[ExecutionError]] = {}


class ExecutionError(Exception):
    """Base of every error an execution can end with.

    ``code`` is stable and safe to branch on; ``message`` is for humans; ``details`` holds
    the error-specific fields (also reachable as attributes on the subclasses).
    """

    code: ClassVar[str] = "UNKNOWN_ERROR"

    def __init__(
        self,
        message: str,
        *,
        execution_id: str | None = None,
        plugin_id: str | None = None,
        handler_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.execution_id = execution_id
        self.plugin_id = plugin_id
        self.handler_id = handler_id
        self.details: dict[str, Any] = dict(details) if details else {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            _BY_CODE[cls.code] = cls

    def __str__(self) -> str:
        where = "/".join(p for p in (self.plugin_id, self.handler_id) if p)
        return f"[{self.code}] {self.message}" + (f" ({where})" if where else "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, execution_id={self.execution_id!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ExecutionError.from_dict, (self.to_dict(),))

    def with_ids(
        self, *, execution_id: str | None, plugin_id: str | None, handler_id: str | None
    ) -> ExecutionError:
        """Fill in ids that are still missing (errors raised deep inside know none)."""
        self.execution_id = self.execution_id or execution_id
        self.plugin_id = self.plugin_id or plugin_id
        self.handler_id = self.handler_id or handler_id
        return self

    def to_dict(self) -> dict[str, Any]:
        """The wire form: plain data that any serializer carries."""
        return {
            "code": self.code,
            "message": self.message,
            "execution_id": self.execution_id,
            "plugin_id": self.plugin_id,
            "handler_id": self.handler_id,
            "details": dict(self.details),
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ExecutionError:
        """Rebuild an error from :meth:`to_dict` output, as the subclass its code names.

        An unknown code (a newer peer) gives a plain ``ExecutionError`` that keeps the code.
        """
        code = str(data.get("code") or ExecutionError.code)
        cls = _BY_CODE.get(code, ExecutionError)
        err = cls.__new__(cls)
        ExecutionError.__init__(
            err,
            str(data.get("message", "")),
            execution_id=data.get("execution_id"),
            plugin_id=data.get("plugin_id"),
            handler_id=data.get("handler_id"),
            details=data.get("details") or {},
        )
        if cls is ExecutionError and code != ExecutionError.code:
            err.code = code  # type: ignore[misc]
        return err


def _detail(name: str, doc: str) -> property:
    return property(lambda self: self.details.get(name), doc=doc)


class PluginNotFoundError(ExecutionError):
    """No plugin with the requested id is registered."""

    code = "PLUGIN_NOT_FOUND"


class HandlerNotFoundError(ExecutionError):
    """The plugin has no such handler, or its entry does not import."""

    code = "HANDLER_NOT_FOUND"
    entry = _detail("entry", "The import path that was tried, when there was one.")


class ExecutionTimeoutError(ExecutionError, TimeoutError):
    """The execution's time limit passed; the work was stopped."""

    code = "TIMEOUT"
    timeout_s = _detail("timeout_s", "The limit that was exceeded, in seconds.")


class PermissionDeniedError(ExecutionError):
    """The handler asked for something its manifest does not grant."""

    code = "PERMISSION_DENIED"
    permission = _detail("permission", "The permission that would be needed, e.g. 'fs.read'.")
    resource = _detail("resource", "What was asked for: a path, a host, a name.")


class QueueFullError(ExecutionError):
    """The pool's queue is at capacity; the request was rejected without running."""

    code = "QUEUE_FULL"
    queue_size = _detail("queue_size", "Requests waiting when this one arrived.")
    capacity = _detail("capacity", "The queue's capacity.")


class WorkerCrashedError(ExecutionError):
    """The worker thread or process died while running the execution."""

    code = "WORKER_CRASHED"
    exit_code = _detail("exit_code", "The process exit status, when it exited.")
    signal = _detail("signal", "The number of the signal that killed it, when one did.")
    stderr_tail = _detail("stderr_tail", "The last lines the process wrote to stderr.")


class HandlerError(ExecutionError):
    """The handler raised an exception."""

    code = "HANDLER_ERROR"
    remote_type = _detail("remote_type", "Qualified name of the exception the handler raised.")
    remote_traceback = _detail("remote_traceback", "The handler's traceback, as text.")


class InvalidRequestError(ExecutionError):
    """The request is malformed: bad ids, unserializable input, bad options."""

    code = "INVALID_REQUEST"


class BackendClosedError(ExecutionError):
    """The backend is not running (never entered, shutting down, or closed)."""

    code = "BACKEND_CLOSED"


class ValidationError(ExecutionError):
    """Input or output does not match the handler's declared types."""

    code = "VALIDATION_ERROR"
    field = _detail("field", "The offending field, when one could be named.")


class HandlerContractError(ExecutionError):
    """The entry imports but is not a callable handler (or has no ``execute``)."""

    code = "HANDLER_CONTRACT_ERROR"


class AbortedError(ExecutionError):
    """The execution was cancelled by its caller: the wire form of a cancellation."""

    code = "ABORTED"


class WorkspaceError(ExecutionError):
    """A workspace directory could not be leased or released."""

    code = "WORKSPACE_ERROR"


class AcquireTimeoutError(ExecutionError):
    """No worker became free within the pool's acquire timeout."""

    code = "ACQUIRE_TIMEOUT"


class WorkerUnhealthyError(ExecutionError):
    """The worker failed its health check (hung, over memory) and was replaced."""

    code = "WORKER_UNHEALTHY"


class ManifestError(ExecutionError):
    """A plugin manifest is malformed; raised when it is loaded, naming the bad key."""

    code = "INVALID_MANIFEST"


class PluginQuarantinedError(ExecutionError):
    """The plugin's executions kept killing their workers: its crash breaker is open and
    it is refused, without running, until the cool-down ends (see docs/backends.md)."""

    code = "PLUGIN_QUARANTINED"
    retry_after_s = _detail("retry_after_s", "Seconds until the plugin is tried again.")
