"""WorkerProcess: the host's handle on one worker, and the ways to start one.

A :class:`WorkerProcess` is a started worker (a child process, or anything that looks like
one: see :class:`~plugin_execution.host.child.ChildProcess`) plus the host's end of its
socket plus a way to kill it. It composes the two halves of talking to it, the socket
(:class:`~plugin_execution.host.connection.WorkerConnection`) and the requests in flight
(:class:`~plugin_execution.host.calls.Calls`), and owns its lifecycle: kill, reap, stderr
capture, and why it died (:attr:`WorkerProcess.exit_cause`, :meth:`WorkerProcess.crash_error`).

:func:`serve_worker` turns "a started child + a connected socket + a kill function" into a
served handle: the handshake, the background tasks (exit watch, deadlines, stderr), and an
exit that always stops and reaps the worker. Every kind of worker goes through it: process
children (:func:`open_worker_process`: ``python -I`` on an inherited socketpair, in a
session and process group of its own, spawned or forked by a zygote), thread workers
(:mod:`~plugin_execution.host.thread`), and any other worker that speaks the protocol.
"""

from __future__ import annotations

import itertools
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from .._groups import unwrap_single
from ..errors import ExecutionError, WorkerCrashedError
from ..protocol import Pong, Shutdown
from ..worker._leftovers import ended, kill_tree
from .batch import Outcome, SubmittedBatch, collect_batch, submit_batch
from .calls import Calls, Pending
from .connection import WorkerConnection
from .zygote import setup_frame

if TYPE_CHECKING:
    from ..backends.job import Job
    from ..sandbox.policy import ChildSandbox
    from ..types import ExecutionResult
    from .child import ChildProcess
    from .handle import ChannelEndpoint, ExitCause
    from .limits import WorkerLimits
    from .spare import ForkedAhead
    from .zygote import Zygote

__all__ = ["WorkerProcess", "open_worker_process", "serve_worker"]

_ids = itertools.count(1)
_STDERR_TAIL_BYTES = 8192
_EXIT_GRACE_S = 0.25  # how long a worker that closed its connection has to exit by itself
_KILLED_END_S = 1.0  # how long closing a worker waits for the descendants it killed to die
# Send buffer of each end of a worker's socket: a 1 MB frame then goes in one or two writes
# instead of five (the default is ~208 KiB), each a wake-up of the reader. A limit, not an
# allocation; the kernel caps it at net.core.wmem_max.
_SEND_BUFFER = 4 << 20


class _StderrTail:
    """The last few KiB a worker wrote to its stderr, for crash reports."""

    def __init__(self, stream: trio.lowlevel.FdStream | None) -> None:
        self.stream = stream
        self.eof = trio.Event()
        self._chunks: deque[bytes] = deque()
        self._bytes = 0

    async def drain(self) -> None:
        if self.stream is None:
            self.eof.set()
            return
        try:
            while chunk := await self.stream.receive_some(65536):
                self._chunks.append(chunk)
                self._bytes += len(chunk)
                while self._bytes > _STDERR_TAIL_BYTES and len(self._chunks) > 1:
                    self._bytes -= len(self._chunks.popleft())
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            pass
        finally:
            self.eof.set()

    def text(self, lines: int) -> str:
        text = b"".join(self._chunks).decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])


