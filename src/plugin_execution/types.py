"""The values that flow through the public API: requests, results, events, health and stats.

All are ``attrs`` frozen classes. Validation happens at the edge, in field validators, and
raises :class:`~plugin_execution.errors.InvalidRequestError` so a bad request never gets as far
as a backend.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import msgpack  # type: ignore[import-untyped,unused-ignore]

from .errors import ExecutionError, InvalidRequestError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ExecutionEvent",
    "ExecutionRequest",
    "ExecutionResult",
    "ExecutionStats",
    "HealthStatus",
    "LatencySummary",
    "new_execution_id",
]

DEFAULT_TIMEOUT_S = 30.0

#: Plugin, handler and execution ids: safe as file names and log fields.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_EXECUTION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


# Execution ids not handed out yet: 16 random bytes each (hex), from one ``os.urandom`` of
# 4 KiB at a time instead of a system call per id. ``list.pop`` is atomic, so threads never
# get the same one; a forked child starts with none (it must not reuse its parent's).
_UNUSED_IDS: list[str] = []
os.register_at_fork(after_in_child=_UNUSED_IDS.clear)


def new_execution_id() -> str:
    """A fresh 128-bit random execution id (hex)."""
    try:
        return _UNUSED_IDS.pop()
    except IndexError:
        pass
    block = os.urandom(4096).hex()
    _UNUSED_IDS.extend([block[start : start + 32] for start in range(32, len(block), 32)])
    return block[:32]


# Plugin and handler ids known good: they recur on every request, and a set lookup is
# cheaper than the regex (bounded: a flood of distinct ids just empties it now and then).
_GOOD_IDS: set[str] = set()


def _check_id(pattern: re.Pattern[str], what: str, *, remember: bool = False) -> Any:
    seen = _GOOD_IDS if remember else set()

    def check(_inst: Any, _attr: attrs.Attribute[Any] | None, value: Any) -> None:
        if type(value) is str and value in seen:
            return
        if not isinstance(value, str) or pattern.fullmatch(value) is None:
            raise InvalidRequestError(
                f"{what} must be 1-128 characters of letters, digits and "
                f"{'-_' if pattern is _EXECUTION_ID else '._:@-'}, starting with a letter or "
                f"digit; got {value!r}"
            )
        if remember and type(value) is str:
            if len(seen) >= 1024:
                seen.clear()
            seen.add(value)

    return check


def check_timeout(_inst: Any, _attr: Any, value: float | None) -> None:
    """Raise InvalidRequestError unless ``value`` is None or a positive number."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidRequestError(f"timeout must be a positive number of seconds; got {value!r}")


def _to_context(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"context must be a mapping; got {type(value).__name__}")
    return dict(value)


_check_plugin_id = _check_id(_ID, "plugin_id", remember=True)
_check_handler_id = _check_id(_ID, "handler_id", remember=True)
_check_execution_id = _check_id(_EXECUTION_ID, "execution_id")
_NEW_ID: Any = object()  # no execution_id given: a new one
_set = object.__setattr__


@attrs.frozen(kw_only=True, init=False)
class ExecutionRequest:
    """One call of ``plugin_id`` / ``handler_id`` with an input and a context.

    ``context`` is the caller's descriptor (host type such as ``cli``, ``rest``, ``ws``;
    request, trace and tenant ids; config). ``execution_id`` is generated when absent and is
    distinct from any request id in ``context``: a retry of one request is a new execution.
    ``timeout`` is in seconds; None means the handler's own default, else
    :data:`DEFAULT_TIMEOUT_S` (30 s). A plugin's quota may lower it, never raise it.
    """

    # The validators and converter below are what __init__ applies (``attrs.validate``
    # runs them too); __init__ is written out because a request is made per execution.
    plugin_id: str = attrs.field(validator=_check_plugin_id)
    handler_id: str = attrs.field(validator=_check_handler_id)
    input: Any = None
    context: dict[str, Any] = attrs.field(factory=dict, converter=_to_context)
    execution_id: str = attrs.field(factory=new_execution_id, validator=_check_execution_id)
    timeout: float | None = attrs.field(default=None, validator=check_timeout)

    def __init__(
        self,
        *,
        plugin_id: str,
        handler_id: str,
        input: Any = None,
        context: Mapping[str, Any] | None = None,
        execution_id: str = _NEW_ID,
        timeout: float | None = None,
    ) -> None:
        context = {} if context is None else _to_context(context)
        if type(plugin_id) is not str or plugin_id not in _GOOD_IDS:
            _check_plugin_id(self, None, plugin_id)
        if type(handler_id) is not str or handler_id not in _GOOD_IDS:
            _check_handler_id(self, None, handler_id)
        if execution_id is _NEW_ID:
            execution_id = new_execution_id()  # valid: 32 hex digits
        else:
            _check_execution_id(self, None, execution_id)
        if timeout is not None:
            check_timeout(self, None, timeout)
        _set(self, "plugin_id", plugin_id)
        _set(self, "handler_id", handler_id)
        _set(self, "input", input)
        _set(self, "context", context)
        _set(self, "execution_id", execution_id)
        _set(self, "timeout", timeout)


