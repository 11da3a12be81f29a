"""A trivial channel handler for ``bench_websocket.py``: echo every message back.

Registered by path (the manifest's ``root`` is this directory), so worker children import it
exactly as they would a plugin's channel. Nothing here imports trio.
"""

from __future__ import annotations

from typing import Any


async def echo(ctx: Any, channel: Any) -> None:
    """Send every message back as it came (text as text, binary as binary)."""
    async for message in channel:
        await channel.send(message)
