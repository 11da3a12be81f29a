"""seccomp: a worker child denies itself new processes, new programs and network sockets.

A classic-BPF filter, assembled here by hand (a dozen instructions), is installed with
``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)``. From then on, in this process and every
thread and process it starts:

- a system call made through another ABI (32-bit ``int 0x80`` on x86-64, x32) fails with
  ``EPERM``: its numbers mean other calls;
- ``setsid`` and ``setpgid`` fail with ``EPERM``: nothing leaves the worker's process group,
  which the host kills when the execution ends;
- ``io_uring_setup`` fails with ``EPERM``: io_uring's operations (``socket``, ``connect``...)
  are not system calls, so no filter would see them;
- unless ``allow_inet`` (a plugin granted ``network.connect``): ``socket`` of the ``AF_INET``,
  ``AF_INET6`` and ``AF_PACKET`` families fails with ``EPERM``: no UDP, raw or TCP socket at
  all, whatever the start method (Landlock only knows TCP ports; a zygote's children share its
  network namespace);
- unless ``allow_spawning`` (for a plugin granted ``shell.allow``): ``fork``, ``vfork``,
  ``execve``, ``execveat`` fail with ``EPERM``; so does ``clone`` unless its flags have
  ``CLONE_THREAD`` (threads, which Python and trio need, are still created); ``clone3`` fails
  with ``ENOSYS``: its flags are in memory that a filter cannot read, and ``ENOSYS`` makes the
  C library fall back to ``clone``, which is checked as above.

Without spawning, a fork bomb, ``subprocess``, ``os.system`` and ``os.exec*`` all end with a
``PermissionError``; with it, whatever the plugin starts stays in the worker's process group
and dies with it. Supported on x86-64 and AArch64; elsewhere :func:`unavailable_reason` says
so. Standard library only, no ``typing`` at run time (loaded by worker children).
"""

from __future__ import annotations

import errno
import os
import struct
import sys

from . import _libc

_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
# classic BPF opcodes: load a 32-bit word of seccomp_data; jumps on a constant; return
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
# offsets in struct seccomp_data (little-endian: the low half of args[0] comes first)
_NR = 0
_ARCH = 4
_ARG0_LOW = 16
_CLONE_THREAD = 0x00010000
_X32_SYSCALL_BIT = 0x40000000

#: machine -> (AUDIT_ARCH_*, system call numbers, whether x32 calls share the arch value)
_ARCHES: dict[str, tuple[int, dict[str, int], bool]] = {
    "x86_64": (
        0xC000003E,
        {
            "clone": 56,
            "fork": 57,
            "vfork": 58,
            "execve": 59,
            "setpgid": 109,
            "setsid": 112,
            "execveat": 322,
            "clone3": 435,
            "socket": 41,
            "io_uring_setup": 425,
        },
        True,
    ),
    "aarch64": (
        0xC00000B7,
        {
            "setpgid": 154,
            "setsid": 157,
            "clone": 220,
            "execve": 221,
            "execveat": 281,
            "clone3": 435,
            "socket": 198,
            "io_uring_setup": 425,
        },
        False,
    ),
}
_SPAWNING = ("fork", "vfork", "execve", "execveat")
_LEAVING_THE_GROUP = ("setsid", "setpgid")
_ALWAYS_DENIED = (*_LEAVING_THE_GROUP, "io_uring_setup")
#: socket families that reach a network: AF_INET, AF_INET6, AF_PACKET
_NETWORK_FAMILIES = (2, 10, 17)


def unavailable_reason() -> str | None:
    """Why :func:`install` cannot work here, in words; None when it can."""
    if not sys.platform.startswith("linux"):
        return f"seccomp is a Linux feature (this is {sys.platform})"
    machine = os.uname().machine
    if machine not in _ARCHES:
        return f"no filter for this architecture ({machine}; x86_64 and aarch64 are supported)"
    if sys.byteorder != "little":
        return "no filter for big-endian machines"
    try:
        _libc.prctl(_libc.PR_GET_SECCOMP)
    except OSError as exc:
        return f"this kernel has no seccomp (prctl(PR_GET_SECCOMP): {exc.strerror})"
    return None


