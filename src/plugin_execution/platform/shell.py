"""``ctx.shell``: run a granted command (``shell.allow``) on the host, as an argv list, never
through a shell, with a timeout and captured output.

A command may be granted by name (``"git"``, looked up on the host's ``PATH``) or by absolute
path (``"/usr/bin/git"``); an argv[0] containing a ``/`` must resolve to a granted path
itself, so ``./git`` in a writable directory is not ``git``. The command runs in the
execution's workspace, in a session of its own (a timeout kills its whole process group),
with an environment of ``PATH``, locale, ``HOME`` = the workspace, and the granted variables.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

from ..errors import ExecutionTimeoutError, InvalidRequestError
from . import _args

if TYPE_CHECKING:
    from .session import PlatformSession

__all__ = ["ShellService"]

_BASE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


def _kill_group(process: trio.Process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class ShellService:
    """Host side of ``ctx.shell``."""

    def __init__(self, *, environ: Mapping[str, str] | None, max_bytes: int) -> None:
        self.environ = environ
        self.max_bytes = max_bytes

    def _executable(self, session: PlatformSession, command: str) -> str:
        environ = os.environ if self.environ is None else self.environ
        found = shutil.which(command, path=environ.get("PATH", os.defpath))
        resolved = os.path.realpath(found) if found else None
        names = {command} if "/" not in command else set()
        if found:
            names |= {found, resolved or found}
        if resolved is None or not session.grants.command(names):
            session.deny("shell.allow", command)
        assert found is not None
        return found

    def _environment(self, session: PlatformSession, home: str) -> dict[str, str]:
        environ = os.environ if self.environ is None else self.environ
        env = {name: environ[name] for name in _BASE_ENV if name in environ}
        for name, value in environ.items():
            if any(fnmatch.fnmatchcase(name, p) for p in session.permissions.env.read):
                env[name] = value
        env["HOME"] = env["TMPDIR"] = home
        return env

    async def run(
        self, session: PlatformSession, argv: Any, timeout: Any = None, input: Any = None
    ) -> dict[str, Any]:
        if type(argv) not in (list, tuple) or not argv or any(type(a) is not str for a in argv):
            raise InvalidRequestError(
                "argv must be a non-empty list of strings (a command is never a shell string)"
            )
        if any("\x00" in a for a in argv):
            raise InvalidRequestError("argv must not contain NUL characters")
        executable = self._executable(session, argv[0])
        stdin = None if input is None else _args.data_bytes(input, "input")
        seconds = _args.optional_seconds(timeout, "timeout") or float("inf")
        seconds = min(seconds, max(0.0, session.remaining()))
        cwd = session.ensure_workspace()
        with trio.move_on_after(seconds) as scope:
            result = await trio.run_process(
                [executable, *argv[1:]],
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=cwd,
                env=self._environment(session, cwd),
                start_new_session=True,
                deliver_cancel=_kill_async,
            )
            return {
                "returncode": result.returncode,
                "stdout": self._clip(result.stdout),
                "stderr": self._clip(result.stderr),
            }
        assert scope.cancelled_caught
        raise ExecutionTimeoutError(
            f"command {argv[0]!r} ran longer than {seconds:g} s and was killed",
            details={"timeout_s": seconds},
        )

    def _clip(self, data: bytes) -> bytes:
        return data if len(data) <= self.max_bytes else data[-self.max_bytes :]


async def _kill_async(process: trio.Process) -> None:
    _kill_group(process)
