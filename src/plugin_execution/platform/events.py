"""``ctx.events``: publish/subscribe on topics, over trio memory channels on the host.

:class:`EventBus` is usable by the host application itself (``platform.events``), so plugins
and the host talk over the same topics. Delivery is best effort: a subscriber whose buffer is
full misses the event (counted in its ``dropped``), so a slow subscriber never slows a
publisher.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio

from . import _args

if TYPE_CHECKING:
    from .session import PlatformSession

__all__ = ["EventBus", "EventsService", "TopicSubscription"]

_MAX_SUBSCRIPTIONS = 64


class TopicSubscription:
    """Events published on one topic, from the moment of subscribing.

    ``async for event in subscription`` yields ``{"topic", "data", "timestamp"}`` dicts
    until :meth:`close`. Use it as a context manager (``with bus.subscribe(t) as sub``) to
    unsubscribe on the way out.
    """

    def __init__(self, bus: EventBus, topic: str, buffer: int) -> None:
        self.topic = topic
        self.dropped = 0
        self._bus = bus
        self._send, self._receive = trio.open_memory_channel[dict[str, Any]](buffer)

    def _offer(self, event: dict[str, Any]) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1
        except trio.ClosedResourceError:
            pass

    async def receive(self) -> dict[str, Any]:
        """The next event; waits for one. Raises ``trio.EndOfChannel`` once closed."""
        try:
            return await self._receive.receive()
        except trio.ClosedResourceError:
            raise trio.EndOfChannel from None

    def close(self) -> None:
        """Unsubscribe. Idempotent; a ``receive`` waiting now ends with ``EndOfChannel``."""
        self._bus._remove(self)
        self._send.close()

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
    """Topics -> subscribers. ``buffer``: events a subscriber may have unread."""

    def __init__(self, *, buffer: int = 256) -> None:
        self.buffer = buffer
        self._topics: dict[str, set[TopicSubscription]] = {}

    def publish(self, topic: str, data: Any = None) -> int:
        """Deliver a copy of ``data`` to every current subscriber of ``topic``; return how
        many got it. Never blocks. ``data`` must be plain data."""
        subscribers = self._topics.get(topic)
        if not subscribers:
            return 0
        packed = _args.pack(data, "event data")
        stamp = time.time()
        delivered = 0
        for subscription in list(subscribers):
            before = subscription.dropped
            subscription._offer({"topic": topic, "data": _args.unpack(packed), "timestamp": stamp})
            delivered += subscription.dropped == before
        return delivered

    def subscribe(self, topic: str, *, buffer: int | None = None) -> TopicSubscription:
        subscription = TopicSubscription(self, topic, self.buffer if buffer is None else buffer)
        self._topics.setdefault(topic, set()).add(subscription)
        return subscription

    def subscribers(self, topic: str) -> int:
        return len(self._topics.get(topic, ()))

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
        session.subscriptions[subscription_id] = self.bus.subscribe(name)
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
