"""Channel handlers for tests/channels: session style (ctx, channel) and events style."""

from __future__ import annotations

import os
from typing import Any

#: In-process tests look here to see how a handler ended.
ENDED: list[str] = []


async def echo(ctx: Any, channel: Any) -> None:
    async for message in channel:
        await channel.send(message)


async def info(ctx: Any, channel: Any) -> None:
    """Sends what the handler knows about its connection, then echoes."""
    await channel.send(
        repr(
            {
                "connection_id": channel.connection_id,
                "request_path": channel.request_path,
                "headers": dict(channel.headers),
                "principal": channel.principal,
                "context": dict(ctx.context),
                "pid": os.getpid(),
            }
        )
    )
    async for message in channel:
        await channel.send(message)


async def boom(ctx: Any, channel: Any) -> None:
    await channel.receive()
    raise ValueError("boom")


async def crash(ctx: Any, channel: Any) -> None:
    await channel.receive()
    os._exit(3)


async def bye(ctx: Any, channel: Any) -> None:
    message = await channel.receive()
    await channel.send(message)
    await channel.close(4000, "bye")


async def done_after_one(ctx: Any, channel: Any) -> None:
    await channel.send(await channel.receive())


async def burst(ctx: Any, channel: Any) -> None:
    """Answers a count with that many messages, then returns."""
    count = int(await channel.receive())
    for i in range(count):
        await channel.send(str(i))


async def hold(ctx: Any, channel: Any) -> None:
    """Waits forever after the first message; records how it ended (in-process)."""
    await channel.receive()
    await channel.send("holding")
    try:
        await channel.receive()
        await channel.receive()
    except BaseException as exc:
        ENDED.append(type(exc).__name__)
        raise


async def big(ctx: Any, channel: Any) -> None:
    """Answers ``"SIZE COUNT"`` with COUNT binary messages of SIZE bytes, then ``"after"``,
    then waits for the client."""
    size, count = map(int, (await channel.receive()).split())
    for _ in range(count):
        await channel.send(b"x" * size)
    await channel.send("after")
    await channel.receive()


async def close_with(ctx: Any, channel: Any) -> None:
    """Closes with the code (and reason, after a space) the client sends."""
    code, _, reason = (await channel.receive()).partition(" ")
    await channel.close(int(code), reason)


async def room(ctx: Any, input: Any) -> Any:
    """An events-style chat room."""
    sender = input.sender
    if input.event == "connect":
        await sender.reply({"type": "welcome", "payload": input.connection_id})
    elif input.event == "message":
        if input.message is None:  # binary
            await sender.reply(input.data)
        elif input.message["type"] == "say":
            await sender.broadcast({"type": "said", "payload": input.message["payload"]})
        elif input.message["type"] == "ping":
            return {"type": "pong", "payload": input.message["payload"]}
        elif input.message["type"] == "quit":
            await sender.close(4001, "quit")
        elif input.message["type"] == "boom":
            raise ValueError("boom")
        elif input.message["type"] == "raise":  # a message of the client's choosing
            raise ValueError(input.message["payload"])
        elif input.message["type"] == "emit":  # the sender's actions, as the plugin forges them
            action = input.message["payload"]
            data = dict(action["data"])
            if "size" in action:  # a message of that many characters
                data["data"] = "z" * action["size"]
            await ctx.emit(action["kind"], data)
    elif input.event == "error":
        await sender.reply({"type": "error", "payload": input.error})
    return None


def not_async(ctx: Any, channel: Any) -> None:
    """A sync session handler: a contract error."""
