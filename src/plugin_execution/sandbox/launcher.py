"""The launcher of ``ctx.shell`` commands: it puts itself in a plugin's sandbox, then becomes
the command.

The host starts ``python -I -c "...; launch(SPEC)" ARGV...`` (under bubblewrap when the
sandbox has it); the launcher applies the rlimits and the kernel layers of ``SPEC`` to itself,
exactly as a worker child does (:mod:`plugin_execution.worker.bootstrap`), then ``execve``'s
the command: the command inherits every restriction (Landlock, seccomp, no capabilities,
no_new_privs), and so does everything it starts. ``SPEC`` is plain data written as a literal
(no parser to import): ``executable``, ``env`` (the command's whole environment), ``limits``,
``sandbox`` (see :class:`~plugin_execution.sandbox.policy.ChildSandbox`) and ``workspace``:
its path, device and inode as the host found it. The command starts in the workspace (its
working directory, set as the launcher starts); the launcher checks that this is the
directory the host found, and its Landlock rule for the workspace names that directory
(``.``), not the path again: a plugin that can swap its workspace for a symlink (a
sandboxed pool worker writes its workspaces' parent) never lends its command the target.

Standard library only, no ``typing`` at run time: a fresh interpreter pays for every import.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

__all__ = ["SANDBOX_FAILED", "argv", "launch"]

#: The exit status when the sandbox could not be applied (EX_OSERR, as a worker child's):
#: the command never ran.
SANDBOX_FAILED = 71
#: The exit status when the command could not be executed (as a shell reports it).
_CANNOT_EXECUTE = 126


def argv(spec: dict[str, Any], command: list[str]) -> list[str]:
    """The launcher's command line for ``command`` (``argv`` of the command, ``argv[0]``
    included) with ``spec``."""
    code = f"from plugin_execution.sandbox.launcher import launch; launch({spec!r})"
    return [sys.executable, "-I", "-c", code, *command]


def launch(spec: dict[str, Any]) -> NoReturn:
    """Apply ``spec``'s limits and sandbox to this process, then exec the command given as
    this interpreter's arguments. Never returns: on a failure it writes why to stderr and
    exits with :data:`SANDBOX_FAILED` (the sandbox) or 126 (the command)."""
    from ..worker.bootstrap import apply_limits, apply_sandbox

    command = sys.argv[1:]
    sandbox = spec.get("sandbox") or {}
    if spec.get("workspace"):
        sandbox = _pinned(sandbox, *spec["workspace"])
    try:
        apply_limits(str(spec.get("limits") or ""))
        apply_sandbox(sandbox)
    except OSError as exc:
        _fail(SANDBOX_FAILED, f"cannot apply the plugin's sandbox: {exc}")
    try:
        os.execve(spec["executable"], command, spec["env"])
    except OSError as exc:
        _fail(_CANNOT_EXECUTE, f"cannot execute {command[0]!r}: {exc}")


def _pinned(sandbox: dict[str, Any], workspace: str, device: int, inode: int) -> dict[str, Any]:
    """``sandbox`` with its Landlock rule for ``workspace`` on the working directory, once
    that is the directory the host found (``device``, ``inode``); else the launcher fails."""
    try:
        here = os.stat(".")
    except OSError as exc:
        _fail(SANDBOX_FAILED, f"cannot check its working directory: {exc}")
    if (here.st_dev, here.st_ino) != (device, inode):
        _fail(SANDBOX_FAILED, "its working directory is not the plugin's workspace")
    rules = sandbox.get("landlock")
    if not rules:
        return sandbox
    write = ["." if path == workspace else path for path in rules["write"]]
    return {**sandbox, "landlock": {**rules, "write": write}}


def _fail(status: int, why: str) -> NoReturn:
    os.write(2, f"plugin_execution shell: {why}\n".encode())
    os._exit(status)