def spawn_filter(
    machine: str | None = None, *, allow_spawning: bool = False, allow_inet: bool = True
) -> bytes:
    """The BPF program (``struct sock_filter[]``) that keeps every process in the group and,
    unless ``allow_spawning``, denies new processes and programs; unless ``allow_inet``,
    network sockets."""
    arch, numbers, x32 = _ARCHES[machine or os.uname().machine]
    program: list[tuple[int, int, object, object]] = [
        (_LD_W_ABS, _ARCH, None, None),
        (_JEQ_K, arch, None, "deny"),
        (_LD_W_ABS, _NR, None, None),
    ]
    if x32:
        program.append((_JGE_K, _X32_SYSCALL_BIT, "deny", None))
    denied = list(_ALWAYS_DENIED)
    if not allow_spawning:
        program.append((_JEQ_K, numbers["clone"], "clone", None))
        program.append((_JEQ_K, numbers["clone3"], "enosys", None))
        denied += _SPAWNING
    if not allow_inet:
        program.append((_JEQ_K, numbers["socket"], "socket", None))
    for name in denied:
        if name in numbers:
            program.append((_JEQ_K, numbers[name], "deny", None))
    program.append((_RET_K, _RET_ALLOW, None, None))
    # BPF jumps only forward: the checks on arguments come after
    labels = {"clone": len(program)}
    program.append((_LD_W_ABS, _ARG0_LOW, None, None))
    program.append((_JSET_K, _CLONE_THREAD, None, "deny"))
    program.append((_RET_K, _RET_ALLOW, None, None))
    labels["socket"] = len(program)
    program.append((_LD_W_ABS, _ARG0_LOW, None, None))
    for family in _NETWORK_FAMILIES:
        program.append((_JEQ_K, family, "deny", None))
    program.append((_RET_K, _RET_ALLOW, None, None))
    labels["enosys"] = len(program)
    program.append((_RET_K, _RET_ERRNO | errno.ENOSYS, None, None))
    labels["deny"] = len(program)
    program.append((_RET_K, _RET_ERRNO | errno.EPERM, None, None))
    return b"".join(_encode(i, insn, labels) for i, insn in enumerate(program))


def _encode(index: int, insn: tuple[int, int, object, object], labels: dict[str, int]) -> bytes:
    code, k, jt, jf = insn

    def offset(target: object) -> int:
        # jumps are relative to the next instruction, forward only, at most 255 ahead
        return 0 if target is None else labels[str(target)] - index - 1

    return struct.pack("=HBBI", code, offset(jt), offset(jf), k)


_programs: dict[tuple[bool, bool], bytes] = {}  # by (allow_spawning, allow_inet)


def warm() -> None:
    """Build every variant of the filter now: a zygote does, before it forks, so that its
    children install theirs without building it (~0.1 ms each)."""
    for allow_spawning in (False, True):
        for allow_inet in (False, True):
            _program(allow_spawning, allow_inet)


def _program(allow_spawning: bool, allow_inet: bool) -> bytes:
    key = (allow_spawning, allow_inet)
    program = _programs.get(key)
    if program is None:
        program = _programs[key] = spawn_filter(
            allow_spawning=allow_spawning, allow_inet=allow_inet
        )
    return program


def install(*, allow_spawning: bool = False, allow_inet: bool = True) -> None:
    """Install the filter on this thread and on every thread and process it starts later
    (see :func:`spawn_filter` for ``allow_spawning`` and ``allow_inet``).

    Sets no_new_privs (required). Threads that already exist are not filtered: call it while
    the process has one thread. Raises OSError when the kernel refuses.
    """
    import ctypes

    program = _program(allow_spawning, allow_inet)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = ctypes.create_string_buffer(
        struct.pack("@HP", len(program) // 8, ctypes.addressof(buffer))
    )
    _libc.set_no_new_privs()
    _libc.prctl(_libc.PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
