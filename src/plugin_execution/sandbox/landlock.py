"""Landlock: a worker child restricts its own file system, TCP and signal access.

Landlock (Linux >= 5.13) lets an unprivileged process give up access rights for good: after
``landlock_restrict_self`` the kernel refuses, with ``EACCES``, every file opened outside the
directories the ruleset allows, and (ABI >= 4) every TCP ``connect`` / ``bind`` to a port it
does not allow. It applies to root too, and nothing the process does later can lift it.

This module is a small ctypes binding to the three system calls (no third-party package: the
calls are three, their structs are fixed-size, and a child must not pay for imports it does
not need). What each ABI version adds, and what is used here:

== ======= ===========================================================================
1  5.13    file system rights (read, write, execute, make/remove entries)
2  5.19    ``REFER``: link/rename across directories (granted inside writable dirs)
3  6.2     ``TRUNCATE``
4  6.7     TCP ``bind`` and ``connect`` by port
5  6.10    ``IOCTL_DEV``: ioctls on devices (handled, never granted)
6  6.12    scopes: no signals to, and no abstract UNIX sockets of, processes outside
7  6.15    audit logging flags (not used)
== ======= ===========================================================================

Standard library only, no ``typing`` at run time: worker children import it before any
plugin code. Only a child calls :func:`restrict`; the host calls :func:`abi_version`.
"""

from __future__ import annotations

import os
import stat
import struct
import sys

from . import _libc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

# The landlock system calls have the same numbers on every architecture (added after the
# syscall tables were unified in 5.1).
_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2

# File system access rights (include/uapi/linux/landlock.h).
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

# Network access rights (ABI 4) and scopes (ABI 6).
NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

#: The rights a rule on a file (not a directory) may carry.
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ = READ_FILE | READ_DIR
#: Everything a workspace needs, but never device nodes (``MAKE_CHAR`` / ``MAKE_BLOCK``: root
#: could otherwise mknod a disk in its workspace and read it raw) nor execution.
WRITE = (
    READ
    | WRITE_FILE
    | TRUNCATE
    | REMOVE_DIR
    | REMOVE_FILE
    | MAKE_DIR
    | MAKE_REG
    | MAKE_SOCK
    | MAKE_FIFO
    | MAKE_SYM
    | REFER
)

#: What the interpreter needs besides its own prefixes and ``sys.path``: shared libraries
#: (extension modules dlopen them), the loader cache, time zones, CPU topology (``os.cpu_count``).
SYSTEM_READ = (
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/usr/share/zoneinfo",
    "/sys/devices/system/cpu",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
    "/proc/self",  # opened now: this process's own /proc/<pid>, nobody else's
)
SYSTEM_WRITE_FILES = ("/dev/null",)


class LandlockError(OSError):
    """The kernel refused to set up or enforce a ruleset."""


def abi_version() -> int:
    """The highest Landlock ABI this kernel supports, or 0 when it has none.

    Raises nothing: ``ENOSYS`` (not built in) and ``EOPNOTSUPP`` (built in, disabled at
    boot) both mean 0; :func:`unavailable_reason` says which.
    """
    try:
        return _libc.syscall(
            _SYS_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION, what="landlock_create_ruleset"
        )
    except OSError:
        return 0


def unavailable_reason() -> str | None:
    """Why :func:`abi_version` is 0, in words; None when Landlock is available."""
    if not sys.platform.startswith("linux"):
        return f"Landlock is a Linux feature (this is {sys.platform})"
    try:
        _libc.syscall(_SYS_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION)
    except OSError as exc:
        import errno

        if exc.errno == errno.ENOSYS:
            return "this kernel has no Landlock (Linux >= 5.13 with CONFIG_SECURITY_LANDLOCK)"
        if exc.errno == errno.EOPNOTSUPP:
            return "Landlock is built in but not enabled at boot (add it to the lsm= list)"
        return f"landlock_create_ruleset failed: {exc.strerror}"
    return None


def handled_fs(abi: int) -> int:
    """Every file system right the ABI knows: what it does not know cannot be restricted."""
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


