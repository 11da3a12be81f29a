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

from typing import TYPE_CHECKING

import trio

from .._groups import unwrap_single
from ..errors import ExecutionError, WorkerCrashedError
from ..protocol import ChannelClose, ChannelCredit, ChannelData, ChannelOpen
from .channel import ChannelClosed

if TYPE_CHECKING:
    from ..backends.base import Job
    from ..process import WorkerProcess
    from ..types import ExecutionResult
    from .channel import Channel

__all__ = ["DEFAULT_WINDOW", "ChannelBridge", "run_session"]

DEFAULT_WINDOW = 64


class ChannelBridge:
    """The host's side of one bridged channel. :func:`run_session` drives it."""

    def __init__(self, proc: WorkerProcess, channel: Channel, channel_id: str, window: int):
        self._proc = proc
        self._channel = channel
        self.channel_id = channel_id
        self.window = window
        self._ack_every = max(1, window // 2)
        self._credit = window  # ChannelData the worker will still take
        self._credit_wake = trio.Event()
        # The worker never has more than ``window`` messages in flight, plus its close.
        self._inbox, self._outbox = trio.open_memory_channel[str | bytes | ChannelClose](window + 1)
        self.in_scope = trio.CancelScope()

    def on_message(self, msg: ChannelData | ChannelCredit | ChannelClose) -> None:
        """A channel message from the worker (called by the worker's reader, never waits)."""
        if isinstance(msg, ChannelCredit):
            self._credit += msg.messages
            self._credit_wake.set()
            return
        item = msg.data if isinstance(msg, ChannelData) else msg
        try:
            self._inbox.send_nowait(item)
        except trio.WouldBlock:
            self._proc.kill(
                WorkerCrashedError(
                    f"worker {self._proc.worker_id} broke the channel flow control: it sent "
                    f"more than {self.window} messages without credit"
                )
            )
        except trio.ClosedResourceError:
            pass  # the session is over; late messages are dropped

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
                    await proc._send(ChannelData(channel_id=self.channel_id, data=message))
                except ExecutionError:
                    return  # the worker is gone: the execution reports it

    async def pump_out(self) -> None:
        """Worker -> client; credit goes back once a batch reached the socket."""
        proc, channel = self._proc, self._channel
        consumed = 0
        async for item in self._outbox:
            if isinstance(item, ChannelClose):
                await channel.close(item.code, item.reason)
                continue
            try:
                await channel.send(item)
            except ChannelClosed:
                pass  # closed meanwhile: the worker's channel raises on its side
            consumed += 1
            if consumed >= self._ack_every:
                try:
                    await proc._send(ChannelCredit(channel_id=self.channel_id, messages=consumed))
                except ExecutionError:
                    return
                consumed = 0

    def finish(self) -> None:
        """The execution ended: stop reading the client, let ``pump_out`` deliver what the
        worker sent before its result, then end."""
        self.in_scope.cancel()
        self._inbox.close()


async def run_session(
    proc: WorkerProcess,
    job: Job,
    *,
    backend: str,
    workspace: str | None = None,
    cancel_grace: float = 1.0,
) -> ExecutionResult:
    """Run ``job``'s session handler on ``proc``, bridging ``job.channel`` to it.

    Returns or raises like :meth:`WorkerProcess.execute`. Messages the worker sent before
    its handler ended are delivered first (also when the handler failed). Cancelling the call
    stops the execution (``Cancel``, then the worker is killed after ``cancel_grace``).
    """
    channel = job.channel
    assert channel is not None
    window = getattr(channel, "flow_window", DEFAULT_WINDOW)
    bridge = ChannelBridge(proc, channel, channel.connection_id, window)
    proc.channels[bridge.channel_id] = bridge
    try:
        await proc._send(
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
