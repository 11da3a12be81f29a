"""Example channels of ``examples.chat``: an echo (session style) and a chat room (events style).

Served by ``plugin-execution serve`` at ``/v1/ws/plugins/examples.chat/echo`` and
``/v1/ws/plugins/examples.chat/room``. Nothing here imports trio or trio-websocket: the
handlers run the same in-process and in worker children.
"""

from __future__ import annotations

from ..channels.events import envelope

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


async def echo(ctx: Any, channel: Any) -> None:
    """Session style: one execution per connection; every message comes back as it was."""
    async for message in channel:
        await channel.send(message)


async def room(ctx: Any, input: Any) -> None:
    """Events style: one short execution per event; everyone in the room hears what is said.

    Send ``{"type": "say", "payload": "hello"}``; everyone gets
    ``{"type": "said", "payload": {"who": ..., "text": "hello"}, ...}``.
    """
    sender, who = input.sender, input.connection_id
    if input.event == "connect":
        await sender.reply(envelope("welcome", {"you": who}))
        await sender.broadcast(envelope("joined", {"who": who}), include_self=False)
    elif input.event == "disconnect":
        await sender.broadcast(envelope("left", {"who": who}))
    elif input.event == "error":
        await sender.reply(envelope("error", input.error))
    elif input.message is None:
        await sender.reply(envelope("error", "this room speaks JSON envelopes, not binary"))
    elif input.message["type"] == "say":
        said = {"who": who, "text": input.message["payload"]}
        await sender.broadcast(envelope("said", said))
    else:
        await sender.reply(envelope("error", f"unknown message type {input.message['type']!r}"))
