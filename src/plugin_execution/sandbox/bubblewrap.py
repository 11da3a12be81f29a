"""bubblewrap (``bwrap``): run a worker child in namespaces of its own.

The host wraps the child's command line in ``bwrap``, which sets up, before Python starts:

- a mount namespace: the whole file system read-only (``--ro-bind / /``), a private empty
  ``/tmp``, ``/var/tmp`` and ``/dev/shm``, a minimal ``/dev``; the workspace (and ``fs.write``)
  bound read-write; what the child must read under a hidden directory (a virtualenv in
  ``/tmp``, say) bound back read-only;
- with ``pid_namespace``: a pid namespace and its own ``/proc`` (the host's processes are
  invisible; killing bwrap's pid 1 kills everything the child started, even what left its
  process group);
- without ``network``: a network namespace with only a loopback that is down, and ``/run``
  hidden (where the host's UNIX sockets live);
- IPC, UTS and (when possible) cgroup namespaces; no capabilities (``--cap-drop ALL``: bwrap
  started by root keeps them otherwise).

Not ``--die-with-parent``: it kills the sandbox when the *thread* that started bwrap exits
(``PR_SET_PDEATHSIG`` follows threads), and trio starts processes from its worker threads,
which exit after 10 idle seconds: every sandbox would die 10 s after it started. A worker child
and the zygote exit by themselves when the host goes away (EOF on their socket); the host kills
bwrap's process group whenever it ends a child.

bwrap exits with its command's status, or 128 + N when the command was killed by signal N:
:class:`WrappedProcess` turns the latter back into ``-N``, as ``subprocess`` reports it (a
child that calls ``exit(128 + N)`` itself reads the same; bwrap gives no way to tell them apart).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence

import trio

__all__ = ["HIDDEN", "WrappedProcess", "command", "find", "probe", "version", "visible"]

#: Directories replaced by empty ones in the sandbox (``/run`` only without network).
HIDDEN = ("/tmp", "/var/tmp", "/dev/shm")
_HIDDEN_WITHOUT_NETWORK = ("/run",)


def find() -> str | None:
    """The ``bwrap`` executable on ``PATH``, or None."""
    return shutil.which("bwrap")


def command(
    argv: Sequence[str],
    *,
    bwrap: str,
    workspace: str,
    read: Iterable[str] = (),
    write: Iterable[str] = (),
    network: bool = False,
    pid_namespace: bool = True,
    chdir: str | None = None,
) -> list[str]:
    """``argv`` wrapped in ``bwrap``: see the module docstring for what it sets up.

    ``read``: paths the child must read (bound back read-only when a hidden directory would
    hide them); ``write``: paths it may write besides ``workspace`` (bound read-write);
    ``chdir``: where it starts (default: ``workspace``).
    """
    args = [bwrap, "--cap-drop", "ALL"]
    args += ["--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if pid_namespace:
        args.append("--unshare-pid")
    if not network:
        args.append("--unshare-net")
    args += ["--ro-bind", "/", "/", "--dev", "/dev"]
    if pid_namespace:
        args += ["--proc", "/proc"]
    hidden = HIDDEN if network else HIDDEN + _HIDDEN_WITHOUT_NETWORK
    for directory in hidden:
        if os.path.isdir(directory):
            args += ["--tmpfs", directory]
    binds: dict[str, str] = {}
    for path in read:
        path = os.path.abspath(path)
        if any(_under(path, directory) for directory in hidden):
            binds.setdefault(path, "--ro-bind-try")
    for path in (workspace, *write):
        binds[os.path.abspath(path)] = "--bind-try"
    for path in sorted(binds, key=lambda p: p.count("/")):  # parents before what is inside
        args += [binds[path], path, path]
    args += ["--chdir", chdir or workspace, "--", *argv]
    return args


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def visible(path: str, *, read: Iterable[str], write: Iterable[str], network: bool) -> bool:
    """Whether ``path`` can be read in a sandbox that :func:`command` built with these
    ``read`` / ``write`` paths: outside the hidden directories, or bound back in."""
    hidden = HIDDEN if network else HIDDEN + _HIDDEN_WITHOUT_NETWORK
    path = os.path.abspath(path)
    if not any(_under(path, directory) for directory in hidden):
        return True
    return any(_under(path, os.path.abspath(bound)) for bound in (*read, *write))


def probe(bwrap: str) -> str | None:
    """Run a trivial command the way a child is run; None if it works, else why not.

    Catches what ``which`` cannot: a bwrap that may not create namespaces here (inside an
    unprivileged container, or with user namespaces disabled), or one that is not executable.
    """
    with tempfile.TemporaryDirectory(prefix="plugin-execution-probe-") as workspace:
        argv = command(
            [sys.executable, "-I", "-S", "-c", "pass"],
            bwrap=bwrap,
            workspace=workspace,
            read=[sys.prefix, sys.base_prefix, os.path.dirname(sys.executable)],
        )
        try:
            done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{bwrap} could not run: {exc}"
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        return f"{bwrap} failed (status {done.returncode}): {said[-1] if said else 'no output'}"
    return None


def version(bwrap: str) -> str:
    """``bwrap --version``, e.g. ``"bubblewrap 0.8.0"``; empty when it cannot say."""
    try:
        done = subprocess.run([bwrap, "--version"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.decode("utf-8", "replace").strip()


class WrappedProcess:
    """A ``trio.Process`` running bwrap, seen as the child it runs.

    ``pid`` is bwrap's (the process group leader: killing its group kills the child);
    ``returncode`` is the child's, with bwrap's ``128 + N`` for "killed by signal N" turned
    back into ``-N``.

    When bwrap exits, whatever is left of its process group is killed before bwrap is reaped:
    bwrap's pid 1 outlives it while processes the child started are still running (even ones
    that left the group with ``setsid``), and killing that pid 1 ends the whole pid namespace.
    Until bwrap is reaped its pid, the group's id, cannot be reused, so the kill cannot reach
    anyone else: the exit is watched through a pidfd, which does not reap.
    """

    def __init__(self, process: trio.Process) -> None:
        self._process = process
        self.pid = process.pid
        self._pidfd = os.pidfd_open(process.pid)
        self._watching = trio.Lock()  # one task at a time waits on the pidfd, and sweeps

    @property
    def returncode(self) -> int | None:
        if self._pidfd >= 0:
            return None  # not reaped yet: wait() does that, after the sweep
        code = self._process.returncode
        if code is not None and 128 < code < 128 + 65:
            return -(code - 128)
        return code

    async def wait(self) -> int:
        async with self._watching:
            if self._pidfd >= 0:
                await trio.lowlevel.wait_readable(self._pidfd)
                self._sweep()
        await self._process.wait()
        code = self.returncode
        assert code is not None
        return code

    def _sweep(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        trio.lowlevel.notify_closing(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
