"""The threads a worker runs handlers on: reusable executor threads and one trio loop.

Threads, not an event loop, so a child that runs only sync handlers never imports trio:

- a sync handler runs on an executor thread (one per concurrent execution, reused), or on
  the reading thread itself (see ``Worker._lead``), which is an executor thread too;
- async handlers, channel sessions and async warm-up hooks share one trio loop, started on
  first need: on a thread of its own, or (a one-shot child's reader, see
  ``Worker._run_loop_here``) on the thread that needed it, the loop then reading the
  socket itself.

Standard library only at import time: worker children load this module at start-up.
"""

from __future__ import annotations

import _thread
import threading
from _queue import Empty, SimpleQueue  # the C module: queue.py costs a fresh child ~2 ms

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["Executor", "HandlerThreads", "TrioLoop"]


class Executor(threading.Thread):
    """A reusable thread for sync handlers; returns itself to the idle queue after each job."""

    def __init__(
        self, idle: SimpleQueue[Executor], stopped: threading.Event, *, start: bool = True
    ) -> None:
        super().__init__(name="worker-executor", daemon=True)
        self._jobs: SimpleQueue[Callable[[], None] | None] = SimpleQueue()
        self._idle = idle
        self._stopped = stopped
        if start:
            self.start()

    def submit(self, job: Callable[[], None] | None) -> None:
        """Run ``job`` on this thread; ``None`` ends the thread."""
        self._jobs.put(job)

    def run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
            if self._stopped.is_set():
                return
            self._idle.put(self)


class TrioLoop:
    """One trio loop for async handlers, on a thread of its own; started on first need.

    Starting it does not wait for the loop to run: what :meth:`start_soon` is given
    meanwhile is started by the loop itself once it runs (the first async handler of a
    fresh child pays no thread hand-offs for the start). ``token`` and ``nursery`` wait for
    the loop. ``thread`` False: no thread is started; whoever made it calls
    :meth:`run_here` (or :meth:`run_on_thread`) next.
    """

    def __init__(self, *, thread: bool = True) -> None:
        import trio

        self.trio = trio
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._early: list[tuple[Callable[..., Any], tuple[Any, ...]]] | None = []

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                with self._lock:
                    early, self._early = self._early, None
                for fn, args in early or ():
                    nursery.start_soon(fn, *args)
                self._ready.set()
                await trio.sleep_forever()

        self._main = main
        if thread:
            self.run_on_thread()

    def run_on_thread(self) -> None:
        """Run the loop on a new thread (not waiting for it to run)."""
        # Not threading.Thread().start(), which waits for the thread to run (see Worker._lead).
        _thread.start_new_thread(self.trio.run, (self._main,))

    def run_here(self) -> None:
        """Run the loop on the calling thread, until :meth:`stop`."""
        self.trio.run(self._main)

    @property
    def token(self) -> Any:
        """The loop's ``TrioToken`` (waits for the loop to run)."""
        self._ready.wait()
        return self._token

    @property
    def nursery(self) -> Any:
        """The nursery tasks start in (waits for the loop to run)."""
        self._ready.wait()
        return self._nursery

    def start_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Start ``fn(*args)`` as a task of the loop (from any thread)."""
        with self._lock:
            if self._early is not None:  # the loop is not up yet: it starts these itself
                self._early.append((fn, args))
                return
        self._token.run_sync_soon(self._nursery.start_soon, fn, *args)

    def run(self, awaitable: Any) -> Any:
        """Run an awaitable on the loop and wait for its outcome (from another thread)."""

        async def wait() -> Any:
            return await awaitable

        return self.trio.from_thread.run(wait, trio_token=self.token)

    def stop(self) -> None:
        """Cancel what runs on the loop and end its thread (releasing its fds)."""
        try:
            self.token.run_sync_soon(self.nursery.cancel_scope.cancel)
        except self.trio.RunFinishedError:
            pass


class HandlerThreads:
    """A worker's executor threads (idle ones wait in a queue) and its trio loop.

    ``loop`` is None until :meth:`start_loop` first runs: a worker that never runs async
    code never imports trio. While ``keep_here`` names a thread, a loop that thread starts
    is made but not run: it waits in ``kept`` for that thread to run it (see
    ``Worker._lead``).
    """

    def __init__(self) -> None:
        self.idle: SimpleQueue[Executor] = SimpleQueue()
        self.stopped = threading.Event()
        self.loop: TrioLoop | None = None
        self.keep_here: int | None = None
        self.kept: TrioLoop | None = None
        self._loop_lock = threading.Lock()

    def executor(self) -> Executor:
        """An idle executor thread, or a new one."""
        try:
            return self.idle.get_nowait()
        except Empty:
            return Executor(self.idle, self.stopped)

    def submit_soon(self, job: Callable[[], None]) -> None:
        """Run ``job`` on an idle executor thread, or on a new one, started without waiting
        for it to run (``threading.Thread.start`` waits: a thread switch or two)."""
        try:
            self.idle.get_nowait().submit(job)
        except Empty:
            _thread.start_new_thread(self._new_executor, (job,))

    def _new_executor(self, job: Callable[[], None]) -> None:
        executor = Executor(self.idle, self.stopped, start=False)
        executor.submit(job)
        executor.run()

    def start_loop(self) -> TrioLoop:
        """The trio loop, started on the first call (from any thread)."""
        with self._loop_lock:
            if self.loop is None:
                here = self.keep_here is not None and self.keep_here == threading.get_ident()
                self.loop = TrioLoop(thread=not here)
                if here:
                    self.kept = self.loop
            return self.loop

    def stop(self) -> None:
        """End the idle threads and the loop; busy threads end after their handler."""
        self.stopped.set()
        while not self.idle.empty():
            self.idle.get_nowait().submit(None)
        if self.loop is not None:
            self.loop.stop()
