"""Workspaces: one private directory per execution, removed when the execution ends.

Layout::

    <root>/                      default <tempdir>/plugin-execution-<uid>, mode 0700
        host-<pid>-<random>/     one per open WorkspaceManager, mode 0700, flock-ed while open
            <execution_id>/      one per lease, mode 0700

An open manager holds an exclusive ``flock`` on its host directory; the kernel drops it when the
process dies, however it dies. Entering a manager sweeps the root: a ``host-*`` directory whose
lock can be taken belongs to a dead host and is removed; live hosts sharing the root are left
alone. A host directory is made under a ``.claim-*`` name and renamed to ``host-*`` only once its
lock is held, so a sweep never mistakes a host that is starting up for a dead one.

Removal never follows a symlink out of the workspace (``shutil.rmtree`` is fd-based on Linux) and
gives back the permissions a handler took from its own directories. Removing a directory that is
missing or empty is one inline syscall; anything else runs in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from .errors import InvalidRequestError, WorkspaceError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from typing import Self

__all__ = ["MAX_EXECUTION_ID_BYTES", "WorkspaceLease", "WorkspaceManager", "validate_execution_id"]

#: The longest execution id accepted, in UTF-8 bytes (a directory name is at most 255).
MAX_EXECUTION_ID_BYTES: Final = 128

_HOST_PREFIX: Final = "host-"
_CLAIM_PREFIX: Final = ".claim-"
#: A ``.claim-*`` directory lives for microseconds unless its host died while starting.
_CLAIM_STALE_S: Final = 60.0
#: Open a real directory only: never a symlink's target.
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW

_OPEN: Final = "open"
_RELEASING: Final = "releasing"
_RELEASED: Final = "released"


def validate_execution_id(execution_id: object) -> str:
    """Return ``execution_id`` if it is usable as one directory name.

    Raises :class:`InvalidRequestError` naming the problem otherwise: not a str, empty, ``.`` or
    ``..``, a path separator, a NUL or other unprintable character, or longer than
    :data:`MAX_EXECUTION_ID_BYTES`.
    """
    problem = _id_problem(execution_id)
    if problem is None:
        return execution_id  # type: ignore[return-value]  # _id_problem checked it is a str
    shown = repr(execution_id)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise InvalidRequestError(
        f"invalid execution id {shown}: {problem}",
        details={"field": "execution_id", "problem": problem},
    )


def _id_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"it must be a str, not {type(value).__name__}"
    if not value:
        return "it is empty"
    if len(value) > MAX_EXECUTION_ID_BYTES:
        return f"it is {len(value)} characters long; the limit is {MAX_EXECUTION_ID_BYTES} bytes"
    if value in (".", ".."):
        return f"{value!r} is not a directory name"
    if "/" in value or "\\" in value:
        return "it contains a path separator"
    if "\0" in value:
        return "it contains a NUL character"
    if not value.isprintable():  # also rules out lone surrogates, which cannot be encoded
        return "it contains a control or unprintable character"
    size = len(value.encode())
    if size > MAX_EXECUTION_ID_BYTES:
        return f"it is {size} bytes long in UTF-8; the limit is {MAX_EXECUTION_ID_BYTES}"
    return None


class WorkspaceLease:
    """One execution's workspace: the directory :attr:`path` (also :attr:`dir`).

    A lease from :meth:`WorkspaceManager.acquire` has its directory already. One from
    :meth:`WorkspaceManager.reserve` gets it on first use: from :meth:`ensure`, or from a worker
    process that was handed the path and creates it itself with ``os.mkdir(path, 0o700)``.
    :meth:`release` removes whatever exists by then, including nothing.
    """

    __slots__ = ("_created", "_done", "_fspath", "_manager", "_path", "_state", "execution_id")

    def __init__(self, manager: WorkspaceManager, execution_id: str, fspath: str) -> None:
        self._manager = manager
        self.execution_id = execution_id
        self._fspath = fspath
        self._path: Path | None = None
        self._state: str = _OPEN
        self._created = False
        self._done: trio.Event | None = None

    def __repr__(self) -> str:
        return f"<WorkspaceLease {self.execution_id!r} {self._state} at {str(self.path)!r}>"

    @property
    def path(self) -> Path:
        """The workspace directory; it may not exist yet for a reserved lease."""
        if self._path is None:
            self._path = Path(self._fspath)
        return self._path

    @property
    def dir(self) -> Path:
        """The workspace directory (same as :attr:`path`)."""
        return self.path

    def __fspath__(self) -> str:
        """The directory as a str: ``os.fspath(lease)``, without building a Path."""
        return self._fspath

    @property
    def released(self) -> bool:
        """True once the directory is gone (released here, or by the manager's exit)."""
        return self._state == _RELEASED

    def ensure(self) -> Path:
        """Create the directory (mode 0700) unless it exists, and return it.

        Synchronous, never blocks for long, and a no-op once it has succeeded; safe to call from
        a worker thread while the event loop releases the lease (the directory is then removed
        again rather than leaked). Raises :class:`WorkspaceError` if the lease was released or
        the directory cannot be created.
        """
        if self._created and self._state == _OPEN:
            return self.path
        if self._state != _OPEN:
            raise self._error(f"the workspace of execution {self.execution_id!r} was released")
        try:
            os.mkdir(self._fspath, 0o700)
        except FileExistsError:
            pass  # a worker process handed the path made it first
        except OSError as exc:
            raise self._error(f"cannot create workspace {self.path}: {exc.strerror}", exc) from exc
        if self._state != _OPEN:  # released while we were creating it: undo, never leak
            with contextlib.suppress(OSError):
                os.rmdir(self._fspath)
            raise self._error(f"the workspace of execution {self.execution_id!r} was released")
        self._created = True
        return self.path

    async def release(self) -> None:
        """Remove the directory and everything in it, never following symlinks. Idempotent.

        Not cancellable: once called it runs to completion even in a cancelled scope, so a
        deadline never leaves a workspace half-removed, and it never raises ``Cancelled``. It
        is a checkpoint only when it has real work to do: a missing or empty directory is
        removed inline, anything else in a worker thread. A second, concurrent call waits for
        the first. Raises :class:`WorkspaceError` if something cannot be removed; the lease then
        stays open, so a later call (or the manager's exit) tries again.
        """
        if self._state == _RELEASED:
            return
        if self._state == _RELEASING:
            await self._wait_released()
            return
        self._state = _RELEASING
        try:
            await _remove(self._fspath)
        except OSError as exc:
            if self._state == _RELEASING:
                self._state = _OPEN
            raise self._error(f"could not remove workspace {self.path}: {exc}", exc) from exc
        else:
            self._state = _RELEASED
            self._manager._forget(self)
        finally:
            done, self._done = self._done, None
            if done is not None:
                done.set()

    def release_unused(self) -> None:
        """Close a reserved lease whose directory was never created, without touching the
        filesystem: a worker process reported that its handler did not use the workspace.
        Anything made there regardless is removed with the host directory when the manager
        exits."""
        if self._state == _OPEN:
            self._state = _RELEASED
            self._manager._forget(self)

    async def _wait_released(self) -> None:
        if self._done is None:
            self._done = trio.Event()
        with trio.CancelScope(shield=True):
            await self._done.wait()
        if self._state != _RELEASED:
            raise self._error(f"could not remove workspace {self.path} (see the other release)")

    def _error(self, message: str, exc: OSError | None = None) -> WorkspaceError:
        details: dict[str, object] = {"path": str(self.path)}
        if exc is not None:
            details.update(error=exc.strerror or str(exc), failed_path=exc.filename)
        return WorkspaceError(message, execution_id=self.execution_id, details=details)


class WorkspaceManager:
    """Leases one private directory per execution. Use as ``async with manager:``.

    ``root`` defaults to ``<tempdir>/plugin-execution-<uid>``, created with mode 0700; that
    default is refused if it is a symlink or belongs to another user, since anyone can create
    names in the temp directory. A ``root`` you pass is created (mode 0700) when missing and
    otherwise used as it is: its permissions are yours to choose.

    Several managers, in one process or in many, may share a root. Entering is reentrant: a
    manager shared by several backends is opened by the first ``async with`` and closed by the
    last one.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self._default_root = root is None
        self.root = _default_root() if root is None else Path(root).absolute()
        self._host: Path | None = None
        self._host_str = ""
        self._host_fd = -1
        self._depth = 0
        self._leases: dict[str, WorkspaceLease] = {}

    def __repr__(self) -> str:
        where = self._host if self._host is not None else f"{self.root} (not open)"
        return f"<WorkspaceManager {str(where)!r}, {len(self._leases)} active>"

    @property
    def host_dir(self) -> Path | None:
        """This manager's own directory under the root while it is open, else None."""
        return self._host

    def active(self) -> int:
        """How many leases are open (reserved or acquired, not yet released)."""
        return len(self._leases)

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Claim a host directory under the root and sweep what dead hosts left there.

        Cancellation: the sweep runs in a worker thread; if the caller is cancelled before it
        starts, the host directory is given up again and ``Cancelled`` propagates, leaving
        nothing behind. Raises :class:`WorkspaceError` if the root is unusable. What a dead host
        left and cannot be removed is reported with a ``RuntimeWarning``, not an error.
        """
        self._depth += 1
        if self._depth > 1:
            return self
        try:
            host = self._claim()
            failures = await trio.to_thread.run_sync(_sweep, str(self.root), host.name)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        if failures:
            warnings.warn(
                f"could not remove what dead hosts left under {self.root}: {'; '.join(failures)}",
                RuntimeWarning,
                stacklevel=2,
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Release every lease still open and remove the host directory.

        Cancellation: shielded; it always runs to completion. Raises :class:`WorkspaceError`
        if something cannot be removed; the host's lock is dropped anyway, so the next manager
        to start on this root sweeps it.
        """
        self._depth -= 1
        if self._depth > 0 or self._host is None:
            return
        host, fd, leases = self._host, self._host_fd, self._leases
        self._host, self._host_fd, self._leases = None, -1, {}
        for lease in leases.values():
            lease._state = _RELEASED
        try:
            await _remove(str(host))
        except OSError as exc:
            raise WorkspaceError(
                f"could not remove host workspace directory {host}: {exc}",
                details={"path": str(host), "error": exc.strerror, "failed_path": exc.filename},
            ) from exc
        finally:
            os.close(fd)

    # -- leases ---------------------------------------------------------------------------

    def reserve(self, execution_id: str) -> WorkspaceLease:
        """Open a lease whose directory is computed but not created yet.

        The directory is made on first use, by :meth:`WorkspaceLease.ensure` or by a worker
        process handed ``lease.path``; a handler that never touches its workspace costs no
        filesystem work at all. Synchronous. Raises :class:`InvalidRequestError` for a bad id,
        :class:`WorkspaceError` if the manager is not open or the id already has a live lease.
        """
        return self._reserve(validate_execution_id(execution_id))

    def _reserve(self, execution_id: str, parent: str | None = None) -> WorkspaceLease:
        """:meth:`reserve` of an id known to be valid (a backend's, from an ExecutionRequest);
        ``parent``: under that directory (a directory of a lease of this manager's, e.g. a
        sandboxed pool worker's own, which it may write) instead of the host directory."""
        if self._host is None:
            raise WorkspaceError(
                "this WorkspaceManager is not open: use `async with manager:` first "
                "(a backend does it when it starts)",
                execution_id=execution_id,
            )
        if execution_id in self._leases:
            raise WorkspaceError(
                f"execution {execution_id!r} already has a live workspace; release it first "
                "or use a fresh execution id",
                execution_id=execution_id,
            )
        path = f"{self._host_str if parent is None else parent}/{execution_id}"
        lease = WorkspaceLease(self, execution_id, path)
        self._leases[execution_id] = lease
        return lease

    async def acquire(self, execution_id: str) -> WorkspaceLease:
        """Open a lease and create its directory (mode 0700): :meth:`reserve` + ``ensure()``.

        Cancellation: raises ``Cancelled`` before creating anything if the caller is already
        cancelled; otherwise it does not block (one ``mkdir``) and is not a schedule point.
        Raises as :meth:`reserve` does, and :class:`WorkspaceError` if the directory cannot be
        created.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        lease = self.reserve(execution_id)
        try:
            lease.ensure()
        except BaseException:
            lease._state = _RELEASED
            self._forget(lease)
            raise
        return lease

    @contextlib.asynccontextmanager
    async def lease(self, execution_id: str) -> AsyncIterator[WorkspaceLease]:
        """``async with manager.lease(id) as lease:`` acquire, then release however it ends.

        The release runs even when the block is cancelled or raises (see
        :meth:`WorkspaceLease.release`).
        """
        lease = await self.acquire(execution_id)
        try:
            yield lease
        finally:
            await lease.release()

    def _forget(self, lease: WorkspaceLease) -> None:
        if self._leases.get(lease.execution_id) is lease:
            del self._leases[lease.execution_id]

    # -- the host directory ---------------------------------------------------------------

    def _claim(self) -> Path:
        """Create and lock a fresh host directory; it becomes visible as ``host-*`` locked."""
        root = self._prepare_root()
        name = f"{os.getpid()}-{os.urandom(6).hex()}"
        staging = os.path.join(root, _CLAIM_PREFIX + name)
        host = os.path.join(root, _HOST_PREFIX + name)
        fd = -1
        try:
            os.mkdir(staging, 0o700)
            fd = os.open(staging, _DIR_FLAGS)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(staging, host)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.rmdir(staging)
            raise WorkspaceError(
                f"cannot create a host workspace directory in {root}: {exc.strerror}",
                details={"path": root, "error": exc.strerror},
            ) from exc
        self._host, self._host_fd, self._host_str = Path(host), fd, host
        return self._host

    def _prepare_root(self) -> str:
        root = str(self.root)
        try:
            if not self._default_root:
                os.makedirs(root, 0o700, exist_ok=True)
                return root
            with contextlib.suppress(FileExistsError):
                os.mkdir(root, 0o700)
            st = os.lstat(root)
            problem = _foreign_root_problem(st)
            if problem is None and stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(root, 0o700)
        except OSError as exc:
            why = exc.strerror
            if isinstance(exc, FileExistsError) or exc.errno == errno.ENOTDIR:
                why = "it (or a parent) exists and is not a directory"
            raise WorkspaceError(
                f"cannot use {root} as the workspace root: {why}; pass a directory this "
                "process may create and write, as workspace= or WorkspaceManager(root=...)",
                details={"path": root, "error": exc.strerror},
            ) from exc
        if problem is not None:
            raise WorkspaceError(
                f"refusing the workspace root {root}: {problem}; another user may have put it "
                "there. Remove it, or pass WorkspaceManager(root=...) a directory of yours",
                details={"path": root},
            )
        return root


def _default_root() -> Path:
    import tempfile

    return Path(tempfile.gettempdir()) / f"plugin-execution-{os.geteuid()}"


def _foreign_root_problem(st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "it is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid != os.geteuid():
        return f"it belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
    return None


def _sweep(root: str, own: str) -> list[str]:
    """Remove the host directories of dead hosts under ``root``; return what could not be."""
    try:
        with os.scandir(root) as entries:
            names = [e.name for e in entries if e.name.startswith((_HOST_PREFIX, _CLAIM_PREFIX))]
    except OSError as exc:
        return [f"{root}: {exc.strerror}"]
    failures = []
    for name in names:
        if name == own:
            continue
        path = os.path.join(root, name)
        try:
            fd = os.open(path, _DIR_FLAGS)
        except OSError:
            continue  # gone already, or not a real directory: not a host's
        try:
            if name.startswith(_CLAIM_PREFIX) and _age_s(fd) < _CLAIM_STALE_S:
                continue  # most likely a host starting up right now
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its host is alive
            _remove_tree(path)
        except OSError as exc:
            failures.append(f"{path}: {exc}")
        finally:
            os.close(fd)
    return failures


def _age_s(fd: int) -> float:
    return time.time() - os.fstat(fd).st_mtime


# -- removal ------------------------------------------------------------------------------


async def _remove(path: str) -> None:
    """Remove ``path`` like :func:`_remove_tree`; inline if it is missing or empty.

    Not cancellable: the thread, when one is needed, runs shielded.
    """
    try:
        os.rmdir(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass  # not empty, a symlink, or no permission: the full removal handles each
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(_remove_tree, path)


def _remove_tree(path: str) -> None:
    """Remove ``path`` and everything under it; a symlink is removed, never followed.

    Directories a handler made inaccessible (``chmod 000``) get their owner's permissions back
    and the removal is tried once more. Raises the first ``OSError`` if anything remains.
    """
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)  # a symlink or file planted where the directory was
            return
    except FileNotFoundError:
        return
    if _rmtree(path) is None:
        return
    _restore_access(path)
    error = _rmtree(path)
    if error is not None:
        raise error


def _rmtree(path: str) -> OSError | None:
    """``shutil.rmtree`` that tolerates concurrent removal and returns its first error."""
    errors: list[OSError] = []

    def on_error(_func: object, _path: str, exc: BaseException) -> None:
        if not isinstance(exc, FileNotFoundError):
            errors.append(exc if isinstance(exc, OSError) else OSError(str(exc)))

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=on_error)
    else:
        shutil.rmtree(path, onerror=lambda f, p, info: on_error(f, p, info[1]))
    return errors[0] if errors else None


def _restore_access(path: str) -> None:
    """Give the owner rwx on ``path`` and every directory under it, never following a symlink.

    Best effort: what cannot be fixed is reported by the removal that follows. Iterative, one
    open fd per level of depth.
    """
    top = _unlock(path, None)
    if top is None:
        return
    stack = [(top, _subdirs(top))]
    try:
        while stack:
            fd, names = stack[-1]
            if not names:
                stack.pop()
                os.close(fd)
                continue
            child = _unlock(names.pop(), fd)
            if child is not None:
                stack.append((child, _subdirs(child)))
    finally:
        for fd, _ in stack:
            os.close(fd)


def _unlock(name: str, dir_fd: int | None) -> int | None:
    """chmod 0700 the real directory ``name`` and open it; None if gone or not a directory.

    ``follow_symlinks=False`` makes the chmod fail on a symlink (``fchmodat`` with
    ``AT_SYMLINK_NOFOLLOW``) instead of changing its target, so a link swapped in after the
    directory was listed changes nothing; ``O_NOFOLLOW`` does the same for the open.
    """
    try:
        os.chmod(name, 0o700, dir_fd=dir_fd, follow_symlinks=False)
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except (OSError, NotImplementedError, ValueError):
        return None


def _subdirs(fd: int) -> list[str]:
    try:
        with os.scandir(fd) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
