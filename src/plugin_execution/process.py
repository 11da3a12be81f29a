"""WorkerProcess: the host's handle on one worker child.

It starts the child (``python -I -m plugin_execution.worker`` on an inherited socketpair, in a
session and process group of its own), completes the handshake, multiplexes executions over
the protocol, and reaps the child. Every process backend is built on it: the subprocess
backend opens one per execution, the pool keeps several alive.

``open_worker_process()`` is an async context manager: when its block exits the child has been
asked to stop, killed if it did not, and reaped; its fds are closed.
"""

from __future__ import annotations

import itertools
import math
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ._deadlines import Deadlines
from ._groups import unwrap_single
from .errors import AbortedError, ExecutionError, InvalidRequestError, WorkerCrashedError
from .protocol import (
    Cancel,
    ChannelClose,
    ChannelCredit,
    ChannelData,
    Connection,
    Error,
    Event,
    Execute,
    Hello,
    Ping,
    PlatformCall,
    PlatformReply,
    Pong,
    ProtocolError,
    Result,
    Shutdown,
    Warmed,
    Warmup,
)
from .types import ExecutionEvent, ExecutionResult, check_serializable
from .worker._leftovers import kill_tree
from .worker._wire import unsent

if TYPE_CHECKING:
    from .backends.job import Job
    from .channels.bridge import ChannelBridge
    from .sandbox.policy import ChildSandbox
    from .zygote import Zygote


