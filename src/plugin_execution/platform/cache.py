"""``ctx.cache``: a key/value cache with TTL, namespaced per plugin.

The service checks the grant and the arguments; a :class:`CacheBackend` stores bytes. The
default, :class:`MemoryCache`, lives in the host's memory, bounded in bytes per plugin and in
all; a host plugs in its own (Redis, memcached...) by passing ``Platform(cache=...)``, which
then bounds what it stores itself.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import InvalidRequestError
from . import _args

if TYPE_CHECKING:
    from .session import PlatformSession

__all__ = ["CacheBackend", "CacheService", "MemoryCache"]


class CacheBackend(Protocol):
    """Where cached values live: opaque bytes under ``(namespace, key)``."""

    async def get(self, namespace: str, key: str) -> bytes | None: ...

    async def set(self, namespace: str, key: str, value: bytes, ttl: float | None) -> None: ...

    async def delete(self, namespace: str, key: str) -> bool: ...


_MiB = 1024 * 1024


class MemoryCache:
    """An in-memory LRU cache with per-entry TTL, bounded in entries and in bytes.

    - ``max_entries`` (default 10,000) entries in all;
    - ``max_bytes`` (default 256 MiB) in all, and ``max_owner_bytes`` (default 64 MiB) per
      owner: the plugin whose call stored the entry (``ctx.cache`` passes it), so one plugin
      filling the cache evicts its own entries, not other plugins'. An entry's size is its
      value's bytes plus its key's and namespace's characters.

    Past a bound, the least recently used entries go (the owner's own first); a value larger
    than the owner's or the whole bound is refused (``ValueError``). Expired entries are
    dropped when read. So the host holds at most ``max_bytes`` for the cache, whatever the
    plugins store. Not a checkpoint: every method completes at once.
    """

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 256 * _MiB,
        max_owner_bytes: int = 64 * _MiB,
        clock: Any = time.monotonic,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or max_owner_bytes < 1:
            raise ValueError("max_entries, max_bytes and max_owner_bytes must be >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_owner_bytes = min(max_owner_bytes, max_bytes)
        self._clock = clock
        # (namespace, key) -> (expires, value, owner, size), least recently used first
        self._entries: OrderedDict[tuple[str, str], tuple[float, bytes, str | None, int]] = (
            OrderedDict()
        )
        # owner -> its keys, least recently used first (a plugin's own eviction order)
        self._owned: dict[str | None, OrderedDict[tuple[str, str], None]] = {}
        self._owner_bytes: dict[str | None, int] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """The bytes the entries held now count for (values, keys, namespaces)."""
        return self._bytes

    def owner_bytes(self, owner: str | None) -> int:
        """What the entries stored by ``owner`` count for now."""
        return self._owner_bytes.get(owner, 0)

    async def get(self, namespace: str, key: str) -> bytes | None:
        where = (namespace, key)
        entry = self._entries.get(where)
        if entry is None:
            return None
        expires, value, owner, _ = entry
        if expires <= self._clock():
            self._drop(where)
            return None
        self._entries.move_to_end(where)
        self._owned[owner].move_to_end(where)
        return value

    async def set(
        self,
        namespace: str,
        key: str,
        value: bytes,
        ttl: float | None,
        *,
        owner: str | None = None,
    ) -> None:
        """Store ``value``; evict least recently used entries past a bound. Raises
        ``ValueError`` for a value larger than ``owner``'s bound or the whole cache's."""
        where = (namespace, key)
        size = len(value) + len(namespace) + len(key)
        limit = self.max_bytes if owner is None else self.max_owner_bytes
        if size > limit:
            raise ValueError(
                f"a cache entry of {size} bytes is over the cache's limit of {limit} bytes"
                + ("" if owner is None else " per plugin")
            )
        self._drop(where)
        expires = float("inf") if ttl is None else self._clock() + ttl
        self._entries[where] = (expires, value, owner, size)
        self._owned.setdefault(owner, OrderedDict())[where] = None
        self._owner_bytes[owner] = self._owner_bytes.get(owner, 0) + size
        self._bytes += size
        if owner is not None:
            owned = self._owned[owner]
            while self._owner_bytes[owner] > self.max_owner_bytes:
                self._drop(next(iter(owned)))
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    async def delete(self, namespace: str, key: str) -> bool:
        return self._drop((namespace, key))

    def _drop(self, where: tuple[str, str]) -> bool:
        entry = self._entries.pop(where, None)
        if entry is None:
            return False
        owner, size = entry[2], entry[3]
        owned = self._owned[owner]
        del owned[where]
        self._bytes -= size
        self._owner_bytes[owner] -= size
        if not owned:
            del self._owned[owner], self._owner_bytes[owner]
        return True


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
        name = _args.text(key, "cache key")
        packed = _args.pack(value, "a cached value")
        if not isinstance(self.backend, MemoryCache):  # a host's own store bounds itself
            await self.backend.set(ns, name, packed, seconds)
            return
        try:
            await self.backend.set(ns, name, packed, seconds, owner=session.plugin_id)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None

    async def delete(self, session: PlatformSession, key: Any, namespace: Any = None) -> bool:
        ns = self._namespace(session, namespace)
        return await self.backend.delete(ns, _args.text(key, "cache key"))
