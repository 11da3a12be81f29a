"""Handlers that fail below their own entry, for the remote-traceback tests
(``tests/test_remote_traceback.py``): the traceback must start at this file."""

from __future__ import annotations

import json
from typing import Any


def _check(value: Any) -> None:
    raise ValueError(f"nested failure: {value!r}")  # the raising line


async def nested(ctx: Any, input: Any) -> None:
    _check(input)  # nested calls


def nested_sync(ctx: Any, input: Any) -> None:
    _check(input)  # nested_sync calls


async def bad_json(ctx: Any, input: Any) -> Any:
    return json.loads("{not json")


async def runtime_call(ctx: Any, input: Any) -> None:
    """Calls into the runtime's own code, which fails there: its frames must stay."""
    from plugin_execution.errors import clip_text

    clip_text(input, 0)  # len(None): a TypeError inside errors.py


async def chained(ctx: Any, input: Any) -> None:
    """A failure raised from another: both tracebacks start here."""
    try:
        {}["missing"]  # the cause
    except KeyError as exc:
        raise RuntimeError("lookup failed") from exc  # the outer


async def in_nursery(ctx: Any, input: Any) -> None:
    """A child task fails: trio wraps it in an ExceptionGroup raised from this frame."""
    import trio

    async def child() -> None:
        _check("child")

    async with trio.open_nursery() as nursery:  # the group
        nursery.start_soon(child)
