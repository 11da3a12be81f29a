"""Deadlines: many timeouts watched by one timer task.

A trio cancel scope per wait costs ~5 us of CPU, a large share of a pool execution's cost on
the host, paid on every call although almost none time out. Here each wait adds an entry to
a heap instead (well under a microsecond), and one task sleeps until the earliest deadline,
then hands each expired entry that still matters to a callback. The waiter itself waits on
whatever it waits on (an event, a socket); the callback is what wakes or stops it.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

__all__ = ["Deadlines"]

K = TypeVar("K")


class Deadlines(Generic[K]):
    """Deadlines of keys, and the task that expires them: run :meth:`run` in a nursery.

    ``expire(key)`` is called (in the timer task; it must not block) once ``key``'s deadline
    has passed, if ``live(key)`` still says it matters; entries of keys that stopped
    mattering are simply dropped. The heap is compacted as it grows, so it holds about the
    live keys, not every key ever added.
    """

    def __init__(self, expire: Callable[[K], None], live: Callable[[K], bool]) -> None:
        self._expire = expire
        self._live = live
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()  # keys themselves need not be comparable
        self._compacted = 0  # heap size after the last compaction
        self._timer: trio.CancelScope | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, deadline: float, key: K) -> None:
        """Expire ``key`` at ``deadline`` (trio clock); ``math.inf`` means never."""
        if deadline == math.inf:
            return
        heap = self._heap
        if len(heap) > 2 * self._compacted + 32:
            heap[:] = [entry for entry in heap if self._live(entry[2])]
            heapq.heapify(heap)
            self._compacted = len(heap)
        heapq.heappush(heap, (deadline, next(self._order), key))
        timer = self._timer
        if timer is not None and deadline < timer.deadline:
            timer.deadline = deadline  # wake the timer earlier

    def add_all(self, entries: list[tuple[float, K]]) -> None:
        """:meth:`add` each ``(deadline, key)`` of ``entries``, at the cost of about one."""
        heap = self._heap
        if len(heap) + len(entries) > 2 * self._compacted + 32:
            heap[:] = [entry for entry in heap if self._live(entry[2])]
            heapq.heapify(heap)
            self._compacted = len(heap)
        order = self._order
        earliest = math.inf
        for deadline, key in entries:
            if deadline < earliest:
                earliest = deadline
            if deadline != math.inf:
                heapq.heappush(heap, (deadline, next(order), key))
        timer = self._timer
        if timer is not None and earliest < timer.deadline:
            timer.deadline = earliest  # wake the timer earlier

    async def run(self) -> None:
        """The timer task: expire what is due, sleep until the next deadline, forever."""
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                key = heapq.heappop(heap)[2]
                if self._live(key):
                    self._expire(key)
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as self._timer:
                await trio.sleep_forever()