class Ruleset:
    """A ruleset being built: add rules, then :meth:`enforce` it on this thread.

    ``tcp``: restrict TCP ``bind`` (all denied) and ``connect`` (ports allowed with
    :meth:`allow_connect`); needs ABI 4. ``scoped``: signals and abstract UNIX sockets stay
    inside the sandbox; needs ABI 6.
    """

    def __init__(self, abi: int, *, tcp: bool, scoped: bool) -> None:
        self.abi = abi
        self.tcp = tcp
        self._fs = handled_fs(abi)
        net = NET_BIND_TCP | NET_CONNECT_TCP if tcp and abi >= 4 else 0
        scopes = SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET if scoped and abi >= 6 else 0
        # The struct grew with the ABI; the kernel takes a prefix of it.
        attr = struct.pack("=QQQ", self._fs, net, scopes)
        size = 8 if abi < 4 else 16 if abi < 6 else 24
        self._fd = _libc.syscall(
            _SYS_CREATE_RULESET, attr[:size], size, 0, what="landlock_create_ruleset"
        )

    def allow_path(self, path: str, access: int) -> bool:
        """Allow ``access`` beneath ``path`` (a directory) or on it (a file).

        Symlinks are followed: the rule names what the path resolves to now. Returns False
        when the path does not exist (nothing to allow).
        """
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                access &= FILE_RIGHTS
            attr = struct.pack("=Qi", access & self._fs, fd)
            _libc.syscall(
                _SYS_ADD_RULE, self._fd, _RULE_PATH_BENEATH, attr, 0, what=f"landlock rule {path}"
            )
        finally:
            os.close(fd)
        return True

    def allow_connect(self, port: int) -> None:
        """Allow TCP ``connect`` to ``port`` (on any host: Landlock does not see addresses)."""
        attr = struct.pack("=QQ", NET_CONNECT_TCP, port)
        _libc.syscall(
            _SYS_ADD_RULE, self._fd, _RULE_NET_PORT, attr, 0, what=f"landlock rule tcp:{port}"
        )

    def enforce(self) -> None:
        """Restrict this thread (and every thread and process it starts later), for good.

        Needs no_new_privs (or CAP_SYS_ADMIN). Threads that already exist are not
        restricted: call it while the process has one thread.
        """
        try:
            _libc.syscall(_SYS_RESTRICT_SELF, self._fd, 0, what="landlock_restrict_self")
        finally:
            self.close()

    def close(self) -> None:
        """Drop the ruleset without enforcing it (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def interpreter_paths() -> list[str]:
    """What this interpreter reads to run: its prefixes and every ``sys.path`` entry.

    Taken in the child, from the child's own ``sys.path`` (isolated mode: no user site, no
    current directory), so it is exactly what imports will search.
    """
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    paths.append(os.path.dirname(sys.executable))
    paths.extend(entry for entry in sys.path if entry)
    return list(dict.fromkeys(paths))


def base_ruleset(*, tcp: bool = True) -> Ruleset:
    """A ruleset with the rules every child has: read what the interpreter needs, and the
    system files (see :func:`restrict`, which adds a child's own). A child forked ahead of
    its execution builds it while it waits. Raises :class:`LandlockError`."""
    abi = abi_version()
    if abi < 1:
        raise LandlockError(unavailable_reason() or "Landlock is not available")
    try:
        ruleset = Ruleset(abi, tcp=tcp, scoped=True)
        try:
            for path in (*interpreter_paths(), *SYSTEM_READ):
                ruleset.allow_path(path, READ)
            for path in SYSTEM_WRITE_FILES:
                ruleset.allow_path(path, WRITE)
        except BaseException:
            ruleset.close()
            raise
    except OSError as exc:
        raise LandlockError(exc.errno, f"Landlock: {exc.strerror}") from None
    return ruleset


def restrict(
    *,
    read: Iterable[str],
    write: Iterable[str],
    execute: Iterable[str] = (),
    tcp_connect: Iterable[int] | None = (),
    base: Ruleset | None = None,
) -> int:
    """Allow only this, for good: read ``read`` (plus what the interpreter needs), read and
    write ``write``, execute ``execute`` (files), TCP-connect to ``tcp_connect`` ports
    (``None``: any port; bind is always denied). Signals and abstract UNIX sockets cannot
    reach outside the sandbox (ABI 6).

    ``base``: a :func:`base_ruleset` built ahead, used when it handles TCP the same way
    (else dropped). Returns the ABI version applied. Raises :class:`LandlockError` when
    Landlock is not available or the kernel refuses a step; the caller must then not run
    plugin code.
    """
    tcp = tcp_connect is not None
    if base is not None and base.tcp != tcp:
        base.close()
        base = None
    ruleset = base if base is not None else base_ruleset(tcp=tcp)
    abi = ruleset.abi
    try:
        for path in read:
            ruleset.allow_path(path, READ)
        for path in write:
            ruleset.allow_path(path, WRITE)
        for path in execute:
            ruleset.allow_path(path, EXECUTE | READ_FILE)
        if tcp_connect is not None and abi >= 4:
            for port in tcp_connect:
                ruleset.allow_connect(port)
        _libc.set_no_new_privs()
        ruleset.enforce()
    except OSError as exc:
        ruleset.close()
        raise LandlockError(exc.errno, f"Landlock: {exc.strerror}") from None
    return abi
