"""OpenTelemetry spans: one per execution and one per channel connection, when the host uses
OpenTelemetry; nothing at all otherwise.

Only ``opentelemetry-api`` is ever imported, never an SDK: the host configures its own
(exporter, sampling). Spans are made only while a tracer provider is set, so an installed but
unconfigured API costs one attribute lookup per execution. A span is a child of the caller's
current span (trio tasks carry OpenTelemetry's context in their contextvars), named
``execute PLUGIN/HANDLER`` or ``channel PATH``, with these attributes:

- ``plugin_execution.plugin_id``, ``.handler_id``, ``.execution_id``, ``.backend``;
- a channel connection's span has ``.channel``, ``.style``, ``.connection_id``, and at the
  end ``.close_code`` and ``.closed_by``; its executions' spans are its children;
- at the end, ``plugin_execution.worker_id`` (where known) and ``plugin_execution.outcome``:
  ``ok`` or the error code (``ABORTED`` when the caller cancelled); the span's status is
  ERROR for every outcome but ``ok``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from ._version import __version__

try:
    from opentelemetry import trace as _trace
except ImportError:  # the API is optional: no tracing without it
    _trace = None  # type: ignore[assignment]

__all__ = ["Span", "enabled", "span"]

_cached: tuple[object, Any] | None = None  # (provider, its tracer)

#: Whether the API would make a provider from its environment variable on first use. If not,
#: the API's global is read directly while no provider is set: ``get_tracer_provider()`` looks
#: the variable up in ``os.environ`` on every call until then (~1.5 µs per execution).
_PROVIDER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
_UNSET = object()


def _tracer() -> Any:
    """The tracer of the host's provider, or None when no provider is set."""
    global _cached
    if _trace is None:
        return None
    if not _PROVIDER_FROM_ENV and getattr(_trace, "_TRACER_PROVIDER", _UNSET) is None:
        return None  # (an API without that global takes the public way below)
    provider = _trace.get_tracer_provider()
    if isinstance(provider, _trace.ProxyTracerProvider | _trace.NoOpTracerProvider):
        return None
    if _cached is None or _cached[0] is not provider:
        _cached = (provider, provider.get_tracer("plugin_execution", __version__))
    return _cached[1]


def enabled() -> bool:
    """Whether spans are being made: the API is installed and a provider is set."""
    return _tracer() is not None


class Span:
    """The span of one execution or connection: attributes to add as it goes, then one
    outcome."""

    def __init__(self, span: Any) -> None:
        self._span = span
        self._ended = False

    def set(self, name: str, value: Any) -> None:
        if value is not None:
            self._span.set_attribute(f"plugin_execution.{name}", value)

    def outcome(self, code: str, message: str = "") -> None:
        """Record how it ended: ``"ok"`` or an error code (first call wins)."""
        if self._ended:
            return
        self._ended = True
        self.set("outcome", code)
        if code != "ok":
            assert _trace is not None
            self._span.set_status(_trace.Status(_trace.StatusCode.ERROR, message or code))


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any]) -> Iterator[Span | None]:
    """A span named ``name`` around the block, or None when tracing is off.

    An ``ExecutionError`` leaving the block is recorded as its code, a cancellation as
    ``ABORTED``, anything else as ``UNKNOWN_ERROR``; the exception propagates unchanged.
    """
    tracer = _tracer()
    if tracer is None:
        yield None
        return
    attrs = {f"plugin_execution.{k}": v for k, v in attributes.items() if v is not None}
    with tracer.start_as_current_span(
        name, attributes=attrs, record_exception=False, set_status_on_exception=False
    ) as otel_span:
        current = Span(otel_span)
        try:
            yield current
        except BaseException as exc:
            current.outcome(_code_of(exc), str(exc)[:200])
            raise
        current.outcome("ok")


def _code_of(exc: BaseException) -> str:
    import trio

    from .errors import ExecutionError

    if isinstance(exc, ExecutionError):
        return exc.code
    if isinstance(exc, trio.Cancelled):
        return "ABORTED"
    return "UNKNOWN_ERROR"
