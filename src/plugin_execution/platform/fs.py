"""``ctx.fs``: files under the paths a handler was granted.

Every path is resolved first (:func:`~plugin_execution.permissions.resolve_path`: relative
to the workspace, ``..`` and symlinks followed, ``//`` collapsed) and the check is made on
the result. Files are then opened with ``O_NOFOLLOW``, so a symlink swapped in after the check
is not followed at the last step. Readable: the workspace, the plugin's own root, ``fs.read``
and ``fs.write``; writable: the workspace and ``fs.write``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import trio

from ..errors import InvalidRequestError
from ..permissions import PathProblem, resolve_path
from . import _args

if TYPE_CHECKING:
    from .session import PlatformSession

__all__ = ["FsService"]

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def _real_workspace(session: PlatformSession) -> str | None:
    """The workspace as the kernel sees it: resolved paths are compared with it."""
    return os.path.realpath(session.workspace) if session.workspace else None


class FsService:
    """Host side of ``ctx.fs``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def _resolve(self, session: PlatformSession, path: Any, permission: str) -> str:
        if type(path) is not str or not path:
            raise InvalidRequestError(f"a path must be a non-empty string, got {path!r}")
        workspace = _real_workspace(session)
        try:
            resolved = resolve_path(path, workspace or "/nonexistent-workspace")
        except PathProblem as exc:
            session.deny(permission, path, str(exc))
        grants = session.grants
        allowed = (
            grants.fs_write(resolved, workspace)
            if permission == "fs.write"
            else grants.fs_read(resolved, workspace)
        )
        if not allowed:
            shown = path if resolved == path else f"{path} (resolves to {resolved})"
            session.deny(permission, shown)
        return resolved

    def _in_workspace(self, session: PlatformSession, resolved: str) -> None:
        workspace = _real_workspace(session)
        if workspace is not None and (resolved + "/").startswith(workspace + "/"):
            session.ensure_workspace()

    async def read(self, session: PlatformSession, path: Any) -> bytes:
        resolved = self._resolve(session, path, "fs.read")
        limit = self.max_bytes

        def read() -> bytes:
            fd = os.open(resolved, _READ)
            with os.fdopen(fd, "rb") as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                raise InvalidRequestError(
                    f"{path!r} is over the {limit}-byte limit of fs.read; read it in a "
                    "process backend's worker directly, or raise Platform(max_transfer_bytes)"
                )
            return data

        return await trio.to_thread.run_sync(read)

    async def write(
        self, session: PlatformSession, path: Any, data: Any, append: bool = False
    ) -> int:
        resolved = self._resolve(session, path, "fs.write")
        blob = _args.data_bytes(data, "data")
        if len(blob) > self.max_bytes:
            raise InvalidRequestError(f"fs.write takes at most {self.max_bytes} bytes at once")
        self._in_workspace(session, resolved)
        self._make_parents(session, resolved)
        flags = _WRITE | (os.O_APPEND if append else os.O_TRUNC)

        def write() -> int:
            fd = os.open(resolved, flags, 0o644)
            with os.fdopen(fd, "wb") as f:
                return f.write(blob)

        return await trio.to_thread.run_sync(write)

    def _make_parents(self, session: PlatformSession, resolved: str) -> None:
        """Create missing parent directories, each of them checked for ``fs.write``."""
        missing = []
        parent = os.path.dirname(resolved)
        while not os.path.isdir(parent) and parent != "/":
            missing.append(parent)
            parent = os.path.dirname(parent)
        workspace = _real_workspace(session)
        for directory in reversed(missing):
            if not session.grants.fs_write(directory, workspace):
                session.deny("fs.write", directory, "a parent directory that must be created")
            try:
                os.mkdir(directory, 0o755)
            except FileExistsError:
                pass

    async def list(self, session: PlatformSession, path: Any = ".") -> list[str]:
        resolved = self._resolve(session, path, "fs.read")
        return sorted(await trio.to_thread.run_sync(os.listdir, resolved))

    async def exists(self, session: PlatformSession, path: Any) -> bool:
        resolved = self._resolve(session, path, "fs.read")
        return os.path.lexists(resolved)  # noqa: ASYNC240 - one lstat, as cheap as the check

    async def remove(self, session: PlatformSession, path: Any) -> None:
        """Remove a file, or an empty directory."""
        resolved = self._resolve(session, path, "fs.write")
        if resolved == _real_workspace(session):
            raise InvalidRequestError("the workspace itself cannot be removed")

        def remove() -> None:
            if os.path.isdir(resolved) and not os.path.islink(resolved):
                os.rmdir(resolved)
            else:
                os.unlink(resolved)

        await trio.to_thread.run_sync(remove)
