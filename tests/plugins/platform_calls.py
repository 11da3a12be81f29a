"""Handlers that call platform services as their input says, for tests/services.

``input = {"service": "fs", "method": "read", "args": [...], "kwargs": {...}}``; ``method``
None calls the service itself (``ctx.fetch(...)``, ``ctx.invoke(...)``). Results that are
objects (a fetch response, a shell result) come back as dicts.
"""

from __future__ import annotations

import os
from typing import Any


def _plain(value: Any) -> Any:
    if hasattr(value, "status") and hasattr(value, "content"):
        return {"status": value.status, "body": value.content, "headers": value.headers}
    if hasattr(value, "returncode"):
        return {"returncode": value.returncode, "stdout": value.stdout, "stderr": value.stderr}
    return value


def _target(ctx: Any, input: dict[str, Any]) -> Any:
    service = getattr(ctx, input["service"])
    method = input.get("method")
    return service if method is None else getattr(service, method)


async def call(ctx: Any, input: dict[str, Any]) -> Any:
    fn = _target(ctx, input)
    return _plain(await fn(*input.get("args", []), **input.get("kwargs", {})))


def call_sync(ctx: Any, input: dict[str, Any]) -> Any:
    fn = _target(ctx, input)
    return _plain(fn(*input.get("args", []), **input.get("kwargs", {})))


async def denied_then_ok(ctx: Any, input: Any) -> str:
    """Catch a denial and carry on: the denial is still counted."""
    from plugin_execution import PermissionDeniedError

    try:
        await ctx.env.get("NOT_GRANTED")
    except PermissionDeniedError as exc:
        return exc.details["permission"]
    return "not denied"


async def subscribe_then_publish(ctx: Any, input: dict[str, Any]) -> Any:
    sub = await ctx.events.subscribe(input["topic"])
    await ctx.events.publish(input["topic"], input["data"])
    event = await sub.receive(timeout=10)
    await sub.close()
    return event["data"] if event else None


def subscribe_then_publish_sync(ctx: Any, input: dict[str, Any]) -> Any:
    sub = ctx.events.subscribe(input["topic"])
    ctx.events.publish(input["topic"], input["data"])
    event = sub.receive(timeout=10)
    sub.close()
    return event["data"] if event else None


async def wait_event(ctx: Any, input: dict[str, Any]) -> Any:
    """Subscribe, tell the host by publishing on input["ready"], return the first event."""
    sub = await ctx.events.subscribe(input["topic"])
    await ctx.events.publish(input["ready"], None)
    async for event in sub:
        return event["data"]
    return None


async def invoke_self(ctx: Any, input: Any) -> Any:
    """Invokes itself: a cycle."""
    return await ctx.invoke(ctx.plugin_id, ctx.handler_id, input)


async def chain(ctx: Any, input: int) -> Any:
    """Invokes the next link (``chain2``... by input count) until input reaches 0."""
    if input <= 0:
        return "bottom"
    return await ctx.invoke(f"tests.chain{input - 1}", "chain", input - 1)


def environment(ctx: Any, input: Any) -> dict[str, str]:
    return dict(os.environ)


async def cache_get(ctx: Any, input: Any) -> Any:
    """For the benchmark: one permission-checked cache read."""
    return await ctx.cache.get("key")


def wait_forever_sync(ctx: Any, input: Any) -> Any:
    """Blocks in a platform call that never answers (no event comes): only cancel ends it."""
    sub = ctx.events.subscribe(input["topic"])
    for event in sub:
        return event
    return "ended"
