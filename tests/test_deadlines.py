"""Deadlines: many timeouts watched by one timer task."""

from __future__ import annotations

import math

import trio
import trio.testing

from plugin_execution._deadlines import Deadlines


async def test_add_all_expires_each_entry_at_its_deadline_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    expired: list[tuple[str, float]] = []
    dead = {"gone"}
    deadlines: Deadlines[str] = Deadlines(
        lambda key: expired.append((key, trio.current_time())), lambda key: key not in dead
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deadlines.run)
        start = trio.current_time()
        deadlines.add(start + 10, "late")
        await trio.testing.wait_all_tasks_blocked()  # the timer sleeps until the late one
        deadlines.add_all(
            [(start + 3, "b"), (start + 1, "a"), (start + 2, "gone"), (math.inf, "never")]
        )
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    # The timer woke for the earlier ones; the dead one and the endless one never expire.
    assert [(key, at - start) for key, at in expired] == [("a", 1), ("b", 3), ("late", 10)]


async def test_add_all_compacts_the_dead_entries_away() -> None:
    live: set[int] = set()
    deadlines: Deadlines[int] = Deadlines(lambda key: None, lambda key: key in live)
    for start in range(0, 1600, 16):
        live = set(range(start, start + 16))  # only the last batch still matters
        deadlines.add_all([(1000.0 + key, key) for key in range(start, start + 16)])
    assert len(deadlines) <= 2 * 16 + 32 + 16
