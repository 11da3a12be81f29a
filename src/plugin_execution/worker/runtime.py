"""The worker runtime: the reading thread of a worker, and what it dispatches where.

A :class:`Worker` serves one host over a stream socket until EOF or ``shutdown``. It is the
child side of the protocol put together:

- this module reads the socket (one reader at a time, leader/followers: see
  :meth:`Worker._lead`) and dispatches each frame: ``execute`` and ``cancel`` to the
  execution runner (``execution.Executions``), ``preply`` to the platform calls in flight
  (``platform_calls``), channel frames to the open channels (``channel``, on the trio
  loop), and answers ``ping`` at once even while handlers run;
- ``outbox`` writes every frame the worker sends, from whichever thread;
- ``threads`` holds the executor threads and the trio loop handlers run on.

Whatever a handler prints is captured per execution and sent as ``log`` events; fd 1 is
pointed at fd 2, so even raw writes never reach the protocol socket.
"""

from __future__ import annotations

import _thread
import os
import select
import sys
import threading
import time
from _queue import SimpleQueue  # the C module: queue.py costs a fresh child ~2 ms

from ._leftovers import kill_leftovers
from ._wire import FIELDS, PROTOCOL_VERSION, FrameDecoder, WireError
from .execution import Executions
from .outbox import FrameWriter
from .platform_calls import PlatformCalls
from .threads import Executor, HandlerThreads

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .channel import WorkerChannel

_CHANNEL_FRAMES = frozenset({"ch_data", "ch_credit", "ch_close"})
_EXECUTE_FIELDS = FIELDS["execute"]
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
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def _read_into(decoder: FrameDecoder, fd: int) -> bool:
    """Read what the host sent into ``decoder`` (a big frame's rest straight into its own
    buffer); False at the end of the stream. OSError as ``os.read`` raises it."""
    big = decoder.big_view()
    if big is not None:
        count = os.readv(fd, (big,))
        decoder.big_filled(count)
        if count:
            return True
    data = os.read(fd, _READ_SIZE)
    if not data:
        return False
    decoder.feed(data)
    return True


class _Stop(Exception):
    """Ends an in-thread worker's serve loop."""


