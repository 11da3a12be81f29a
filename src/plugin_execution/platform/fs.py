"""``ctx.fs``: files under the paths a handler was granted.

Every path is resolved first (:func:`~plugin_execution.permissions.resolve_path`: relative
to the workspace, ``..`` and symlinks followed, ``//`` collapsed) and the check is made on
the result. Readable: the workspace, the plugin's own root, ``fs.read`` and ``fs.write``;
writable: the workspace and ``fs.write``.

The host then opens exactly the path it checked (``_fdwalk``): it walks from the directory
the grant is rooted at (the workspace, the root, a granted directory) and refuses any symlink
on the way, so a directory swapped for a symlink after the check is a denial, never a file
elsewhere. Only regular files are read or written (a FIFO or device is refused unopened) and
directories listed. The blocking work runs on the platform's :class:`HostThreads` (bounded per
plugin and in total), under the execution's deadline.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import InvalidRequestError
from ..permissions import PathProblem, resolve_path
from . import _args, _fdwalk
from ._limits import HostThreads

if TYPE_CHECKING:
    from .session import PlatformSession

__all__ = ["FsService", "resolve_parent"]

T = TypeVar("T")
#: The kernel's limit on a path, in bytes with its terminating NUL (ENAMETOOLONG past it).
_PATH_MAX = 4096
#: What each name of a listing counts against the transfer limit besides its characters
#: (about what it takes in the reply frame).
_LIST_ITEM_BYTES = 8


def _real_workspace(session: PlatformSession) -> str | None:
    """The workspace as the kernel sees it (resolved paths are compared with it): its parent
    resolved, the workspace itself never followed. A plugin that can write the parent (a
    sandboxed pool worker's own directory holds its workspaces) may have swapped the
    workspace for a symlink: the host keeps the path it made, whose walk then fails, and
    never takes the symlink's target for the workspace."""
    return resolve_parent(session.workspace) if session.workspace else None


def resolve_parent(path: str) -> str:
    """``path`` with its parent directory resolved and its own last part kept as it is,
    never followed (the workspace, which its plugin may have swapped for a symlink)."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(parent), name)


class _Checked:
    """A path that passed the check: what it was asked as, what it resolved to, the
    directory the walk to it starts from, and what a relative path was resolved against."""

    __slots__ = ("anchor", "asked", "base", "resolved")

    def __init__(self, asked: str, resolved: str, anchor: str, base: str) -> None:
        self.asked = asked
        self.resolved = resolved
        self.anchor = anchor
        self.base = base


class FsService:
    """Host side of ``ctx.fs``."""

    def __init__(self, max_bytes: int, threads: HostThreads | None = None) -> None:
        self.max_bytes = max_bytes
        self.threads = threads if threads is not None else HostThreads()

    def _checker(
        self, session: PlatformSession, path: Any, permission: str
    ) -> Callable[[], _Checked]:
        """The check of ``path`` for ``permission``, to run in the host's file thread with
        the work it guards: resolving a path is file work too (an lstat and a readlink per
        part), kept off the event loop. What can be refused without the file system is
        refused here, at once."""
        if type(path) is not str or not path:
            raise InvalidRequestError(f"a path must be a non-empty string, got {path!r}")
        if len(path) >= _PATH_MAX or len(path.encode("utf-8", "surrogatepass")) >= _PATH_MAX:
            # what the kernel refuses anyway; resolving it costs time quadratic in its parts
            raise InvalidRequestError(
                f"a path must be shorter than {_PATH_MAX} bytes (PATH_MAX), got "
                f"{len(path)} characters"
            )
        workspace = _real_workspace(session)
        base = workspace or "/nonexistent-workspace"
        grants = session.grants
        write = permission == "fs.write"

        def check() -> _Checked:
            try:
                resolved = resolve_path(path, base)
            except PathProblem as exc:
                raise _Refused(path, str(exc)) from None
            anchor = grants.fs_anchor(resolved, workspace, write=write)
            if anchor is None:
                raise _Refused(_shown(path, resolved, base))
            return _Checked(path, resolved, anchor, base)

        return check

    async def _run(
        self,
        session: PlatformSession,
        permission: str,
        path: Any,
        fn: Callable[[_Checked], T],
    ) -> T:
        """Check ``path`` and run ``fn(checked)`` with it, both on the host's file threads;
        a refusal there (not granted, a path that changed under the walk) is denied here, a
        FIFO or device refused."""
        check = self._checker(session, path, permission)

        def work() -> T:
            checked = check()
            try:
                return fn(checked)
            except _fdwalk.PathChanged:
                raise _Refused(
                    _shown(checked.asked, checked.resolved, checked.base),
                    "the path changed after it was checked (a symlink appeared on it)",
                ) from None
            except _fdwalk.CreateRefused as exc:
                raise _Refused(exc.path, "a parent directory that must be created") from None
            except _fdwalk.NotRegularFile as exc:
                raise InvalidRequestError(
                    f"{checked.asked!r} is {exc.kind}: ctx.fs reads and writes regular files only"
                ) from None
            except OSError as exc:  # named as the plugin asked, not by the walk's relative parts
                raise OSError(exc.errno, exc.strerror, checked.asked) from None

        try:
            return await self.threads.run_sync(session, f"ctx.fs on {path!r}", work)
        except _Refused as refused:
            session.deny(permission, refused.resource, refused.reason)

    async def read(self, session: PlatformSession, path: Any) -> bytes:
        limit = self.max_bytes
        return await self._run(session, "fs.read", path, lambda checked: _read(checked, limit))

    async def write(
        self, session: PlatformSession, path: Any, data: Any, append: bool = False
    ) -> int:
        blob = _args.data_bytes(data, "data")
        if len(blob) > self.max_bytes:
            raise InvalidRequestError(f"fs.write takes at most {self.max_bytes} bytes at once")
        workspace = _real_workspace(session)
        grants = session.grants

        def may_create(directory: str) -> bool:
            # runs in the host's thread: a pure check, the denial is raised back on the loop
            return grants.fs_write(directory, workspace)

        def write(checked: _Checked) -> int:
            if checked.anchor == workspace:
                session.ensure_workspace()  # safe from a thread (WorkspaceLease.ensure)
            return _write(checked, blob, append, may_create)

        return await self._run(session, "fs.write", path, write)

    async def list(self, session: PlatformSession, path: Any = ".") -> list[str]:
        limit = self.max_bytes
        return await self._run(session, "fs.read", path, lambda checked: _list(checked, limit))

    async def exists(self, session: PlatformSession, path: Any) -> bool:
        return await self._run(session, "fs.read", path, _exists)

    async def remove(self, session: PlatformSession, path: Any) -> None:
        """Remove a file, or an empty directory."""
        workspace = _real_workspace(session)

        def remove(checked: _Checked) -> None:
            if checked.resolved == workspace:
                raise InvalidRequestError("the workspace itself cannot be removed")
            _remove(checked)

        await self._run(session, "fs.write", path, remove)


class _Refused(Exception):
    """A check made in the host's thread failed: denied (``session.deny``) on the loop."""

    def __init__(self, resource: str, reason: str = "") -> None:
        super().__init__(resource)
        self.resource = resource
        self.reason = reason


def _shown(path: str, resolved: str, base: str | None = None) -> str:
    """``path`` as a denial names it: with what it resolves to when only ``.``, ``..`` and
    repeated slashes made the difference. Where symlinks did, their target stays unsaid: the
    host resolved them with its own view (``/proc/self`` is the host's, ``/tmp`` too), which
    the plugin's sandbox may hide (its cwd, the files it holds open, other workspaces)."""
    if resolved == path:
        return path
    if base is not None:
        normalized = os.path.normpath(os.path.join(base, path))
        if normalized.startswith("//"):
            normalized = "/" + normalized.lstrip("/")
        if normalized != resolved:
            return f"{path} (through a symlink)"
    return f"{path} (resolves to {resolved})"


# -- the blocking work, in a host thread: every fd is closed before returning ----------------


def _read(checked: _Checked, limit: int) -> bytes:
    anchor, parts, name = _fdwalk.parent_of(checked.anchor, checked.resolved)
    parent = _fdwalk.open_dir(anchor, parts)
    try:
        fd = _fdwalk.open_file(parent, name, os.O_RDONLY)
    finally:
        os.close(parent)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InvalidRequestError(
            f"{checked.asked!r} is over the {limit}-byte limit of fs.read; read it in a "
            "process backend's worker directly, or raise Platform(max_transfer_bytes)"
        )
    return data


def _write(checked: _Checked, blob: bytes, append: bool, may_create: Callable[[str], bool]) -> int:
    anchor, parts, name = _fdwalk.parent_of(checked.anchor, checked.resolved)
    parent = _fdwalk.open_dir(anchor, parts, create=may_create)
    try:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else 0)
        fd = _fdwalk.open_file(parent, name, flags)
    finally:
        os.close(parent)
    with os.fdopen(fd, "wb") as f:
        if not append:
            f.truncate(0)  # only now that it is known to be a regular file
        return f.write(blob)


