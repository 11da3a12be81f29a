"""What the benchmarks share: the registry of trivial handlers, and importing them directly.

Kept apart from ``_handlers.py``, which worker children import and which must stay lean.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from plugin_execution import PluginRegistry

HERE = Path(__file__).resolve().parent
PLUGIN_ID = "bench.handlers"
HANDLERS = ("noop", "noop_sync", "echo")


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
