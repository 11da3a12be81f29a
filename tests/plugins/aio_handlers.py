"""Handlers for the asyncio host tests: they say where they run, then wait to be stopped."""

from __future__ import annotations

import os
import time
from typing import Any


def pid_then_sleep(ctx: Any, input: dict[str, Any]) -> str:
    """Write this process's pid to ``input["pid_file"]``, then sleep ``input["seconds"]``."""
    path = input["pid_file"]
    with open(f"{path}.tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(f"{path}.tmp", path)  # whole, or not there
    time.sleep(input["seconds"])
    return "slept"


def emit_pid_then_sleep(ctx: Any, input: dict[str, Any]) -> str:
    """Emit a ``pid`` event, then sleep ``input["seconds"]``: a sync handler, which only
    the death of its process can stop."""
    ctx.emit_nowait("pid", {"pid": os.getpid()})
    time.sleep(input["seconds"])
    return "slept"
