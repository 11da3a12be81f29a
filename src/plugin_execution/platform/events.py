"""``ctx.events``: publish/subscribe on topics, in the host's memory.

:class:`EventBus` is usable by the host application itself (``platform.events``), so plugins
and the host talk over the same topics. Delivery is best effort: a subscriber whose buffer is
full misses the event (counted in its ``dropped``), so a slow subscriber never slows a
publisher.

Memory: a published event is packed once (msgpack) and that one immutable payload is shared
by every subscriber's queue; each receive unpacks a copy of its own. What the queues hold is
bounded in bytes per subscription, per plugin and in all (see :class:`EventBus`); past a bound
the event is dropped for that subscriber, never copied or queued.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio

from ..errors import InvalidRequestError
from . import _args

if TYPE_CHECKING:
    from .session import PlatformSession

__all__ = ["EventBus", "EventsService", "TopicSubscription"]

_MAX_SUBSCRIPTIONS = 64
_MiB = 1024 * 1024


class _Payload:
    """One published event's packed data, shared by the queues that hold it; counted in
    the bus's total while any queue does."""

    __slots__ = ("data", "holders", "size", "stamp")

    def __init__(self, data: bytes, stamp: float) -> None:
        self.data = data
        self.size = len(data)
        self.stamp = stamp
        self.holders = 0


class TopicSubscription:
    """Events published on one topic, from the moment of subscribing.

    ``async for event in subscription`` yields ``{"topic", "data", "timestamp"}`` dicts
    until :meth:`close`. Use it as a context manager (``with bus.subscribe(t) as sub``) to
    unsubscribe on the way out.
    """

    def __init__(self, bus: EventBus, topic: str, buffer: int, owner: str | None) -> None:
        self.topic = topic
        self.owner = owner
        self.dropped = 0
        self._bus = bus
        self._buffer = buffer
        self._queue: deque[_Payload] = deque()
        self._bytes = 0
        self._closed = False
        self._waiting = trio.lowlevel.ParkingLot()

    @property
    def queued_bytes(self) -> int:
        """The bytes of the events queued for this subscriber, unread."""
        return self._bytes

    def _offer(self, payload: _Payload) -> bool:
        if self._closed or not self._bus._admit(self, payload):
            self.dropped += not self._closed
            return False
        self._queue.append(payload)
        self._bytes += payload.size
        self._bus._hold(self, payload)
        self._waiting.unpark()
        return True

    def _fits(self, payload: _Payload) -> bool:
        return (
            len(self._queue) < self._buffer
            and self._bytes + payload.size <= self._bus.subscriber_bytes
        )

    def _take(self) -> _Payload:
        payload = self._queue.popleft()
        if not self._closed:  # (closing gave the bus back what was queued)
            self._bytes -= payload.size
            self._bus._release(self, payload)
        return payload

    async def receive(self) -> dict[str, Any]:
        """The next event; waits for one. Raises ``trio.EndOfChannel`` once closed.
        A checkpoint."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._queue:
            if self._closed:
                raise trio.EndOfChannel
            await self._waiting.park()
        payload = self._take()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return {"topic": self.topic, "data": _args.unpack(payload.data), "timestamp": payload.stamp}

    def close(self) -> None:
        """Unsubscribe. Idempotent. Events already queued can still be received, then
        ``receive`` raises ``EndOfChannel`` (one waiting now too); they no longer count
        toward the bus's bounds: their memory goes with this object."""
        if self._closed:
            return
        self._bus._remove(self)
        for payload in self._queue:
            self._bus._release(self, payload)
        self._bytes = 0
        self._closed = True
        self._waiting.unpark_all()

    def __enter__(self) -> TopicSubscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            try:
                yield await self.receive()
            except trio.EndOfChannel:
                return