class ChildProcess(Protocol):
    """What a worker needs of its process: a ``trio.Process`` or a zygote's child."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


__all__ = ["WorkerLimits", "WorkerProcess", "open_worker_process"]

_ids = itertools.count(1)
_STDERR_TAIL_BYTES = 8192
_MAX_CALLS_IN_FLIGHT = 64  # platform calls of one execution at once
# Bytes of the frames of one execution's platform calls in flight: what the host holds for
# its calls waiting (an invoke's input, a request body...) is bounded, not 64 x 64 MiB.
_MAX_CALL_BYTES_IN_FLIGHT = 64 * 1024 * 1024
_EXIT_GRACE_S = 0.25  # how long a worker that closed its connection has to exit by itself
# Bytes per os.read: 64 KiB stays under glibc's mmap threshold (128 KiB); a bigger buffer is
# mmap'ed and unmapped on every call, ~9 us each, more than the rest of a small read. A frame
# bigger than this is read straight into a buffer of its own (see Connection.big_view).
_READ_SIZE = 65536
_SPIN_BACKOFF = 16
_YIELD_EVERY = 0.001  # s: at least this often, an answer got by polling yields to the run
# Send buffer of each end of a worker's socket: a 1 MB frame then goes in one or two writes
# instead of five (the default is ~208 KiB), each a wake-up of the reader. A limit, not an
# allocation; the kernel caps it at net.core.wmem_max.
_SEND_BUFFER = 4 << 20


class WorkerLimits:
    """Resource limits applied by the child to itself before it imports plugin code."""

    __slots__ = ("address_space_mb", "cpu_s", "file_size_mb", "open_files", "processes")

    def __init__(
        self,
        *,
        address_space_mb: int | None = None,
        cpu_s: float | None = None,
        open_files: int | None = None,
        file_size_mb: int | None = None,
        processes: int | None = None,
    ) -> None:
        self.address_space_mb = address_space_mb
        self.cpu_s = cpu_s
        self.open_files = open_files
        self.file_size_mb = file_size_mb
        self.processes = processes

    def to_arg(self) -> str:
        parts = []
        if self.address_space_mb:
            parts.append(f"as={self.address_space_mb * 1024 * 1024}")
        if self.cpu_s:
            parts.append(f"cpu={max(1, int(self.cpu_s + 0.999))}")
        if self.open_files:
            parts.append(f"nofile={self.open_files}")
        if self.file_size_mb:
            parts.append(f"fsize={self.file_size_mb * 1024 * 1024}")
        if self.processes:
            parts.append(f"nproc={self.processes}")
        return ",".join(parts)


class _Reply:
    """Something a caller waits for: a result, a pong, a warm-up, the handshake.

    ``done`` once the answer (``value`` or ``error``) is in; ``wake`` is set then, and also to
    hand a parked waiter the socket when the task reading it leaves. ``expired``: an
    execution's deadline passed first (see ``WorkerProcess._expire``).
    """

    __slots__ = ("done", "error", "expired", "sink", "value", "wake")

    def __init__(self, sink: Any = None) -> None:
        self.done = False
        self.expired = False
        self.wake = trio.Event()
        self.sink = sink
        self.value: Any = None
        self.error: ExecutionError | None = None

    def finish(self, value: Any = None, error: ExecutionError | None = None) -> None:
        if not self.done:
            self.done = True
            self.value = value
            self.error = error
            self.wake.set()


class _Pending(_Reply):
    """An execution submitted to the worker: its job, and what of its request is still to
    be sent (see :meth:`WorkerProcess.submit`)."""

    __slots__ = ("cancel_grace", "job", "linger", "unsent")

    def __init__(self, job: Job, cancel_grace: float, linger: float) -> None:
        super().__init__(job.sink)
        self.job: Job | None = job
        self.cancel_grace = cancel_grace
        self.linger = linger
        self.unsent: tuple[list[memoryview], bool] | None = None


class WorkerProcess:
    """One live worker child. Create it with :func:`open_worker_process`."""

    def __init__(
        self,
        process: ChildProcess,
        stream: trio.SocketStream,
        stderr: trio.lowlevel.FdStream | None,
        kill: Callable[[], None] | None = None,
    ) -> None:
        self.process = process
        self.pid = process.pid
        self.worker_id = f"w{next(_ids)}-{process.pid}"
        self.started_at = time.monotonic()
        self.executions = 0
        self._stream = stream
        self._fd = stream.socket.fileno()
        self._fd_closed = False  # set before the stream closes (see serve_worker)
        self._stderr = stderr
        self._force_kill = kill or self._kill_group
        # Its pid leads a process group of ours only when we stop it by signalling that
        # group (a thread's pid is the host's own; a Ray actor's is on another node).
        self._own_group = kill is None
        self._stderr_tail: deque[bytes] = deque()
        self._stderr_bytes = 0
        self._conn = Connection(role="host")
        self._send_lock = trio.Semaphore(1)  # whole frames only; see _write_now
        self._pending: dict[str, _Reply] = {}
        self._pongs: dict[int, _Reply] = {}
        self._warmed: dict[tuple[str, str], _Reply] = {}
        self._ping_seq = itertools.count()
        self._hello = _Reply()
        self._waiting: set[_Reply] = set()  # callers in _wait_for
        self._reading = False  # one of them is reading the socket
        self._reader_reply: _Reply | None = None  # what the reading one waits for
        self._parked: trio.CancelScope | None = None  # its wait, when cancellable (_park)
        # The deadlines of executions running here: (execution id, cancel grace, reply).
        self._deadlines = Deadlines(self._expire, self._unexpired)
        self._spin_backoff = 0  # polls to skip after one that found nothing (see _poll)
        self._yielded_at = 0.0  # when a reader that polled last yielded (see _read_until)
        #: Polling for the worker's answer needs a CPU for the worker meanwhile, and a worker
        #: of its own process (a thread worker needs the GIL the polling thread holds).
        self.spin_ok = len(os.sched_getaffinity(0)) >= 2
        self._spin_peers: select.poll | None = None  # see spin_with
        self._stderr_eof = trio.Event()
        self.lost = trio.Event()
        self.crash: ExecutionError | None = None
        self._kill_error: ExecutionError | None = None
        self._closing = False
        self._killed = False
        self._exiting = False  # it said so: an execution's error was WORKER_CRASHED
        #: The plugin ids of the executions it was running when it was lost: non-empty when
        #: the work, not the worker, is the likely cause (see WorkerPoolBackend._serve_on).
        self.lost_running: tuple[str, ...] = ()
        #: Channel sessions bridged to this worker, by channel id (see channels/bridge.py).
        self.channels: dict[str, ChannelBridge] = {}
        # The last two channels that sent the worker a message, and when (see channel_sent).
        self._channel_sends: list[tuple[float, ChannelBridge | None]] = [(-math.inf, None)] * 2
        # Platform calls: each execution running here (its session is what the calls are
        # checked against), the cancel scopes of its calls in flight, and where they run.
        self._jobs: dict[str, Job] = {}
        self._calls: dict[str, set[trio.CancelScope]] = {}
        self._call_bytes: dict[str, int] = {}  # their frames' bytes, per execution
        self._call_nursery: trio.Nursery | None = None
        self._losing = False

    # -- state ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def killed(self) -> bool:
        """True once the host killed the worker (a timeout, a failed health check)."""
        return self._killed

    @property
    def exiting(self) -> bool:
        """True once the worker reported an execution failed with ``WORKER_CRASHED`` (it
        ran out of memory and exits): it takes no more work and should be replaced."""
        return self._exiting

    @property
    def alive(self) -> bool:
        """False once the worker is lost or being declared lost, killed and not yet reaped,
        or said it is exiting (an execution failed with ``WORKER_CRASHED``, e.g. out of
        memory): give it no work."""
        return not (self._killed or self._exiting or self._losing or self.lost.is_set())

    def crash_error(self) -> ExecutionError:
        """A fresh copy of why the worker was lost (one exception object per raise)."""
        if self.crash is None:
            return WorkerCrashedError(f"worker {self.worker_id} is not available")
        return ExecutionError.from_dict(self.crash.to_dict())

    def stderr_tail(self, lines: int = 20) -> str:
        text = b"".join(self._stderr_tail).decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- background tasks -----------------------------------------------------------------

    async def _wait_for(self, reply: _Reply, *, sent: bool = False, spin: float = 0.0) -> None:
        """Wait until ``reply`` is done or the worker is lost, reading the socket meanwhile.

        There is no reader task: a waiting caller reads, one at a time, and dispatches what
        comes, so an answer wakes its caller directly instead of going through a second task
        (two fewer trips through the scheduler per round trip). A reader whose answer came,
        or that is cancelled, hands the socket to another waiter. Cancellable. ``sent``: the
        request went out just now, so its answer cannot be there yet (skip one ``read``);
        ``spin``: then poll for it for up to that many seconds before parking (see
        :meth:`_poll`).
        """
        self._waiting.add(reply)
        try:
            while not reply.done and not self.lost.is_set():
                if self._reading:
                    await reply.wake.wait()
                    if not reply.done:
                        reply.wake = trio.Event()  # woken to take over the socket
                    sent = False
                else:
                    await self._read_until(reply, wait_first=sent, spin=spin)
        finally:
            self._waiting.discard(reply)

    async def _read_until(
        self, reply: _Reply | None, *, wait_first: bool = False, spin: float = 0.0
    ) -> None:
        """Read and dispatch until ``reply`` is done (``None``: until the connection ends).

        Also ends when the worker is declared lost meanwhile: ``_lose`` wakes a reader parked
        on the socket (a dead worker's socket may stay open if something it started still
        holds it, so no EOF would come).
        """
        self._reading = True
        self._reader_reply = reply
        reason = ""
        fd = self._fd
        conn = self._conn
        until = 0.0  # when spinning ends (see _poll)
        spun = False
        try:
            while (reply is None or not reply.done) and not self.lost.is_set():
                if self._fd_closed:
                    break
                data: bytes | None
                if wait_first:
                    wait_first = False
                    polled: bytes | bool = False
                    if spin:
                        until = until or time.perf_counter() + spin
                        polled = self._poll(until)
                        if polled is True:  # let the others run, then poll on
                            await trio.lowlevel.checkpoint()
                            wait_first = True
                            continue
                    if isinstance(polled, bool):
                        await self._park(fd)
                        continue
                    data = polled
                    spun = True
                else:
                    big = conn.big_view()
                    try:
                        if big is None:
                            data = os.read(fd, _READ_SIZE)
                        else:
                            count = os.readv(fd, (big,))
                            conn.big_filled(count)
                            data = b"" if not count else None
                    except BlockingIOError:
                        await self._park(fd)
                        continue
                if data is not None:
                    conn.receive_data(data)
                while (msg := conn.next_message()) is not None:
                    self._dispatch(msg)
                if data == b"":
                    reason = "the worker closed its connection"
                    break
        except trio.ClosedResourceError:
            pass  # _lose woke us: the worker is gone
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
        except OSError as exc:
            reason = f"connection lost: {exc}"
        finally:
            self._reading = False
            self._reader_reply = None
            for waiter in self._waiting:  # pass the socket on, never back to ourselves
                if waiter is not reply and not waiter.done:
                    waiter.wake.set()
                    break
        if reason:
            await self._lose(reason)
        elif spun:
            # Polling got the answer without a trip through the scheduler. Make one now and
            # then (each costs ~15 us here), so a caller calling in a loop never keeps the
            # rest of the run waiting for more than about _YIELD_EVERY.
            now = time.perf_counter()
            if now - self._yielded_at > _YIELD_EVERY:
                self._yielded_at = now
                await trio.lowlevel.cancel_shielded_checkpoint()

    def channel_sent(self, bridge: ChannelBridge, now: float, window: float) -> bool:
        """Note that ``bridge`` sent the worker a message at ``now``; True when no other
        channel did within ``window`` seconds (the worker is then busy with this one only)."""
        sends = self._channel_sends
        if sends[0][1] is bridge:
            other = sends[1]
        else:
            other = sends[1] = sends[0]
        sends[0] = (now, bridge)
        return now - other[0] > window

    async def _park(self, fd: int) -> None:
        """The reader waits for the socket. While channels are bridged here, inside a cancel
        scope that :meth:`read_for_reader` cancels when it read the reader's answer for it."""
        if not self.channels:
            await trio.lowlevel.wait_readable(fd)
            return
        try:
            with trio.CancelScope() as self._parked:
                await trio.lowlevel.wait_readable(fd)
        finally:
            self._parked = None

    def read_for_reader(self, seconds: float) -> None:
        """Poll the socket for up to ``seconds`` (see :meth:`_poll`) and dispatch what came,
        on behalf of the task parked reading it.

        A channel bridge calls this right after sending a message, when the worker's answer
        is tens of microseconds away: the answer is then handled in this task's step, with
        no wake-up of the host through epoll and no step of the reader in between (about a
        third of a bridged round trip). Whatever ends the reader's wait (its answer, EOF, an
        error) is left for it, or handed to it by cancelling its park.
        """
        parked = self._parked
        if parked is None or self._fd_closed or not self.spin_ok:
            return  # nobody parked (whoever reads next gets the data), or no polling here
        data = self._poll(time.perf_counter() + seconds)
        if isinstance(data, bool):
            return
        if not data:
            parked.cancel()  # EOF: the reader reads it again, and reports the loss
            return
        try:
            self._conn.receive_data(data)
            while (msg := self._conn.next_message()) is not None:
                self._dispatch(msg)
        except ProtocolError:
            parked.cancel()  # the reader's next_message() raises it again, and reports it
            return
        reply = self._reader_reply
        if reply is not None and reply.done:
            parked.cancel()

    def spin_with(self, peers: select.poll) -> None:
        """Share ``peers`` (a ``select.poll`` of a pool's worker sockets) with the other
        workers of the pool: a caller polling for this worker's answer then gives way as
        soon as another worker's answer is in, instead of keeping its caller waiting. Until
        :meth:`spin_alone` (at the latest when the connection closes)."""
        if self.spin_ok and not self._fd_closed and self._spin_peers is None:
            peers.register(self._fd, select.POLLIN)
            self._spin_peers = peers

    def spin_alone(self) -> None:
        """Leave the peers of :meth:`spin_with` (before the socket closes: the poll object
        must never hold an fd number that may be another file's)."""
        peers, self._spin_peers = self._spin_peers, None
        if peers is not None:
            peers.unregister(self._fd)

    def _poll(self, until: float) -> bytes | bool:
        """Read the socket in a tight loop until ``until`` (``time.perf_counter()``): what
        came; or True: another worker of the pool answered, whose caller should not wait for
        this one's answer (see :meth:`spin_with`): poll again once the run's other tasks
        have run; or False: park (time is up, another task of the run is ready to run, or
        no polling now).

        Spin, then park: a reply due in tens of microseconds is picked up at once instead
        of through an epoll wake-up of a thread gone idle (~40% of a small round trip on
        2 vCPUs), and the worker, lingering for the next request (``Execute.linger``), is
        not woken either. A poll that runs out of time (a slow handler) makes the next
        ``_SPIN_BACKOFF`` polls be skipped, so slow handlers cost little spinning.
        """
        if self._spin_backoff:
            self._spin_backoff -= 1
            return False
        if self._fd_closed:
            return False
        if trio.lowlevel.current_statistics().tasks_runnable:
            return False
        fd = self._fd
        peers = self._spin_peers
        while True:
            try:
                return os.read(fd, _READ_SIZE)
            except BlockingIOError:
                if time.perf_counter() >= until:
                    self._spin_backoff = _SPIN_BACKOFF
                    return False
                if peers is not None:
                    for ready, _events in peers.poll(0):
                        if ready != fd:  # (this one's answer, come meanwhile: read it)
                            return True
            except OSError:
                return False  # the usual path reports it

    async def _watch_exit(self) -> None:
        """Notice the worker's end even when no caller is reading: read what it said last
        (a result written just before it exited), then declare it lost."""
        try:
            await self.process.wait()
            with trio.move_on_after(1):
                if self._reading:
                    await self.lost.wait()
                else:
                    await self._read_until(None)
        finally:
            # Even when cancelled: whoever waits on this worker must hear that it is gone.
            await self._lose("the worker exited")

    def _expire(self, key: tuple[str, float, _Reply]) -> None:
        execution_id, grace, pending = key
        pending.expired = True
        assert self._call_nursery is not None
        self._call_nursery.start_soon(self._stop_expired, execution_id, pending, grace)

    def _unexpired(self, key: tuple[str, float, _Reply]) -> bool:
        # The same reply, not just the same id: an id may be used again once it finished.
        pending = key[2]
        return self._pending.get(key[0]) is pending and not pending.done and not pending.expired

    async def _stop_expired(self, execution_id: str, pending: _Reply, grace: float) -> None:
        """Past its deadline: ask the worker to stop the handler; kill the worker if it has
        not answered within ``grace`` seconds. The caller, still waiting, gets the answer (or
        the crash) and reports the timeout."""
        with trio.move_on_after(grace):
            try:
                await self._send(Cancel(execution_id=execution_id, reason="timed out"))
            except ExecutionError:
                return
            await trio.sleep_forever()
        if not pending.done:
            self.kill()

    async def _drain_stderr(self) -> None:
        if self._stderr is None:
            self._stderr_eof.set()
            return
        try:
            while chunk := await self._stderr.receive_some(65536):
                self._stderr_tail.append(chunk)
                self._stderr_bytes += len(chunk)
                while self._stderr_bytes > _STDERR_TAIL_BYTES and len(self._stderr_tail) > 1:
                    self._stderr_bytes -= len(self._stderr_tail.popleft())
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            pass
        finally:
            self._stderr_eof.set()

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, ChannelData | ChannelCredit | ChannelClose):
            bridge = self.channels.get(msg.channel_id)
            if bridge is not None:
                bridge.on_message(msg)
        elif isinstance(msg, Event):
            pending = self._pending.get(msg.execution_id)
            if pending is not None:  # stamped when the handler emitted it, in the worker
                pending.sink.deliver_nowait(
                    ExecutionEvent(
                        execution_id=msg.execution_id,
                        kind=msg.kind,
                        data=msg.data,
                        timestamp=msg.timestamp,
                    )
                )
        elif isinstance(msg, Result):
            pending = self._pending.get(msg.execution_id)
            if pending is not None:
                pending.finish(msg)
        elif isinstance(msg, Error):
            pending = self._pending.get(msg.execution_id)
            if pending is not None:
                error = ExecutionError.from_dict(msg.error)
                if isinstance(error, WorkerCrashedError):
                    self._exiting = True  # its last words: no other execution may follow
                pending.finish(error=error)
        elif isinstance(msg, Pong):
            pong = self._pongs.pop(msg.seq, None)
            if pong is not None:
                pong.finish(msg)
        elif isinstance(msg, Warmed):
            warmed = self._warmed.pop((msg.plugin_id, msg.handler_id), None)
            if warmed is not None:
                warmed.finish(msg)
        elif isinstance(msg, PlatformCall):
            self._accept_call(msg, self._conn.frame_size)
        elif isinstance(msg, Hello):
            self._hello.finish(msg)

    def _accept_call(self, msg: PlatformCall, size: int) -> None:
        """Start serving a ``PlatformCall`` (``size``: its frame's bytes), or refuse it at
        once, keeping nothing of it: a call for an execution not running on this worker, or
        one that would take the execution's calls in flight past
        ``_MAX_CALL_BYTES_IN_FLIGHT``. Runs as the frame is read, so refused calls never
        pile up waiting for a task."""
        nursery = self._call_nursery
        if nursery is None:
            return
        execution_id = msg.execution_id
        job = self._jobs.get(execution_id)
        refused: ExecutionError | None = None
        held = self._call_bytes.get(execution_id, 0) + size
        if job is None:
            refused = AbortedError(f"execution {execution_id!r} is not running here")
        elif held > _MAX_CALL_BYTES_IN_FLIGHT:
            refused = InvalidRequestError(
                f"platform calls of {held} bytes in flight, over the limit of "
                f"{_MAX_CALL_BYTES_IN_FLIGHT} bytes per execution"
            )
        if refused is not None:
            nursery.start_soon(self._reply, msg.call_id, None, refused.to_dict())
            return
        assert job is not None
        self._call_bytes[execution_id] = held
        nursery.start_soon(self._platform_call, msg, job, size)

    async def _platform_call(self, msg: PlatformCall, job: Job, size: int) -> None:
        """Serve one ``PlatformCall`` accepted by :meth:`_accept_call` with the session the
        host made for its execution (the worker's word is taken for nothing but the
        execution id), and reply. The cancel scopes and bytes of the calls in flight are
        kept per execution only while there are some."""
        from .platform_client import error_to_wire

        error: dict[str, Any] | None = None
        value: Any = None
        execution_id = msg.execution_id
        scopes = self._calls.setdefault(execution_id, set())
        with trio.CancelScope() as scope:
            scopes.add(scope)
            try:
                if len(scopes) > _MAX_CALLS_IN_FLIGHT:
                    raise InvalidRequestError(
                        f"more than {_MAX_CALLS_IN_FLIGHT} platform calls in flight"
                    )
                value = await job.session.acall(msg.service, msg.method, msg.args, msg.kwargs)
            except Exception as exc:
                error = error_to_wire(exc)
            finally:
                scopes.discard(scope)
                if not scopes and self._calls.get(execution_id) is scopes:
                    del self._calls[execution_id]
                left = self._call_bytes[execution_id] - size
                if left:
                    self._call_bytes[execution_id] = left
                else:
                    del self._call_bytes[execution_id]
        if scope.cancelled_caught:
            error = AbortedError("the execution ended before this platform call").to_dict()
        await self._reply(msg.call_id, value, error)

    async def _reply(self, call_id: int, value: Any, error: dict[str, Any] | None) -> None:
        """Answer a ``PlatformCall``: ``value``, or ``error`` (an error's wire form)."""
        reply = PlatformReply(call_id=call_id, ok=error is None, value=value, error=error)
        try:
            await self._send(reply)
        except ProtocolError as exc:  # the value would not encode: say so instead
            failed = InvalidRequestError(f"the platform's reply could not be sent: {exc}")
            await self._send(
                PlatformReply(call_id=call_id, ok=False, value=None, error=failed.to_dict())
            )
        except ExecutionError:
            pass  # the worker is gone

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
            if not self._killed and not self._closing and self._own_group:
                _end_group(self.pid)  # it died on its own (a crash): it could not clean up
            with trio.move_on_after(1):  # let the stderr pipe drain to EOF
                await self._stderr_eof.wait()
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
            self.crash = self._kill_error
        else:
            self.crash = WorkerCrashedError(
                f"worker {self.worker_id} {how} ({reason})", details=details
            )
        self.lost_running = tuple(job.request.plugin_id for job in self._jobs.values())
        self.lost.set()
        if self._reading:  # wake the reader parked on the socket (the fd stays open)
            trio.lowlevel.notify_closing(self._fd)
        for reply in (*self._pending.values(), *self._pongs.values(), *self._warmed.values()):
            reply.finish(error=self.crash_error())
        self._pongs.clear()
        self._warmed.clear()
        self._hello.finish(error=self.crash_error())

    # -- talking to the worker ------------------------------------------------------------

    async def _send(self, msg: Any) -> None:
        """Send one frame. Whole frames only: the lock keeps concurrent senders apart."""
        await self._send_frame(self._conn.send(msg))

    async def _send_frame(self, data: bytes) -> None:
        """Send one whole frame: at once when the kernel takes it (see :meth:`_write_now`),
        else under the send lock."""
        unsent = self._write_now(data)
        if unsent is not None:
            await self._send_rest(*unsent)

    def _write_now(self, data: bytes | list[bytes]) -> tuple[list[memoryview], bool] | None:
        """Fast path: when nobody else is sending, write straight to the non-blocking socket;
        a frame the kernel takes whole costs no lock and no trip through the scheduler (a
        round trip on the pool has ~4 of them, so this is a large share of its latency).
        ``data``: the frame, or its pieces (``os.writev``; see ``pack_parts``).

        Returns None when all went out; else what is left and whether the send lock was
        taken for it (a frame begun here), for :meth:`_send_rest`. The lock is a semaphore,
        not a Lock, because the task that finishes a frame may not be the one that began it
        (see :meth:`submit`).
        """
        if self._fd_closed:  # the fd number may be another file's by now: never touch it
            raise self.crash_error()
        lock = self._send_lock
        if lock.value == 0:  # another frame is going out: queue for the lock
            sent = 0
        else:
            try:
                if isinstance(data, bytes):
                    sent = os.write(self._fd, data)
                    if sent == len(data):
                        return None  # the usual case
                else:
                    sent = os.writev(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # broken: _send_rest reports it the usual way
        rest = unsent([data] if isinstance(data, bytes) else data, sent)
        if not rest:
            return None
        if lock.value == 0:
            return rest, False
        lock.acquire_nowait()  # free: nothing awaited since value said so
        return rest, True

    async def _send_rest(self, rest: list[memoryview], locked: bool) -> None:
        """Send what :meth:`_write_now` left, under the send lock (``locked``: taken)."""
        lock = self._send_lock
        if not locked:
            await lock.acquire()
        try:
            for part in rest:
                await self._stream.send_all(part)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self.lost.wait()
            raise self.crash_error() from None
        finally:
            lock.release()

    def submit(
        self,
        job: Job,
        *,
        workspace: str | None = None,
        cancel_grace: float = 1.0,
        linger: float = 0.0,
    ) -> _Pending:
        """Start ``job`` on this worker without waiting: the request goes out now if the
        socket takes it whole (else :meth:`collect` finishes sending it). Pair every call
        with :meth:`collect`, which waits for the answer and cleans up.

        The pool submits a queued caller's request in the same step that frees the worker,
        so the worker is not idle while the caller is scheduled. ``linger``: how long the
        worker polls for a next request after answering (``Execute.linger``), and the host
        for the reply before parking (see :meth:`_poll`): a next request usually follows at
        once.
        """
        if self.lost.is_set():
            raise self.crash_error()
        request = job.request
        execution_id = request.execution_id
        target = job.target
        deadline = job.deadline
        fields = {
            "execution_id": execution_id,
            "plugin_id": request.plugin_id,
            "handler_id": request.handler_id,
            "entry": target.entry,
            "root": target.root,
            "input": request.input,
            "context": request.context,
            "workspace": workspace,
            "timeout": max(0.001, deadline - trio.current_time()),
            "linger": linger,
        }
        try:
            frame = self._conn.send_execute(**fields)
        except ProtocolError:
            # Input must be plain data on every backend; a context may hold values the
            # converter makes plain (the general path); too big is too big.
            check_serializable(request.input, "input")
            try:
                frame = self._conn.send(Execute(**fields))
            except ProtocolError as exc:
                raise InvalidRequestError(f"the request cannot be sent: {exc}") from None
        pending = self._pending[execution_id] = _Pending(job, cancel_grace, linger)
        self._jobs[execution_id] = job
        self._deadlines.add(deadline, (execution_id, cancel_grace, pending))
        self.executions += 1
        pending.unsent = self._write_now(frame)
        return pending

    async def collect(
        self, pending: _Pending, *, backend: str, sent_now: bool = True
    ) -> ExecutionResult:
        """Wait for the answer to a :meth:`submit` and return the result.

        Raises the handler's :class:`ExecutionError`; ``WorkerCrashedError`` when the worker
        dies; ``job.timeout_error()`` at the deadline, after sending ``Cancel`` and waiting
        the cancel grace for the worker to stop the handler, killing the worker if it did
        not. Cancellation does the same, then re-raises. ``sent_now``: the request went out
        just before this call, so its answer cannot be there yet. A submission that asked
        the worker to linger polls for the reply as long before parking (see :meth:`_poll`).
        """
        job = pending.job
        assert job is not None, "collected twice"
        execution_id = job.request.execution_id
        try:
            if pending.unsent is not None:
                unsent, pending.unsent = pending.unsent, None
                with trio.CancelScope(shield=True):  # never half a frame: it would end the worker
                    await self._send_rest(*unsent)
            await self._wait_for(pending, sent=sent_now, spin=pending.linger)
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self._stop_execution(execution_id, pending, pending.cancel_grace)
            raise
        finally:
            del self._pending[execution_id]
            del self._jobs[execution_id]
            if self._calls:
                for scope in self._calls.pop(execution_id, ()):
                    scope.cancel()
            # The deadline heap keeps ``pending`` until its deadline or a compaction: let go
            # of what may be big (the request's input, the output, an error's traceback).
            error, result, pending.error, pending.value = pending.error, pending.value, None, None
            pending.job = pending.sink = pending.unsent = None
        if pending.expired:
            raise job.timeout_error()
        if error is not None:
            raise error
        if not pending.done:
            raise self.crash_error()
        return ExecutionResult(
            execution_id=execution_id,
            ok=True,
            output=result.output,
            duration_s=time.perf_counter() - job.started,
            backend=backend,
            worker_id=self.worker_id,
            metadata=result.metadata,
        )

    async def execute(
        self,
        job: Job,
        *,
        backend: str,
        workspace: str | None = None,
        cancel_grace: float = 1.0,
        spin: float = 0.0,
    ) -> ExecutionResult:
        """Run ``job`` on this worker and return its result: :meth:`submit`, then
        :meth:`collect` (see there for the errors). ``spin``: seconds to poll for the reply
        before parking (see :meth:`_poll`); the worker then lingers as long for the next
        request (one usually follows at once).
        """
        pending = self.submit(job, workspace=workspace, cancel_grace=cancel_grace, linger=spin)
        return await self.collect(pending, backend=backend)

    async def _stop_execution(self, execution_id: str, pending: _Reply, grace: float) -> None:
        if pending.done or self.lost.is_set():
            return
        try:
            await self._send(Cancel(execution_id=execution_id, reason="stopped by the host"))
        except ExecutionError:
            return
        with trio.move_on_after(grace):
            await self._wait_for(pending)
        if not pending.done:
            self.kill()

    async def ping(self) -> Pong:
        """Ask the worker for a ``Pong`` (RSS, uptime, in-flight); wait as long as it takes.

        Raises ``WorkerCrashedError`` when the worker dies first. Wrap in a timeout to
        detect a hung worker.
        """
        seq = next(self._ping_seq)
        reply = self._pongs[seq] = _Reply()
        try:
            await self._send(Ping(seq=seq))
            await self._wait_for(reply)
        finally:
            self._pongs.pop(seq, None)
        if not reply.done or reply.error is not None:
            raise self.crash_error()
        pong: Pong = reply.value
        return pong

    async def warmup(self, plugin_id: str, handler_id: str, entry: str, root: str | None) -> None:
        """Import a handler and run its ``warmup()`` hook in the worker; raise on failure."""
        reply = self._warmed[(plugin_id, handler_id)] = _Reply()
        await self._send(Warmup(plugin_id=plugin_id, handler_id=handler_id, entry=entry, root=root))
        await self._wait_for(reply)
        if not reply.done or reply.error is not None:
            raise self.crash_error()
        warmed: Warmed = reply.value
        if not warmed.ok and warmed.error is not None:
            raise ExecutionError.from_dict(warmed.error)

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
        kill_tree(self.pid)

    async def aclose(self, grace: float = 2.0) -> None:
        """Ask the worker to exit; kill it after ``grace`` seconds; reap it. Idempotent.

        Shielded from cancellation, and independent of whoever reads the socket: it waits on
        the process itself.
        """
        self._closing = True
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                with trio.move_on_after(grace):
                    if not self.lost.is_set():
                        try:
                            await self._send(Shutdown())
                        except ExecutionError:
                            pass
                    await self.process.wait()
            if self.process.returncode is None:
                self.kill()
                await self.process.wait()


def _end_group(leader: int) -> None:
    """Kill what is left of the process group of a worker that exited by itself (a crash):
    processes its handler started. The leader is reaped by now; its id stays reserved as a
    group id while the group has members, so with none left this finds nobody."""
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
) -> AsyncIterator[WorkerProcess]:
    """Start a worker child and yield it once it said ``Hello``.

    The child is a fresh ``python -I`` by default, or forked by ``zygote``. ``sandbox``: the
    kernel layers it applies to itself, and the command (bubblewrap) a spawned child is
    started under. Raises ``WorkerCrashedError`` if it dies or stays silent for
    ``start_timeout`` seconds before the handshake. On exit it is shut down (killed after
    ``close_grace``) and reaped.
    """
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
    async with serve_worker(
        process,
        host_sock,
        trio.lowlevel.FdStream(err_read),
        start_timeout=start_timeout,
        close_grace=close_grace,
    ) as worker:
        yield worker


