"""``ctx.shell``: run a granted command (``shell.allow``) for a plugin, inside the plugin's own
sandbox, as an argv list, never through a shell, with a timeout and bounded output.

A command may be granted by name (``"git"``, looked up on the host's ``PATH``) or by absolute
path (``"/usr/bin/git"``); an argv[0] containing a ``/`` must resolve to a granted path
itself, so ``./git`` in a writable directory is not ``git``.

The host starts the command, but it gets no more reach than the plugin's grants, on every
backend (docs/sandbox.md, "Threat model"): a launcher (:mod:`..sandbox.launcher`) applies the
sandbox the plugin's child would run under, built by the same
:class:`~plugin_execution.sandbox.policy.SandboxPolicy`, then execs the command: no
capabilities, Landlock (read the plugin's files and ``fs.read``, write the workspace and
``fs.write``, execute only ``shell.allow``), seccomp (its process group kept, no network socket
without ``network.connect``), bubblewrap when installed. It runs in the execution's workspace,
in a session of its own (ended as a group), with an environment of ``PATH``, locale, the granted
variables, and ``HOME`` = ``TMPDIR`` = a fresh empty directory made for this one command (never
the workspace, where the plugin could plant a ``.gitconfig``), removed after it.

Output is read as it comes: once stdout and stderr together pass ``max_bytes``, the command's
process group is killed and the result says ``truncated`` (what came first is kept). At most
``max_per_plugin`` commands of one plugin, and ``max_concurrent`` in all, run at once.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..errors import ExecutionTimeoutError, InvalidRequestError, PermissionDeniedError
from ..host.limits import WorkerLimits
from ..manifest import Permissions
from ..sandbox import launcher
from ..sandbox.policy import ChildSandbox, SandboxPolicy, check_layers
from ..sandbox.support import detect
from . import _args
from .fs import resolve_parent

if TYPE_CHECKING:
    from .session import PlatformSession

__all__ = ["ShellService"]

_BASE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
#: Set for every command: git reads no system-wide or global configuration (the fresh
#: ``HOME`` has none either); a repository's own ``.git/config`` is the plugin's, and what it
#: makes git run is confined like the plugin.
_FIXED_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
_CHUNK = 64 * 1024


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class ShellService:
    """Host side of ``ctx.shell``.

    ``max_bytes``: what a command may write to stdout and stderr together before it is
    killed. ``max_concurrent`` / ``max_per_plugin``: commands running at once on the host /
    for one plugin (16 / 4); more wait, within their timeout. So the host holds at most
    ``max_concurrent * max_bytes`` of command output. ``sandbox``: the layers its commands
    run under, as the subprocess backend's option: ``True`` (every layer this machine has),
    a tuple of the layers required (the first command fails if one is missing), or ``False``
    (none: only its own session, the environment allow-list, the fresh ``HOME`` and the
    output cap).
    """

    def __init__(
        self,
        *,
        environ: Mapping[str, str] | None,
        max_bytes: int,
        sandbox: bool | Iterable[str] = True,
        max_concurrent: int = 16,
        max_per_plugin: int = 4,
    ) -> None:
        self.environ = environ
        self.max_bytes = max_bytes
        self.max_per_plugin = max_per_plugin
        self._slots = trio.CapacityLimiter(max_concurrent)
        self._per_plugin: dict[str, trio.CapacityLimiter] = {}
        self._sandbox_option = check_layers(sandbox)
        self._policy: SandboxPolicy | None = None

    async def policy(self) -> SandboxPolicy:
        """The sandbox policy of commands (detected once, on first use)."""
        if self._policy is None:
            support = await trio.to_thread.run_sync(detect)  # the bwrap probe runs a child
            self._policy = SandboxPolicy(self._sandbox_option, support)
        return self._policy

    def _executable(self, session: PlatformSession, command: str) -> str:
        """The absolute, resolved path of the file ``command`` names, once it is granted:
        what was checked is what runs. A ``command`` with a ``/`` names a file relative to
        where the command runs (the workspace), never to the host's own cwd; a bare name
        is looked up on the host's ``PATH``."""
        environ = os.environ if self.environ is None else self.environ
        if "/" in command:
            workspace = session.workspace or "/nonexistent-workspace"
            found = shutil.which(os.path.join(workspace, command))
        else:
            found = shutil.which(command, path=environ.get("PATH", os.defpath))
        resolved = os.path.realpath(found) if found else None
        names = {command} if "/" not in command else set()
        if found and resolved:
            names |= {found, resolved, os.path.abspath(found)}
        if resolved is None or not session.grants.command(names):
            session.deny("shell.allow", command)
        return resolved

    def _environment(self, session: PlatformSession, home: str) -> dict[str, str]:
        environ = os.environ if self.environ is None else self.environ
        env = {name: environ[name] for name in _BASE_ENV if name in environ}
        for name, value in environ.items():
            if any(fnmatch.fnmatchcase(name, p) for p in session.permissions.env.read):
                env[name] = value
        env.update(_FIXED_ENV)
        env["HOME"] = env["TMPDIR"] = home
        return env

    async def run(
        self, session: PlatformSession, argv: Any, timeout: Any = None, input: Any = None
    ) -> dict[str, Any]:
        """Run ``argv`` for ``session``; a dict with ``returncode`` (``-N`` when killed by
        signal N), ``stdout``, ``stderr`` and ``truncated``. Raises
        :class:`PermissionDeniedError` (not granted), :class:`InvalidRequestError` (bad
        arguments) or :class:`ExecutionTimeoutError` (past ``timeout`` or the execution's
        deadline: the command was killed). On cancellation the command is killed and reaped
        before ``trio.Cancelled`` propagates."""
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
        policy = await self.policy()
        started = False
        with trio.move_on_after(seconds) as scope:
            async with self._slot(session.plugin_id):
                started = True
                return await self._run_in_sandbox(
                    policy, session, executable, list(argv), cwd, stdin
                )
        assert scope.cancelled_caught
        raise ExecutionTimeoutError(
            f"command {argv[0]!r} ran longer than {seconds:g} s and was killed"
            if started
            else f"command {argv[0]!r} waited {seconds:g} s for a free command slot; never run",
            details={"timeout_s": seconds},
        )

    @asynccontextmanager
    async def _slot(self, plugin_id: str) -> AsyncIterator[None]:
        """One of the plugin's command slots and one of the host's (output buffers are
        bounded per command: these bound them per plugin and in total)."""
        limiter = self._per_plugin.get(plugin_id)
        if limiter is None:
            limiter = self._per_plugin[plugin_id] = trio.CapacityLimiter(self.max_per_plugin)
        try:
            async with limiter, self._slots:
                yield
        finally:
            if limiter.borrowed_tokens == 0 and limiter.statistics().tasks_waiting == 0:
                self._per_plugin.pop(plugin_id, None)

    async def _run_in_sandbox(
        self,
        policy: SandboxPolicy,
        session: PlatformSession,
        executable: str,
        argv: list[str],
        cwd: str,
        stdin: bytes | None,
    ) -> dict[str, Any]:
        home = tempfile.mkdtemp(prefix="plugin-execution-home-")
        try:
            env = self._environment(session, home)
            sandbox = _command_sandbox(policy, session, cwd, home, env)
            spec = {
                "executable": executable,
                "env": env,
                "limits": _limits(session.permissions),
                "sandbox": sandbox.spec,
                "workspace": [cwd, *_workspace_identity(cwd)],
            }
            command = sandbox.command(launcher.argv(spec, argv))
            return await _run_capped(command, sandbox, cwd, env, stdin, self.max_bytes)
        finally:
            with trio.CancelScope(shield=True):  # fd-based: safe on a tree the command made
                await trio.to_thread.run_sync(shutil.rmtree, home, True)


