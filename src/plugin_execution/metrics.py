"""Prometheus metrics of one backend (and its WebSocket connections), for ``GET /metrics``.

Every server gets a private ``prometheus_client.CollectorRegistry``, never the process-wide
default one, so two servers in one process (or a test suite) never mix their figures.
What it exposes:

- ``plugin_execution_executions_total{plugin,handler,backend,outcome}``: executions ended
  since the metrics were attached (``outcome``: ``ok`` or the error code), counted by a
  backend observer (``ExecutionBackend.add_observer``);
- ``plugin_execution_execution_duration_seconds{plugin,handler,backend}``: a histogram;
- read from ``backend.stats()`` at scrape time: ``plugin_execution_in_flight``,
  ``plugin_execution_queued`` (queue depth), ``plugin_execution_queue_full_rejections_total``,
  ``plugin_execution_acquire_timeouts_total``, ``plugin_execution_worker_crashes_total``,
  ``plugin_execution_workers_recycled_total``, ``plugin_execution_workers{state}`` (pool
  backends), and the latency summary ``plugin_execution_latency_seconds{quantile}``;
- from the ``ConnectionRegistry``: ``plugin_execution_ws_connections{path}`` (live),
  ``plugin_execution_ws_connections_opened_total``,
  ``plugin_execution_ws_handshakes_rejected_total{status}`` and
  ``plugin_execution_ws_connections_closed_total{code}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .backends.base import ExecutionBackend
    from .channels.registry import ConnectionRegistry

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

#: The content type of the Prometheus text exposition format (version 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class ServerMetrics:
    """The metrics of ``backend`` (and of ``connections`` when given), in a private registry.

    Attaching adds an observer to the backend; :meth:`detach` removes it.
    """

    def __init__(
        self, backend: ExecutionBackend, connections: ConnectionRegistry | None = None
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._executions = Counter(
            "plugin_execution_executions",
            "Executions ended, by plugin, handler, backend and outcome (ok or error code).",
            ["plugin", "handler", "backend", "outcome"],
            registry=self.registry,
        )
        self._durations = Histogram(
            "plugin_execution_execution_duration_seconds",
            "How long executions took, by plugin, handler and backend.",
            ["plugin", "handler", "backend"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StatsCollector(backend, connections))
        self._backend_name = backend.name
        self.detach = backend.add_observer(self._observe)

    def _observe(self, plugin_id: str, handler_id: str, outcome: str, duration_s: float) -> None:
        backend = self._backend_name
        self._executions.labels(plugin_id, handler_id, backend, outcome).inc()
        self._durations.labels(plugin_id, handler_id, backend).observe(duration_s)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)


class _StatsCollector(Collector):
    """Reads ``backend.stats()`` and the connection registry at each scrape."""

    def __init__(self, backend: ExecutionBackend, connections: ConnectionRegistry | None) -> None:
        self.backend = backend
        self.connections = connections

    def collect(self) -> Iterator[Metric]:
        stats = self.backend.stats()
        name = stats.backend

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"plugin_execution_{metric}", doc, labels=["backend"])
            family.add_metric([name], value)
            return family

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"plugin_execution_{metric}", doc, labels=["backend"])
            family.add_metric([name], value)
            return family

        yield gauge("in_flight", "Executions running now.", stats.in_flight)
        yield gauge("queued", "Executions waiting for a worker (queue depth).", stats.queued)
        yield counter(
            "queue_full_rejections", "Executions refused: queue full.", stats.queue_full_rejections
        )
        yield counter(
            "acquire_timeouts",
            "Executions that found no free worker in time.",
            stats.acquire_timeouts,
        )
        yield counter("worker_crashes", "Workers that died.", stats.worker_crashes)
        yield counter("workers_recycled", "Workers replaced by policy.", stats.workers_recycled)
        latency = SummaryMetricFamily(
            "plugin_execution_latency_seconds",
            "Execution latency over the recent window (percentiles of the last 10 000).",
            labels=["backend"],
        )
        window = stats.latency
        latency.add_metric([name], count_value=window.count, sum_value=window.avg * window.count)
        yield latency
        quantiles = GaugeMetricFamily(
            "plugin_execution_latency_quantile_seconds",
            "Execution latency percentiles over the recent window.",
            labels=["backend", "quantile"],
        )
        for q, value in (("0.5", window.p50), ("0.95", window.p95), ("0.99", window.p99)):
            quantiles.add_metric([name, q], value)
        yield quantiles
        workers = stats.details.get("workers")
        if isinstance(workers, dict):
            family = GaugeMetricFamily(
                "plugin_execution_workers", "Workers by state.", labels=["backend", "state"]
            )
            for state, count in sorted(workers.items()):
                family.add_metric([name, str(state)], float(count))
            yield family
        if self.connections is not None:
            yield from _connection_metrics(self.connections)


def _connection_metrics(connections: ConnectionRegistry) -> Iterator[Metric]:
    live = GaugeMetricFamily(
        "plugin_execution_ws_connections",
        "Live WebSocket connections by channel route.",
        labels=["path"],
    )
    by_path: dict[str, int] = {}
    for info in connections.list():
        by_path[info.path] = by_path.get(info.path, 0) + 1
    for path, count in sorted(by_path.items()):
        live.add_metric([path], count)
    yield live
    counts = connections.stats()
    yield CounterMetricFamily(
        "plugin_execution_ws_connections_opened",
        "WebSocket connections accepted.",
        value=counts["opened"],
    )
    rejected = CounterMetricFamily(
        "plugin_execution_ws_handshakes_rejected",
        "WebSocket handshakes refused, by HTTP status.",
        labels=["status"],
    )
    for status, count in sorted(counts["rejected"].items()):
        rejected.add_metric([str(status)], count)
    yield rejected
    closed = CounterMetricFamily(
        "plugin_execution_ws_connections_closed",
        "WebSocket connections closed, by close code.",
        labels=["code"],
    )
    for code, count in sorted(counts["closed"].items()):
        closed.add_metric([str(code)], count)
    yield closed
