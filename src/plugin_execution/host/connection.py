"""WorkerConnection: the host's end of one worker's socket.

Framing (the sans-I/O :class:`~plugin_execution.protocol.Connection`), non-blocking writes of
whole frames, and reading without a reader task: a caller waiting for an answer reads the
socket itself and dispatches what comes (:meth:`WorkerConnection.wait_for`), polling for it
briefly before parking when an answer is microseconds away, and handing the socket to the
next waiter when it leaves. This is the host's hot path: every round trip goes through
:meth:`WorkerConnection.write_now` and :meth:`WorkerConnection.read_until`, so both stay free
of extra awaits, tasks and cancel scopes.

What a message means is not decided here: each one goes to ``dispatch`` (the worker's
:class:`~plugin_execution.host.calls.Calls`), and a connection that ends goes to ``lose``
(the worker handle, which reaps the worker and says why it died).
"""

from __future__ import annotations

import math
import os
import select
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from ..protocol import Connection, ProtocolError
from ..worker._wire import unsent

if TYPE_CHECKING:
    from ..errors import ExecutionError
    from .handle import ChannelEndpoint

__all__ = ["Reply", "WorkerConnection"]

# Bytes per os.read: 64 KiB stays under glibc's mmap threshold (128 KiB); a bigger buffer is
# mmap'ed and unmapped on every call, ~9 us each, more than the rest of a small read. A frame
# bigger than this is read straight into a buffer of its own (see Connection.big_view).
_READ_SIZE = 65536
_SPIN_BACKOFF = 16
# What a reader takes in without a trip through the scheduler: a worker that keeps its
# socket full (written faster than the host decodes) would otherwise keep the reader in its
# loop, and the whole host (deadlines, other workers, channels) waiting, for as long as it
# likes. 1024 messages (tiny ones: about a millisecond of decoding) or 16 MiB (big ones: a
# few milliseconds of copying); a round trip takes far less.
_READ_BEFORE_YIELD = 16 << 20
_MESSAGES_BEFORE_YIELD = 1024
_YIELD_EVERY = 0.001  # s: at least this often, an answer got by polling yields to the run


class Reply:
    """Something a caller waits for: a result, a pong, a warm-up, the handshake.

    ``done`` once the answer (``value`` or ``error``) is in; ``wake`` is set then, and also to
    hand a parked waiter the socket when the task reading it leaves. ``expired``: an
    execution's deadline passed first (see ``Calls.expire``).
    """

    __slots__ = ("done", "error", "expired", "sink", "value", "wake")

    def __init__(self, sink: Any = None) -> None:
        self.done = False
        self.expired = False
        # Made by whoever parks on it (see parked): most answers come to a task that is
        # reading, so most replies never need one.
        self.wake: trio.Event | None = None
        self.sink = sink
        self.value: Any = None
        self.error: ExecutionError | None = None

    def finish(self, value: Any = None, error: ExecutionError | None = None) -> None:
        if not self.done:
            self.done = True
            self.value = value
            self.error = error
            if self.wake is not None:
                self.wake.set()

    def parked(self) -> trio.Event:
        """The event to park on until the answer comes, or the socket is handed over."""
        wake = self.wake
        if wake is None:
            wake = self.wake = trio.Event()
        return wake


