"""Handlers that misbehave toward their own worker rather than escape it
(tests/deputy/test_unruly_handlers.py): an answer bigger than a frame, every fd taken."""

from __future__ import annotations

import os
from typing import Any

_KEPT: list[int] = []


def huge_result(ctx: Any, input: dict[str, int]) -> bytes:
    """``input["mib"]`` MiB of zeros as the result."""
    return bytes(input["mib"] << 20)


def take_every_fd(ctx: Any, input: Any) -> int:
    """Open /dev/null until the process may open no more, and keep them all (in the
    worker's memory, for whatever runs there next); how many it took."""
    while True:
        try:
            _KEPT.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            return len(_KEPT)


def hello(ctx: Any, input: Any) -> str:
    return "hello"
