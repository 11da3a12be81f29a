"""Counting outcomes and latencies cheaply on the hot path; summarising them on demand, and
in a backend's health report."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from .errors import known_code
from .types import ExecutionStats, HealthStatus, LatencySummary

__all__ = ["StatsRecorder", "summarize"]

_WINDOW = 10_000
#: Distinct codes ``failed_by_code`` keeps apart: past them, an execution that ended with a
#: code no error class defines is counted under ``UNKNOWN_ERROR``.
_MAX_CODES = 32


def summarize(samples: deque[float] | list[float]) -> LatencySummary:
    """Average and nearest-rank percentiles of ``samples`` (seconds)."""
    if not samples:
        return LatencySummary()
    ordered = sorted(samples)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, int(q * n + 0.5) - 1))]

    return LatencySummary(
        count=n,
        avg=sum(ordered) / n,
        p50=rank(0.50),
        p95=rank(0.95),
        p99=rank(0.99),
        max=ordered[-1],
    )


class StatsRecorder:
    """Mutable counters a backend updates per execution; :meth:`snapshot` freezes them.

    Recording is O(1); percentiles are computed only when someone asks, over the last
    10 000 samples.
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.total = 0
        self.ok = 0
        self.failed_by_code: Counter[str] = Counter()
        self.in_flight = 0
        self.queued = 0
        self.queue_full_rejections = 0
        self.acquire_timeouts = 0
        self.worker_crashes = 0
        self.workers_recycled = 0
        self.permission_denials = 0
        self.last_error: str | None = None
        self._latency: deque[float] = deque(maxlen=_WINDOW)
        self._queue_wait: deque[float] = deque(maxlen=_WINDOW)

    def health(self, state: str, uptime_s: float, details: dict[str, Any]) -> HealthStatus:
        """The backend's health: healthy while ``state`` is ``"running"``; the details say its
        state, uptime, executions in flight and last error, then the backend's ``details``."""
        healthy = state == "running"
        return HealthStatus(
            healthy=healthy,
            backend=self.backend,
            status="healthy" if healthy else "unhealthy",
            details={
                "state": state,
                "uptime_s": uptime_s,
                "in_flight": self.in_flight,
                "last_error": self.last_error,
                **details,
            },
        )

    def record_ok(self, duration_s: float) -> None:
        self.total += 1
        self.ok += 1
        self._latency.append(duration_s)

    def record_failure(self, code: str, duration_s: float, message: str = "") -> str:
        """Count a failure with ``code``; returns the code it was counted under (observers
        use the same, so a worker's made-up codes grow no label set for good either)."""
        self.total += 1
        counts = self.failed_by_code
        if code not in counts and len(counts) >= _MAX_CODES and not known_code(code):
            code = "UNKNOWN_ERROR"
        counts[code] += 1
        self._latency.append(duration_s)
        self.last_error = f"{code}: {message}" if message else code
        return code

    def record_permission_denial(self) -> None:
        """A platform service refused a call: counted when it happens, whether or not the
        handler then lets the error end its execution."""
        self.permission_denials += 1

    def record_queue_wait(self, wait_s: float) -> None:
        self._queue_wait.append(wait_s)

    def snapshot(self, **details: Any) -> ExecutionStats:
        return ExecutionStats(
            backend=self.backend,
            total=self.total,
            ok=self.ok,
            failed=sum(self.failed_by_code.values()),
            failed_by_code=dict(self.failed_by_code),
            in_flight=self.in_flight,
            queued=self.queued,
            queue_full_rejections=self.queue_full_rejections,
            acquire_timeouts=self.acquire_timeouts,
            worker_crashes=self.worker_crashes,
            workers_recycled=self.workers_recycled,
            permission_denials=self.permission_denials,
            latency=summarize(self._latency),
            queue_wait=summarize(self._queue_wait),
            details=details,
        )