def _list(checked: _Checked, limit: int) -> list[str]:
    """The names in the directory, read a few at a time: a directory the plugin filled
    with more names than ``limit`` bytes (a transfer's limit) is refused, never held whole."""
    parts = _fdwalk.components(checked.anchor, checked.resolved)
    fd = _fdwalk.open_dir(checked.anchor, parts, flags=os.O_RDONLY)
    names: list[str] = []
    size = 0
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                size += len(entry.name) + _LIST_ITEM_BYTES
                if size > limit:
                    raise InvalidRequestError(
                        f"{checked.asked!r} holds more names than the {limit}-byte limit of "
                        "a transfer (max_transfer_bytes): list a directory with fewer entries"
                    )
                names.append(entry.name)
    finally:
        os.close(fd)
    return sorted(names)


def _exists(checked: _Checked) -> bool:
    anchor, parts, name = _fdwalk.parent_of(checked.anchor, checked.resolved)
    try:
        parent = _fdwalk.open_dir(anchor, parts)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        os.stat(name, dir_fd=parent, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    finally:
        os.close(parent)
    return True


def _remove(checked: _Checked) -> None:
    anchor, parts, name = _fdwalk.parent_of(checked.anchor, checked.resolved)
    parent = _fdwalk.open_dir(anchor, parts)
    try:
        mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        if stat.S_ISDIR(mode):
            os.rmdir(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)
    finally:
        os.close(parent)
