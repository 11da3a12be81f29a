"""The handler's side of the platform services: ``ctx.fs``, ``ctx.env``, ``ctx.cache``,
``ctx.storage``, ``ctx.events``, ``ctx.fetch``, ``ctx.shell`` and ``ctx.invoke``.

These are thin proxies. Each method becomes one call ``(service, method, args, kwargs)`` to
a :class:`PlatformCaller` supplied by whoever built the context: in-process, the host's
session itself; in a worker process, a round trip over the worker protocol. The checks all
happen on the host, where the plugin cannot reach them.

The calling convention follows the handler's shape. In an ``async def`` handler each method
returns an awaitable (``data = await ctx.fs.read("in.csv")``); in a plain ``def`` handler
(run off the event loop) the same method blocks and returns the value
(``data = ctx.fs.read("in.csv")``).

Standard library only at import time: worker children load this module at start-up.
"""

from __future__ import annotations

import builtins

from .errors import ExecutionError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, Protocol

    class PlatformCaller(Protocol):
        """Carries platform calls to the host."""

        async def acall(
            self, service: str, method: str, args: list[Any], kwargs: dict[str, Any]
        ) -> Any: ...

        def call(
            self, service: str, method: str, args: list[Any], kwargs: dict[str, Any]
        ) -> Any: ...


__all__ = [
    "CacheClient",
    "EnvClient",
    "EventsClient",
    "FetchClient",
    "FetchResponse",
    "FsClient",
    "InvokeClient",
    "ShellClient",
    "ShellResult",
    "StorageClient",
    "Subscription",
    "error_from_wire",
    "error_to_wire",
]


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """What a platform call raised, as plain data for a ``PlatformReply``.

    An :class:`ExecutionError` keeps its own wire form; an ``OSError`` (a missing file, a
    refused connection) keeps its type, errno and filename, so the handler can catch
    ``FileNotFoundError`` on every backend.
    """
    if isinstance(exc, ExecutionError):
        return exc.to_dict()
    if isinstance(exc, OSError):
        return {
            "code": "OS_ERROR",
            "message": str(exc),
            "details": {
                "type": type(exc).__name__,
                "errno": exc.errno,
                "strerror": exc.strerror,
                "filename": exc.filename if isinstance(exc.filename, str) else None,
            },
        }
    return ExecutionError(f"platform call failed: {type(exc).__name__}: {exc}").to_dict()


def error_from_wire(error: dict[str, Any]) -> BaseException:
    """The exception :func:`error_to_wire` described, ready to raise in the handler."""
    if error.get("code") == "OS_ERROR":
        details = error.get("details") or {}
        kind = getattr(builtins, str(details.get("type")), OSError)
        if not (isinstance(kind, type) and issubclass(kind, OSError)):
            kind = OSError
        if details.get("errno") is None:
            return kind(str(error.get("message", "")))
        return kind(details["errno"], details.get("strerror"), details.get("filename"))
    return ExecutionError.from_dict(error)


async def _after(awaitable: Any, then: Callable[[Any], Any]) -> Any:
    return then(await awaitable)


class _Client:
    """One service's proxy; ``blocking`` says which calling convention it speaks."""

    __slots__ = ("_blocking", "_caller")
    _service = ""

    def __init__(self, caller: PlatformCaller, blocking: bool) -> None:
        self._caller = caller
        self._blocking = blocking

    def _call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        if self._blocking:
            return self._caller.call(self._service, name, list(args), kwargs)
        return self._caller.acall(self._service, name, list(args), kwargs)

    def _then(self, then: Callable[[Any], Any], name: str, /, *args: Any, **kwargs: Any) -> Any:
        result = self._call(name, *args, **kwargs)
        return then(result) if self._blocking else _after(result, then)


