"""The subprocess backend's child slots, and the child its zygote keeps forked ahead.

A slot is one child process alive: an execution holds one from before its child starts
until that child is reaped. :class:`ChildSlots` hands them out (waiting until the job's
deadline), lends a caller's slot to its nested invocations when none is free, and keeps
**one child forked ahead** (:mod:`plugin_execution.host.spare`) while a slot is free for it.

The child forked ahead holds a slot of its own, so the backend never has more children than
``max_concurrent``: it is made only from a slot that nobody waits for, and the next execution
that fits the zygote takes it, slot included (waiting for it while it is being forked rather
than for another slot). Nobody can then be left waiting for a slot that a spare holds. A
spare whose child died, or whose zygote died, is reaped and replaced; the one left when the
backend closes is killed and reaped before its block ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from ..errors import BackendClosedError, WorkerCrashedError
from ..host.process import worker_socketpair
from ..host.spare import ForkedAhead, fork_ahead

if TYPE_CHECKING:
    from ..host.zygote import ZygoteKeeper
    from .job import Job

__all__ = ["ChildSlots"]


class _Ahead:
    """A slot held for a child forked ahead (the limiter's borrower), and that child."""

    def __init__(self) -> None:
        self.child: ForkedAhead | None = None
        self.taken = trio.Event()


class ChildSlots:
    """``max_concurrent`` child slots; with ``zygotes``, one of them for a child forked
    ahead whenever one is free (see the module's docstring). ``running`` says whether the
    backend still takes work (a wait ended by the shutdown is then ``BackendClosedError``)."""

    def __init__(
        self,
        max_concurrent: int,
        *,
        zygotes: ZygoteKeeper | None,
        running: Callable[[], bool],
    ) -> None:
        self.limiter = trio.CapacityLimiter(max_concurrent)
        self.zygotes = zygotes
        self._running = running
        self._waiting: set[trio.CancelScope] = set()  # executions queued for a slot
        self._ahead: _Ahead | None = None  # ready, not taken
        self._forking: trio.Event | None = None  # set once the one being forked is ready
        self._freed = trio.Event()  # a slot was given back: maybe one is free for a spare
        #: Children forked ahead; of them, used by an execution.
        self.forked_ahead = 0
        self.used_ahead = 0

    @asynccontextmanager
    async def hold(self, job: Job, *, ahead: bool) -> AsyncIterator[ForkedAhead | None]:
        """Hold a child slot for ``job``, waiting for one until its deadline; yield the
        child forked ahead that comes with it (``ahead``: the job's child may be one), else
        None. A nested invocation (``ctx.invoke``) that finds none free runs on its
        caller's slot instead, lent to one of the caller's invocations at a time: it must
        never wait for the slots its own ancestors hold (with every slot taken by callers,
        none would come)."""
        spare = await self._take(job) if ahead else None
        if spare is not None:
            child = spare.child
            try:
                if child is not None and not child.usable:
                    await child.discard()
                    child = None
                job.slot = self.limiter
                del job  # not held while the child is reaped
                yield child
            finally:
                if child is not None:
                    await child.discard()  # unless it was used (then its worker reaps it)
                self.limiter.release_on_behalf_of(spare)
                self._freed.set()
            return
        parent = job.parent
        nested = parent is not None and parent.slot is not None
        if parent is not None and nested and not _took(self.limiter):
            lent = parent.lent_slot()
            await self._wait(
                job, lent.acquire, " while its caller's slot was lent to another of its invocations"
            )
            try:
                job.slot = parent.slot
                del job
                yield None
            finally:
                lent.release()
            return
        if not nested:
            await self._wait(job, self.limiter.acquire, " while waiting for a free child slot")
        try:
            job.slot = self.limiter
            del job
            yield None
        finally:
            self.limiter.release()
            self._freed.set()

    def cancel_waiting(self) -> None:
        """Fail the executions still waiting for a slot (the backend is closing)."""
        for waiting in self._waiting:
            waiting.cancel()

    async def _take(self, job: Job) -> _Ahead | None:
        """The slot of the child forked ahead, if there is one (waiting, within the job's
        deadline, while it is being forked)."""
        if self._forking is not None:
            await self._wait(job, self._forking.wait, " while waiting for a child")
        spare, self._ahead = self._ahead, None
        if spare is not None:
            spare.taken.set()
            if spare.child is not None and spare.child.usable:
                self.used_ahead += 1
        return spare

    async def _wait(self, job: Job, acquire: Callable[[], Awaitable[object]], what: str) -> None:
        """Wait for capacity until the job's deadline; a shutdown ends the wait at once with
        ``BackendClosedError`` (what is queued never starts)."""
        with trio.CancelScope(deadline=job.deadline) as waiting:
            self._waiting.add(waiting)
            try:
                await acquire()
            finally:
                self._waiting.discard(waiting)
        if waiting.cancelled_caught:
            if not self._running():
                raise BackendClosedError("the subprocess backend shut down before a slot freed")
            raise job.timeout_error(what)

    async def keep_ahead(self, prepare: Callable[[], Mapping[str, object]] | None = None) -> None:
        """Keep a child forked ahead in a free slot, until cancelled (then the one left is
        killed and reaped). ``prepare()``: what the next one does while it waits (see
        ``bootstrap.prepare``), asked at each fork."""
        zygotes = self.zygotes
        assert zygotes is not None
        while True:
            zygote = zygotes.live()
            if zygote is None:  # (a lost one's keeper sets ready anew once it is replaced)
                ready = zygotes.ready
                if ready.is_set():
                    await trio.sleep(0.01)
                else:
                    await ready.wait()
                continue
            spare = _Ahead()
            try:
                self.limiter.acquire_on_behalf_of_nowait(spare)
            except trio.WouldBlock:  # every slot in use, or waited for
                self._freed = trio.Event()
                await self._freed.wait()
                continue
            self._forking = forking = trio.Event()
            try:
                spec = prepare() if prepare is not None else None
                spare.child = await fork_ahead(zygote, worker_socketpair(), spec)
                self.forked_ahead += 1
                self._ahead = spare
            except WorkerCrashedError:  # the zygote is gone, or could not fork
                pass
            finally:
                self._forking = None
                forking.set()
                if self._ahead is not spare:  # it failed, or we were cancelled
                    self.limiter.release_on_behalf_of(spare)
            if spare.child is None:
                await trio.sleep(0.05)  # not in a tight loop
                continue
            try:
                await _until_taken_or_dead(spare)
            finally:
                if self._ahead is spare:  # not taken: it died, or the backend closes
                    self._ahead = None
                    await spare.child.discard()
                    self.limiter.release_on_behalf_of(spare)


async def _until_taken_or_dead(spare: _Ahead) -> None:
    child = spare.child
    assert child is not None
    async with trio.open_nursery() as nursery:

        async def wait_then_cancel(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait_then_cancel, spare.taken.wait)
        nursery.start_soon(wait_then_cancel, child.child.wait)


def _took(limiter: trio.CapacityLimiter) -> bool:
    """Take a token of ``limiter`` if one is free now; whether it did."""
    try:
        limiter.acquire_nowait()
    except trio.WouldBlock:
        return False
    return True
