"""Trivial handlers for the benchmarks: they measure the runtime's cost, not the handler's.

Benchmarks register a manifest whose ``root`` is this directory and whose entries are
``_handlers:noop`` / ``_handlers:noop_sync`` / ``_handlers:echo``, so every backend (process
ones too) imports these by path, exactly as it would a real plugin. Nothing here imports trio.
"""

from __future__ import annotations

TYPE_CHECKING = False  # importing typing would add ~5 ms to a fresh child's start
if TYPE_CHECKING:
    from typing import Any


async def noop(ctx: Any, input: Any) -> Any:
    """Return the input; never yields to the event loop."""
    return input


def noop_sync(ctx: Any, input: Any) -> Any:
    """Return the input, synchronously."""
    return input


def echo(ctx: Any, input: Any) -> Any:
    """Return the input unchanged, synchronously: the payload goes to the worker and back.

    ``bench_pool.py`` runs this one function on every contender (the pool as a handler, the
    peers as ``echo(None, payload)``), so all of them do the same work.
    """
    return input
