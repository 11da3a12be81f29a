"""``ctx.env``: environment variables of the host, the granted ones only (``env.read``:
names or ``PREFIX*``). Asking for one that is not granted is denied even when it is unset,
so a handler cannot probe which variables exist."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import _args

if TYPE_CHECKING:
    from .session import PlatformSession

__all__ = ["EnvService"]


class EnvService:
    """Host side of ``ctx.env``. ``environ``: where values come from (default: os.environ)."""

    def __init__(self, environ: Mapping[str, str] | None) -> None:
        self.environ = environ

    async def get(self, session: PlatformSession, name: Any, default: Any = None) -> Any:
        name = _args.text(name, "variable name", limit=1024)
        if not session.grants.env(name):
            session.deny("env.read", name)
        environ = os.environ if self.environ is None else self.environ
        return environ.get(name, default)
