"""The manifests of the bundled example plugins ``examples.hello`` and ``examples.chat``."""

from __future__ import annotations

from ..manifest import ChannelSpec, HandlerSpec, PluginManifest

__all__ = ["chat_manifest", "manifest"]

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

chat_manifest = PluginManifest(
    id="examples.chat",
    version="1.0.0",
    description="WebSocket channels: an echo (session style) and a chat room (events style).",
    channels=(
        ChannelSpec(path="/echo", entry="plugin_execution.examples.chat:echo"),
        ChannelSpec(path="/room", entry="plugin_execution.examples.chat:room", style="events"),
    ),
)
