"""Capabilities: a worker child started by root gives up root's privileges.

A child of a root host runs as uid 0 with every capability: it could raise its own resource
limits back (``CAP_SYS_RESOURCE``), load kernel modules, change the host's network, reboot.
Landlock does not stop those; dropping the capabilities does. The child sets no_new_privs (no
later ``execve`` can regain them) and empties its effective, permitted, inheritable and ambient
sets, and its bounding set when it may. It keeps uid 0, so files are still checked against
root's ownership: Landlock, not the uid, is what limits its file access.

Standard library only, no ``typing`` at run time (loaded by worker children).
"""

from __future__ import annotations

import os
import struct

from . import _libc

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_MAX_CAPS = 64  # the kernel's cap_last_cap is below this (40 on 6.x)
_CAP_SETPCAP = 8


def effective() -> int:
    """This process's effective capabilities, as a bit mask (0 when it cannot tell)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def has_any() -> bool:
    """Whether this process holds any effective capability (root usually holds them all)."""
    return effective() != 0


def drop_all() -> None:
    """Drop every capability of this thread, for good (and of what it starts later).

    Sets no_new_privs first: no ``execve`` can then grant capabilities back, even to uid 0,
    whatever the bounding set holds. The bounding set is emptied too when this process may
    (``CAP_SETPCAP``; under bubblewrap it no longer can, and no_new_privs covers it). Raises
    OSError when the kernel refuses. Call it while the process has one thread: capabilities
    are per thread.

    Every child of a sandboxed backend runs this before serving: the capability sets are
    read with ``capget`` and the bounding set dropped with bare ``prctl`` calls (reading
    ``/proc/self/status`` and a checked call per capability cost a zygote's child ~0.3 ms more).
    """
    import ctypes

    _libc.set_no_new_privs()
    lib = _libc.libc()
    header = ctypes.create_string_buffer(struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(24)  # two {effective, permitted, inheritable}
    if lib.capget(header, data) == 0:
        low, _, _, high, _, _ = struct.unpack("=6I", data.raw)
        held = low | high << 32
    else:
        held = effective()
    if held & (1 << _CAP_SETPCAP):
        prctl = lib.prctl
        for cap in range(_MAX_CAPS):
            if prctl(_libc.PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                err = ctypes.get_errno()
                if err == 22:  # EINVAL: past the last capability this kernel knows
                    break
                raise OSError(err, f"prctl(PR_CAPBSET_DROP): {os.strerror(err)}")
    try:
        _libc.prctl(_libc.PR_CAP_AMBIENT, _libc.PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        if exc.errno != 22:  # kernels before 4.3 have no ambient set
            raise
    empty = ctypes.create_string_buffer(bytes(24))
    if lib.capset(header, empty) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
