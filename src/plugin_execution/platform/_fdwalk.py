"""Opening what was checked: directory walks from a trusted directory that never follow a
symlink, for the file work the host does on a plugin's behalf.

``ctx.fs`` checks a *resolved* path (no symlinks, no ``..``) against the grants. Opening that
path again by name would walk it a second time, and a plugin that swaps a directory of it for
a symlink in between gets the host (often root) to open what the symlink points at. So the
host walks the checked path from its anchor (the workspace or the granted directory it lies
in) and refuses any symlink on the way: the file it opens is the one at the path it checked,
or the operation fails with :class:`PathChanged`.

The walk is one ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)``
(Linux >= 5.6) where the kernel has it, else one ``openat(O_NOFOLLOW | O_DIRECTORY)`` per
component. The last component is always handled by name inside the directory fd
(``*at`` calls, ``O_NOFOLLOW``), so it is checked with ``fstat`` before and after opening:
only regular files are opened for reading or writing, and never a FIFO or a device, which
could block the host's thread (``O_NONBLOCK`` guards the window between the two checks).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from collections.abc import Callable

__all__ = [
    "CreateRefused",
    "NotRegularFile",
    "PathChanged",
    "components",
    "open_dir",
    "open_file",
    "parent_of",
]

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_SYS_OPENAT2 = 437  # one number on every architecture added since Linux 5.1's unification
_OPENAT2_ARCHES = frozenset({"x86_64", "aarch64", "arm64", "riscv64", "ppc64le", "s390x"})
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW_DIR = _DIR | os.O_NOFOLLOW
_LINK_ERRNOS = (errno.ELOOP, errno.EXDEV)


class PathChanged(OSError):
    """A symlink (or an escape from the anchor) met on a path that was checked without one:
    the path changed after the check. Callers refuse the operation."""


class NotRegularFile(OSError):
    """The file is a FIFO, a socket or a device: the host reads and writes regular files only."""

    def __init__(self, path: str, mode: int) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({_kind(mode)})", path)
        self.kind = _kind(mode)


class CreateRefused(Exception):
    """A missing directory (``path``, absolute) that the walk's ``create`` did not allow."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a regular file"


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Openat2:
    """``openat2(2)`` through ``syscall(2)``; :attr:`usable` turns False for good the first
    time the kernel (or a seccomp filter) answers ENOSYS."""

    def __init__(self) -> None:
        self.usable = platform.system() == "Linux" and platform.machine() in _OPENAT2_ARCHES
        self._syscall: Callable[..., int] | None = None

    def __call__(self, dir_fd: int, path: str, flags: int) -> int | None:
        """An fd, or None when openat2 is not available here."""
        if not self.usable:
            return None
        if self._syscall is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
            self._syscall = libc.syscall
        how = _OpenHow(flags=flags, mode=0, resolve=_RESOLVE)
        raw = os.fsencode(path)
        for _ in range(8):  # EAGAIN: a concurrent rename; the kernel asks for a retry
            fd = self._syscall(
                ctypes.c_long(_SYS_OPENAT2),
                ctypes.c_int(dir_fd),
                ctypes.c_char_p(raw),
                ctypes.byref(how),
                ctypes.c_size_t(ctypes.sizeof(how)),
            )
            if fd >= 0:
                return fd
            err = ctypes.get_errno()
            if err == errno.ENOSYS:
                self.usable = False
                return None
            if err != errno.EAGAIN:
                raise _error(err, path)
        raise _error(errno.EAGAIN, path)


_openat2 = _Openat2()


def _error(err: int, path: str) -> OSError:
    if err in _LINK_ERRNOS:
        return PathChanged(err, "the path changed after it was checked (a symlink met)", path)
    return OSError(err, os.strerror(err), path)


def components(anchor: str, path: str) -> list[str]:
    """The parts of ``path`` below ``anchor``; both absolute and resolved (no symlinks, no
    ``.`` or ``..``). ValueError when ``path`` is not ``anchor`` or under it."""
    if path == anchor:
        return []
    prefix = anchor.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise ValueError(f"{path!r} is not under {anchor!r}")
    parts = path[len(prefix) :].split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{path!r} is not a resolved path")
    return parts


def parent_of(anchor: str, path: str) -> tuple[str, list[str], str]:
    """``(anchor, parts, name)``: the directory ``path``'s entry is in, as an anchor and the
    parts below it, and the entry's name. ``path == anchor`` is looked up in the anchor's
    parent; ``/`` is ``("/", [], ".")``."""
    parts = components(anchor, path)
    if parts:
        return anchor, parts[:-1], parts[-1]
    if anchor == "/":
        return "/", [], "."
    return os.path.dirname(anchor), [], os.path.basename(anchor)