class FsClient(_Client):
    """``ctx.fs``: files. Relative paths are relative to the workspace; ``..`` and symlinks
    are resolved before the check, so they never reach outside what is granted. Raises
    ``PermissionDeniedError`` (``fs.read`` / ``fs.write``), or the ``OSError`` the
    filesystem gave (``FileNotFoundError``...)."""

    __slots__ = ()
    _service = "fs"

    def read(self, path: str) -> Any:
        """The file's bytes."""
        return self._call("read", path)

    def read_text(self, path: str, encoding: str = "utf-8") -> Any:
        return self._then(lambda data: data.decode(encoding), "read", path)

    def write(self, path: str, data: bytes | str, *, append: bool = False) -> Any:
        """Write (or append) ``data`` (``str`` as UTF-8); missing parent directories are
        created. Returns the number of bytes written."""
        return self._call("write", path, data, append=append)

    def list(self, path: str = ".") -> Any:
        """The names in a directory, sorted."""
        return self._call("list", path)

    def exists(self, path: str) -> Any:
        return self._call("exists", path)

    def remove(self, path: str) -> Any:
        """Remove a file or an empty directory."""
        return self._call("remove", path)


class EnvClient(_Client):
    """``ctx.env``: the host's environment variables that ``env.read`` grants."""

    __slots__ = ()
    _service = "env"

    def get(self, name: str, default: Any = None) -> Any:
        """The variable's value, or ``default`` when unset. Not granted: denied, set or not."""
        return self._call("get", name, default)


class CacheClient(_Client):
    """``ctx.cache``: plain-data values under string keys, in the plugin's namespace (or a
    shared one it was granted), with an optional time to live in seconds."""

    __slots__ = ()
    _service = "cache"

    def get(self, key: str, default: Any = None, *, namespace: str | None = None) -> Any:
        return self._call("get", key, default, namespace=namespace)

    def set(
        self, key: str, value: Any, *, ttl: float | None = None, namespace: str | None = None
    ) -> Any:
        return self._call("set", key, value, ttl=ttl, namespace=namespace)

    def delete(self, key: str, *, namespace: str | None = None) -> Any:
        """Remove ``key``; returns whether it was there."""
        return self._call("delete", key, namespace=namespace)


class StorageClient(_Client):
    """``ctx.storage``: blobs (bytes) under keys like ``"reports/q1.pdf"``, kept by the host
    in the plugin's namespace (or a shared one it was granted)."""

    __slots__ = ()
    _service = "storage"

    def put(self, key: str, data: bytes | str, *, namespace: str | None = None) -> Any:
        return self._call("put", key, data, namespace=namespace)

    def get(self, key: str, default: Any = None, *, namespace: str | None = None) -> Any:
        """The blob's bytes, or ``default`` when there is none."""
        return self._call("get", key, default, namespace=namespace)

    def exists(self, key: str, *, namespace: str | None = None) -> Any:
        return self._call("exists", key, namespace=namespace)

    def delete(self, key: str, *, namespace: str | None = None) -> Any:
        return self._call("delete", key, namespace=namespace)

    def list(self, prefix: str = "", *, namespace: str | None = None) -> Any:
        """The keys starting with ``prefix``, sorted."""
        return self._call("list", prefix, namespace=namespace)


class EventsClient(_Client):
    """``ctx.events``: publish and subscribe on granted topics."""

    __slots__ = ()
    _service = "events"

    def publish(self, topic: str, data: Any = None) -> Any:
        """Send ``data`` to the topic's current subscribers; returns how many got it."""
        return self._call("publish", topic, data)

    def subscribe(self, topic: str) -> Any:
        """A :class:`Subscription` to ``topic``, from now on. It ends with the execution."""
        return self._then(
            lambda sub_id: Subscription(self._caller, self._blocking, sub_id, topic),
            "subscribe",
            topic,
        )


class Subscription(_Client):
    """Events on one topic: ``{"topic", "data", "timestamp"}`` dicts.

    Async handlers: ``await sub.receive(timeout=...)`` or ``async for event in sub``; sync
    handlers: ``sub.receive(...)`` or ``for event in sub``. ``receive`` returns ``None`` when
    the timeout passes; iteration ends when the subscription is closed (``sub.close()``).
    """

    __slots__ = ("id", "topic")
    _service = "events"

    def __init__(self, caller: PlatformCaller, blocking: bool, sub_id: int, topic: str) -> None:
        super().__init__(caller, blocking)
        self.id = sub_id
        self.topic = topic

    def receive(self, timeout: float | None = None) -> Any:
        return self._call("receive", self.id, timeout)

    def close(self) -> Any:
        return self._call("unsubscribe", self.id)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while (event := self._caller.call("events", "receive", [self.id, None], {})) is not None:
            yield event

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        event = await self._caller.acall("events", "receive", [self.id, None], {})
        if event is None:
            raise StopAsyncIteration
        return event  # type: ignore[no-any-return]


