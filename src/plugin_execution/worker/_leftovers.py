"""Processes a handler leaves behind: finding them, killing them, reaping them.

A worker makes itself a *child subreaper* at start-up (``PR_SET_CHILD_SUBREAPER``): whatever
a handler starts stays its descendant, even a ``setsid`` double fork, whose orphan is
re-parented to the worker instead of to init. The worker kills and reaps them when an
execution ends (when no other is running) and before it exits; the host kills the worker's
whole tree when it stops a worker by force (see ``WorkerProcess.kill``).

Standard library only, no ``typing`` at run time: worker children import it at start-up.
The signal numbers come from the C module ``_signal``: ``signal.py`` imports ``enum``, which
costs a fresh child ~3 ms, more than the rest of this module.
Descendants are found by scanning ``/proc`` (``/proc/PID/task/TID/children`` is not built
into every kernel); that costs milliseconds, so a worker does it only when something is
left, and the host only when it kills a worker.

A SIGKILLed process is not gone when ``kill()`` returns: the kernel tears it down when it
next runs, milliseconds later under load or for a process holding much memory. A worker
waits for what it killed by reaping it; the host, which cannot reap its workers' descendants,
polls :func:`ended` on the pids :func:`kill_tree` returns.
"""

from __future__ import annotations

import errno
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from signal import SIGKILL, SIGSTOP
    from typing import Any
else:  # the same numbers, from the C module (no stub for mypy)
    from _signal import SIGKILL, SIGSTOP

_PR_SET_CHILD_SUBREAPER = 36
_REAP_LIMIT_S = 5.0  # how long a worker waits for what it killed to die


_WAITID_FLAGS = os.WEXITED | os.WNOHANG | os.WNOWAIT
#: libc's ``waitid`` through ctypes, its ``siginfo_t`` buffer, and ctypes' ``get_errno``: set
#: by :func:`become_subreaper` (see :func:`has_children`).
_waitid: tuple[Callable[..., int], Any, Callable[[], int]] | None = None


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children, not init's. False if the
    kernel refused (the worker then works as before: ``setsid`` leftovers may escape)."""
    global _waitid
    import ctypes

    from ..sandbox._libc import libc

    lib = libc()  # use_errno: the errno of each call is kept for ctypes.get_errno
    _waitid = (lib.waitid, ctypes.create_string_buffer(128), ctypes.get_errno)
    return bool(lib.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def has_children() -> bool:
    """Whether this process has any child, live or zombie: one syscall (``waitid``), the
    per-execution check. A subreaper without children has no descendants at all.

    Through ctypes once :func:`become_subreaper` loaded it: ``os.waitid`` reports "none"
    by raising ``ChildProcessError``, the usual answer, and that exception costs more than
    the syscall (~1.7 us a check against ~1.1 us here). The buffer is shared by every
    thread: what the kernel writes there is never read."""
    if _waitid is not None:
        waitid, info, get_errno = _waitid
        if waitid(os.P_ALL, 0, info, _WAITID_FLAGS) == 0:
            return True
        if get_errno() == errno.ECHILD:
            return False
        # Anything else (a seccomp filter's EPERM, say): as os.waitid reports it.
    try:
        os.waitid(os.P_ALL, 0, _WAITID_FLAGS)
    except ChildProcessError:
        return False
    return True


def _parents() -> dict[int, list[int]] | None:
    """Every process's children, by parent pid, from ``/proc``; None if it cannot be read
    here (a sandbox may hide it)."""
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    for name in names:
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/stat", os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile
        try:
            stat = os.read(fd, 512)
        except OSError:
            continue
        finally:
            os.close(fd)
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split(b" ", 2)
        children.setdefault(int(fields[1]), []).append(int(name))
    return children


def descendants(root: int, *, skip: frozenset[int] | set[int] = frozenset()) -> list[int] | None:
    """Every process below ``root`` in the process tree (zombies included), parents first,
    leaving out the children of ``root`` in ``skip`` and theirs; None if ``/proc`` cannot be
    read here."""
    children = _parents()
    if children is None:
        return None
    found: list[int] = []
    level = [pid for pid in children.get(root, ()) if pid not in skip]
    while level:
        found += level
        level = [pid for parent in level for pid in children.get(parent, ())]
    return found


def own_children() -> list[int] | None:
    """This process's children (of every thread of it), from ``/proc/self``: readable where
    the rest of ``/proc`` is not (a worker under Landlock, which keeps only its own). A
    subreaper that kills them gets their children next. None if it cannot be read."""
    found: list[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                found += [int(pid) for pid in f.read().split()]
    except OSError:
        return None
    return found


def kill_all(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` that still exists."""
    for pid in pids:
        try:
            os.kill(pid, SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_leftovers() -> bool:
    """In a worker (a subreaper): SIGKILL every descendant and reap them all. Returns
    whether none is left; gives up after a few seconds, or at once if neither ``/proc`` nor
    its own children there can be read (the host kills the worker's process group when it
    ends)."""
    me = os.getpid()
    deadline = time.monotonic() + _REAP_LIMIT_S
    while True:
        _reap_children()
        if not has_children():
            return True
        pids = descendants(me)
        if pids is None:
            pids = own_children()  # a level at a time: what they started comes to us
        if pids is None or time.monotonic() > deadline:
            return False
        kill_all(pids)
        time.sleep(0.001)  # let them die; their children come to us meanwhile


def ended(pid: int) -> bool:
    """Whether the process ``pid`` has ended: a zombie (its teardown done, only its exit
    status left to reap), or no process at all. True where ``/proc`` cannot be read."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return True
    try:
        stat = os.read(fd, 512)
    except OSError:
        return True
    finally:
        os.close(fd)
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state in (b"Z", b"X")


def kill_tree(leader: int) -> set[int]:
    """From the host: SIGKILL the process ``leader`` (a worker, its own process group's
    leader), its group, and every descendant, wherever they went (another session, say).
    Returns the descendants it killed: they may take a while to die (see :func:`ended`);
    the leader, the caller's child, is waited for by reaping it.

    The group is stopped first, so nothing in it forks meanwhile, and the worker, a
    subreaper, stays the parent of what it started until the end. What left the group may
    still fork until it is killed: scan again until a scan finds nothing new (a killed
    process forks no more). One scan of ``/proc`` when the worker left nothing behind."""
    killed: set[int] = set()
    try:
        os.killpg(leader, SIGSTOP)
    except (ProcessLookupError, PermissionError):
        return killed  # already gone, with its whole group
    try:
        while True:
            pids = descendants(leader)
            fresh = [pid for pid in pids or () if pid not in killed]
            if not fresh:
                break
            kill_all(fresh)
            killed.update(fresh)
    finally:  # never leave the group stopped
        try:
            os.killpg(leader, SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return killed
