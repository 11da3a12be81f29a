"""ConnectionRegistry: the live WebSocket connections, by channel path and by id.

Every connection that ``mount_websocket_channels`` accepts is registered here until it
closes. The registry counts and lists them, broadcasts to every connection of a channel,
and closes them one by one or all at once. One registry may serve several mounts; its
``max_connections`` then caps them together.
"""

from __future__ import annotations

import builtins
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .channel import GOING_AWAY, NORMAL_CLOSURE, check_message

if TYPE_CHECKING:
    from .connection import ServerChannel

__all__ = ["ConnectionInfo", "ConnectionRegistry"]


@attrs.frozen
class ConnectionInfo:
    """A snapshot of one live connection."""

    connection_id: str
    path: str  # the channel's route
    request_path: str  # what the client asked for, query string included
    plugin_id: str
    tenant_id: str | None
    principal: Any
    opened_at: float  # time.time()
    metadata: dict[str, Any]


class ConnectionRegistry:
    """Live connections by channel path and id. See the module docstring.

    ``max_connections`` caps the connections of every mount using this registry together
    (further handshakes are rejected with 503); None means no cap.
    """

    def __init__(self, *, max_connections: int | None = None) -> None:
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be >= 1 or None, not {max_connections}")
        self.max_connections = max_connections
        self._by_id: dict[str, ServerChannel] = {}
        self._by_path: dict[str, dict[str, ServerChannel]] = {}
        self._reserved: Counter[str] = Counter()  # admitted, by path: handshaking or live
        self._opened = 0
        self._rejected: Counter[int] = Counter()
        self._closed: Counter[int] = Counter()
        self._closed_by: dict[str, Counter[int]] = {"client": Counter(), "server": Counter()}

    # -- observing --------------------------------------------------------------------------

    def count(self, path: str | None = None) -> int:
        """Live connections: all of them, or those of the channel at ``path``."""
        if path is None:
            return len(self._by_id)
        return len(self._by_path.get(path, ()))

    def list(self, path: str | None = None) -> builtins.list[ConnectionInfo]:
        """Snapshots of the live connections (of the channel at ``path``), oldest first."""
        conns = self._by_id.values() if path is None else self._by_path.get(path, {}).values()
        return [_info(conn) for conn in conns]

    def get(self, connection_id: str) -> ConnectionInfo | None:
        conn = self._by_id.get(connection_id)
        return None if conn is None else _info(conn)

    def stats(self) -> dict[str, Any]:
        """Counters since creation: ``opened``, ``live``, ``rejected`` handshakes by HTTP
        status, ``closed`` connections by close code (1013: disconnected as too slow), and
        ``closed_by``: the same, split by the side that began the close (``client``: its
        close frame, or 1006 when it dropped the connection; ``server``: the host's close,
        1002 / 1007 / 1009 for what the client sent included)."""
        return {
            "opened": self._opened,
            "live": len(self._by_id),
            "rejected": dict(self._rejected),
            "closed": dict(self._closed),
            "closed_by": {side: dict(codes) for side, codes in self._closed_by.items()},
        }

    # -- acting -----------------------------------------------------------------------------

    async def broadcast(
        self, path: str, message: str | bytes, *, exclude: Iterable[str] = ()
    ) -> int:
        """Queue ``message`` for every connection of the channel at ``path`` (but those in
        ``exclude``); returns how many took it.

        Never waits for a client: each connection has a bounded send queue, and one whose
        queue is full is disconnected with 1013 (try again later) instead. A checkpoint.
        """
        check_message(message)
        skip = set(exclude)
        delivered = 0
        for conn in builtins.list(self._by_path.get(path, {}).values()):
            if conn.connection_id not in skip and conn.offer(message):
                delivered += 1
        await trio.lowlevel.checkpoint()
        return delivered

    async def close(self, connection_id: str, code: int = NORMAL_CLOSURE, reason: str = "") -> bool:
        """Close one connection (its handler is cancelled) and wait until it is closed.
        Returns False when no such connection is live."""
        conn = self._by_id.get(connection_id)
        if conn is None:
            await trio.lowlevel.checkpoint()
            return False
        conn.end(code, reason)
        await conn.wait_closed()
        return True

    async def close_all(
        self, code: int = GOING_AWAY, reason: str = "the server is closing connections"
    ) -> int:
        """Close every live connection and wait until they are closed; returns how many."""
        conns = builtins.list(self._by_id.values())
        for conn in conns:
            conn.end(code, reason)
        for conn in conns:
            await conn.wait_closed()
        await trio.lowlevel.checkpoint()
        return len(conns)

    # -- for mount_websocket_channels -------------------------------------------------------

    def reserve(
        self, path: str, per_path_limit: int | None = None, total_limit: int | None = None
    ) -> bool:
        """Admit one more connection to ``path`` unless a limit is reached: ``total_limit``
        or this registry's ``max_connections`` in total, ``per_path_limit`` on ``path``."""
        total = sum(self._reserved.values())
        for cap in (self.max_connections, total_limit):
            if cap is not None and total >= cap:
                return False
        if per_path_limit is not None and self._reserved[path] >= per_path_limit:
            return False
        self._reserved[path] += 1
        return True

    def release(self, path: str) -> None:
        self._reserved[path] -= 1
        if self._reserved[path] <= 0:
            del self._reserved[path]

    def rejected(self, status: int) -> None:
        self._rejected[status] += 1

    def add(self, conn: ServerChannel) -> None:
        self._by_id[conn.connection_id] = conn
        self._by_path.setdefault(conn.path, {})[conn.connection_id] = conn
        self._opened += 1

    def remove(self, conn: ServerChannel) -> None:
        """Forget ``conn`` (idempotent): as soon as it begins closing."""
        if self._by_id.pop(conn.connection_id, None) is None:
            return
        peers = self._by_path.get(conn.path)
        if peers is not None:
            peers.pop(conn.connection_id, None)
            if not peers:
                del self._by_path[conn.path]
        code = int(conn.close_code) if conn.close_code is not None else 1005
        self._closed[code] += 1
        self._closed_by["server" if conn.closed_by == "server" else "client"][code] += 1


def _info(conn: ServerChannel) -> ConnectionInfo:
    return ConnectionInfo(
        connection_id=conn.connection_id,
        path=conn.path,
        request_path=conn.request_path,
        plugin_id=conn.plugin_id,
        tenant_id=conn.tenant_id,
        principal=conn.principal,
        opened_at=conn.opened_at,
        metadata=dict(conn.metadata),
    )