def _workspace_identity(workspace: str) -> tuple[int, int]:
    """The device and inode of the workspace directory itself, opened from its parent
    without following it: the launcher checks that the command starts there (see
    ``launcher.launch``). A sandboxed pool worker may write its workspaces' parent (its own
    directory), so it may have put a symlink to somewhere else in its workspace's place;
    the command then never runs."""
    parent, name = os.path.split(resolve_parent(workspace))
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        parent_fd = os.open(parent, flags)
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
        try:
            status = os.fstat(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise PermissionDeniedError(
            f"the workspace is no longer the directory the host made ({exc.strerror}): "
            "no command runs there",
            details={"permission": "shell.allow"},
        ) from None
    return status.st_dev, status.st_ino


def _command_sandbox(
    policy: SandboxPolicy, session: PlatformSession, cwd: str, home: str, env: dict[str, str]
) -> ChildSandbox:
    """The plugin's own sandbox, with the command's fresh ``HOME`` writable too."""
    permissions = session.permissions
    fs = attrs.evolve(permissions.fs, write=(*permissions.fs.write, home))
    return policy.for_child(
        attrs.evolve(permissions, fs=fs),
        workspace=cwd,
        root=session.root,
        env=env,
        zygote=False,
    )


def _limits(permissions: Permissions) -> str:
    """The plugin's memory and CPU quotas, per process of the command; never a core file."""
    quotas = permissions.quotas
    return WorkerLimits(address_space_mb=quotas.memory_mb, cpu_s=quotas.cpu_s).to_arg()


class _Output:
    """stdout and stderr of one command, bounded together: past ``limit`` bytes, ``over``."""

    def __init__(self, limit: int) -> None:
        self.room = limit
        self.over = trio.Event()
        self.streams = {"stdout": bytearray(), "stderr": bytearray()}

    async def drain(self, name: str, stream: trio.abc.ReceiveStream) -> None:
        buffer = self.streams[name]
        while chunk := await stream.receive_some(_CHUNK):
            if len(chunk) > self.room:
                buffer += chunk[: self.room]
                self.room = 0
                self.over.set()
                return
            buffer += chunk
            self.room -= len(chunk)


async def _run_capped(
    command: list[str],
    sandbox: ChildSandbox,
    cwd: str,
    env: dict[str, str],
    stdin: bytes | None,
    limit: int,
) -> dict[str, Any]:
    """Run ``command`` in its own session; read its output as it comes, and kill its process
    group when the output passes ``limit`` bytes, when it exits (what it left running), or
    when this is cancelled. Always reaps it."""
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    child = sandbox.adopt(process)
    output = _Output(limit)
    assert process.stdout is not None and process.stderr is not None
    # Until the leader is reaped its pid, the group's id, is reserved: every kill of the group
    # below happens before the reaping, so it can never reach a process that reused the id.
    exited = os.pidfd_open(process.pid)
    try:
        async with trio.open_nursery() as nursery:

            async def stop_when_over() -> None:
                await output.over.wait()
                _kill_group(process.pid)

            nursery.start_soon(stop_when_over)
            if stdin is not None:
                assert process.stdin is not None
                nursery.start_soon(_feed, process.stdin, stdin)
            async with trio.open_nursery() as readers:
                readers.start_soon(output.drain, "stdout", process.stdout)
                readers.start_soon(output.drain, "stderr", process.stderr)
                await trio.lowlevel.wait_readable(exited)  # it exited; not reaped yet
                # what the command left running (and holding the pipes) ends with it
                _kill_group(process.pid)
            nursery.cancel_scope.cancel()
    finally:
        _kill_group(process.pid)
        trio.lowlevel.notify_closing(exited)
        os.close(exited)
        with trio.CancelScope(shield=True):
            await child.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    await stream.aclose()
    return {
        "returncode": child.returncode,
        "stdout": bytes(output.streams["stdout"]),
        "stderr": bytes(output.streams["stderr"]),
        "truncated": output.over.is_set(),
    }


async def _feed(stream: trio.abc.SendStream, data: bytes) -> None:
    """Write ``data`` to the command's stdin, then close it; a command that stops reading
    early is not an error."""
    try:
        async with stream:
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
