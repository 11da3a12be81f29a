"""Carrying a session-style channel over the worker protocol (process backends).

The handler runs in a worker; the WebSocket stays on the host. For one session the host
sends ``ChannelOpen`` then ``Execute``; while the execution runs, two pumps move messages:

- in: client -> ``channel.receive()`` -> ``ChannelData`` to the worker;
- out: ``ChannelData`` from the worker -> ``channel.send()`` -> client.

Flow control is credit-based, per direction, with a window of ``W`` messages (``ChannelOpen``
names it): a side may have at most ``W`` ``ChannelData`` in flight that the other has not
returned as ``ChannelCredit``, and a receiver returns credit only once its consumer took the
messages (the worker's handler received them; the host wrote them to the socket), in
batches of ``W/2``. So a slow handler stops the host's pump, which stops reading the
WebSocket (trio-websocket then stops reading the TCP socket); a slow client stops the
worker's ``channel.send()``. Memory stays bounded: at most ``W`` messages per direction per
channel, on either side.

Text stays ``str`` and binary stays ``bytes`` (msgpack keeps them apart), and order is kept:
one socket, one pump per direction.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import trio

from .._groups import unwrap_single
from ..errors import ExecutionError, WorkerCrashedError
from ..protocol import ChannelClose, ChannelCredit, ChannelData, ChannelOpen
from .channel import INTERNAL_ERROR, MESSAGE_TOO_BIG, ChannelClosed, sendable_close_code
from .connection import message_size

if TYPE_CHECKING:
    from ..backends.job import Job
    from ..host.handle import WorkerHandle
    from ..types import ExecutionResult
    from .channel import Channel

__all__ = ["DEFAULT_WINDOW", "ChannelBridge", "run_session"]

DEFAULT_WINDOW = 64
_SPIN_S = 300e-6  # how long the pump polls for the worker's answer to a message it sent
_ALONE_S = 5e-3  # ... when no other channel on the worker sent a message for this long


class _TooBig:
    """Stands in ``_out`` for a message from the worker over the channel's size limit, which
    is dropped as it arrives: delivering it ends the connection with 1009."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


async def _refuse_too_big(channel: Channel, size: int) -> None:
    """End ``channel`` with 1009 for a message of ``size`` bytes its handler sent (dropped
    unsent), as the channel itself does for one sent to it in-process."""
    too_big = getattr(channel, "too_big", None)
    if too_big is not None:
        too_big(size)
        await trio.lowlevel.checkpoint()
    else:
        await channel.close(MESSAGE_TOO_BIG, "the handler sent a message over the size limit")


