"""Handlers for the shutdown and leftover-process tests (tests/backends/test_shutdown.py,
tests/backends/test_descendants.py): work still running when a backend closes, and processes
a handler starts and leaves behind."""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any

SLEEP = shutil.which("sleep") or "/bin/sleep"
# A leftover slow to die: it holds ``argv[2]`` MiB, every page touched, whose teardown takes
# the kernel milliseconds after a SIGKILL; it says its pid on fd ``argv[1]`` once it holds them.
HOG = (
    "import os, sys, time\n"
    "size = int(sys.argv[2]) << 20\n"
    "held = bytearray(size)\n"
    "held[::4096] = b'\\1' * (size >> 12)\n"
    "os.write(int(sys.argv[1]), str(os.getpid()).encode())\n"
    "os.close(int(sys.argv[1]))\n"
    "time.sleep(300)\n"
)


async def nap(ctx: Any, input: dict[str, float]) -> str:
    """Make the workspace (a process child's TMPDIR), then sleep ``seconds`` (trio)."""
    import trio

    (ctx.workspace / "note.txt").write_text("working")
    await trio.sleep(input["seconds"])
    return "slept"


def nap_sync(ctx: Any, input: dict[str, float]) -> str:
    (ctx.workspace / "note.txt").write_text("working")
    time.sleep(input["seconds"])
    return "slept"


def leave_child(ctx: Any, input: dict[str, Any]) -> int:
    """Start ``sleep 300`` and leave it running; return its pid (also written to
    ``input["record"]`` when given, for a caller that gets no result).

    ``how``: ``"plain"``, a child of this process, in its process group; ``"setsid"``, a
    double fork whose grandchild runs in a session of its own, orphaned at once.
    ``hold_mb``: the leftover is a Python process holding that much memory instead of
    ``sleep`` (see ``HOG``), answered once it holds it. Then
    ``then``: ``"return"`` (default), ``"sleep"`` (block ``seconds``), or ``"exit"`` (end the
    process at once, as a crash)."""
    read, write = os.pipe()
    hold = input.get("hold_mb")
    hog = [sys.executable, "-I", "-S", "-c", HOG, str(write), str(hold)]
    pid = os.fork()
    if pid == 0:  # only async-signal-safe work until exec: the parent has threads
        try:
            os.close(read)
            if input["how"] == "setsid":
                os.setsid()
                if os.fork() != 0:
                    os._exit(0)  # the middle one: its child is orphaned now
            if hold:
                os.set_inheritable(write, True)
                os.execv(hog[0], hog)
            os.write(write, str(os.getpid()).encode())
            os.close(write)
            os.execv(SLEEP, [SLEEP, "300"])
        finally:
            os._exit(127)
    os.close(write)
    try:
        leftover = int(os.read(read, 64))
    finally:
        os.close(read)
    if input["how"] == "setsid":
        os.waitpid(pid, 0)  # the middle one
    record = input.get("record")
    if record:
        with open(record, "w") as f:
            f.write(str(leftover))
    then = input.get("then", "return")
    if then == "sleep":
        time.sleep(input.get("seconds", 300))
    elif then == "exit":
        os._exit(3)
    return leftover


#: The backend that ``shut_down_own_backend`` closes (set by the test; in-process only).
BACKEND: Any = None


async def shut_down_own_backend(ctx: Any, input: Any) -> str:
    """Shut down the backend this very execution runs on, then go on as if nothing happened."""
    import trio

    await BACKEND.shutdown(drain=True, timeout=0.5)
    await trio.lowlevel.checkpoint()  # the first after it: this execution was stopped too
    return "went on"
