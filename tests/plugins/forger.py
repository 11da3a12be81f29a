"""Handlers that speak for their worker (tests/deputy/test_forged_frames.py): they write
frames of their own making on the worker's protocol socket, as any plugin code in a worker
process can, to see what the host takes from them."""

from __future__ import annotations

import os
import socket
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]


def _protocol_socket() -> socket.socket:
    """The worker's socket to the host (the only socket a worker child holds)."""
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                return socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
    raise RuntimeError("no socket found")


def send_frame(message: dict[str, Any]) -> None:
    body = msgpack.packb(message, use_bin_type=True)
    with _protocol_socket() as sock:
        sock.sendall(len(body).to_bytes(4, "big") + body)


def forge_error(ctx: Any, input: dict[str, Any]) -> str:
    """End this execution with the error ``input["error"]`` (its wire form, as sent)."""
    send_frame({"t": "error", "execution_id": ctx.execution_id, "error": input["error"]})
    return "the host took the forged error first"


def _platform_calls() -> Any:
    """The worker runtime's platform-call machinery, found in memory as any code can."""
    import gc

    from plugin_execution.worker.platform_calls import PlatformCalls

    return next(o for o in gc.get_objects() if isinstance(o, PlatformCalls))


def forge_call(ctx: Any, input: dict[str, Any]) -> dict[str, Any]:
    """Call ``env.get(input["name"])`` as execution ``input["as"]`` (not this one): the
    outcome, the value or the error's code."""
    calls = _platform_calls()
    try:
        value = calls.call(input["as"], "env", "get", [input["name"]], {})
    except Exception as exc:
        return {"error": getattr(exc, "code", type(exc).__name__), "message": str(exc)}
    return {"value": value}


def invoke_forger(ctx: Any, input: dict[str, Any]) -> Any:
    """The caller with the grant: invoke ``forger.thief``, which knows this execution's id."""
    return ctx.invoke("forger.thief", "forge_call", {"as": ctx.execution_id, "name": input["name"]})


def flood(ctx: Any, input: dict[str, Any]) -> str:
    """Keep the worker's socket full of frames the host reads and drops (results for an
    execution nobody runs) for up to ``input["seconds"]``, as fast as the host takes them."""
    import time

    one = msgpack.packb(
        {
            "t": "result",
            "execution_id": "nobody",
            "output": None,
            "duration_s": 0.0,
            "metadata": {},
        },
        use_bin_type=True,
    )
    block = (len(one).to_bytes(4, "big") + one) * 2048
    end = time.monotonic() + input["seconds"]
    with _protocol_socket() as sock:
        while time.monotonic() < end:
            sock.sendall(block)
    return "the host let the flood run its course"


def forge_result(ctx: Any, input: dict[str, Any]) -> str:
    """Answer execution ``input["for"]`` (someone else's) with a result of this plugin's making."""
    send_frame(
        {
            "t": "result",
            "execution_id": input["for"],
            "output": "forged",
            "duration_s": 0.0,
            "metadata": {},
        }
    )
    return "sent"


def genuine(ctx: Any, input: Any) -> str:
    """Say where this execution's workspace is, wait for a ``go`` file there, then answer."""
    import time

    ctx.emit_nowait("started", {"workspace": str(ctx.workspace)})
    end = time.monotonic() + 30
    while not (ctx.workspace / "go").exists() and time.monotonic() < end:
        time.sleep(0.01)
    return "genuine"


def half_frame(ctx: Any, input: dict[str, Any]) -> str:
    """Begin a frame of ``input["size"]`` bytes, send a few of them, then go silent."""
    import time

    with _protocol_socket() as sock:
        sock.sendall(input["size"].to_bytes(4, "big") + b"\x85")
        time.sleep(60)
    return "the host waited for the rest of the frame"


def lose_socket(ctx: Any, input: Any) -> str:
    """Put /dev/null where the worker's socket was (dup2 over its fd), then return."""
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, int(name))
                os.close(null)
        except OSError:
            continue
    return "the host took an answer from a worker without a socket"


def bomb(ctx: Any, input: dict[str, Any]) -> str:
    """Answer this execution with a result whose output is ``input["count"]`` empty maps:
    one byte each on the wire, a dict of ~64 bytes each once decoded."""
    count = input["count"]
    output = b"\xdd" + count.to_bytes(4, "big") + b"\x80" * count
    head = msgpack.packb(
        {"t": "result", "execution_id": ctx.execution_id, "duration_s": 0.0, "metadata": {}},
        use_bin_type=True,
    )
    body = bytes([head[0] + 1]) + head[1:] + msgpack.packb("output") + output
    with _protocol_socket() as sock:
        sock.sendall(len(body).to_bytes(4, "big") + body)
    return "the host took a result of its own making"


def read_env(ctx: Any, input: dict[str, Any]) -> Any:
    """``ctx.env.get(input["name"])``, or the error's code."""
    try:
        return ctx.env.get(input["name"])
    except Exception as exc:
        return {"error": getattr(exc, "code", type(exc).__name__)}


def ask(ctx: Any, input: dict[str, Any]) -> dict[str, Any]:
    """Read ``input["name"]`` itself, then through ``input["plugin"]``'s ``read_env``."""
    try:
        via = ctx.invoke(input["plugin"], "read_env", {"name": input["name"]})
    except Exception as exc:
        via = {"error": getattr(exc, "code", type(exc).__name__)}
    return {"own": read_env(ctx, input), "via": via}
