"""The manifest of the bundled example plugin ``examples.hello``."""

from __future__ import annotations

from ..manifest import HandlerSpec, PluginManifest

__all__ = ["manifest"]

manifest = PluginManifest(
    id="examples.hello",
    version="1.0.0",
    description="Greets, counts words and computes Fibonacci numbers: one handler per style.",
    handlers=(
        HandlerSpec(id="greet", entry="plugin_execution.examples.hello:greet"),
        HandlerSpec(id="wordcount", entry="plugin_execution.examples.hello:wordcount"),
        HandlerSpec(id="fib", entry="plugin_execution.examples.hello:fib", warmup=True),
        HandlerSpec(id="countdown", entry="plugin_execution.examples.hello:countdown"),
    ),
)
