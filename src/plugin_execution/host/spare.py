"""Worker children forked ahead: the zygote forks one before the execution that will run in
it is known, so the fork and the child's first steps (faulting in the pages it touches) are
off that execution's path.

A child forked ahead (:class:`ForkedAhead`) has its protocol socket and its output pipe from
the start; it has detached from the zygote (its own session, none of the zygote's fds) and
waits. It has run no plugin code and has none of its sandbox yet: that depends on the
execution (the plugin's grants, the workspace), and goes out with its setup
(:func:`~plugin_execution.host.zygote.setup_frame`: cwd, environment, limits, kernel layers)
when it is used (``open_worker_process(ahead=...)``). One that is not used is discarded:
killed, reaped, our ends closed. Who keeps them (and counts them) is the backend's business
(``backends/_spares.py``).
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from .zygote import Zygote, ZygoteChild

__all__ = ["ForkedAhead", "fork_ahead"]


class ForkedAhead:
    """A worker child the zygote forked ahead; :meth:`use` it once, or :meth:`discard` it."""

    def __init__(
        self, zygote: Zygote, child: ZygoteChild, sock: socket.socket, err_read: int
    ) -> None:
        self.zygote = zygote
        self.child = child
        self._sock: socket.socket | None = sock
        self._err_read: int | None = err_read

    @property
    def usable(self) -> bool:
        """Not used yet, alive, and its zygote too: a child whose zygote is going dies with
        it (an execution given it would lose it)."""
        return self._sock is not None and self.child.returncode is None and not self.zygote.exited()

    def use(self, setup: bytes) -> tuple[ZygoteChild, socket.socket, int]:
        """Send the child its ``setup``; return its process, the host's end of its socket
        and the read end of its output pipe, which the caller owns from now on."""
        sock, err_read = self._sock, self._err_read
        if sock is None or err_read is None:
            raise RuntimeError("a child forked ahead is used once")
        self._sock = self._err_read = None
        try:
            sock.sendall(setup)  # a few KiB into an empty socket buffer: it never blocks
        except OSError:
            pass  # it died: whoever serves it sees that, and why
        return self.child, sock, err_read

    async def discard(self) -> None:
        """Kill and reap the child unless it was used; close our ends. Idempotent."""
        if self._sock is None:
            return
        self._sock.close()  # it reads EOF and exits, if it still can
        self._sock = None
        if self._err_read is not None:
            os.close(self._err_read)
            self._err_read = None
        if self.child.returncode is None:
            try:
                os.killpg(self.child.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        with trio.CancelScope(shield=True):
            await self.child.wait()  # the zygote reaps it (or its loss marks it exited)


async def fork_ahead(
    zygote: Zygote,
    pair: tuple[socket.socket, socket.socket],
    prepare: Mapping[str, object] | None = None,
) -> ForkedAhead:
    """Have ``zygote`` fork a child ahead (see :meth:`Zygote.fork_ahead`: ``prepare``),
    serving on ``pair`` (the host's end, the child's: ``process.worker_socketpair()``; both
    are ours to close from now). Raises ``WorkerCrashedError`` when the zygote is gone or
    could not fork."""
    host_sock, child_sock = pair
    err_read, err_write = os.pipe()
    try:
        child = await zygote.fork_ahead(child_sock.fileno(), err_write, prepare)
    except BaseException:
        host_sock.close()
        os.close(err_read)
        raise
    finally:
        child_sock.close()
        os.close(err_write)
    return ForkedAhead(zygote, child, host_sock, err_read)
