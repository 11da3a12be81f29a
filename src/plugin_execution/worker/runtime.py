"""The worker runtime: read frames, run handlers, answer.

Threads, not an event loop, so a child that runs a sync handler never imports trio:

- the main thread reads the socket and dispatches; it answers ``Ping`` at once even while
  handlers run, and exits the process when the host goes away (EOF) or says ``Shutdown``;
- a sync handler runs on an executor thread (one per concurrent execution, reused);
- async handlers share one trio loop on a thread of its own, started on first need;
- a channel session (``ch_open`` then ``execute``) runs its handler on that loop with a
  :class:`~plugin_execution.worker.channel.WorkerChannel`; the channel frames of each read
  reach the loop in one batch.

Whatever a handler prints is captured per execution and sent as ``log`` events; fd 1 is
pointed at fd 2, so even raw writes never reach the protocol socket.
"""

from __future__ import annotations

import contextvars
import errno
import os
import select
import sys
import threading
import time
from _queue import Empty, SimpleQueue  # the C module: queue.py costs a fresh child ~2 ms

from ..context import ExecutionContext
from ..errors import (
    AbortedError,
    ExecutionError,
    ExecutionTimeoutError,
    HandlerContractError,
    PermissionDeniedError,
    WorkerCrashedError,
    handler_error,
    plain_error,
    safe_text,
)
from ..errors import InvalidRequestError as _InvalidRequest
from ..handlers import Handler, load_handler
from ._leftovers import has_children, kill_leftovers
from ._wire import PROTOCOL_VERSION, FrameDecoder, WireError, encode, encode_parts, unsent
from .platform_calls import PlatformCalls

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

    from ..types import ExecutionEvent
    from .channel import WorkerChannel

_CHANNEL_FRAMES = frozenset({"ch_data", "ch_credit", "ch_close"})
_OOM_EXIT = 137
_DENIED_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)  # the kernel said no: permissions
_PROTOCOL_EXIT = 76  # EX_PROTOCOL
_WATCH_S = 0.01  # how long a handler runs on the reading thread before another takes over
# How often the watcher looks. Each look wakes a thread; at 100 a second (a look every
# _WATCH_S) that cost a busy pool ~5% of its throughput on 2 vCPUs, measured against
# anyio.to_process in the same runs. A long handler is thus handed over 10-110 ms in.
_WATCH_EVERY = 0.1
_SPIN_BACKOFF = 16  # lingers skipped after one that found no request (see _linger_poll)
# Bytes per os.read: 64 KiB stays under glibc's mmap threshold (128 KiB); a bigger buffer is
# mmap'ed and unmapped on every call, ~9 us each, more than the rest of a small read. A frame
# bigger than this is read straight into a buffer of its own (see FrameDecoder.big_view).
_READ_SIZE = 65536
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("execution", default=None)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def _handler_error(exc: BaseException) -> ExecutionError:
    """What the caller sees of a handler's exception: ``HANDLER_ERROR``, except an OSError by
    which the kernel refused an access (EACCES, EPERM, EROFS): the sandbox (or plain file
    permissions) stopped the handler, which is ``PERMISSION_DENIED``, naming the path when
    the error has one. Never raises, whatever the exception (see ``errors.handler_error``)."""
    error = handler_error(exc)
    try:
        if isinstance(exc, OSError) and exc.errno in _DENIED_ERRNOS:
            details = dict(error.details, errno=errno.errorcode[exc.errno])
            if exc.filename is not None:
                details["resource"] = safe_text(
                    os.fsdecode(exc.filename)
                    if isinstance(exc.filename, str | bytes)
                    else exc.filename
                )
            return PermissionDeniedError(
                f"the system refused the handler: {type(exc).__name__}: {safe_text(exc)}",
                details=details,
            )
    except BaseException:  # a hostile OSError subclass: report it as what it raised
        pass
    return error


class _Stop(Exception):
    """Ends an in-thread worker's serve loop."""