class ChannelBridge:
    """The host's side of one bridged channel. :func:`run_session` drives it.

    What the worker sends waits in ``_out`` (at most ``window`` messages and a close) until
    it is written to the client, in order, by whichever pump holds the delivery turn
    (``_delivering``): ``pump_out`` as a rule, or ``pump_in`` when it read the worker's
    answer itself right after sending a message (see ``_SPIN_S``), which saves a wake-up
    of ``pump_out`` per round trip.
    """

    def __init__(self, proc: WorkerHandle, channel: Channel, channel_id: str, window: int):
        self._proc = proc
        self._channel = channel
        self.channel_id = channel_id
        self.window = window
        self._ack_every = max(1, window // 2)
        self._credit = window  # ChannelData the worker will still take
        self._credit_wake = trio.Event()
        self._out: deque[str | bytes | ChannelClose | _TooBig] = deque()
        #: The largest message the channel sends (its ``max_message_size``), if it has one.
        self._max_size: int | None = getattr(channel, "max_message_size", None)
        self._out_lot = trio.lowlevel.ParkingLot()  # pump_out, waiting for work
        self._delivering = False  # a pump is writing _out to the client
        self._consumed = 0  # messages written since credit last went back
        self._reading_here = False  # pump_in is reading the worker's answer itself
        self._in_delivering = False  # pump_in holds the delivery turn
        self._finished = False  # the execution ended: no more comes from the worker
        self._stop_in = False  # ... and pump_in stops after its delivery
        self.in_scope = trio.CancelScope()

    def on_message(self, msg: ChannelData | ChannelCredit | ChannelClose) -> None:
        """A channel message from the worker (called by the worker's reader, never waits)."""
        if isinstance(msg, ChannelCredit):
            self._credit += msg.messages
            self._credit_wake.set()
            return
        if self._finished:
            return  # the session is over; late messages are dropped
        if len(self._out) > self.window:
            self._proc.kill(
                WorkerCrashedError(
                    f"worker {self._proc.worker_id} broke the channel flow control: it sent "
                    f"more than {self.window} messages without credit"
                )
            )
            return
        item: str | bytes | ChannelClose | _TooBig
        if isinstance(msg, ChannelData):
            item = msg.data
            limit = self._max_size
            if limit is not None and len(item) > limit:
                size = message_size(item, limit)
                if size > limit:
                    item = _TooBig(size)  # never held: the window bounds what is, in bytes
        else:
            item = msg
        self._out.append(item)
        if not self._delivering and not self._reading_here:
            self._out_lot.unpark()

    async def _deliver(self) -> None:
        """Write what waits in ``_out`` to the client, in order; credit goes back to the
        worker once a batch reached the socket. Only the pump holding the turn calls it."""
        proc, channel = self._proc, self._channel
        self._delivering = True
        try:
            while self._out:
                item = self._out.popleft()
                if isinstance(item, ChannelClose):
                    if sendable_close_code(item.code):
                        await channel.close(item.code, item.reason)
                    else:  # the worker's channel refuses it: this worker wrote its own frame
                        reason = f"the handler closed with close code {item.code}, not sendable"
                        await channel.close(INTERNAL_ERROR, reason)
                    continue
                if isinstance(item, _TooBig):
                    await _refuse_too_big(channel, item.size)
                else:
                    try:
                        await channel.send(item)
                    except ChannelClosed:
                        pass  # closed meanwhile: the worker's channel raises on its side
                self._consumed += 1
                if self._consumed >= self._ack_every:
                    messages, self._consumed = self._consumed, 0
                    try:
                        await proc.send(
                            ChannelCredit(channel_id=self.channel_id, messages=messages)
                        )
                    except ExecutionError:
                        return
        finally:
            self._delivering = False
            if self._out or self._finished:
                self._out_lot.unpark()  # came meanwhile, or the end: pump_out takes over

    async def pump_in(self) -> None:
        """Client -> worker, within the worker's credit."""
        proc, channel = self._proc, self._channel
        with self.in_scope:
            while True:
                try:
                    message = await channel.receive()
                except ChannelClosed:
                    return  # closed on the host's side: nothing more comes in
                while self._credit <= 0:
                    self._credit_wake = trio.Event()
                    await self._credit_wake.wait()
                self._credit -= 1
                try:
                    await proc.send_channel_data(self.channel_id, message)
                except ExecutionError:
                    return  # the worker is gone: the execution reports it
                # Alone on the worker, its answer (if any) is usually tens of microseconds
                # away: poll for it rather than sleep, and write it to the client from this
                # task. With other channels busy there, the host has their messages to
                # handle meanwhile: no polling.
                if not proc.channel_sent(self, trio.current_time(), _ALONE_S):
                    continue
                self._reading_here = True
                try:
                    proc.read_for_reader(_SPIN_S)
                finally:
                    self._reading_here = False
                if self._out and not self._delivering:
                    self._in_delivering = True
                    try:
                        await self._deliver()
                    finally:
                        self._in_delivering = False
                    if self._stop_in:
                        return

    async def pump_out(self) -> None:
        """Worker -> client, when pump_in is not delivering; ends once the execution ended
        and everything the worker sent before was delivered."""
        while True:
            if self._out and not self._delivering:
                await self._deliver()
            elif self._finished and not self._out:
                return
            else:
                await self._out_lot.park()

    def finish(self) -> None:
        """The execution ended: stop reading the client, let the pumps deliver what the
        worker sent before its result, then end."""
        self._finished = True
        if self._in_delivering:
            self._stop_in = True  # let pump_in finish delivering, then it stops
        else:
            self.in_scope.cancel()
        self._out_lot.unpark_all()


async def run_session(
    proc: WorkerHandle,
    job: Job,
    *,
    backend: str,
    workspace: str | None = None,
    cancel_grace: float = 1.0,
) -> ExecutionResult:
    """Run ``job``'s session handler on ``proc``, bridging ``job.channel`` to it.

    Returns or raises like :meth:`WorkerHandle.execute`. Messages the worker sent before
    its handler ended are delivered first (also when the handler failed). Cancelling the call
    stops the execution (``Cancel``, then the worker is killed after ``cancel_grace``).
    """
    channel = job.channel
    assert channel is not None
    window = getattr(channel, "flow_window", DEFAULT_WINDOW)
    bridge = ChannelBridge(proc, channel, channel.connection_id, window)
    proc.channels[bridge.channel_id] = bridge
    try:
        await proc.send(
            ChannelOpen(
                channel_id=bridge.channel_id,
                execution_id=job.request.execution_id,
                path=channel.request_path,
                headers=dict(channel.headers),
                window=window,
                principal=job.request.context.get("principal"),
            )
        )
        with unwrap_single():
            async with trio.open_nursery() as pumps:
                pumps.start_soon(bridge.pump_in)
                pumps.start_soon(bridge.pump_out)
                try:
                    return await proc.execute(
                        job, backend=backend, workspace=workspace, cancel_grace=cancel_grace
                    )
                except ExecutionError:
                    raise
                except BaseException:
                    pumps.cancel_scope.cancel()
                    raise
                finally:
                    bridge.finish()
    finally:
        del proc.channels[bridge.channel_id]
