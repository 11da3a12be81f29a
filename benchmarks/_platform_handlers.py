"""Handlers for ``bench_platform.py``: each times ``calls`` permission-checked
``ctx.cache.get`` calls where it runs and returns the samples (nanoseconds), so what is
measured is the call alone, not the execution around it. Nothing here imports trio."""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


async def cache_get(ctx: Any, input: Any) -> list[int]:
    cache = ctx.cache
    clock = time.perf_counter_ns
    out = []
    for _ in range(input["calls"]):
        start = clock()
        await cache.get("key")
        out.append(clock() - start)
    return out


def cache_get_sync(ctx: Any, input: Any) -> list[int]:
    cache = ctx.cache
    clock = time.perf_counter_ns
    out = []
    for _ in range(input["calls"]):
        start = clock()
        cache.get("key")
        out.append(clock() - start)
    return out