class WorkerConnection:
    """The socket of one worker: writes, reads, polling. Made by the worker handle.

    ``lost`` is the handle's: once set, readers stop and writers raise ``crash_error()``.
    ``channels``: the channel sessions bridged to the worker (the handle's; while there are
    some, a parked reader can be handed its answer, see :meth:`read_for_reader`).
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        lost: trio.Event,
        crash_error: Callable[[], ExecutionError],
        lose: Callable[[str], Awaitable[None]],
        channels: dict[str, ChannelEndpoint],
        spin_ok: bool,
    ) -> None:
        self.stream = stream
        self.fd = stream.socket.fileno()
        self.fd_closed = False  # set before the stream closes (see serve_worker)
        self.protocol = Connection(role="host")
        self.lost = lost
        self.crash_error = crash_error
        self.lose = lose
        self.channels = channels
        #: Where each message read goes (set by the handle: ``Calls.dispatch``).
        self.dispatch: Callable[[object], None] = lambda msg: None
        self._send_lock = trio.Semaphore(1)  # whole frames only; see write_now
        self._waiting: set[Reply] = set()  # callers in wait_for
        self.reading = False  # one of them is reading the socket
        self._reader_reply: Reply | None = None  # what the reading one waits for
        self._parked: trio.CancelScope | None = None  # its wait, when cancellable (_park)
        self._spin_backoff = 0  # polls to skip after one that found nothing (see _poll)
        self._yielded_at = 0.0  # when a reader that polled last yielded (see read_until)
        #: Polling for the worker's answer needs a CPU for the worker meanwhile, and a worker
        #: of its own process (a thread worker needs the GIL the polling thread holds).
        self.spin_ok = spin_ok and len(os.sched_getaffinity(0)) >= 2
        self._spin_peers: select.poll | None = None  # see spin_with
        # The last two channels that sent the worker a message, and when (see channel_sent).
        self._channel_sends: list[tuple[float, ChannelEndpoint | None]] = [(-math.inf, None)] * 2

    def wake_reader(self) -> None:
        """Wake the reader parked on the socket (the worker was declared lost; its socket
        may stay open if something it started still holds it, so no EOF would come)."""
        if self.reading:
            trio.lowlevel.notify_closing(self.fd)

    async def wait_for(self, reply: Reply, *, sent: bool = False, spin: float = 0.0) -> None:
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
                if self.reading:
                    await reply.parked().wait()
                    if not reply.done:
                        reply.wake = None  # woken to take over the socket
                    sent = False
                else:
                    await self.read_until(reply, wait_first=sent, spin=spin)
        finally:
            self._waiting.discard(reply)

    async def read_until(
        self, reply: Reply | None, *, wait_first: bool = False, spin: float = 0.0
    ) -> None:
        """Read and dispatch until ``reply`` is done (``None``: until the connection ends).

        Also ends when the worker is declared lost meanwhile: :meth:`wake_reader` wakes a
        reader parked on the socket (a dead worker's socket may stay open if something it
        started still holds it, so no EOF would come).
        """
        self.reading = True
        self._reader_reply = reply
        reason = ""
        fd = self.fd
        conn = self.protocol
        until = 0.0  # when spinning ends (see _poll)
        spun = False
        unyielded = 0  # bytes read since the last trip through the scheduler
        dispatched = 0  # messages handled since then
        try:
            while (reply is None or not reply.done) and not self.lost.is_set():
                if self.fd_closed:
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
                        unyielded = dispatched = 0
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
                            unyielded += count
                            data = b"" if not count else None
                    except BlockingIOError:
                        await self._park(fd)
                        unyielded = dispatched = 0
                        continue
                if data is not None:
                    conn.receive_data(data)
                    unyielded += len(data)
                while (msg := conn.next_message()) is not None:
                    self.dispatch(msg)
                    dispatched += 1
                if data == b"":
                    reason = "the worker closed its connection"
                    break
                if unyielded >= _READ_BEFORE_YIELD or dispatched >= _MESSAGES_BEFORE_YIELD:
                    unyielded = dispatched = 0
                    await trio.lowlevel.checkpoint()
        except trio.ClosedResourceError:
            pass  # wake_reader woke us: the worker is gone
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
        except OSError as exc:
            reason = f"connection lost: {exc}"
        finally:
            self.reading = False
            self._reader_reply = None
            for waiter in self._waiting:  # pass the socket on, never back to ourselves
                if waiter is not reply and not waiter.done:
                    waiter.parked().set()
                    break
        if reason:
            await self.lose(reason)
        elif spun:
            # Polling got the answer without a trip through the scheduler. Make one now and
            # then (each costs ~15 us here), so a caller calling in a loop never keeps the
            # rest of the run waiting for more than about _YIELD_EVERY.
            now = time.perf_counter()
            if now - self._yielded_at > _YIELD_EVERY:
                self._yielded_at = now
                await trio.lowlevel.cancel_shielded_checkpoint()

    def channel_sent(self, bridge: ChannelEndpoint, now: float, window: float) -> bool:
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
        if parked is None or self.fd_closed or not self.spin_ok:
            return  # nobody parked (whoever reads next gets the data), or no polling here
        data = self._poll(time.perf_counter() + seconds)
        if isinstance(data, bool):
            return
        if not data:
            parked.cancel()  # EOF: the reader reads it again, and reports the loss
            return
        try:
            self.protocol.receive_data(data)
            while (msg := self.protocol.next_message()) is not None:
                self.dispatch(msg)
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
        if self.spin_ok and not self.fd_closed and self._spin_peers is None:
            peers.register(self.fd, select.POLLIN)
            self._spin_peers = peers

    def spin_alone(self) -> None:
        """Leave the peers of :meth:`spin_with` (before the socket closes: the poll object
        must never hold an fd number that may be another file's)."""
        peers, self._spin_peers = self._spin_peers, None
        if peers is not None:
            peers.unregister(self.fd)

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
        if self.fd_closed:
            return False
        if trio.lowlevel.current_statistics().tasks_runnable:
            return False
        fd = self.fd
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

    async def send(self, msg: Any) -> None:
        """Send one frame. Whole frames only: the lock keeps concurrent senders apart."""
        await self.send_frame(self.protocol.send(msg))

    async def send_frame(self, data: bytes) -> None:
        """Send one whole frame: at once when the kernel takes it (see :meth:`write_now`),
        else under the send lock."""
        unsent = self.write_now(data)
        if unsent is not None:
            await self.send_rest(*unsent)

    def write_now(self, data: bytes | list[bytes]) -> tuple[list[memoryview], bool] | None:
        """Fast path: when nobody else is sending, write straight to the non-blocking socket;
        a frame the kernel takes whole costs no lock and no trip through the scheduler (a
        round trip on the pool has ~4 of them, so this is a large share of its latency).
        ``data``: the frame, or its pieces (``os.writev``; see ``pack_parts``).

        Returns None when all went out; else what is left and whether the send lock was
        taken for it (a frame begun here), for :meth:`send_rest`. The lock is a semaphore,
        not a Lock, because the task that finishes a frame may not be the one that began it
        (see ``Calls.submit``).
        """
        if self.fd_closed:  # the fd number may be another file's by now: never touch it
            raise self.crash_error()
        lock = self._send_lock
        if lock.value == 0:  # another frame is going out: queue for the lock
            sent = 0
        else:
            try:
                if isinstance(data, bytes):
                    sent = os.write(self.fd, data)
                    if sent == len(data):
                        return None  # the usual case
                else:
                    sent = os.writev(self.fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # broken: send_rest reports it the usual way
        rest = unsent([data] if isinstance(data, bytes) else data, sent)
        if not rest:
            return None
        if lock.value == 0:
            return rest, False
        lock.acquire_nowait()  # free: nothing awaited since value said so
        return rest, True

    async def send_rest(self, rest: list[memoryview], locked: bool) -> None:
        """Send what :meth:`write_now` left, under the send lock (``locked``: taken)."""
        lock = self._send_lock
        if not locked:
            await lock.acquire()
        try:
            for part in rest:
                await self.stream.send_all(part)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self.lost.wait()
            raise self.crash_error() from None
        finally:
            lock.release()