@attrs.frozen(kw_only=True)
class ExecutionResult:
    """The outcome of one execution: ``ok`` with ``output``, or not ``ok`` with ``error``.

    ``metadata`` carries what the backend measured: ``workspace_id``, ``warm``,
    ``peak_memory_kb`` where known, and backend-specific details.
    """

    execution_id: str
    ok: bool
    output: Any = None
    error: ExecutionError | None = attrs.field(default=None, eq=False)
    duration_s: float = 0.0
    backend: str = ""
    worker_id: str | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict)

    def unwrap(self) -> Any:
        """Return ``output``, or raise ``error`` when the execution failed."""
        if self.error is not None:
            raise self.error
        return self.output


@attrs.frozen(kw_only=True)
class ExecutionEvent:
    """Something a running execution reported: progress, a log line, or a custom event.

    ``kind`` is ``"progress"`` (``data = {"done": n, "total": m}``), ``"log"``
    (``data = {"level": ..., "message": ...}``) or any name the handler chose.
    """

    execution_id: str
    kind: str
    data: Any = None
    timestamp: float = 0.0


@attrs.frozen(kw_only=True)
class HealthStatus:
    """A backend's health: ``status`` is ``healthy``, ``degraded`` or ``unhealthy``."""

    healthy: bool
    """False when the backend cannot take work (closed, or its workers cannot start)."""
    backend: str
    status: Literal["healthy", "degraded", "unhealthy"] = "healthy"
    details: dict[str, Any] = attrs.field(factory=dict)
    """Backend-specific: workers by state, active subprocesses, uptime, last error, sandbox."""


@attrs.frozen(kw_only=True)
class LatencySummary:
    """Average and percentiles in seconds over a recent window of samples."""

    count: int = 0
    """How many samples the figures below are taken over."""
    avg: float = 0.0
    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0


@attrs.frozen(kw_only=True)
class ExecutionStats:
    """Counters since the backend started, and latency over a recent window.

    ``total == ok + failed`` once nothing is in flight. Returned by ``backend.stats()``,
    which is cheap (no I/O): poll it as often as a dashboard wants.
    """

    backend: str
    """The backend's name: ``in-process``, ``worker-pool`` or ``subprocess``."""
    total: int = 0
    """Executions that ended, whatever their outcome."""
    ok: int = 0
    """Executions that returned a result."""
    failed: int = 0
    """Executions that ended with an error (``failed_by_code`` splits them)."""
    failed_by_code: dict[str, int] = attrs.field(factory=dict)
    """Failures by error code, e.g. ``{"TIMEOUT": 3, "HANDLER_ERROR": 1}``."""
    in_flight: int = 0
    """Executions running now."""
    queued: int = 0
    """Executions waiting for a worker or a slot now."""
    queue_full_rejections: int = 0
    """Executions refused with ``QUEUE_FULL``."""
    acquire_timeouts: int = 0
    """Executions that waited longer than the pool's ``acquire_timeout``."""
    worker_crashes: int = 0
    """Workers (or children) that died under an execution or on their own."""
    workers_recycled: int = 0
    """Workers retired on purpose: executions, uptime or memory past their limit."""
    permission_denials: int = 0
    """``PERMISSION_DENIED`` refusals of platform calls, caught by the handler or not."""
    latency: LatencySummary = attrs.field(factory=LatencySummary)
    """Duration of every ended execution, failures included, over the last 10,000."""
    queue_wait: LatencySummary = attrs.field(factory=LatencySummary)
    """Time executions waited for a worker or slot before starting."""
    details: dict[str, Any] = attrs.field(factory=dict)


def check_serializable(value: Any, what: str) -> None:
    """Raise InvalidRequestError unless ``value`` is plain data every backend can carry."""
    try:
        msgpack.packb(value, use_bin_type=True)
    except Exception as exc:
        raise InvalidRequestError(
            f"{what} is not serializable (plain data only: dict, list, str, bytes, int, "
            f"float, bool, None): {type(exc).__name__}: {exc}"
        ) from None
