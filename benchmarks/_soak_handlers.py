"""Handlers for ``soak.py``: the well-behaved and the misbehaving plugins a soak mixes.

Each kind is registered as its own plugin (``soak.echo``, ``soak.crash``, ...), all from this
file, so a per-plugin breaker that refuses a crashing plugin never touches the others.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def echo(ctx: Any, input: Any) -> Any:
    """The common case: return the input."""
    return input


async def sleep(ctx: Any, input: Any) -> Any:
    """Wait ``input`` seconds without holding the worker's CPU."""
    import trio

    await trio.sleep(float(input))
    return input


def raise_(ctx: Any, input: Any) -> Any:
    """An ordinary exception."""
    raise ValueError(f"soak asked for an error ({input!r})")


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ of this exception raises")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ of this exception raises")


def bad_str(ctx: Any, input: Any) -> Any:
    """An exception that cannot be rendered: its ``__str__`` and ``__repr__`` raise."""
    raise _Unprintable(input)


def crash(ctx: Any, input: Any) -> Any:
    """Kill the worker that runs this, without a word."""
    os._exit(3)


def busy(ctx: Any, input: Any) -> Any:
    """Spin on the CPU until stopped from outside (a timeout must kill it)."""
    while True:
        time.monotonic()


def memory(ctx: Any, input: Any) -> Any:
    """Allocate and touch ``input`` MB: past the plugin's memory quota."""
    block = bytearray(int(input) * 1024 * 1024)
    block[::4096] = b"\x01" * len(block[::4096])
    return len(block)


def fork(ctx: Any, input: Any) -> Any:
    """Leave a process behind: a plain child, or a ``setsid`` double fork (``input`` True).

    The leftover runs ``sleep`` with a marker argument, so the soak can find it afterwards.
    Returns the leftover's pid.
    """
    marker = str(input["marker"])
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read_end)
            if input["setsid"]:
                os.setsid()
                if os.fork():
                    os._exit(0)
            os.write(write_end, str(os.getpid()).encode())
            os.close(write_end)
            os.execv("/bin/sleep", ["sleep", marker])
        finally:
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        leftover = int(pipe.read() or b"0")
    if input["setsid"]:
        os.waitpid(pid, 0)  # the intermediate child exits at once
    return leftover