class WorkerProcess:
    """One live worker (implements :class:`~plugin_execution.host.handle.WorkerHandle`).
    Start one with :func:`open_worker_process` or :func:`serve_worker`.

    ``kill`` stops the worker by force; None: it is a process group leader (a child started
    in a session of its own), killed with its whole tree, and what its group left behind
    after it died on its own is killed too. ``pid`` None: no process the host can see.
    """

    def __init__(
        self,
        process: ChildProcess,
        stream: trio.SocketStream,
        stderr: trio.lowlevel.FdStream | None,
        kill: Callable[[], None] | None = None,
        *,
        spin_ok: bool = True,
    ) -> None:
        self.process = process
        self.pid = process.pid
        self.worker_id = f"w{next(_ids)}-{process.pid if process.pid is not None else 'thread'}"
        self.started_at = time.monotonic()
        self._group = kill is None and process.pid is not None
        self._force_kill = kill or self._kill_group
        self._stderr = _StderrTail(stderr)
        self.lost = trio.Event()
        #: Channel sessions bridged to this worker, by channel id (see channels/bridge.py).
        self.channels: dict[str, ChannelEndpoint] = {}
        self.connection = WorkerConnection(
            stream,
            lost=self.lost,
            crash_error=self.crash_error,
            lose=self._lose,
            channels=self.channels,
            spin_ok=spin_ok,
        )
        self.calls = Calls(
            self.connection,
            worker_id=self.worker_id,
            kill=self.kill,
            crash_error=self.crash_error,
            channels=self.channels,
        )
        self.connection.dispatch = self.calls.dispatch
        self.crash: ExecutionError | None = None
        self._kill_error: ExecutionError | None = None
        self._closing = False
        self._killed = False
        self._losing = False
        #: Descendants SIGKILLed with it, not known to have died yet (see _killed_ended).
        self._dying: set[int] = set()
        #: The plugin ids of the executions it was running when it was lost: non-empty when
        #: the work, not the worker, is the likely cause (see the pool's worker actors).
        self.lost_running: tuple[str, ...] = ()

    # -- state ----------------------------------------------------------------------------

    @property
    def executions(self) -> int:
        return self.calls.executions

    @property
    def in_flight(self) -> int:
        return self.calls.in_flight

    @property
    def spin_ok(self) -> bool:
        return self.connection.spin_ok

    @property
    def greeted(self) -> bool:
        """True once the worker said ``Hello``: it started."""
        hello = self.calls.hello
        return hello.done and hello.error is None

    @property
    def killed(self) -> bool:
        """True once the host killed the worker (a timeout, a failed health check)."""
        return self._killed

    @property
    def exiting(self) -> bool:
        """True once the worker reported an execution failed with ``WORKER_CRASHED`` (it
        ran out of memory and exits): it takes no more work and should be replaced."""
        return self.calls.exiting

    @property
    def alive(self) -> bool:
        """False once the worker is lost or being declared lost, killed and not yet reaped,
        or said it is exiting (an execution failed with ``WORKER_CRASHED``, e.g. out of
        memory): give it no work."""
        return not (self._killed or self.calls.exiting or self._losing or self.lost.is_set())

    @property
    def exit_cause(self) -> ExitCause | None:
        """Why the worker ended (see :data:`~plugin_execution.host.handle.ExitCause`); None
        while its process runs. A zygote's child killed because its zygote died is
        ``"orphaned"`` (see ``ZygoteChild.orphaned``)."""
        code = self.process.returncode
        if getattr(self.process, "orphaned", False):
            return "orphaned"
        if self._killed:
            return "killed"
        if code is None:
            return None
        if not self.calls.exiting and code == -signal.SIGKILL:
            return "outside"
        return "closed" if self._closing else "exited"

    def crash_error(self) -> ExecutionError:
        """A fresh copy of why the worker was lost (one exception object per raise)."""
        if self.crash is None:
            return WorkerCrashedError(f"worker {self.worker_id} is not available")
        return ExecutionError.from_dict(self.crash.to_dict())

    def stderr_tail(self, lines: int = 20) -> str:
        return self._stderr.text(lines)

    # -- requests (see host/calls.py) -----------------------------------------------------

    def submit(
        self,
        job: Job,
        *,
        workspace: str | None = None,
        cancel_grace: float = 1.0,
        linger: float = 0.0,
    ) -> Pending:
        """Start ``job`` without waiting: see :meth:`Calls.submit`."""
        return self.calls.submit(job, workspace=workspace, cancel_grace=cancel_grace, linger=linger)

    def collect(
        self, pending: Pending, *, backend: str, sent_now: bool = True
    ) -> Awaitable[ExecutionResult]:
        """Wait for a :meth:`submit`'s result: see :meth:`Calls.collect`."""
        return self.calls.collect(pending, backend=backend, sent_now=sent_now)

    def submit_batch(
        self, jobs: list[tuple[Job, str | None]], *, cancel_grace: float = 1.0, linger: float = 0.0
    ) -> SubmittedBatch:
        """Start ``jobs`` in one frame without waiting: see :func:`.batch.submit_batch`."""
        return submit_batch(self.calls, jobs, cancel_grace=cancel_grace, linger=linger)

    def collect_batch(self, batch: SubmittedBatch, *, backend: str) -> Awaitable[list[Outcome]]:
        """Wait for a :meth:`submit_batch`'s outcomes: see :func:`.batch.collect_batch`."""
        return collect_batch(self.calls, batch, backend=backend)

    def execute(
        self,
        job: Job,
        *,
        backend: str,
        workspace: str | None = None,
        cancel_grace: float = 1.0,
        spin: float = 0.0,
    ) -> Awaitable[ExecutionResult]:
        """Run ``job`` and return its result: see :meth:`Calls.execute`."""
        return self.calls.execute(
            job, backend=backend, workspace=workspace, cancel_grace=cancel_grace, spin=spin
        )

    async def ping(self) -> Pong:
        """Ask the worker for a ``Pong``: see :meth:`Calls.ping`."""
        return await self.calls.ping()

    async def warmup(self, plugin_id: str, handler_id: str, entry: str, root: str | None) -> None:
        """Import a handler and run its ``warmup()`` hook in the worker; raise on failure."""
        await self.calls.warmup(plugin_id, handler_id, entry, root)

    # -- the socket (see host/connection.py), for channel bridges and the pool ------------

    async def send(self, msg: Any) -> None:
        """Send one message (whole frames only; see ``WorkerConnection.send``)."""
        await self.connection.send(msg)

    def send_channel_data(self, channel_id: str, data: str | bytes) -> Awaitable[None]:
        """Send one ``ChannelData`` frame (a bridge's pump)."""
        connection = self.connection
        return connection.send_frame(connection.protocol.send_channel_data(channel_id, data))

    def channel_sent(self, bridge: ChannelEndpoint, now: float, window: float) -> bool:
        return self.connection.channel_sent(bridge, now, window)

    def read_for_reader(self, seconds: float) -> None:
        self.connection.read_for_reader(seconds)

    def spin_with(self, peers: select.poll) -> None:
        self.connection.spin_with(peers)

    def spin_alone(self) -> None:
        self.connection.spin_alone()

    # -- lifecycle ------------------------------------------------------------------------

    def kill(self, error: ExecutionError | None = None) -> None:
        """SIGKILL the worker, its whole process group (it runs in a session of its own)
        and every process below it, even one that left the group (see ``_leftovers``).

        ``error``, when given, is what its in-flight executions fail with (default:
        ``WorkerCrashedError``); e.g. ``WorkerUnhealthyError`` after a failed health check.
        """
        if error is not None and self._kill_error is None and not self.lost.is_set():
            self._kill_error = error
        self._killed = True
        if self.process.returncode is None:
            self._force_kill()

    def _kill_group(self) -> None:
        # The group, and what left it: a handler's setsid double fork stays the worker's
        # descendant (it is a subreaper), and is killed with it.
        assert self.pid is not None
        self._dying |= kill_tree(self.pid)

    async def _killed_ended(self) -> None:
        """Wait, at most ``_KILLED_END_S``, until the descendants :meth:`kill` SIGKILLed
        have died. The worker, the host's child, is waited for by reaping it; they are not
        the host's children, and the kernel tears a killed process down only when it next
        runs (milliseconds later under load, or for one holding much memory). Without this
        wait they could still run an instant after the worker's block ended."""
        delay = 0.001
        with trio.move_on_after(_KILLED_END_S):
            while self._dying:
                self._dying = {pid for pid in self._dying if not ended(pid)}
                if self._dying:
                    await trio.sleep(delay)
                    delay = min(2 * delay, 0.02)

    async def aclose(self, grace: float = 2.0) -> None:
        """Ask the worker to exit; kill it after ``grace`` seconds; reap it, and wait for
        what a kill of its tree killed to die (see :meth:`_killed_ended`). Idempotent.

        Shielded from cancellation, and independent of whoever reads the socket: it waits on
        the process itself.
        """
        self._closing = True
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                with trio.move_on_after(grace):
                    if not self.lost.is_set():
                        try:
                            await self.connection.send(Shutdown())
                        except ExecutionError:
                            pass
                    await self.process.wait()
            if self.process.returncode is None:
                self.kill()
                await self.process.wait()
            await self._killed_ended()

    async def wait(self) -> None:
        """Wait until the worker is lost: exited, killed, or its connection broke."""
        await self.lost.wait()

    async def _watch_exit(self) -> None:
        """Notice the worker's end even when no caller is reading: read what it said last
        (a result written just before it exited), then declare it lost."""
        try:
            await self.process.wait()
            with trio.move_on_after(1):
                if self.connection.reading:
                    await self.lost.wait()
                else:
                    await self.connection.read_until(None)
        finally:
            # Even when cancelled: whoever waits on this worker must hear that it is gone.
            await self._lose("the worker exited")

    async def _lose(self, reason: str) -> None:
        """The worker is gone (or unusable): reap it and fail what it was running. Once."""
        if self._losing:
            with trio.CancelScope(shield=True):
                await self.lost.wait()
            return
        self._losing = True
        with trio.CancelScope(shield=True):
            if not self._closing and self.process.returncode is None:
                # The connection broke. A worker that closed it is usually exiting: let it
                # report its own status (under bubblewrap that takes a hop or two), then make
                # sure the process is gone.
                with trio.move_on_after(_EXIT_GRACE_S):
                    await self.process.wait()
                if self.process.returncode is None:
                    self._force_kill()
            await self.process.wait()
            if self._group and not self._killed and not self._closing:
                assert self.pid is not None
                _end_group(self.pid)  # it died on its own (a crash): it could not clean up
            with trio.move_on_after(1):  # let the stderr pipe drain to EOF
                await self._stderr.eof.wait()
        self.crash = self._lost_error(reason)
        self.lost_running = self.calls.running_plugins()
        self.lost.set()
        self.connection.wake_reader()
        self.calls.fail_all()

    def _lost_error(self, reason: str) -> ExecutionError:
        """Why the worker was lost: the error it was killed with, or a crash report."""
        code = self.process.returncode
        details: dict[str, Any] = {"stderr_tail": self.stderr_tail(), "pid": self.pid}
        if code is not None and code < 0:
            details["signal"] = -code
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            details["exit_code"] = code
            how = f"exited with status {code}"
        describe = getattr(self.process, "describe_exit", None)
        if describe is not None:  # a worker that is no child of ours says how it ended
            how, more = describe()
            details.update(more)
        if self._kill_error is not None:
            self._kill_error.details.update(details)
            return self._kill_error
        return WorkerCrashedError(f"worker {self.worker_id} {how} ({reason})", details=details)


