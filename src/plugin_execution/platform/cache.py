"""``ctx.cache``: a key/value cache with TTL, namespaced per plugin.

The service checks the grant and the arguments; a :class:`CacheBackend` stores bytes. The
default, :class:`MemoryCache`, lives in the host's memory; a host plugs in its own (Redis,
memcached...) by passing ``Platform(cache=...)``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Protocol

from . import _args

if TYPE_CHECKING:
    from .session import PlatformSession

__all__ = ["CacheBackend", "CacheService", "MemoryCache"]


class CacheBackend(Protocol):
    """Where cached values live: opaque bytes under ``(namespace, key)``."""

    async def get(self, namespace: str, key: str) -> bytes | None: ...

    async def set(self, namespace: str, key: str, value: bytes, ttl: float | None) -> None: ...

    async def delete(self, namespace: str, key: str) -> bool: ...


class MemoryCache:
    """An in-memory LRU cache with per-entry TTL, bounded to ``max_entries`` in all.

    Expired entries are dropped when read, and the least recently used ones when full.
    Not a checkpoint: every method completes at once.
    """

    def __init__(self, *, max_entries: int = 10_000, clock: Any = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, namespace: str, key: str) -> bytes | None:
        entry = self._entries.get((namespace, key))
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._entries[(namespace, key)]
            return None
        self._entries.move_to_end((namespace, key))
        return value

    async def set(self, namespace: str, key: str, value: bytes, ttl: float | None) -> None:
        expires = float("inf") if ttl is None else self._clock() + ttl
        self._entries[(namespace, key)] = (expires, value)
        self._entries.move_to_end((namespace, key))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def delete(self, namespace: str, key: str) -> bool:
        return self._entries.pop((namespace, key), None) is not None


class CacheService:
    """Host side of ``ctx.cache``: grant ``platform = ["cache"]`` (the plugin's namespace)
    or ``"cache:NAME-PATTERN"`` (shared namespaces)."""

    def __init__(self, backend: CacheBackend) -> None:
        self.backend = backend

    def _namespace(self, session: PlatformSession, namespace: Any) -> str:
        ns = _args.namespace(namespace, session.plugin_id)
        if not session.grants.service("cache", ns, session.plugin_id):
            grant = "cache" if ns == session.plugin_id else f"cache:{ns}"
            session.deny(f"platform.{grant}", f"cache namespace {ns}")
        return ns

    async def get(
        self, session: PlatformSession, key: Any, default: Any = None, namespace: Any = None
    ) -> Any:
        ns = self._namespace(session, namespace)
        value = await self.backend.get(ns, _args.text(key, "cache key"))
        return default if value is None else _args.unpack(value)

    async def set(
        self,
        session: PlatformSession,
        key: Any,
        value: Any,
        ttl: Any = None,
        namespace: Any = None,
    ) -> None:
        ns = self._namespace(session, namespace)
        seconds = _args.optional_seconds(ttl, "ttl")
        await self.backend.set(
            ns, _args.text(key, "cache key"), _args.pack(value, "a cached value"), seconds
        )

    async def delete(self, session: PlatformSession, key: Any, namespace: Any = None) -> bool:
        ns = self._namespace(session, namespace)
        return await self.backend.delete(ns, _args.text(key, "cache key"))
