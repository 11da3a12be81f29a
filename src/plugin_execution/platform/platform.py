"""Platform: the services the host offers handlers through ``ctx``, and the one place that
dispatches calls to them.

Every call, from an in-process handler or proxied from a worker process, arrives at
:meth:`Platform.dispatch` with the caller's :class:`PlatformSession`, so checks and results
are the same on every backend.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Self

import trio

from ..errors import ExecutionError, InvalidRequestError
from ._limits import HostThreads
from .cache import CacheBackend, CacheService, MemoryCache
from .env import EnvService
from .events import EventBus, EventsService
from .fetch import FetchService
from .fs import FsService
from .invoke import InvokeService
from .session import PlatformSession
from .shell import ShellService
from .storage import FileStorage, StorageBackend, StorageService

if TYPE_CHECKING:
    import httpx

__all__ = ["Platform"]

_MiB = 1024 * 1024


class Platform:
    """The host's platform services. Construct one, pass it to
    ``create_execution_backend(platform=...)`` (backends share it freely), or let each
    backend make a default one.

    - ``cache``: a :class:`CacheBackend` (default: a :class:`MemoryCache`).
    - ``storage_root``: the directory of ``ctx.storage`` blobs (one subdirectory per
      namespace); default: a temporary directory that lasts as long as the platform is in
      use. ``storage``: any :class:`StorageBackend` instead.
    - ``events``: an :class:`EventBus` (default: a new one); the host publishes and
      subscribes on ``platform.events`` too.
    - ``environ``: where ``ctx.env`` and ``ctx.shell`` read variables (default os.environ).
    - ``http_transport``: an ``httpx.AsyncBaseTransport`` for ``ctx.fetch`` (tests, proxies).
    - ``max_transfer_bytes``: cap on one file read/write, blob, HTTP body or command
      output (default 32 MiB, under the worker protocol's 64 MiB frame limit).
    - ``max_invoke_depth``: how deep ``ctx.invoke`` chains may go (default 8).
    - ``max_host_threads_per_plugin`` / ``max_host_threads``: threads the host's file work
      for plugins (``ctx.fs``) may use at once, per plugin and in all (default 4 and 16);
      apart from trio's shared default thread limiter.
    - ``shell_sandbox``: the kernel layers ``ctx.shell`` commands run under, on every backend
      (default ``True``: every layer this machine has; see docs/sandbox.md).

    A backend enters the platform while it runs (``async with platform``, re-entrant); when
    the last user leaves, the HTTP client's connections and a temporary storage directory
    are released.
    """

    def __init__(
        self,
        *,
        cache: CacheBackend | None = None,
        storage_root: str | os.PathLike[str] | None = None,
        storage: StorageBackend | None = None,
        events: EventBus | None = None,
        environ: Mapping[str, str] | None = None,
        http_transport: httpx.AsyncBaseTransport | None = None,
        max_transfer_bytes: int = 32 * _MiB,
        max_invoke_depth: int = 8,
        max_host_threads_per_plugin: int = 4,
        max_host_threads: int = 16,
        shell_sandbox: bool | Iterable[str] = True,
    ) -> None:
        if storage is not None and storage_root is not None:
            raise ValueError("pass storage_root or storage, not both")
        self.cache: CacheBackend = cache if cache is not None else MemoryCache()
        self.storage: StorageBackend = storage if storage is not None else FileStorage(storage_root)
        self.events = events if events is not None else EventBus()
        self.max_invoke_depth = max_invoke_depth
        self._fetch = FetchService(max_bytes=max_transfer_bytes, transport=http_transport)
        self._users = 0
        services: dict[str, object] = {
            "fs": FsService(
                max_transfer_bytes, HostThreads(max_host_threads_per_plugin, max_host_threads)
            ),
            "env": EnvService(environ),
            "cache": CacheService(self.cache),
            "storage": StorageService(self.storage, max_transfer_bytes),
            "events": EventsService(self.events),
            "fetch": self._fetch,
            "shell": ShellService(
                environ=environ, max_bytes=max_transfer_bytes, sandbox=shell_sandbox
            ),
            "invoke": InvokeService(max_invoke_depth),
        }
        self._methods: dict[tuple[str, str], Callable[..., Awaitable[Any]]] = {
            (name, method): getattr(service, method)
            for name, service in services.items()
            for method in _METHODS[name]
        }

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._users += 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._users -= 1
        if self._users == 0:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client and remove a temporary storage root. Usable again after."""
        await self._fetch.aclose()
        close = getattr(self.storage, "close", None)
        if callable(close):
            close()

    # -- calls ----------------------------------------------------------------------------

    def session(self, **kwargs: Any) -> PlatformSession:
        """A :class:`PlatformSession` on this platform (see its constructor)."""
        return PlatformSession(self, **kwargs)

    async def dispatch(
        self,
        session: PlatformSession,
        service: str,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run ``service.method(*args, **kwargs)`` for ``session``.

        Raises what the service raises: :class:`PermissionDeniedError` and other
        :class:`ExecutionError` subclasses, ``OSError`` (a missing file, a refused
        connection) and ``ExecutionTimeoutError``. Bad arguments are
        :class:`InvalidRequestError`; anything else is an ``ExecutionError`` (UNKNOWN_ERROR).
        Cancellation propagates.
        """
        fn = self._methods.get((service, method))
        if fn is None:
            raise InvalidRequestError(f"there is no platform method {service}.{method}")
        try:
            return await fn(session, *args, **kwargs)
        except (ExecutionError, OSError, trio.Cancelled):
            raise
        except TypeError as exc:
            raise InvalidRequestError(f"bad arguments for {service}.{method}: {exc}") from None
        except Exception as exc:
            raise ExecutionError(
                f"platform service {service}.{method} failed: {type(exc).__name__}: {exc}",
                execution_id=session.execution_id,
                plugin_id=session.plugin_id,
                handler_id=session.handler_id,
            ) from exc


_METHODS: dict[str, tuple[str, ...]] = {
    "fs": ("read", "write", "list", "exists", "remove"),
    "env": ("get",),
    "cache": ("get", "set", "delete"),
    "storage": ("put", "get", "exists", "delete", "list"),
    "events": ("publish", "subscribe", "receive", "unsubscribe"),
    "fetch": ("request",),
    "shell": ("run",),
    "invoke": ("call",),
}