def _silent(worker: WorkerProcess, start_timeout: float) -> WorkerCrashedError:
    return WorkerCrashedError(
        f"worker {worker.worker_id} did not start within {start_timeout:g} s",
        details={"stderr_tail": worker.stderr_tail()},
    )


async def _watch_start(worker: WorkerProcess, start_timeout: float) -> None:
    """Kill a worker served without waiting for its ``Hello`` that stays silent too long."""
    hello = worker.calls.hello
    with trio.move_on_after(start_timeout):
        await hello.parked().wait()
    if not hello.done and not worker.lost.is_set():
        worker.kill(_silent(worker, start_timeout))


def _end_group(leader: int) -> None:
    """Kill what is left of the process group of a worker that ended: processes its
    handlers started and left running (the sandbox's seccomp filter keeps them from leaving
    the group). The leader is reaped by now; its id stays reserved as a group id while the
    group has members, so with none left this finds nobody (a fresh process could only get
    that id as its group id after the kernel's pid counter wrapped around)."""
    try:
        os.killpg(leader, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def worker_socketpair() -> tuple[socket.socket, socket.socket]:
    """The host's end and the worker's end of a new worker connection (see _SEND_BUFFER)."""
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in pair:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
    return pair


def worker_argv(
    limits: WorkerLimits | None, fd: int, sandbox: Mapping[str, Any] | None = None
) -> list[str]:
    """``python -I -c ...`` rather than ``-m plugin_execution.worker``: runpy costs ~3 ms.

    ``sandbox`` (plain data) is written into the code as a literal: no parser to import.
    """
    spec = limits.to_arg() if limits is not None else ""
    args = f"{fd}, {spec!r}" + (f", {dict(sandbox)!r}" if sandbox else "")
    code = f"from plugin_execution.worker.bootstrap import serve; serve({args})"
    return [sys.executable, "-I", "-c", code]


@asynccontextmanager
async def open_worker_process(
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    limits: WorkerLimits | None = None,
    zygote: Zygote | None = None,
    start_timeout: float = 30.0,
    close_grace: float = 2.0,
    sandbox: ChildSandbox | None = None,
    sweep_group: bool = False,
    handshake: bool = True,
    ahead: ForkedAhead | None = None,
) -> AsyncIterator[WorkerProcess]:
    """Start a worker child and yield it once it said ``Hello`` (``handshake`` False: at
    once, see :func:`serve_worker`).

    The child is a fresh ``python -I`` by default, or forked by ``zygote``. ``sandbox``: the
    kernel layers it applies to itself, and the command (bubblewrap) a spawned child is
    started under. Raises ``WorkerCrashedError`` if it dies or stays silent for
    ``start_timeout`` seconds before the handshake. On exit it is shut down (killed after
    ``close_grace``) and reaped; ``sweep_group``: then what is left of its process group
    (processes its handlers started and left running) is killed too. ``ahead``: a child
    the zygote forked ahead, to be used (given its setup) instead of starting one.
    """
    process: ChildProcess
    if ahead is not None:  # forked already: only its setup is left to send
        process, host_sock, err_read = ahead.use(
            setup_frame(
                cwd=cwd,
                env=env,
                limits=limits.to_arg() if limits is not None else "",
                sandbox=sandbox.spec if sandbox is not None else None,
            )
        )
    else:
        process, host_sock, err_read = await _start_child(
            cwd=cwd,
            env=env,
            limits=limits,
            zygote=zygote,
            start_timeout=start_timeout,
            sandbox=sandbox,
        )
    try:
        async with serve_worker(
            process,
            host_sock,
            trio.lowlevel.FdStream(err_read),
            start_timeout=start_timeout,
            close_grace=close_grace,
            handshake=handshake,
        ) as worker:
            yield worker
    finally:
        if sweep_group and process.pid is not None:
            _end_group(process.pid)


async def _start_child(
    *,
    cwd: str | None,
    env: Mapping[str, str] | None,
    limits: WorkerLimits | None,
    zygote: Zygote | None,
    start_timeout: float,
    sandbox: ChildSandbox | None,
) -> tuple[ChildProcess, socket.socket, int]:
    """Fork (by ``zygote``) or spawn a worker child; it, the host's end of its socket and
    the read end of its output pipe."""
    host_sock, child_sock = worker_socketpair()
    err_read, err_write = os.pipe()
    process: ChildProcess | None = None
    try:
        if zygote is not None:
            with trio.move_on_after(start_timeout):
                process = await zygote.spawn(
                    child_sock.fileno(),
                    err_write,
                    cwd=cwd,
                    env=env,
                    limits=limits.to_arg() if limits is not None else "",
                    sandbox=sandbox.spec if sandbox is not None else None,
                )
            if process is None:
                raise WorkerCrashedError(
                    f"the zygote (pid {zygote.pid}) did not fork a worker within "
                    f"{start_timeout:g} s"
                )
        else:
            spec = sandbox.spec if sandbox is not None else None
            argv = worker_argv(limits, child_sock.fileno(), spec)
            process = await trio.lowlevel.open_process(
                sandbox.command(argv) if sandbox is not None else argv,
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=err_write,
                stderr=err_write,
                start_new_session=True,
                cwd=cwd,
                env=env,
            )
            if sandbox is not None:
                process = sandbox.adopt(process)
    except BaseException:
        host_sock.close()
        os.close(err_read)
        raise
    finally:
        child_sock.close()
        os.close(err_write)
    return process, host_sock, err_read


@asynccontextmanager
async def serve_worker(
    process: ChildProcess,
    host_sock: socket.socket,
    stderr: trio.lowlevel.FdStream | None,
    *,
    kill: Callable[[], None] | None = None,
    spin_ok: bool = True,
    start_timeout: float = 30.0,
    close_grace: float = 2.0,
    handshake: bool = True,
) -> AsyncIterator[WorkerProcess]:
    """Drive a started worker: handshake, serve, and always shut it down and reap it.

    The entry point for any kind of worker that speaks the protocol: ``process`` is
    anything with a ``pid`` (None: no OS process), a ``returncode`` and ``await wait()``;
    ``host_sock`` is the host's end of a connected stream socket; ``kill`` stops the worker
    by force (default: SIGKILL its process group, see :class:`WorkerProcess`). ``spin_ok``
    False: never poll for its answers (a worker sharing the host's GIL). Takes ownership of
    ``host_sock`` and ``stderr``. Raises ``WorkerCrashedError`` when the worker dies or
    stays silent for ``start_timeout`` seconds before its ``Hello``.

    ``handshake`` False: yield the worker at once, without waiting for its ``Hello``, so a
    first request overlaps its start (the worker reads it once it is up); the ``Hello``
    is then read with the first answer. A worker that dies first fails what was sent to
    it with ``WorkerCrashedError``, and one still silent after ``start_timeout`` seconds
    is killed, failing it the same way.
    """
    worker = WorkerProcess(
        process,
        trio.SocketStream(trio.socket.from_stdlib_socket(host_sock)),
        stderr,
        kill,
        spin_ok=spin_ok,
    )
    connection, calls = worker.connection, worker.calls
    try:
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                calls.start(nursery)
                nursery.start_soon(worker._watch_exit)
                nursery.start_soon(calls.deadlines.run)
                nursery.start_soon(worker._stderr.drain)
                try:
                    if handshake:
                        with trio.move_on_after(start_timeout):
                            await connection.wait_for(calls.hello)
                        if worker.lost.is_set():
                            raise worker.crash_error()
                        if not calls.hello.done:
                            raise _silent(worker, start_timeout)
                    else:
                        nursery.start_soon(_watch_start, worker, start_timeout)
                    yield worker
                finally:
                    await worker.aclose(close_grace)
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            connection.spin_alone()
            connection.fd_closed = True  # raw reads and writes of the fd stop here
            await connection.stream.aclose()
            if stderr is not None:
                await stderr.aclose()
            if process.returncode is None:
                worker.kill()
                await process.wait()
            await worker._killed_ended()
