"""What the benchmarks share: the registry of trivial handlers, and importing them directly.

Kept apart from ``_handlers.py``, which worker children import and which must stay lean.
"""

from __future__ import annotations

import importlib
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from plugin_execution import PluginRegistry

HERE = Path(__file__).resolve().parent
PLUGIN_ID = "bench.handlers"
HANDLERS = ("noop", "noop_sync", "echo")

Samples = list[int]  # nanoseconds, one per call


class Summary(TypedDict):
    calls: int
    median_us: float
    p99_us: float
    mean_us: float
    min_us: float


def bench_registry() -> PluginRegistry:
    """A registry holding the trivial handlers of ``benchmarks/_handlers.py``, by path."""
    registry = PluginRegistry()
    registry.register(
        {
            "id": PLUGIN_ID,
            "version": "1",
            "root": str(HERE),
            "handlers": [{"id": name, "entry": f"_handlers:{name}"} for name in HANDLERS],
        }
    )
    return registry


def import_handlers() -> Any:
    """The ``_handlers`` module, imported the way a worker would: its root on sys.path."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module("_handlers")


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted samples."""
    index = min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))
    return float(ordered[index])


def summarize(samples: dict[str, Samples]) -> dict[str, Summary]:
    """Per variant, in microseconds: median, p99, mean, min, and the number of calls."""
    summary: dict[str, Summary] = {}
    for name, series in samples.items():
        ordered = sorted(series)
        summary[name] = {
            "calls": len(ordered),
            "median_us": statistics.median(ordered) / 1000,
            "p99_us": percentile(ordered, 0.99) / 1000,
            "mean_us": statistics.fmean(ordered) / 1000,
            "min_us": ordered[0] / 1000,
        }
    return summary
