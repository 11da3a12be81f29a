"""Handlers for the deputy suite (tests/deputy): a plugin that tries to get the host to do, on
its behalf, what its own sandbox forbids it."""

from __future__ import annotations

import socket
from typing import Any


def shell(ctx: Any, input: dict[str, Any]) -> dict[str, Any]:
    """Plant ``input["plant"]`` (workspace-relative path -> text) in the workspace, then run
    ``input["argv"]`` through ``ctx.shell`` and read ``input["read_back"]`` (a file it made in
    the workspace); the result as plain data (output cut to 4 KiB). The planted files named in
    ``input["executable"]`` are made executable. With ``input["swap_workspace_to"]``, the
    workspace is first moved aside and replaced by a symlink to that directory."""
    swap = input.get("swap_workspace_to")
    if (
        swap is not None
    ):  # the workspace becomes a symlink to ``swap`` (where its parent is writable)
        import os

        try:
            os.rename(ctx.workspace, f"{ctx.workspace}.moved")
            os.symlink(swap, ctx.workspace)
        except OSError as exc:
            return {"swap_refused": f"{type(exc).__name__}: {exc}"}
    for name, text in input.get("plant", {}).items():
        path = ctx.workspace / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if name in input.get("executable", ()):
            path.chmod(0o755)
    result = ctx.shell.run(input["argv"], timeout=input.get("timeout", 30))
    back = input.get("read_back")
    return {
        "read_back": (ctx.workspace / back).read_text() if back else None,
        "returncode": result.returncode,
        "stdout": result.stdout[:4096].decode("utf-8", "replace"),
        "stderr": result.stderr[:4096].decode("utf-8", "replace"),
        "stdout_bytes": len(result.stdout),
        "truncated": result.truncated,
    }


def udp(ctx: Any, input: dict[str, Any]) -> str:
    """Send one datagram to ``input["port"]`` on the loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"leak", ("127.0.0.1", input["port"]))
    return "sent"
