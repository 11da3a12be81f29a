"""Zygote: the host's handle on a warm helper that forks worker children on request.

``open_zygote()`` starts ``python -I -m plugin_execution.worker --zygote`` and yields a
:class:`Zygote` whose :meth:`Zygote.spawn` returns a :class:`ZygoteChild`: a fresh worker
process, forked from the warm zygote, that the zygote reaps and reports back. The wire format
of the control channel is documented in ``worker/zygote.py``.

A ``ZygoteChild`` looks like a ``trio.Process`` to the worker handle
(:class:`~plugin_execution.host.process.WorkerProcess`: ``pid``, ``returncode``, ``await
wait()``), so every start method shares one code path.
"""

from __future__ import annotations

import array
import itertools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager

import msgpack
import trio

from .._groups import unwrap_single
from ..errors import WorkerCrashedError

__all__ = ["BASE_ENV", "Zygote", "ZygoteChild", "ZygoteKeeper", "open_zygote", "setup_frame"]

_MAX_MESSAGE = 1 << 20
#: The host variables every worker child (and the zygote) gets: nothing else of the host's.
BASE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


class ZygoteChild:
    """A worker child forked by the zygote. Not our child: the zygote reaps it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        #: True when it was killed because its zygote died (not for anything it did).
        self.orphaned = False
        self._exited = trio.Event()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def _set_exited(self, status: int) -> None:
        if self.returncode is None:
            self.returncode = status
            self._exited.set()


def _setup(
    cwd: str | None,
    env: Mapping[str, str] | None,
    limits: str,
    sandbox: Mapping[str, object] | None,
) -> dict[str, object]:
    return {
        "cwd": cwd,
        "env": dict(env or os.environ),
        "limits": limits,
        "sandbox": dict(sandbox) if sandbox else None,
    }


def setup_frame(
    *,
    cwd: str | None,
    env: Mapping[str, str] | None,
    limits: str,
    sandbox: Mapping[str, object] | None = None,
) -> bytes:
    """What a child forked ahead (:meth:`Zygote.fork_ahead`) reads first on its protocol
    socket: the arguments of :meth:`Zygote.spawn`, length-prefixed."""
    body: bytes = msgpack.packb(_setup(cwd, env, limits, sandbox), use_bin_type=True)
    if len(body) > _MAX_MESSAGE:
        raise ValueError("a child's setup is too big")
    return len(body).to_bytes(4, "big") + body


class Zygote:
    """A live zygote. Create it with :func:`open_zygote`."""

    def __init__(self, process: trio.Process, ctl: trio.socket.SocketType) -> None:
        self.process = process
        self.pid = process.pid
        self._ctl = ctl
        self._ids = itertools.count()
        self._spawning: dict[int, trio.MemorySendChannel[int | str]] = {}
        self._children: dict[int, ZygoteChild] = {}
        self._early_exits: dict[int, int] = {}
        self._abandoned: set[int] = set()
        self.lost = trio.Event()

    @property
    def children(self) -> int:
        return len(self._children)

    def exited(self) -> bool:
        """Whether its process has exited, even if that is not seen yet (a zombie is not
        reaped by asking)."""
        if self.lost.is_set():
            return True
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # reaped already
            return True

    async def spawn(
        self,
        sock_fd: int,
        out_fd: int,
        *,
        cwd: str | None,
        env: Mapping[str, str] | None,
        limits: str,
        sandbox: Mapping[str, object] | None = None,
    ) -> ZygoteChild:
        """Fork a worker child that serves on ``sock_fd`` and writes output to ``out_fd``.

        ``sandbox``: the kernel layers the child applies to itself after the fork (plain
        data, see ``sandbox.policy.ChildSandbox.spec``). The fds are duplicated into the
        child; the caller still owns (and closes) its own. Raises ``WorkerCrashedError`` when
        the zygote is gone or the fork failed.
        """
        return await self._fork(_setup(cwd, env, limits, sandbox), sock_fd, out_fd)

    async def fork_ahead(
        self, sock_fd: int, out_fd: int, prepare: Mapping[str, object] | None = None
    ) -> ZygoteChild:
        """Fork a worker child ahead of the execution it will run: it does what every child
        does (``prepare``: see ``bootstrap.prepare``), then waits for its setup (cwd,
        environment, limits, sandbox: :func:`setup_frame`), the first bytes the host sends
        on ``sock_fd``'s other end; closing that end first ends it. Otherwise as
        :meth:`spawn`."""
        return await self._fork({"ahead": dict(prepare or {}) or True}, sock_fd, out_fd)

    async def _fork(self, fields: dict[str, object], sock_fd: int, out_fd: int) -> ZygoteChild:
        if self.lost.is_set():
            raise WorkerCrashedError(f"the zygote (pid {self.pid}) is gone")
        request_id = next(self._ids)
        send, receive = trio.open_memory_channel[int | str](1)
        self._spawning[request_id] = send
        message = msgpack.packb({"t": "spawn", "id": request_id, **fields}, use_bin_type=True)
        fds = array.array("i", [sock_fd, out_fd]).tobytes()
        try:
            await self._ctl.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            try:
                reply = await receive.receive()
            except trio.Cancelled:
                self._abandon(receive)
                raise
        except (OSError, trio.EndOfChannel):
            raise WorkerCrashedError(f"the zygote (pid {self.pid}) is gone") from None
        finally:
            self._spawning.pop(request_id, None)
        if isinstance(reply, str):
            raise WorkerCrashedError(f"the zygote could not fork a worker: {reply}")
        child = self._children[reply] = ZygoteChild(reply)
        if reply in self._early_exits:
            self._set_exited(reply, self._early_exits.pop(reply))
        return child

    def _abandon(self, receive: trio.MemoryReceiveChannel[int | str]) -> None:
        """The caller was cancelled after asking for a fork: kill the child if it came."""
        try:
            reply = receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return  # a later reply finds no waiter: _read_loop kills that child
        if isinstance(reply, int):
            self._kill_abandoned(reply)

    def _kill_abandoned(self, pid: int) -> None:
        self._abandoned.add(pid)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _set_exited(self, pid: int, status: int) -> None:
        if pid in self._abandoned:
            self._abandoned.discard(pid)
            return
        child = self._children.pop(pid, None)
        if child is None:
            self._early_exits[pid] = status  # reaped before "spawned" was read
        else:
            child._set_exited(status)

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._ctl.recv(_MAX_MESSAGE)
                if not data:
                    break
                message = msgpack.unpackb(data, raw=False)
                kind = message.get("t")
                if kind == "exited":
                    self._set_exited(message["pid"], message["status"])
                elif kind in ("spawned", "spawn_failed"):
                    waiter = self._spawning.get(message["id"])
                    if waiter is not None:
                        waiter.send_nowait(message.get("pid") or str(message.get("error")))
                    elif message.get("pid"):
                        self._kill_abandoned(message["pid"])
        except (OSError, ValueError, msgpack.ExtraData, msgpack.FormatError):
            pass
        self._lose()

    def _lose(self) -> None:
        """The zygote is gone: its children are orphans we can no longer reap; kill them."""
        self.lost.set()
        for waiter in self._spawning.values():
            waiter.close()
        for pid, child in list(self._children.items()):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            child.orphaned = True
            child._set_exited(-signal.SIGKILL)
        self._children.clear()


async def _end_with(process: trio.Process) -> None:
    """When the zygote's process exits, kill what is left of its process group.

    Under bubblewrap that process is bwrap, and the zygote its child (same group): killed
    alone, bwrap would leave the zygote serving with nobody to watch it. Its exit is seen
    through a pidfd, before it is reaped, so the group's id cannot have been reused.
    """
    pidfd = os.pidfd_open(process.pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@asynccontextmanager
async def open_zygote(
    *,
    start_timeout: float = 30.0,
    wrapper: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Zygote]:
    """Start a zygote and yield it once warm. On exit it is stopped and reaped.

    ``wrapper``: a command prefix the zygote runs under (bubblewrap, ending with ``--``);
    its children then share the zygote's namespaces. ``env``: the zygote's own environment
    (default: ``PATH`` and the locale variables of the host's, nothing else). Its children
    get theirs from each spawn request, but the kernel shows every one of them the
    zygote's as ``/proc/self/environ``, so it must never hold the host's secrets. Children
    still running when the block exits are killed. Raises ``WorkerCrashedError`` when the
    zygote fails to start.
    """
    if env is None:
        env = {name: os.environ[name] for name in BASE_ENV if name in os.environ}
    host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        process = await trio.lowlevel.open_process(
            [
                *wrapper,
                sys.executable,
                "-I",
                "-m",
                "plugin_execution.worker",
                "--zygote",
                "--fd",
                str(child.fileno()),
            ],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    except BaseException:
        host.close()
        raise
    finally:
        child.close()
    ctl = trio.socket.from_stdlib_socket(host)
    zygote = Zygote(process, ctl)
    try:
        data = b""
        with trio.move_on_after(start_timeout):
            data = await ctl.recv(_MAX_MESSAGE)
        if not data or msgpack.unpackb(data, raw=False).get("t") != "ready":
            raise WorkerCrashedError("the zygote failed to start", details={"pid": process.pid})
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(zygote._read_loop)
                nursery.start_soon(_end_with, process)
                try:
                    yield zygote
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            ctl.close()
            zygote._lose()
            with trio.move_on_after(2):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


class ZygoteKeeper:
    """Keeps one zygote up for a backend: starts it, and replaces it (with backoff) whenever
    it dies. ``current`` is the live zygote, or None while there is none; ``ready`` is set
    while there is one.

    ``wrapper`` (run in a thread before each start: it may glob and stat) gives the command
    prefix the zygote runs under (see :func:`open_zygote`). ``on_error``: called with the
    error when a zygote fails to start, which is then retried; None: the error propagates.
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        wrapper: Callable[[], Sequence[str]] | None = None,
        start_timeout: float = 30.0,
        first_delay: float = 0.1,
        max_delay: float = 30.0,
        on_error: Callable[[WorkerCrashedError], None] | None = None,
    ) -> None:
        self.current: Zygote | None = None
        self.ready = trio.Event()
        #: Zygotes started after the first one.
        self.restarts = 0
        self._env = env
        self._wrapper = wrapper
        self._start_timeout = start_timeout
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._on_error = on_error

    def live(self) -> Zygote | None:
        """The zygote to fork from now: None while it is down (start workers another way)."""
        zygote = self.current
        return None if zygote is None or zygote.lost.is_set() else zygote

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a zygote until cancelled; ``task_status.started()`` once the first is up (or
        failed, with ``on_error``). Its children still running when this ends are killed."""
        delay = self._first_delay
        started = False
        while True:
            wrapper: Sequence[str] = ()
            if self._wrapper is not None:
                wrapper = await trio.to_thread.run_sync(self._wrapper)
            try:
                async with open_zygote(
                    start_timeout=self._start_timeout, wrapper=wrapper, env=self._env
                ) as zygote:
                    self.current = zygote
                    self.ready.set()
                    if not started:
                        started = True
                        task_status.started()
                    await zygote.lost.wait()
            except WorkerCrashedError as exc:
                if self._on_error is None:
                    raise
                self._on_error(exc)
            finally:
                self.current = None
                if self.ready.is_set():
                    self.ready = trio.Event()
            if not started:
                started = True
                task_status.started()
            self.restarts += 1
            await trio.sleep(delay)
            delay = min(delay * 2, self._max_delay)
