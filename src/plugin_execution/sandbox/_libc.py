"""The few libc calls the sandbox needs, through ctypes (``syscall``, ``prctl``).

Loaded on first use: importing ctypes costs a fresh child ~2 ms, so only a child that applies
a kernel layer pays for it (a zygote imports it once, before it forks). Standard library only,
no ``typing`` at run time: worker children import this module before any plugin code.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes

#: ``prctl`` options used by the sandbox (linux/prctl.h).
PR_GET_SECCOMP = 21
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library of this process, with ``errno`` saved after every call."""
    global _libc
    if _libc is None:
        import ctypes

        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.prctl.restype = ctypes.c_int
        lib.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        _libc = lib
    return _libc


def _check(result: int, what: str) -> int:
    if result < 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def syscall(number: int, *args: object, what: str = "syscall") -> int:
    """``syscall(number, *args)``; ints are passed as ``long``, bytes as pointers.

    Raises OSError with the call's errno when it fails.
    """
    import ctypes

    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return _check(libc().syscall(ctypes.c_long(number), *converted), what)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """``prctl(option, ...)``; raises OSError when it fails."""
    return _check(libc().prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def set_no_new_privs() -> None:
    """No exec can ever grant this process more privileges (setuid bits, file caps).

    Required before Landlock and seccomp can be applied without CAP_SYS_ADMIN; and it
    stays set across fork and exec, for good.
    """
    prctl(PR_SET_NO_NEW_PRIVS, 1)
