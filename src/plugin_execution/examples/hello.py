"""Example handlers: an async one, a sync one, a CPU-bound one and a streaming one.

Nothing here imports trio: the handlers run the same in-process and in worker children.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


async def greet(ctx: Any, input: dict[str, Any]) -> dict[str, Any]:
    """Say hello; report which process ran it."""
    name = input.get("name", "world")
    return {"greeting": f"Hello, {name}!", "pid": os.getpid()}


def wordcount(ctx: Any, input: dict[str, Any]) -> dict[str, int]:
    """Count words in ``input["text"]`` (a plain sync handler)."""
    counts: dict[str, int] = {}
    for word in str(input.get("text", "")).lower().split():
        counts[word] = counts.get(word, 0) + 1
    return counts


def fib(ctx: Any, input: dict[str, Any]) -> int:
    """The n-th Fibonacci number, computed slowly on purpose: a CPU-bound handler."""
    n = int(input.get("n", 20))

    def slow(k: int) -> int:
        return k if k < 2 else slow(k - 1) + slow(k - 2)

    return slow(n)


async def countdown(ctx: Any, input: dict[str, Any]) -> str:
    """Stream progress and one custom event per step."""
    steps = int(input.get("from", 3))
    for i in range(steps, 0, -1):
        ctx.progress(steps - i + 1, steps)
        await ctx.emit("tick", {"remaining": i - 1})
    return "liftoff"
