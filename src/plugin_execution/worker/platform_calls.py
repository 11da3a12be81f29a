"""Platform calls from a worker: ``ctx.fs.read(...)`` and friends as ``pcall`` frames to the
host, answered by ``preply`` frames.

The host checks every call against the permissions it resolved itself; the worker only
carries it. A sync handler (on an executor thread) blocks on a lock until the reader thread
hands it the reply; an async handler (on the worker's trio loop) awaits an event that the
reader sets through the loop's token. A ``cancel`` for the execution fails its calls still
waiting, so a sync handler blocked in one is released at once.

Standard library only at import time: worker children load this module at start-up.
"""

from __future__ import annotations

import itertools
import sys
from _thread import allocate_lock

from ..errors import AbortedError, InvalidRequestError
from ..platform_client import error_from_wire
from ._wire import WireError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["PlatformCalls", "WorkerCaller"]


class _Call:
    """One call in flight; ``wake`` is called (from the reader thread) when it is answered."""

    __slots__ = ("error", "execution_id", "value", "wake")

    def __init__(self, execution_id: str, wake: Callable[[], None]) -> None:
        self.execution_id = execution_id
        self.wake = wake
        self.value: Any = None
        self.error: dict[str, Any] | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise error_from_wire(self.error)
        return self.value


class PlatformCalls:
    """The worker's calls in flight, by call id. ``send(tag, fields)`` writes one frame;
    ``loop()`` gives the worker's trio loop (``threads.TrioLoop``) for async callers;
    ``before_blocking()`` runs before a sync caller blocks for its reply (the worker makes
    sure some other thread reads the socket, where the reply comes)."""

    def __init__(
        self,
        send: Callable[[str, dict[str, Any]], None],
        loop: Callable[[], Any],
        before_blocking: Callable[[], None] = lambda: None,
    ) -> None:
        self._send = send
        self._loop = loop
        self._before_blocking = before_blocking
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}

    def caller(self, execution_id: str) -> WorkerCaller:
        return WorkerCaller(self, execution_id)

    def on_reply(self, msg: dict[str, Any]) -> None:
        """A ``preply`` frame arrived (reader thread)."""
        call = self._calls.pop(msg["call_id"], None)
        if call is not None:
            if msg["ok"]:
                call.value = msg["value"]
            else:
                call.error = msg["error"] or {"code": "UNKNOWN_ERROR", "message": "no error"}
            call.wake()

    def abort(self, execution_id: str) -> None:
        """The execution is being cancelled: fail its waiting calls (reader thread)."""
        for call_id, call in list(self._calls.items()):
            if call.execution_id == execution_id and self._calls.pop(call_id, None) is call:
                call.error = AbortedError("the execution was cancelled").to_dict()
                call.wake()

    def _start(self, call: _Call, service: str, method: str, args: Any, kwargs: Any) -> int:
        call_id = next(self._ids)
        self._calls[call_id] = call
        try:
            self._send(
                "pcall",
                {
                    "call_id": call_id,
                    "execution_id": call.execution_id,
                    "service": service,
                    "method": method,
                    "args": args,
                    "kwargs": kwargs,
                },
            )
        except WireError as exc:
            del self._calls[call_id]
            raise InvalidRequestError(
                f"arguments of {service}.{method} must be plain data: {exc}"
            ) from None
        return call_id

    def call(self, execution_id: str, service: str, method: str, args: Any, kwargs: Any) -> Any:
        """Blocking form, for a sync handler's thread."""
        trio = sys.modules.get("trio")
        if trio is not None and trio.lowlevel.in_trio_run():
            raise RuntimeError(
                f"ctx.{service}.{method} blocks: in an async handler, await it instead"
            )
        lock = allocate_lock()
        lock.acquire()
        call = _Call(execution_id, lock.release)
        self._start(call, service, method, args, kwargs)
        self._before_blocking()
        lock.acquire()
        return call.outcome()

    async def acall(
        self, execution_id: str, service: str, method: str, args: Any, kwargs: Any
    ) -> Any:
        """Awaitable form, for an async handler on the worker's trio loop."""
        loop = self._loop()
        event = loop.trio.Event()
        token = loop.token
        call = _Call(execution_id, lambda: token.run_sync_soon(event.set))
        call_id = self._start(call, service, method, args, kwargs)
        try:
            await event.wait()
        finally:
            self._calls.pop(call_id, None)  # cancelled: a late reply finds nobody
        return call.outcome()


class WorkerCaller:
    """The ``platform`` of one execution's context in a worker (see ``PlatformCaller``)."""

    __slots__ = ("_calls", "_execution_id")

    def __init__(self, calls: PlatformCalls, execution_id: str) -> None:
        self._calls = calls
        self._execution_id = execution_id

    def call(self, service: str, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return self._calls.call(self._execution_id, service, method, args, kwargs)

    async def acall(
        self, service: str, method: str, args: list[Any], kwargs: dict[str, Any]
    ) -> Any:
        return await self._calls.acall(self._execution_id, service, method, args, kwargs)
