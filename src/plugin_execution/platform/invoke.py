"""``ctx.invoke``: run another plugin's handler through the same backend.

Only plugin ids matched by ``invoke.allow`` may be invoked. An invocation chain may not come
back to a handler already in it (a cycle), nor grow deeper than the platform's
``max_invoke_depth``; both are refused before anything runs. The invoked execution gets the
caller's context descriptor, and at most the caller's remaining time.

Capacity: the caller waits while its invocation runs, so a nested invocation never waits for
capacity its ancestors hold. It takes free capacity when the backend has some at once;
otherwise it runs on its caller's (the subprocess backend's child slot, the pool's worker),
lent to one of the caller's invocations at a time. A chain thus needs one slot, however deep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequestError
from . import _args

if TYPE_CHECKING:
    from .session import PlatformSession

__all__ = ["InvokeService"]


class InvokeService:
    """Host side of ``ctx.invoke``."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth

    async def call(
        self,
        session: PlatformSession,
        plugin_id: Any,
        handler_id: Any,
        input: Any = None,
        timeout: Any = None,
    ) -> Any:
        from ..types import ExecutionRequest

        plugin = _args.text(plugin_id, "plugin id", limit=128)
        handler = _args.text(handler_id, "handler id", limit=128)
        seconds = _args.optional_seconds(timeout, "timeout")
        if not session.grants.invoke(plugin):
            session.deny("invoke.allow", f"{plugin}/{handler}")
        chain = (*session.chain, (session.plugin_id, session.handler_id))
        if (plugin, handler) in chain:
            path = " -> ".join(f"{p}/{h}" for p, h in (*chain, (plugin, handler)))
            raise InvalidRequestError(f"invoke would form a cycle: {path}")
        if len(chain) > self.max_depth:
            raise InvalidRequestError(
                f"invoke chain deeper than {self.max_depth} executions "
                f"({' -> '.join(f'{p}/{h}' for p, h in chain)})"
            )
        backend = session.backend
        if backend is None:
            raise InvalidRequestError("this execution has no backend to invoke through")
        remaining = session.remaining()
        if seconds is None or seconds > remaining:
            seconds = remaining
        if not seconds > 0:
            raise session.refuse("no time left to invoke another handler")
        request = ExecutionRequest(
            plugin_id=plugin,
            handler_id=handler,
            input=input,
            context=dict(session.context),
        )
        result = await backend._invoke(request, timeout=seconds, chain=chain, parent=session.job)
        return result.output
