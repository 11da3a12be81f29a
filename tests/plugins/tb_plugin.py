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
