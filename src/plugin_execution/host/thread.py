"""Workers as threads of the host process, for the pool's ``kind="thread"``.

The same worker runtime as a child process, on a thread, over a socketpair: every protocol
path (cancel, ping, events, errors) is shared with process workers. What differs is what
cannot be done to a thread: it cannot be killed. "Killing" an in-thread worker closes its
socket; its reader stops and a handler still running is abandoned (it runs to completion
on its own daemon thread, its result discarded) while the pool starts a replacement.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..worker.runtime import Worker
from .process import WorkerProcess, serve_worker, worker_socketpair

__all__ = ["open_worker_thread"]


class _WorkerThread:
    """A ``ChildProcess`` look-alike for a thread: ``returncode`` is 0 once it ended."""

    def __init__(self, sock: socket.socket) -> None:
        self.pid = None  # no process of its own
        self.returncode: int | None = None
        self._sock = sock
        self._ended = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def run() -> None:
            try:
                Worker(sock.fileno(), in_thread=True, close=sock.close).serve()
            finally:
                try:
                    token.run_sync_soon(self._end)
                except trio.RunFinishedError:
                    pass

        self._thread = threading.Thread(target=run, name="pool-worker", daemon=True)
        self._thread.start()

    def _end(self) -> None:
        self.returncode = 0
        self._ended.set()

    async def wait(self) -> int:
        await self._ended.wait()
        return 0

    def kill(self) -> None:
        """Abandon the thread: shut its socket so its reader stops."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@asynccontextmanager
async def open_worker_thread(
    *, start_timeout: float = 30.0, close_grace: float = 2.0
) -> AsyncIterator[WorkerProcess]:
    """Start a worker on a new thread and yield its handle; stop it on exit."""
    host_sock, worker_sock = worker_socketpair()
    thread = _WorkerThread(worker_sock)
    async with serve_worker(
        thread,
        host_sock,
        None,
        kill=thread.kill,
        spin_ok=False,  # it needs the GIL a polling host thread would hold
        start_timeout=start_timeout,
        close_grace=close_grace,
    ) as worker:
        yield worker