def _open_anchor(anchor: str, create: Callable[[str], bool] | None) -> int:
    """The anchor itself: an absolute, resolved path, walked from ``/`` without symlinks
    (a granted directory that does not exist yet is made where ``create`` allows)."""
    root = os.open("/", _DIR)
    try:
        parts = anchor.strip("/").split("/") if anchor != "/" else []
        return _descend(root, "/", parts, _DIR, create)
    finally:
        os.close(root)


def _descend(
    dir_fd: int,
    base: str,
    parts: list[str],
    flags: int,
    create: Callable[[str], bool] | None = None,
) -> int:
    """A new fd for ``dir_fd/parts...`` (a directory; ``dir_fd`` is at the path ``base``),
    never following a symlink.

    ``create(path)``: whether the missing directory ``path`` (absolute) may be made
    (mkdirat, mode 0755); None creates nothing. Raises :class:`PathChanged` on a symlink,
    :class:`CreateRefused` when ``create`` says no.
    """
    if not parts:
        return os.open(".", flags | os.O_DIRECTORY, dir_fd=dir_fd)
    if create is None:
        fd = _openat2(dir_fd, "/".join(parts), flags | os.O_DIRECTORY)
        if fd is not None:
            return fd
    fd = os.dup(dir_fd)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            step = (flags if last else _DIR) | os.O_DIRECTORY | os.O_NOFOLLOW
            try:
                nxt = _open_step(fd, part, step)
            except FileNotFoundError:
                if create is None:
                    raise
                path = os.path.join(base, *parts[: i + 1])
                if not create(path):
                    raise CreateRefused(path) from None
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                nxt = _open_step(fd, part, step)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_step(dir_fd: int, part: str, flags: int) -> int:
    try:
        return os.open(part, flags, dir_fd=dir_fd)
    except OSError as exc:
        changed = exc.errno == errno.ENOTDIR and not _is_other_file(dir_fd, part)
        if exc.errno in _LINK_ERRNOS or changed:
            raise PathChanged(
                errno.ELOOP, "the path changed after it was checked (a symlink met)", part
            ) from None
        raise


def _is_other_file(dir_fd: int, name: str) -> bool:
    """Whether ``name`` is (still) neither a directory nor a symlink. ``O_NOFOLLOW |
    O_DIRECTORY`` fails with ENOTDIR on a symlink as on a file: only a file that is still
    there, and not a directory by now, is a plain ENOTDIR."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return False
    return not (stat.S_ISLNK(mode) or stat.S_ISDIR(mode))


def open_dir(
    anchor: str,
    parts: list[str],
    *,
    flags: int = _DIR,
    create: Callable[[str], bool] | None = None,
) -> int:
    """An fd on the directory ``anchor/parts...``, reached without following any symlink
    and without leaving ``anchor``. ``flags``: ``O_PATH`` (default; for ``*at`` calls) or
    ``O_RDONLY`` (to list it). ``create(path)``: whether a missing directory (the anchor's
    own included) may be made; see :func:`_descend`. The caller closes the fd."""
    base = _open_anchor(anchor, create)
    try:
        return _descend(base, anchor, parts, flags | os.O_CLOEXEC, create)
    finally:
        os.close(base)


def open_file(dir_fd: int, name: str, flags: int, mode: int = 0o644) -> int:
    """Open the regular file ``name`` in ``dir_fd`` (never a symlink, FIFO or device).

    The entry is ``fstatat``-ed first, so a FIFO or device is refused without being opened;
    it is opened ``O_NONBLOCK | O_NOFOLLOW | O_NOCTTY`` and ``fstat``-ed again, since the entry
    may have been replaced in between. With ``O_CREAT`` a missing file is created. Raises
    :class:`NotRegularFile`, :class:`PathChanged` (a symlink), IsADirectoryError, or the
    ``OSError`` of the call.
    """
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
    else:
        _check_regular(name, before)
    safe = flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(name, safe, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _LINK_ERRNOS:
            raise PathChanged(exc.errno, "the path changed after it was checked", name) from None
        raise
    try:
        _check_regular(name, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(name: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), name)
    if stat.S_ISLNK(mode):
        raise PathChanged(errno.ELOOP, "the path changed after it was checked", name)
    raise NotRegularFile(name, mode)