class _FrameSink:
    """Sends a context's events to the host as ``event`` frames."""

    __slots__ = ("_execution_id", "_worker")

    def __init__(self, worker: Worker, execution_id: str) -> None:
        self._worker = worker
        self._execution_id = execution_id

    def emit(self, kind: str, data: Any) -> None:
        self._worker.send(
            "event",
            {
                "execution_id": self._execution_id,
                "kind": kind,
                "data": data,
                "timestamp": time.time(),
            },
        )

    def deliver_nowait(self, event: ExecutionEvent) -> None:
        self._worker.send(
            "event",
            {
                "execution_id": self._execution_id,
                "kind": event.kind,
                "data": event.data,
                "timestamp": event.timestamp,
            },
        )

    async def aemit(self, kind: str, data: Any) -> None:
        self.emit(kind, data)


class _CapturedStream:
    """A text stream that turns a handler's prints into ``log`` events, line by line."""

    def __init__(self, worker: Worker, name: str) -> None:
        self._worker = worker
        self._name = name
        self._partial: dict[str, str] = {}
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        execution_id = _current.get()
        if execution_id is None:
            os.write(2, text.encode("utf-8", "replace"))
            return len(text)
        buffered = self._partial.pop(execution_id, "") + text
        *lines, rest = buffered.split("\n")
        for line in lines:
            self._emit(execution_id, line)
        if rest:
            self._partial[execution_id] = rest
        return len(text)

    def finish(self, execution_id: str) -> None:
        rest = self._partial.pop(execution_id, None)
        if rest:
            self._emit(execution_id, rest)

    def _emit(self, execution_id: str, line: str) -> None:
        self._worker.send(
            "event",
            {
                "execution_id": execution_id,
                "kind": "log",
                "data": {"stream": self._name, "message": line},
                "timestamp": time.time(),
            },
        )

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 2


class _Executor(threading.Thread):
    """A reusable thread for sync handlers; returns itself to the idle queue after each job."""

    def __init__(
        self, idle: SimpleQueue[_Executor], stopped: threading.Event, *, start: bool = True
    ) -> None:
        super().__init__(name="worker-executor", daemon=True)
        self._jobs: SimpleQueue[Callable[[], None] | None] = SimpleQueue()
        self._idle = idle
        self._stopped = stopped
        if start:
            self.start()

    def submit(self, job: Callable[[], None] | None) -> None:
        """Run ``job`` on this thread; ``None`` ends the thread."""
        self._jobs.put(job)

    def run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
            if self._stopped.is_set():
                return
            self._idle.put(self)


class _TrioLoop:
    """One trio loop on its own thread, for async handlers; started on first need."""

    def __init__(self) -> None:
        import trio

        self._trio = trio
        ready = threading.Event()

        async def main() -> None:
            self.token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                ready.set()
                await trio.sleep_forever()

        threading.Thread(target=trio.run, args=(main,), name="worker-trio", daemon=True).start()
        ready.wait()

    def start_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.token.run_sync_soon(self.nursery.start_soon, fn, *args)

    def stop(self) -> None:
        """Cancel what runs on the loop and end its thread (releasing its fds)."""
        try:
            self.token.run_sync_soon(self.nursery.cancel_scope.cancel)
        except self._trio.RunFinishedError:
            pass


class _Running:
    """What the worker knows about an execution in flight."""

    __slots__ = ("cancel", "ctx")

    def __init__(self, ctx: ExecutionContext) -> None:
        self.ctx = ctx
        self.cancel: Callable[[], None] = ctx.cancel


