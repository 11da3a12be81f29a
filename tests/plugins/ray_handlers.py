"""Handlers for tests/backends/test_ray*.py: what a Ray actor worker runs."""

from __future__ import annotations

import os
import time
from typing import Any


async def tick_then_wait(ctx: Any, input: dict[str, float]) -> str:
    """One event at once, then the answer only after ``seconds``: events are live."""
    await ctx.emit("tick", {"at": time.time()})
    import trio

    await trio.sleep(input["seconds"])
    return "done"


def where(ctx: Any, input: Any) -> dict[str, Any]:
    """Where it ran, after ``sleep`` seconds (to be caught in flight)."""
    time.sleep(input.get("sleep", 0) if isinstance(input, dict) else 0)
    return {"pid": os.getpid()}


def write_workspace(ctx: Any, input: Any) -> str:
    (ctx.workspace / "note.txt").write_text("hello")
    print("wrote the note")
    return str(ctx.workspace)


def allocate(ctx: Any, input: dict[str, int]) -> int:
    """Take memory (pages touched, so they count) ``step_mb`` at a time, up to ``limit_mb``,
    pausing between steps so a memory monitor sees it grow; the MiB held if it lived."""
    held = []
    for _ in range(0, input["limit_mb"], input["step_mb"]):
        held.append(b"\x01" * (input["step_mb"] << 20))
        time.sleep(0.02)
    return len(held) * input["step_mb"]
