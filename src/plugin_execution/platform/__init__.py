"""Platform services for handlers: files, environment, cache, storage, events, HTTP,
commands and other plugins, each reached through ``ctx`` and checked against the handler's
permissions on the host. See docs/permissions.md."""

from __future__ import annotations

from .cache import CacheBackend as CacheBackend
from .cache import MemoryCache as MemoryCache
from .events import EventBus as EventBus
from .events import TopicSubscription as TopicSubscription
from .platform import Platform as Platform
from .session import PlatformSession as PlatformSession
from .storage import FileStorage as FileStorage
from .storage import StorageBackend as StorageBackend

__all__ = [
    "CacheBackend",
    "EventBus",
    "FileStorage",
    "MemoryCache",
    "Platform",
    "PlatformSession",
    "StorageBackend",
    "TopicSubscription",
]
