"""Handlers for tests. Importable as ``tests.plugins.sample`` or, with the plugin root on
``sys.path``, as ``sample`` (how a worker child imports an uninstalled plugin)."""

from __future__ import annotations

import os
import time
from typing import Any

import attrs


async def echo(ctx: Any, input: Any) -> Any:
    return input


def add(ctx: Any, input: dict[str, int]) -> int:
    return input["a"] + input["b"]


async def sleep(ctx: Any, input: dict[str, float]) -> str:
    import trio

    await trio.sleep(input["seconds"])
    return "slept"


def sleep_sync(ctx: Any, input: dict[str, float]) -> str:
    time.sleep(input["seconds"])
    return "slept"


def spin(ctx: Any, input: Any) -> None:
    """A tight CPU loop that never yields and never returns."""
    while True:
        pass


async def fail(ctx: Any, input: Any) -> None:
    raise ValueError(f"bad input: {input!r}")


def fail_sync(ctx: Any, input: Any) -> None:
    raise KeyError("missing")


async def events(ctx: Any, input: dict[str, int]) -> int:
    for i in range(input["count"]):
        ctx.progress(i + 1, input["count"])
        await ctx.emit("tick", {"i": i})
    ctx.logger.info("done after %d", input["count"])
    return input["count"]


def events_sync(ctx: Any, input: dict[str, int]) -> int:
    for i in range(input["count"]):
        ctx.progress(i + 1, input["count"])
    return input["count"]


async def unserializable(ctx: Any, input: Any) -> object:
    return object()


async def use_workspace(ctx: Any, input: Any) -> dict[str, Any]:
    path = ctx.workspace / "note.txt"
    path.write_text("hello")
    return {"dir": str(ctx.workspace), "mode": oct(os.stat(ctx.workspace).st_mode & 0o777)}


def whoami(ctx: Any, input: Any) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "execution_id": ctx.execution_id,
        "plugin_id": ctx.plugin_id,
        "handler_id": ctx.handler_id,
        "context": dict(ctx.context),
    }


def crash(ctx: Any, input: dict[str, int]) -> None:
    os._exit(input.get("code", 3))


def kill_self(ctx: Any, input: dict[str, int]) -> None:
    import signal

    os.kill(os.getpid(), input.get("signal", signal.SIGKILL))
    # The kernel may deliver the signal to another thread of this process a moment later;
    # never answer, so the test sees the death and not a race with our own Result.
    time.sleep(60)


def noisy(ctx: Any, input: Any) -> str:
    print("to stdout")
    import sys

    print("to stderr", file=sys.stderr)
    os.write(1, b"raw fd 1\n")
    return "quiet result"


@attrs.frozen
class Point:
    x: int
    y: int


@attrs.frozen
class Norm:
    squared: int


def typed(ctx: Any, input: Point) -> Norm:
    return Norm(input.x * input.x + input.y * input.y)


class Counter:
    """A class handler: instantiated once per process, with warmup() and describe()."""

    def __init__(self) -> None:
        self.calls = 0
        self.warm = False

    def warmup(self) -> None:
        self.warm = True

    def describe(self) -> dict[str, str]:
        return {"summary": "counts calls"}

    async def execute(self, ctx: Any, input: Any) -> dict[str, Any]:
        self.calls += 1
        return {"calls": self.calls, "warm": self.warm}


not_a_handler = 42


class NoExecute:
    pass


def environment(ctx: Any, input: Any) -> dict[str, str]:
    return dict(os.environ)


def limits(ctx: Any, input: Any) -> dict[str, Any]:
    import resource

    return {
        name: list(resource.getrlimit(getattr(resource, name)))
        for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NOFILE", "RLIMIT_FSIZE")
    } | {"cwd": os.getcwd(), "pgid": os.getpgid(0), "pid": os.getpid()}


def allocate(ctx: Any, input: dict[str, int]) -> int:
    """Allocate ``mb`` megabytes and touch them."""
    block = bytearray(input["mb"] * 1024 * 1024)
    return len(block)


def open_fds(ctx: Any, input: Any) -> list[int]:
    return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))


def late_workspace(ctx: Any, input: dict[str, Any]) -> None:
    """Outlive the timeout, then ask for the workspace; write what happened to input["report"]."""
    time.sleep(input["seconds"])
    try:
        outcome = f"got {ctx.workspace}"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    with open(input["report"], "w") as report:
        report.write(outcome)


def fork_straggler(ctx: Any, input: dict[str, str]) -> None:
    """Die, leaving a forked child that holds the worker's socket open until the test lets go."""
    if os.fork() == 0:
        with open(input["fifo"]) as release:  # blocks until the test opens it for writing
            release.read()
        os._exit(0)
    os._exit(3)


def proc_environ(ctx: Any, input: Any) -> str:
    """The process's environment as the kernel shows it (as of exec), not ``os.environ``."""
    with open("/proc/self/environ", "rb") as f:
        return f.read().decode("utf-8", "replace")


_overlap = {"now": 0, "most": 0}


async def overlap(ctx: Any, input: dict[str, float]) -> int:
    """How many runs of this handler this worker has had at once, at most, so far."""
    import trio

    _overlap["now"] += 1
    _overlap["most"] = max(_overlap["most"], _overlap["now"])
    try:
        await trio.sleep(input["seconds"])
    finally:
        _overlap["now"] -= 1
    return _overlap["most"]