@asynccontextmanager
async def serve_worker(
    process: ChildProcess,
    host_sock: socket.socket,
    stderr: trio.lowlevel.FdStream | None,
    *,
    kill: Callable[[], None] | None = None,
    start_timeout: float = 30.0,
    close_grace: float = 2.0,
) -> AsyncIterator[WorkerProcess]:
    """Drive a started worker: handshake, serve, and always shut it down and reap it.

    Takes ownership of ``host_sock`` and ``stderr``. ``kill`` stops the worker by force
    (default: SIGKILL its process group).
    """
    worker = WorkerProcess(
        process, trio.SocketStream(trio.socket.from_stdlib_socket(host_sock)), stderr, kill
    )
    try:
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                worker._call_nursery = nursery
                nursery.start_soon(worker._watch_exit)
                nursery.start_soon(worker._deadlines.run)
                nursery.start_soon(worker._drain_stderr)
                try:
                    with trio.move_on_after(start_timeout):
                        await worker._wait_for(worker._hello)
                    if worker.lost.is_set():
                        raise worker.crash_error()
                    if not worker._hello.done:
                        raise WorkerCrashedError(
                            f"worker {worker.worker_id} did not start within {start_timeout:g} s",
                            details={"stderr_tail": worker.stderr_tail()},
                        )
                    yield worker
                finally:
                    await worker.aclose(close_grace)
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            worker.spin_alone()
            worker._fd_closed = True  # raw reads and writes of the fd stop here
            await worker._stream.aclose()
            if stderr is not None:
                await stderr.aclose()
            if process.returncode is None:
                worker.kill()
                await process.wait()
