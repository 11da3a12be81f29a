"""ctx.events and the host's EventBus."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel

from plugin_execution import PermissionDeniedError, Permissions
from plugin_execution.platform import EventBus, Platform

from .conftest import Harness


async def test_publish_and_subscribe_between_plugins_and_host(
    harness: Harness, platform: Platform
) -> None:
    events = harness.ctx(Permissions(platform=("events:orders.*",))).events
    with platform.events.subscribe("orders.new") as host_sub:
        sub = await events.subscribe("orders.new")
        assert await events.publish("orders.new", {"id": 1}) == 2
        assert (await sub.receive(timeout=5))["data"] == {"id": 1}
        assert (await host_sub.receive())["data"] == {"id": 1}
        platform.events.publish("orders.new", "from the host")
        assert (await sub.receive())["topic"] == "orders.new"
        assert await sub.receive(timeout=0.01) is None
        await sub.close()
        assert await sub.receive(timeout=0.01) is None


async def test_bare_events_grants_the_plugins_own_topics(harness: Harness) -> None:
    events = harness.ctx(Permissions(platform=("events",))).events
    assert await events.publish("tests.p/done") == 0
    with pytest.raises(PermissionDeniedError) as info:
        await events.publish("orders.new")
    assert info.value.details == {
        "permission": "platform.events:orders.new",
        "resource": "topic orders.new",
    }


async def test_subscriptions_end_with_the_session(harness: Harness, platform: Platform) -> None:
    session = harness.session(Permissions(platform=("events:t",)))
    await session.acall("events", "subscribe", ["t"], {})
    assert platform.events.subscribers("t") == 1
    session.close()
    assert platform.events.subscribers("t") == 0


async def test_a_slow_subscriber_drops_instead_of_blocking() -> None:
    bus = EventBus(buffer=2)
    with bus.subscribe("t") as sub:
        assert [bus.publish("t", i) for i in range(4)] == [1, 1, 0, 0]
        assert sub.dropped == 2
        assert [(await sub.receive())["data"] for _ in range(2)] == [0, 1]


async def test_host_iteration_ends_when_closed() -> None:
    bus = EventBus()
    got = []
    sub = bus.subscribe("t")
    async with trio.open_nursery() as nursery:

        async def consume() -> None:
            async for event in sub:
                got.append(event["data"])

        nursery.start_soon(consume)
        await trio.lowlevel.checkpoint()
        bus.publish("t", 1)
        await trio.lowlevel.checkpoint()
        sub.close()
    assert got == [1]