class FetchResponse:
    """What ``ctx.fetch`` returns: ``status``, ``headers`` (lower-case names; repeated
    headers joined with ``", "``), ``content`` (bytes), ``url``; ``text``, ``json()``."""

    __slots__ = ("content", "headers", "status", "url")

    def __init__(self, reply: dict[str, Any]) -> None:
        self.status: int = reply["status"]
        self.url: str = reply["url"]
        self.content: bytes = reply["body"]
        headers: dict[str, str] = {}
        for name, value in reply["headers"]:
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.headers = headers

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 400

    @property
    def text(self) -> str:
        charset = "utf-8"
        for part in self.headers.get("content-type", "").split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                charset = value.strip('"')
        return self.content.decode(charset, "replace")

    def json(self) -> Any:
        import json

        return json.loads(self.content)

    def __repr__(self) -> str:
        return f"<FetchResponse {self.status} {self.url}>"


class FetchClient(_Client):
    """``ctx.fetch(url, ...)``: an HTTP request to a URL that ``network.fetch`` grants.

    Returns a :class:`FetchResponse` whatever the status (a 404 is a response, not an
    error). Raises ``PermissionDeniedError`` (the URL, or a redirect, is not granted),
    ``ConnectionError`` (the server could not be reached) or ``ExecutionTimeoutError``.
    ``json=`` sends a JSON body; ``body=`` bytes or str as they are.
    """

    __slots__ = ()
    _service = "fetch"

    def __call__(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | str | None = None,
        json: Any = None,
        timeout: float | None = None,
    ) -> Any:
        if json is not None:
            import json as _json

            body = _json.dumps(json).encode()
            headers = {"content-type": "application/json", **(headers or {})}
        return self._then(
            FetchResponse,
            "request",
            url,
            method=method,
            headers=headers,
            body=body,
            timeout=timeout,
        )

    def get(self, url: str, **kwargs: Any) -> Any:
        return self(url, method="GET", **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self(url, method="POST", **kwargs)


class ShellResult:
    """A finished command: ``returncode`` (``-N`` when killed by signal N), ``stdout`` and
    ``stderr`` (bytes), and ``truncated``: the output passed the platform's limit, so the
    command was killed (``returncode`` -9) and only what came first is here."""

    __slots__ = ("returncode", "stderr", "stdout", "truncated")

    def __init__(self, reply: dict[str, Any]) -> None:
        self.returncode: int = reply["returncode"]
        self.stdout: bytes = reply["stdout"]
        self.stderr: bytes = reply["stderr"]
        self.truncated: bool = bool(reply.get("truncated", False))

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def __repr__(self) -> str:
        return f"<ShellResult returncode={self.returncode}>"


class ShellClient(_Client):
    """``ctx.shell``: run a command that ``shell.allow`` grants."""

    __slots__ = ()
    _service = "shell"

    def run(
        self, argv: list[str], *, timeout: float | None = None, input: bytes | str | None = None
    ) -> Any:
        """Run ``argv`` (a list: never a shell string) in the workspace, inside the plugin's
        own sandbox, and capture its output; returns a :class:`ShellResult` whatever the exit
        status (output past the limit: ``truncated``). Past ``timeout`` (and at the
        execution's deadline) the command is killed: ``ExecutionTimeoutError``."""
        if isinstance(argv, str):
            raise TypeError("argv must be a list of strings, not a shell command line")
        return self._then(ShellResult, "run", list(argv), timeout=timeout, input=input)


class InvokeClient(_Client):
    """``ctx.invoke(plugin_id, handler_id, input)``: another plugin's handler, through the
    same backend; returns its output or raises its ``ExecutionError``."""

    __slots__ = ()
    _service = "invoke"

    def __call__(
        self, plugin_id: str, handler_id: str, input: Any = None, *, timeout: float | None = None
    ) -> Any:
        return self._call("call", plugin_id, handler_id, input, timeout=timeout)