class EventBus:
    """Topics -> subscribers, with bounded queues.

    - ``buffer`` (default 256): events a subscriber may have unread;
    - ``subscriber_bytes`` (default 8 MiB): bytes of events a subscriber may have unread,
      and the largest event that can be published (a bigger one is refused);
    - ``owner_bytes`` (default 64 MiB): bytes unread by all the subscriptions of one plugin
      (each subscription counts every event it holds, shared or not);
    - ``max_bytes`` (default 256 MiB): bytes of the distinct events held for anyone.

    An event that would pass a bound is dropped for that subscriber (counted in its
    ``dropped``). Host subscriptions (``owner`` None) are bound by the first, second and last.
    """

    def __init__(
        self,
        *,
        buffer: int = 256,
        subscriber_bytes: int = 8 * _MiB,
        owner_bytes: int = 64 * _MiB,
        max_bytes: int = 256 * _MiB,
    ) -> None:
        if min(buffer, subscriber_bytes, owner_bytes, max_bytes) < 1:
            raise ValueError("buffer, subscriber_bytes, owner_bytes and max_bytes must be >= 1")
        self.buffer = buffer
        self.subscriber_bytes = subscriber_bytes
        self.owner_bytes = owner_bytes
        self.max_bytes = max_bytes
        self._topics: dict[str, set[TopicSubscription]] = {}
        self._held = 0  # bytes of the distinct payloads some queue holds
        self._by_owner: dict[str, int] = {}

    @property
    def held_bytes(self) -> int:
        """The bytes of the distinct events queued for subscribers now."""
        return self._held

    def publish(self, topic: str, data: Any = None) -> int:
        """Deliver ``data`` to every current subscriber of ``topic``; return how many got
        it. Never blocks. ``data`` must be plain data, packed no larger than
        ``subscriber_bytes`` (else :class:`InvalidRequestError`)."""
        subscribers = self._topics.get(topic)
        if not subscribers:
            return 0
        packed = _args.pack(data, "event data")
        if len(packed) > self.subscriber_bytes:
            raise InvalidRequestError(
                f"event data of {len(packed)} bytes is over the event bus's limit of "
                f"{self.subscriber_bytes} bytes per event"
            )
        payload = _Payload(packed, time.time())
        return sum(subscription._offer(payload) for subscription in list(subscribers))

    def subscribe(
        self, topic: str, *, buffer: int | None = None, owner: str | None = None
    ) -> TopicSubscription:
        """A new subscription to ``topic``. ``owner``: the plugin it is for (None: the host),
        whose subscriptions share ``owner_bytes``."""
        subscription = TopicSubscription(
            self, topic, self.buffer if buffer is None else buffer, owner
        )
        self._topics.setdefault(topic, set()).add(subscription)
        return subscription

    def subscribers(self, topic: str) -> int:
        return len(self._topics.get(topic, ()))

    def _admit(self, subscription: TopicSubscription, payload: _Payload) -> bool:
        if not subscription._fits(payload):
            return False
        owner = subscription.owner
        if owner is not None and self._by_owner.get(owner, 0) + payload.size > self.owner_bytes:
            return False
        return payload.holders > 0 or self._held + payload.size <= self.max_bytes

    def _hold(self, subscription: TopicSubscription, payload: _Payload) -> None:
        if not payload.holders:
            self._held += payload.size
        payload.holders += 1
        owner = subscription.owner
        if owner is not None:
            self._by_owner[owner] = self._by_owner.get(owner, 0) + payload.size

    def _release(self, subscription: TopicSubscription, payload: _Payload) -> None:
        payload.holders -= 1
        if not payload.holders:
            self._held -= payload.size
        owner = subscription.owner
        if owner is not None:
            left = self._by_owner[owner] - payload.size
            if left:
                self._by_owner[owner] = left
            else:
                del self._by_owner[owner]

    def _remove(self, subscription: TopicSubscription) -> None:
        subscribers = self._topics.get(subscription.topic)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._topics[subscription.topic]


class EventsService:
    """Host side of ``ctx.events``: grant ``platform = ["events:TOPIC-PATTERN"]``; the bare
    ``"events"`` grants the plugin's own topics, ``"<plugin id>/..."``."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self._ids = itertools.count(1)

    def _topic(self, session: PlatformSession, topic: Any) -> str:
        name = _args.text(topic, "topic", limit=256)
        if not session.grants.service("events", name, session.plugin_id):
            session.deny(f"platform.events:{name}", f"topic {name}")
        return name

    async def publish(self, session: PlatformSession, topic: Any, data: Any = None) -> int:
        return self.bus.publish(self._topic(session, topic), data)

    async def subscribe(self, session: PlatformSession, topic: Any) -> int:
        name = self._topic(session, topic)
        if len(session.subscriptions) >= _MAX_SUBSCRIPTIONS:
            raise session.refuse(f"an execution may hold {_MAX_SUBSCRIPTIONS} subscriptions")
        subscription_id = next(self._ids)
        session.subscriptions[subscription_id] = self.bus.subscribe(name, owner=session.plugin_id)
        return subscription_id

    async def receive(
        self, session: PlatformSession, subscription_id: Any, timeout: Any = None
    ) -> dict[str, Any] | None:
        """The next event, or None when ``timeout`` passes or the subscription is closed."""
        subscription = session.subscriptions.get(subscription_id)
        if subscription is None:
            return None
        seconds = _args.optional_seconds(timeout, "timeout")
        with trio.move_on_after(seconds if seconds is not None else float("inf")):
            try:
                return await subscription.receive()
            except trio.EndOfChannel:
                return None
        return None

    async def unsubscribe(self, session: PlatformSession, subscription_id: Any) -> None:
        subscription = session.subscriptions.pop(subscription_id, None)
        if subscription is not None:
            subscription.close()