class Worker:
    """Serves one host over the stream socket ``fd`` until EOF or ``Shutdown``.

    Plain ``os.read`` / ``os.write`` on the fd: the ``socket`` module costs a fresh child
    ~6 ms of imports. ``close`` releases the fd when serving ends (default ``os.close``).
    ``in_thread``: a thread of the host process (the pool's ``thread`` kind), not a child;
    it runs no handler on its reading thread and ends by returning, not by exiting.
    ``loop_here``: the reader that dispatches the first request needing the trio loop runs
    the loop itself (see :meth:`_run_loop_here`): a one-shot child's (``bootstrap.prepare``).
    """

    def __init__(
        self,
        fd: int,
        *,
        in_thread: bool = False,
        close: Callable[[], None] | None = None,
        loop_here: bool = False,
    ) -> None:
        self._fd = fd
        self._in_thread = in_thread
        self._loop_here = loop_here and not in_thread
        self._writer = FrameWriter(fd, close if close is not None else lambda: os.close(fd))
        self.send = self._writer.send  # how every part of the worker writes a frame
        self._started = time.monotonic()
        self._threads = HandlerThreads()
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
        self._platform = PlatformCalls(self.send, self._threads.start_loop, self._stop_leading)
        self._channels: dict[str, WorkerChannel] = {}  # by channel id, until the handler ends
        self._channel_of: dict[str, WorkerChannel] = {}  # by execution id, until it starts
        self._channel_batch: list[tuple[str, dict[str, Any]]] = []
        self._executions = Executions(
            self.send,
            self._threads,
            self._platform,
            self._channels,
            self._exit,
            in_thread=in_thread,
            send_message=self._writer.send_message,
        )

    def serve(self) -> None:
        """Serve until the host goes away or says ``Shutdown``.

        In a child process this never returns (the process exits). In a thread (the pool's
        ``thread`` kind) it returns, abandoning handlers still running on executor threads.
        """
        if not self._in_thread:
            os.dup2(2, 1)
            sys.stdout, sys.stderr = self._executions.stdout, self._executions.stderr
        self.send("hello", {"version": PROTOCOL_VERSION, "pid": os.getpid()})
        if self._in_thread:
            try:
                self._lead()
            except _Stop:
                pass
            self._writer.close()
            self._threads.stop()
            return
        # A child process: the main thread is one of the executor threads that take turns
        # at reading (see _lead); the process ends by os._exit, from whichever thread.
        main = Executor(self._threads.idle, self._threads.stopped, start=False)
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
        threads = self._threads
        if threads.loop is None and self._loop_here:
            threads.keep_here = me  # a loop a frame starts is this thread's to run
        try:
            while True:
                for tag, fields in decoder:
                    self._dispatch(tag, fields)
                    if threads.kept is not None:
                        self._run_loop_here()
                        return
                    job = self._inline
                    if job is not None:
                        self._inline = None
                        if not self._watching:  # first handler run here: not at start-up
                            self._watching = True
                            # Not threading.Thread().start(), which waits for the new
                            # thread to run: a thread switch or two before the first
                            # handler may (~1 ms in a fresh child on a busy machine).
                            _thread.start_new_thread(self._watch_inline, ())
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
                    more = _read_into(decoder, fd)
                except OSError:
                    more = False
                if not more:
                    self._exit(0)
        except WireError as exc:
            # Only a host bug gets here; say so on stderr (the host shows its tail in the
            # WorkerCrashedError) rather than dying with a traceback.
            os.write(2, f"plugin_execution worker: bad frame from the host: {exc}\n".encode())
            if not self._in_thread:
                os._exit(_PROTOCOL_EXIT)
            raise _Stop from None

    def _run_loop_here(self) -> None:
        """Run the loop a frame just started (the first: see ``HandlerThreads.keep_here``)
        on this thread, until it stops, and have the loop read the socket from now on (see
        ``_loop_reader``), the frames left in the decoder first: the first async handler
        starts as soon as trio is up, and no thread is started for reading. A new reading
        thread cost the handler 0.4-1.5 ms here (it took the GIL while trio started, on a
        busy 2-vCPU machine). The price: an async handler that blocks the loop delays
        ``Ping`` and ``Cancel`` until it yields (the host kills a child that does not
        answer its ``Cancel`` in time; a host that dies takes its zygote, which kills its
        children). Only in a one-shot child (``loop_here``), whose allocator keeps what it
        frees (``bootstrap._keep_freed_memory``)."""
        threads = self._threads
        loop, threads.kept, threads.keep_here = threads.kept, None, None
        assert loop is not None
        with self._lead_lock:
            self._leader = None
        loop.start_soon(_loop_reader, self, self._decoder, None)
        loop.run_here()

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
        self._threads.executor().submit(self._lead)

    def _watch_inline(self) -> None:
        """Give the socket a reader while a handler runs long on the reading thread."""
        while True:
            time.sleep(_WATCH_EVERY)
            thread = self._inline_thread
            if thread is not None and time.monotonic() - self._inline_since >= _WATCH_S:
                self._stop_leading(thread)

    def _exit(self, code: int) -> None:
        """Stop serving: a child kills what its handlers left and exits with ``code``; a
        thread worker's reader raises ``_Stop`` (``serve`` then returns)."""
        if self._in_thread:
            raise _Stop
        kill_leftovers()  # nothing a handler started outlives its worker
        os._exit(code)

    def _dispatch(self, tag: str, msg: dict[str, Any]) -> None:
        if tag in _CHANNEL_FRAMES:
            self._channel_batch.append((tag, msg))
        elif tag == "execute":
            job = self._executions.start(msg, self._channel_of.pop(msg["execution_id"], None))
            if job is not None:
                self._on_executor(job)
                if self._inline is not None:  # runs on this reading thread: then may linger
                    self._linger = msg["linger"]
        elif tag == "batch":
            members = msg["executes"]
            for member in members:
                if type(member) is not dict or member.keys() != _EXECUTE_FIELDS:
                    raise WireError("'batch' message: a member is not an execute's fields")
            self._on_executor(self._unkept(self._executions.batch(members)))
            if self._inline is not None:  # runs on this reading thread: then may linger
                self._linger = msg["linger"]
        elif tag == "preply":
            self._platform.on_reply(msg)
        elif tag == "cancel":
            self._executions.cancel(msg["execution_id"])
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
                    "in_flight": len(self._executions.running),
                },
            )
        elif tag == "warmup":
            self._on_executor(self._unkept(lambda: self._executions.warmup(msg)))
        elif tag == "shutdown":
            self._exit(0)

    # -- channels -------------------------------------------------------------------------

    def _open_channel(self, msg: dict[str, Any]) -> None:
        from .channel import WorkerChannel

        self._threads.start_loop()  # the channel's handler runs there; its primitives too
        channel = WorkerChannel(self.send, msg)
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
        loop = self._threads.loop
        assert loop is not None  # started when the first channel opened
        handback: SimpleQueue[BaseException | None] = SimpleQueue()
        loop.start_soon(_loop_reader, self, decoder, handback)
        outcome = handback.get()
        if outcome is not None:
            raise outcome

    def _flush_channels(self) -> None:
        """Hand this read's channel frames to the trio loop in one wake-up, in order."""
        batch, self._channel_batch = self._channel_batch, []
        if self._threads.loop is not None:
            self._threads.loop.token.run_sync_soon(self._deliver_channels, batch)

    def _deliver_channels(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        for tag, msg in batch:
            channel = self._channels.get(msg["channel_id"])
            if channel is not None:
                channel.deliver(tag, msg)

    # -- where sync jobs run ----------------------------------------------------------------

    def _unkept(self, job: Callable[[], None]) -> Callable[[], None]:
        """``job``, which may wait for the trio loop it starts (a batch's async member, an
        async warm-up hook): the loop must then run on a thread of its own, even when the
        job runs on the reader that would keep it (see ``_lead``). As it is where no reader
        keeps a loop (a pool worker's every batch)."""
        if self._threads.keep_here is None:
            return job

        def run() -> None:
            self._threads.keep_here = None
            job()

        return run

    def _on_executor(self, job: Callable[[], None]) -> None:
        """Run a sync handler's job off the reading path: on the reader itself when it is a
        plain thread of a child process (see _lead), else on an executor thread."""
        if not self._in_thread and self._leader == threading.get_ident():
            self._inline = job
        else:
            self._threads.executor().submit(job)


async def _loop_reader(
    worker: Worker, decoder: FrameDecoder, handback: SimpleQueue[BaseException | None] | None
) -> None:
    """Read and dispatch frames on the trio loop: while channels are open (``handback``:
    see ``Worker._read_on_loop``), or for good (``handback`` None: the loop a one-shot
    child's reader runs itself, see ``Worker._run_loop_here``), the frames left in the
    decoder first."""
    loop = worker._threads.loop
    assert loop is not None
    trio = loop.trio
    fd = worker._fd
    outcome: BaseException | None = None
    if handback is None:  # the handler's task first (the loop runs early tasks in any order)
        await trio.lowlevel.checkpoint()
    os.set_blocking(fd, False)
    try:
        while True:
            for tag, fields in decoder:
                worker._dispatch(tag, fields)
            if worker._channel_batch:
                batch, worker._channel_batch = worker._channel_batch, []
                worker._deliver_channels(batch)
            if handback is not None and not worker._channels:
                break
            try:
                more = _read_into(decoder, fd)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            except OSError:
                more = False
            if not more:
                worker._exit(0)
    except (_Stop, WireError) as exc:
        if handback is None:  # no thread to hand it to: as _lead does
            os.write(2, f"plugin_execution worker: bad frame from the host: {exc}\n".encode())
            os._exit(_PROTOCOL_EXIT)
        outcome = exc
    finally:
        if handback is not None:
            os.set_blocking(fd, True)
            handback.put(outcome)