class Worker:
    """Serves one host over the stream socket ``fd`` until EOF or ``Shutdown``.

    Plain ``os.read`` / ``os.write`` on the fd: the ``socket`` module costs a fresh child
    ~6 ms of imports. ``close`` releases the fd when serving ends (default ``os.close``).
    """

    def __init__(
        self, fd: int, *, in_thread: bool = False, close: Callable[[], None] | None = None
    ) -> None:
        self._fd = fd
        self._release_fd = close if close is not None else lambda: os.close(fd)
        self._fd_closed = False
        self._in_thread = in_thread
        self._send_lock = threading.Lock()
        self._started = time.monotonic()
        self._pid = os.getpid()
        self._handlers: dict[tuple[str, str | None], Handler] = {}
        self._running: dict[str, _Running] = {}
        self._idle: SimpleQueue[_Executor] = SimpleQueue()
        self._stopped = threading.Event()
        self._decoder = FrameDecoder()
        self._leader: int | None = None  # the thread reading the socket (see _lead)
        self._inline: Callable[[], None] | None = None
        self._lead_lock = threading.Lock()
        self._inline_thread: int | None = None  # the leader, while it runs a handler itself
        self._inline_since = 0.0
        self._watching = False  # _watch_inline runs (from the first handler run inline)
        self._linger = 0.0  # the last inline execution's Execute.linger (see _linger_poll)
        self._linger_backoff = 0
        # Wait for requests in poll(), not in a blocking read: see _lead.
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._trio: _TrioLoop | None = None
        self._loop_lock = threading.Lock()
        self._stdout = _CapturedStream(self, "stdout")
        self._stderr = _CapturedStream(self, "stderr")
        self._platform = PlatformCalls(self.send, self._loop, self._stop_leading)
        self._channels: dict[str, WorkerChannel] = {}  # by channel id, until the handler ends
        self._channel_of: dict[str, WorkerChannel] = {}  # by execution id, until it starts
        self._channel_batch: list[tuple[str, dict[str, Any]]] = []

    # -- I/O ------------------------------------------------------------------------------

    def send(self, tag: str, fields: dict[str, Any], big: str | None = None) -> None:
        """Write one frame, whole. ``big``: a field that may hold a big ``bytes`` value,
        then written from where it lies (see ``encode_parts``). After :meth:`_close` it
        writes nothing: a handler a thread worker abandoned may finish long after, and the
        fd number may belong to another socket or file by then."""
        frame = encode(tag, fields) if big is None else encode_parts(tag, fields, big)
        with self._send_lock:
            if self._fd_closed:
                return
            try:
                if isinstance(frame, bytes):  # the usual case: one write takes it all
                    try:
                        sent = os.write(self._fd, frame)
                    except BlockingIOError:
                        sent = 0
                    if sent == len(frame):
                        return
                    parts = unsent([frame], sent)
                else:
                    parts = unsent(frame, 0)
                while parts:
                    try:
                        sent = os.writev(self._fd, parts)
                    except BlockingIOError:  # the loop reads: the fd is non-blocking
                        _wait_writable(self._fd)
                        continue
                    parts = unsent(parts, sent)
            except OSError:
                pass  # the host is gone; the reader sees EOF and stops the worker

    def _close(self) -> None:
        """Release the fd, once no frame can be written to it any more."""
        with self._send_lock:
            if self._fd_closed:
                return
            self._fd_closed = True
            self._release_fd()

    def serve(self) -> None:
        """Serve until the host goes away or says ``Shutdown``.

        In a child process this never returns (the process exits). In a thread (the pool's
        ``thread`` kind) it returns, abandoning handlers still running on executor threads.
        """
        if not self._in_thread:
            os.dup2(2, 1)
            sys.stdout, sys.stderr = self._stdout, self._stderr
        self.send("hello", {"version": PROTOCOL_VERSION, "pid": os.getpid()})
        if self._in_thread:
            try:
                self._lead()
            except _Stop:
                pass
            self._close()
            self._stop_threads()
            return
        # A child process: the main thread is one of the executor threads that take turns
        # at reading (see _lead); the process ends by os._exit, from whichever thread.
        main = _Executor(self._idle, self._stopped, start=False)
        main.submit(self._lead)
        main.run()

    def _lead(self) -> None:
        """Read and dispatch frames, as the one thread that reads (leader/followers).

        A sync execution dispatched here runs on this very thread, right away, and the thread
        stays the reader: a short handler costs no thread switch at all. Frames that come
        meanwhile wait in the socket. Should the handler take a while, ``_watch_inline`` makes
        an idle thread the reader (after ``_WATCH_S`` to ``_WATCH_S + _WATCH_EVERY``), so
        ``Ping`` and ``Cancel`` are still read; a platform call does so at once, since its
        reply must be read. A thread worker (``in_thread``) never runs handlers here: they
        go to executor threads.
        """
        decoder = self._decoder
        me = self._leader = threading.get_ident()
        fd = self._fd
        try:
            while True:
                for tag, fields in decoder:
                    self._dispatch(tag, fields)
                    job = self._inline
                    if job is not None:
                        self._inline = None
                        if not self._watching:  # first handler run here: not at start-up
                            self._watching = True
                            threading.Thread(
                                target=self._watch_inline, name="worker-watch", daemon=True
                            ).start()
                        with self._lead_lock:
                            self._inline_since = time.monotonic()
                            self._inline_thread = me
                        try:
                            job()
                        finally:
                            with self._lead_lock:
                                # Another thread may be the reader running a handler by
                                # now (the result went out before this): leave its mark.
                                if self._inline_thread == me:
                                    self._inline_thread = None
                                still_leading = self._leader == me
                        if not still_leading:
                            return  # another thread reads now; this one goes idle
                if self._channel_batch:
                    self._flush_channels()
                if self._channels:
                    self._read_on_loop(decoder)
                if self._linger:
                    self._linger_poll()
                try:
                    # Sleep in poll(POLLIN), never in read(): the host reading a reply
                    # wakes every task asleep on this socket (the kernel's "room to write"
                    # wake-up), and a blocked read() sleeps again, one wasted context
                    # switch per round trip (~a third of the worker's CPU); poll() is not
                    # woken by it.
                    self._poller.poll()
                    big = decoder.big_view()
                    if big is not None:
                        count = os.readv(fd, (big,))
                        decoder.big_filled(count)
                        if count:
                            continue
                    data = os.read(fd, _READ_SIZE)
                except OSError:
                    data = b""
                if not data:
                    self._exit(0)
                decoder.feed(data)
        except WireError as exc:
            # Only a host bug gets here; say so on stderr (the host shows its tail in the
            # WorkerCrashedError) rather than dying with a traceback.
            os.write(2, f"plugin_execution worker: bad frame from the host: {exc}\n".encode())
            if not self._in_thread:
                os._exit(_PROTOCOL_EXIT)
            raise _Stop from None

    def _linger_poll(self) -> None:
        """Poll the socket for up to ``Execute.linger`` seconds before sleeping in ``read``.

        The host asks for it when it has a CPU to spare for this process: the next request
        usually follows within tens of microseconds, and picking it up awake saves this
        process a wake-up from sleep (and the host the cost of waking it). One that does not
        come (the host had no more work) makes the next ``_SPIN_BACKOFF`` lingers be
        skipped, so an idle worker soon just sleeps.
        """
        seconds, self._linger = self._linger, 0.0
        if self._linger_backoff:
            self._linger_backoff -= 1
            return
        poller = self._poller
        end = time.perf_counter() + seconds
        while not poller.poll(0):
            if time.perf_counter() >= end:
                self._linger_backoff = _SPIN_BACKOFF
                return

    def _stop_leading(self, thread: int | None = None) -> None:
        """If ``thread`` (default: this one) is the reader running a handler, make an idle
        thread the reader instead. Called before a handler blocks on a platform reply, and
        by ``_watch_inline`` for a handler that runs long."""
        thread = threading.get_ident() if thread is None else thread
        with self._lead_lock:
            if self._inline_thread != thread or self._leader != thread:
                return
            self._leader = None
        self._executor().submit(self._lead)

    def _watch_inline(self) -> None:
        """Give the socket a reader while a handler runs long on the reading thread."""
        while True:
            time.sleep(_WATCH_EVERY)
            thread = self._inline_thread
            if thread is not None and time.monotonic() - self._inline_since >= _WATCH_S:
                self._stop_leading(thread)

    def _stop_threads(self) -> None:
        """In a thread worker, end its helper threads; busy ones end after their handler."""
        self._stopped.set()
        while not self._idle.empty():
            self._idle.get_nowait().submit(None)
        if self._trio is not None:
            self._trio.stop()

    def _exit(self, code: int) -> None:
        if self._in_thread:
            raise _Stop
        kill_leftovers()  # nothing a handler started outlives its worker
        os._exit(code)

    def _dispatch(self, tag: str, msg: dict[str, Any]) -> None:
        if tag in _CHANNEL_FRAMES:
            self._channel_batch.append((tag, msg))
        elif tag == "execute":
            self._start(msg)
        elif tag == "preply":
            self._platform.on_reply(msg)
        elif tag == "cancel":
            running = self._running.get(msg["execution_id"])
            if running is not None:
                cancel = running.cancel
                cancel()
                if running.cancel is not cancel:  # _run_async swapped it in meanwhile
                    running.cancel()
            self._platform.abort(msg["execution_id"])
            self._channel_of.pop(msg["execution_id"], None)
        elif tag == "ch_open":
            self._open_channel(msg)
        elif tag == "ping":
            self.send(
                "pong",
                {
                    "seq": msg["seq"],
                    "rss_bytes": _rss_bytes(),
                    "uptime_s": time.monotonic() - self._started,
                    "in_flight": len(self._running),
                },
            )
        elif tag == "warmup":
            self._on_executor(lambda: self._warmup(msg))
        elif tag == "shutdown":
            self._exit(0)

    # -- channels -------------------------------------------------------------------------

    def _open_channel(self, msg: dict[str, Any]) -> None:
        from .channel import WorkerChannel

        self._loop()  # the channel's handler runs there; its primitives belong to it
        channel = WorkerChannel(self, msg)
        self._channels[channel.connection_id] = channel
        self._channel_of[channel.execution_id] = channel

    def _read_on_loop(self, decoder: FrameDecoder) -> None:
        """While channels are open, the trio loop reads the socket itself.

        A channel message then wakes one thread (the loop, where its handler runs) instead
        of two (this reader, then the loop): about a third of a bridged round trip. Blocks
        this thread until the loop hands reading back (the last channel closed), re-raising
        what ended the loop's reading (``_Stop``, ``WireError``). The price: while a channel
        is open, an async handler that blocks the loop also delays ``Ping`` and ``Cancel``.
        """
        assert self._trio is not None
        handback: SimpleQueue[BaseException | None] = SimpleQueue()
        self._trio.start_soon(self._loop_reader, decoder, handback)
        outcome = handback.get()
        if outcome is not None:
            raise outcome

    async def _loop_reader(
        self, decoder: FrameDecoder, handback: SimpleQueue[BaseException | None]
    ) -> None:
        trio = self._trio._trio  # type: ignore[union-attr]
        fd = self._fd
        outcome: BaseException | None = None
        os.set_blocking(fd, False)
        try:
            while self._channels:
                try:
                    data = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._exit(0)
                decoder.feed(data)
                for tag, fields in decoder:
                    self._dispatch(tag, fields)
                if self._channel_batch:
                    batch, self._channel_batch = self._channel_batch, []
                    self._deliver_channels(batch)
        except (_Stop, WireError) as exc:
            outcome = exc
        finally:
            os.set_blocking(fd, True)
            handback.put(outcome)

    def _flush_channels(self) -> None:
        """Hand this read's channel frames to the trio loop in one wake-up, in order."""
        batch, self._channel_batch = self._channel_batch, []
        if self._trio is not None:
            self._trio.token.run_sync_soon(self._deliver_channels, batch)

    def _deliver_channels(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        for tag, msg in batch:
            channel = self._channels.get(msg["channel_id"])
            if channel is not None:
                channel.deliver(tag, msg)

    # -- running handlers -----------------------------------------------------------------

    def _handler(self, entry: str, root: str | None) -> tuple[Handler, bool]:
        key = (entry, root)
        handler = self._handlers.get(key)
        if handler is not None:
            return handler, True
        handler = self._handlers[key] = load_handler(entry, root)
        return handler, False

    def _start(self, msg: dict[str, Any]) -> None:
        execution_id = msg["execution_id"]
        workspace = msg.get("workspace")
        ctx = ExecutionContext(
            execution_id=execution_id,
            plugin_id=msg["plugin_id"],
            handler_id=msg["handler_id"],
            context=msg.get("context") or {},
            sink=_FrameSink(self, execution_id),
            workspace=_workspace_provider(workspace) if workspace else None,
            platform=self._platform.caller(execution_id),
        )
        self._running[execution_id] = running = _Running(ctx)
        try:
            handler, warm = self._handler(msg["entry"], msg.get("root"))
        except BaseException as exc:  # what importing plugin code raised, whatever it is
            error = exc if isinstance(exc, ExecutionError) else _handler_error(exc)
            self._finish(execution_id, error=error)
            return
        ctx.blocking = not handler.is_async
        channel = self._channel_of.pop(execution_id, None)
        if channel is not None:
            if not handler.is_async:
                self._channels.pop(channel.connection_id, None)
                self._finish(
                    execution_id,
                    error=HandlerContractError(
                        f"channel entry {msg['entry']!r} is not an async function: a "
                        "session-style channel handler is 'async def handler(ctx, channel)'",
                        details={"entry": msg["entry"]},
                    ),
                )
                return
            self._loop().start_soon(self._run_async, handler, warm, msg, running, channel)
        elif handler.is_async:
            self._loop().start_soon(self._run_async, handler, warm, msg, running)
        else:
            self._on_executor(lambda: self._run_sync(handler, warm, msg, running))
            if self._inline is not None:  # runs on this reading thread: then may linger
                self._linger = msg["linger"]

    def _on_executor(self, job: Callable[[], None]) -> None:
        """Run a sync handler's job off the reading path: on the reader itself when it is a
        plain thread of a child process (see _lead), else on an executor thread."""
        if not self._in_thread and self._leader == threading.get_ident():
            self._inline = job
        else:
            self._executor().submit(job)

    def _executor(self) -> _Executor:
        try:
            return self._idle.get_nowait()
        except Empty:
            return _Executor(self._idle, self._stopped)

    def _run_sync(self, handler: Handler, warm: bool, msg: dict[str, Any], run: _Running) -> None:
        started = time.perf_counter()
        token = _current.set(msg["execution_id"])
        try:
            output = handler.plain_output(handler.call(run.ctx, msg["input"]))
        except ExecutionError as exc:
            self._finish(msg["execution_id"], error=exc)
        except MemoryError:
            self._out_of_memory(msg["execution_id"])
        except BaseException as exc:
            self._finish(msg["execution_id"], error=_handler_error(exc))
        else:
            self._finish(msg["execution_id"], output=output, started=started, warm=warm)
        finally:
            _current.reset(token)

    async def _run_async(
        self,
        handler: Handler,
        warm: bool,
        msg: dict[str, Any],
        run: _Running,
        channel: WorkerChannel | None = None,
    ) -> None:
        trio = self._trio._trio  # type: ignore[union-attr]
        token = self._trio.token  # type: ignore[union-attr]
        started = time.perf_counter()
        _current.set(msg["execution_id"])
        timeout = msg.get("timeout")
        with trio.CancelScope() as scope:
            if timeout:
                scope.deadline = trio.current_time() + timeout
            cancel_ctx = run.cancel

            def cancel() -> None:  # called from the reader thread
                cancel_ctx()
                token.run_sync_soon(scope.cancel)

            run.cancel = cancel
            if channel is not None:
                channel.cancel = cancel
            if run.ctx.cancelled:  # the Cancel came before this task started
                scope.cancel()
            try:
                argument = msg["input"] if channel is None else channel
                output = handler.plain_output(await handler.call(run.ctx, argument))
            except ExecutionError as exc:
                self._finish(msg["execution_id"], error=exc)
                return
            except MemoryError:
                self._out_of_memory(msg["execution_id"])
                return
            except BaseException as exc:
                if _is_cancellation(exc, trio.Cancelled):
                    raise  # the scope's: a timeout or the host's Cancel, reported below
                # SystemExit, KeyboardInterrupt, GeneratorExit...: the handler's, like any
                # other exception; they must not end the loop other handlers run on.
                self._finish(msg["execution_id"], error=_handler_error(exc))
                return
            finally:
                if channel is not None:
                    channel.end()
                    self._channels.pop(channel.connection_id, None)
        if not scope.cancelled_caught:
            self._finish(msg["execution_id"], output=output, started=started, warm=warm)
        elif run.ctx.cancelled:
            self._finish(msg["execution_id"], error=AbortedError("cancelled by the host"))
        else:
            self._finish(
                msg["execution_id"],
                error=ExecutionTimeoutError(
                    f"execution exceeded its {timeout:g} s timeout and was stopped",
                    details={"timeout_s": timeout},
                ),
            )

    def _out_of_memory(self, execution_id: str) -> None:
        """A handler hit the memory limit: report it, then exit, since this process's
        state can no longer be trusted (the pool replaces the worker)."""
        error = WorkerCrashedError(
            "the worker ran out of memory (its address-space limit was reached) and exited",
            details={"reason": "memory_limit", "exit_code": _OOM_EXIT, "pid": os.getpid()},
        )
        try:
            self._finish(execution_id, error=error)
        finally:
            self._exit(_OOM_EXIT)

    def _finish(
        self,
        execution_id: str,
        *,
        output: Any = None,
        error: ExecutionError | None = None,
        started: float = 0.0,
        warm: bool = False,
    ) -> None:
        self._stdout.finish(execution_id)
        self._stderr.finish(execution_id)
        running = self._running.pop(execution_id, None)
        if not self._running and not self._in_thread and has_children():
            # What the handler started and left running ends with its execution, before
            # the caller hears of the outcome (with several in flight: once none is).
            kill_leftovers()
        if error is None:
            used = running is not None and running.ctx.workspace_used
            fields = {
                "execution_id": execution_id,
                "output": output,
                "duration_s": time.perf_counter() - started,
                "metadata": {
                    "warm": warm,
                    "pid": self._pid,
                    # The host removes the workspace only when it was made (see WorkerPool).
                    "workspace_id": execution_id if used else None,
                },
            }
            try:
                self.send("result", fields, big="output")
                return
            except BaseException as exc:  # msgpack's errors, or what a hostile value raised
                error = _InvalidRequest(
                    f"the handler's output is not serializable (plain data only): "
                    f"{type(exc).__name__}: {safe_text(exc)}"
                )
        # Bounded plain data, whatever the error holds: sending it cannot fail.
        self.send("error", {"execution_id": execution_id, "error": plain_error(error)})

    def _await_on_loop(self, awaitable: Any) -> Any:
        """Run an awaitable on the trio loop and wait for it (from an executor thread)."""
        loop = self._loop()

        async def wait() -> Any:
            return await awaitable

        return loop._trio.from_thread.run(wait, trio_token=loop.token)

    def _loop(self) -> _TrioLoop:
        with self._loop_lock:
            if self._trio is None:
                self._trio = _TrioLoop()
            return self._trio

    def _warmup(self, msg: dict[str, Any]) -> None:
        fields = {"plugin_id": msg["plugin_id"], "handler_id": msg["handler_id"]}
        try:
            handler, _ = self._handler(msg["entry"], msg.get("root"))
            pending = handler.warmup()
            if hasattr(pending, "__await__"):
                self._await_on_loop(pending)
        except BaseException as exc:  # a warm-up hook is plugin code: anything goes
            error = exc if isinstance(exc, ExecutionError) else _handler_error(exc)
            self.send("warmed", {**fields, "ok": False, "error": plain_error(error)})
        else:
            self.send("warmed", {**fields, "ok": True, "error": None})


def _is_cancellation(exc: BaseException, cancelled: type[BaseException]) -> bool:
    """``exc`` is trio's ``Cancelled``, or a group of nothing else (a handler's nursery)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(cancelled)[1] is None
    return isinstance(exc, cancelled)


def _wait_writable(fd: int) -> None:
    import select

    select.select((), (fd,), ())


def _workspace_provider(path: str) -> Callable[[], Path]:
    def provide() -> Path:
        from pathlib import Path

        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        return Path(path)

    return provide
