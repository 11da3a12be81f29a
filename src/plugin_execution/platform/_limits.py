"""HostThreads: the threads the host runs blocking work in for plugins, bounded per plugin
and in total, apart from trio's shared default thread limiter.

A plugin that gets the host's threads stuck (a slow disk, or anything a check missed) then
uses up its own slots only: other plugins, and whatever else of the host's uses trio's
default limiter, keep theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, cast

import trio

if TYPE_CHECKING:
    from .session import PlatformSession

__all__ = ["HostThreads"]

T = TypeVar("T")


class _PluginSlots:
    """One plugin's limiter and how many calls hold or wait for it (dropped at zero)."""

    __slots__ = ("limiter", "users")

    def __init__(self, size: int) -> None:
        self.limiter = trio.CapacityLimiter(size)
        self.users = 0


class _Both:
    """A limiter-like pair for ``trio.to_thread.run_sync``: a plugin's slot and one of the
    total. trio releases it when the thread really ends, also after an abandoned call, so a
    stuck thread keeps counting against both bounds."""

    def __init__(self, owner: HostThreads, plugin_id: str, slots: _PluginSlots) -> None:
        self._owner = owner
        self._plugin_id = plugin_id
        self._slots = slots

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self._slots.limiter.acquire_on_behalf_of(borrower)
        try:
            await self._owner.total.acquire_on_behalf_of(borrower)
        except BaseException:
            self._slots.limiter.release_on_behalf_of(borrower)
            raise

    def release_on_behalf_of(self, borrower: object) -> None:
        self._owner.total.release_on_behalf_of(borrower)
        self._slots.limiter.release_on_behalf_of(borrower)
        self._owner._drop_if_idle(self._plugin_id, self._slots)


class HostThreads:
    """At most ``per_plugin`` threads per plugin and ``total`` in all (defaults 4 and 16)."""

    def __init__(self, per_plugin: int = 4, total: int = 16) -> None:
        if not 1 <= per_plugin <= total:
            raise ValueError("HostThreads needs 1 <= per_plugin <= total")
        self.per_plugin = per_plugin
        self.total = trio.CapacityLimiter(total)
        self._plugins: dict[str, _PluginSlots] = {}

    def in_use(self, plugin_id: str) -> int:
        """Threads ``plugin_id`` holds now (abandoned ones included)."""
        slots = self._plugins.get(plugin_id)
        return 0 if slots is None else int(slots.limiter.borrowed_tokens)

    def _drop_if_idle(self, plugin_id: str, slots: _PluginSlots) -> None:
        idle = slots.users == 0 and slots.limiter.borrowed_tokens == 0
        if idle and self._plugins.get(plugin_id) is slots:
            del self._plugins[plugin_id]

    async def run_sync(
        self, session: PlatformSession, what: str, fn: Callable[..., T], *args: object
    ) -> T:
        """``fn(*args)`` in a thread, under ``session``'s plugin's bound and its execution's
        deadline. Past the deadline (waiting for a slot or running) raises
        :class:`ExecutionTimeoutError` naming ``what``; the thread is then abandoned, still
        holding its slots until it returns. Cancellation abandons it the same way."""
        plugin_id = session.plugin_id
        slots = self._plugins.get(plugin_id)
        if slots is None:
            slots = self._plugins[plugin_id] = _PluginSlots(self.per_plugin)
        slots.users += 1
        limiter = cast(trio.CapacityLimiter, _Both(self, plugin_id, slots))  # duck-typed: trio
        try:
            with trio.move_on_at(session.deadline) as scope:
                return await trio.to_thread.run_sync(
                    fn, *args, limiter=limiter, abandon_on_cancel=True
                )
        finally:
            slots.users -= 1
            self._drop_if_idle(plugin_id, slots)
        assert scope.cancelled_caught
        raise session.past_deadline(what)
