"""Handlers that try to fill the host's memory, or to hold capacity, for tests/deputy.

Each does what a hostile plugin would: store big values in ``ctx.cache``, subscribe many
times and publish big events, emit big events nobody reads, write forged ``pcall`` frames to
its own worker's protocol socket, or invoke another handler while every slot is taken.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Any

import msgpack


async def fill_cache(ctx: Any, input: dict[str, int]) -> int:
    """``count`` values of ``size`` bytes under distinct keys."""
    for i in range(input["count"]):
        await ctx.cache.set(f"k{i}", os.urandom(16) + bytes(input["size"] - 16))
    return input["count"]


async def flood_subscribers(ctx: Any, input: dict[str, Any]) -> list[int]:
    """``subscriptions`` subscriptions to one topic, never read, then ``publishes`` events
    of ``size`` bytes on it; returns how many subscribers each publish reached."""
    topic = input["topic"]
    subs = [await ctx.events.subscribe(topic) for _ in range(input["subscriptions"])]
    reached = [
        await ctx.events.publish(topic, os.urandom(16) + bytes(input["size"] - 16))
        for _ in range(input["publishes"])
    ]
    assert len(subs) == input["subscriptions"]
    return reached


async def emit_blobs(ctx: Any, input: dict[str, int]) -> int:
    """``count`` events of ``size`` bytes each."""
    for _ in range(input["count"]):
        await ctx.emit("blob", os.urandom(16) + bytes(input["size"] - 16))
    return input["count"]


async def emit_blobs_nowait(ctx: Any, input: dict[str, int]) -> int:
    """As :func:`emit_blobs`, without waiting for room (the in-process non-blocking emit)."""
    for _ in range(input["count"]):
        ctx.emit_nowait("blob", os.urandom(16) + bytes(input["size"] - 16))
    return input["count"]


def _protocol_socket() -> tuple[int, threading.Lock]:
    """The fd the worker runtime serves the host on, and the lock its writer sends frames under
    (so that the forged frames go out whole, between the runtime's own)."""
    for obj in gc.get_objects():
        if type(obj).__name__ == "FrameWriter" and hasattr(obj, "_lock"):
            return obj._fd, obj._lock
    raise RuntimeError("no worker runtime in this process")


def _frame(fields: dict[str, Any]) -> bytes:
    payload = msgpack.packb(fields, use_bin_type=True)
    return len(payload).to_bytes(4, "big") + payload


def forge_pcalls(ctx: Any, input: dict[str, int]) -> int:
    """Write ``count`` ``pcall`` frames whose execution ids (``id_length`` characters, each
    different) name no execution, straight to the protocol socket; return how many."""
    fd, lock = _protocol_socket()
    length = input["id_length"]
    for i in range(input["count"]):
        frame = _frame(
            {
                "t": "pcall",
                "call_id": 10**9 + i,
                "execution_id": f"{i:08d}".ljust(length, "x"),
                "service": "cache",
                "method": "get",
                "args": ["k"],
                "kwargs": {},
            }
        )
        with lock:
            view = memoryview(frame)
            while view:
                view = view[os.write(fd, view) :]
    time.sleep(input.get("linger", 0))
    return input["count"]


def quick(ctx: Any, input: Any) -> str:
    """A 0.1 s handler."""
    time.sleep(0.1)
    return "quick"


def hold(ctx: Any, input: dict[str, Any]) -> str:
    """Hold its slot until the cache has ``input["until"]`` (at most 20 s), then return
    "held": the invocations behind it stay in flight meanwhile."""
    deadline = time.monotonic() + 20
    while ctx.cache.get(input["until"]) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return "held"


async def invoke(ctx: Any, input: dict[str, Any]) -> Any:
    """``ctx.invoke(plugin, handler, input)``."""
    return await ctx.invoke(input["plugin"], input["handler"], input.get("input"))


def invoke_sync(ctx: Any, input: dict[str, Any]) -> Any:
    """:func:`invoke` from a sync handler."""
    return ctx.invoke(input["plugin"], input["handler"], input.get("input"))


async def invoke_many(ctx: Any, input: dict[str, Any]) -> list[Any]:
    """``count`` invocations at once, from one execution: their outputs, or for those that
    failed their error codes. With ``release`` (``[key, n]``): once ``n`` have failed, set
    ``key`` in the cache (what :func:`hold` waits for)."""
    import trio

    from plugin_execution import ExecutionError

    results: list[Any] = [None] * input["count"]
    release_key, release_after = input.get("release") or (None, 0)
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        try:
            results[i] = await ctx.invoke(input["plugin"], input["handler"], input.get("input"))
        except ExecutionError as exc:
            results[i] = exc.code
            failed += 1
            if failed == release_after:
                await ctx.cache.set(release_key, True)

    async with trio.open_nursery() as nursery:
        for i in range(input["count"]):
            nursery.start_soon(one, i)
    return results
