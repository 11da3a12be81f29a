"""One trio guest run per asyncio loop, shared by every backend of that loop.

trio runs as a guest on the asyncio loop (``trio.lowlevel.start_guest_run``): its tasks step
in callbacks of the same thread, and only its wait for I/O happens in a helper thread. So
asyncio code may touch trio objects directly: spawning a task in the guest's nursery,
cancelling a scope or setting a ``trio.Event`` reschedules trio tasks and, when trio is
waiting for I/O, wakes it (trio's own ``force_guest_tick_asap``). A call from asyncio into
trio is therefore one trio task in the shared nursery and one asyncio future that task
completes: no thread per call, no extra task on either side.

The run starts when the first backend of a loop is entered and ends (its nursery cancelled,
its ``done_callback`` seen) when the last one leaves: nothing of trio outlives the backends.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

import outcome
import trio

from .. import tracing

__all__ = ["GuestRun", "Held", "acquire", "release"]

T = TypeVar("T")

_runs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GuestRun] = weakref.WeakKeyDictionary()


#: How long trio stays awake (runnable, stepping once per asyncio loop iteration) after a
#: call from asyncio ended, in seconds. While it is awake, handing it a call costs
#: no thread wake-up; once it sleeps, trio waits for I/O in its helper thread and the next
#: call must wake that thread, which wakes the asyncio loop (~50-150 µs more for that call).
LINGER = 200e-6

#: Idle runner tasks kept parked for the next calls; past this, a runner that finds no
#: work ends (a burst of many concurrent calls leaves no crowd of parked tasks behind).
MAX_IDLE_RUNNERS = 128


class _Call:
    """One call from asyncio into trio: what to run, the caller's future, and where it runs."""

    __slots__ = ("args", "cancelled", "finished", "fn", "future", "running", "scope")

    def __init__(
        self,
        future: asyncio.Future[Any],
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
    ) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        #: The cancel scope of the runner running it; None until a runner took it.
        self.scope: trio.CancelScope | None = None
        self.running = True
        self.cancelled = False  # given up by the asyncio side before a runner took it
        #: Made when the asyncio caller gave up (cancelled) and waits for the trio side.
        self.finished: asyncio.Future[None] | None = None

    def done(self) -> None:
        self.running = False
        if self.finished is not None:
            _resolve(self.finished, None)


class GuestRun:
    """The trio guest run of one asyncio loop. See the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.users = 0
        self.closing = False
        self._nursery: trio.Nursery | None = None
        self._idle: list[trio.lowlevel.Task] = []  # parked runners, waiting for a call
        self._queue: deque[_Call] = deque()  # calls for the runners about to park
        self._lingering = 0  # runners in their last batch before they park
        self._keep_until = 0.0  # the keeper lingers until then (time.perf_counter)
        self._keeping = False  # whether a lingering runner is keeping trio awake
        self._stop = trio.Event()
        self._ready: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()

    # -- the run itself ---------------------------------------------------------------------

    def start(self) -> None:
        trio.lowlevel.start_guest_run(
            self._main,
            run_sync_soon_threadsafe=self.loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=self.loop.call_soon,
            done_callback=self._finished,
            host_uses_signal_set_wakeup_fd=True,
        )

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            _resolve(self._ready, None)
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def _finished(self, result: outcome.Outcome[None]) -> None:
        self._nursery = None
        while self._queue:  # (only a call made as the last backend left can be here)
            _fail(self._queue.popleft().future, RuntimeError("the trio guest run ended"))
        if isinstance(result, outcome.Error):
            _fail(self._ready, result.error)
            _fail(self.done, result.error)
        else:
            _fail(self._ready, RuntimeError("the trio guest run ended before it started"))
            _resolve(self.done, None)

    # -- calls from asyncio into trio -------------------------------------------------------
    #
    # Calls run on runner tasks: long-lived trio tasks, each in a cancel scope of its own,
    # that take one call after another. Handing a call to a parked runner is one
    # ``reschedule``, much cheaper than spawning a task and entering a scope per call. A
    # runner that finished a call stays runnable for one more trio batch before it parks:
    # the caller's wake-up runs first on the asyncio loop, so its next call finds trio
    # awake instead of waiting in its I/O thread (two thread wake-ups saved per call). One
    # of them, the keeper, lingers longer (until LINGER after the last call ended), for
    # callers that await other things between calls. A new call ends the lingering and goes
    # to a lingering runner first (rather than waking a parked one, which would cost a task
    # step more): the keeper must not go on spinning while the call waits for a worker
    # process, which on a small machine takes a CPU from the worker.

    def start_call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> _Call:
        """Start ``await fn(*args)`` in trio; its outcome completes ``call.future``."""
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("the trio guest run of this loop is not running")
        call = _Call(self.loop.create_future(), fn, args)
        self._keep_until = 0.0  # trio is awake until this call ends: the keeper may stop
        if tracing.enabled():
            # A task of its own, spawned here, runs in a copy of the asyncio caller's context,
            # so the execution's span is a child of the caller's (a runner's is its own).
            nursery.start_soon(self._run_alone, call)
        elif self._lingering > len(self._queue):  # a runnable runner takes it (the keeper)
            self._queue.append(call)
        elif self._idle:
            trio.lowlevel.reschedule(self._idle.pop(), outcome.Value(call))
        else:  # a runner serves every caller: it must not keep this one's context
            contextvars.Context().run(nursery.start_soon, self._runner, call)
        return call

    async def _runner(self, call: _Call | None) -> None:
        me = trio.lowlevel.current_task()
        while True:
            with trio.CancelScope() as scope:
                while True:
                    if call is not None and not call.cancelled:
                        call.scope = scope
                        await self._run_call(call)
                    elif call is not None:
                        call.done()
                    call = await self._next_call(me)
                    if call is None:
                        return
            # The scope caught the cancellation of ``call`` by its caller: a fresh scope
            # for the next one.
            call = await self._next_call(me)
            if call is None:
                return

    async def _keep_awake(self) -> None:
        """Linger, stepping once per trio batch, until a call is queued for this runner or
        LINGER seconds have passed since the last call ended: meanwhile trio stays runnable,
        so a call from asyncio needs no thread wake-up (see LINGER)."""
        self._keeping = True
        try:
            clock = time.perf_counter
            while not self._queue and not self.closing and clock() < self._keep_until:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._keeping = False

    async def _run_alone(self, call: _Call) -> None:
        if call.cancelled:
            call.done()
            return
        with trio.CancelScope() as call.scope:
            await self._run_call(call)
        if not self._keeping:
            await self._keep_awake()

    async def _next_call(self, me: trio.lowlevel.Task) -> _Call | None:
        if self._queue:
            return self._queue.popleft()
        self._lingering += 1
        try:
            await trio.lowlevel.cancel_shielded_checkpoint()
            if not self._queue and not self._keeping:
                await self._keep_awake()
        finally:
            self._lingering -= 1
        if self._queue:
            return self._queue.popleft()
        if len(self._idle) >= MAX_IDLE_RUNNERS:
            return None
        self._idle.append(me)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._idle.remove(me)
            return trio.lowlevel.Abort.SUCCEEDED

        next_call: _Call = await trio.lowlevel.wait_task_rescheduled(abort)
        return next_call

    async def _run_call(self, call: _Call) -> None:
        future = call.future
        try:
            value = await call.fn(*call.args)
        except Exception as exc:
            _fail(future, exc)
        except BaseException:  # trio.Cancelled: by the caller, or the run is ending
            if call.scope is not None and call.scope.cancel_called:
                future.cancel()  # the caller gave up on it: nobody reads an outcome
            else:
                _fail(future, RuntimeError("the trio guest run ended during this call"))
            raise
        else:
            if not future.done():
                future.set_result(value)
        finally:
            call.done()
            self._keep_until = time.perf_counter() + LINGER

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)`` in trio. Cancelling the caller cancels the trio task's scope
        and waits until the task has finished (its cleanup done), then raises
        ``CancelledError``; an exception of the trio task is raised as it is."""
        call = self.start_call(fn, *args)
        try:
            return await call.future  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            if call.future.cancelled():
                await self.abort(call)
            raise

    async def abort(self, call: _Call) -> None:
        """Cancel ``call`` in trio and wait, however often cancelled, until it ended."""
        if call.scope is None:  # no runner has begun it: it never will
            call.cancelled = True
            if call in self._queue:
                self._queue.remove(call)
            return
        call.scope.cancel()
        if not call.running:
            return
        finished = call.finished = self.loop.create_future()
        await wait_uncancelled(finished)

    async def enter(self, manager: AbstractAsyncContextManager[T]) -> Held[T]:
        """Enter ``manager`` (a trio async context manager) in a trio task that holds it
        open until :meth:`Held.exit`."""
        entered: asyncio.Future[T] = self.loop.create_future()
        leave = trio.Event()
        call = self.start_call(_hold, manager, entered, leave)
        try:
            value = await entered
        except asyncio.CancelledError:
            if entered.cancelled():
                await self.abort(call)
            raise
        except BaseException:
            await wait_uncancelled(call.future)  # it failed: the task is ending
            raise
        return Held(self, call, value, leave)

    # -- calls from trio into asyncio -------------------------------------------------------

    async def call_asyncio(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` as an asyncio task and wait for it from trio. Cancelling the trio
        caller cancels the asyncio task and waits for it to end."""
        task = self.loop.create_task(coro)
        done = trio.Event()
        task.add_done_callback(lambda _: done.set())
        try:
            await done.wait()
        finally:
            if not task.done():
                task.cancel()
                with trio.CancelScope(shield=True):
                    await done.wait()
        return task.result()


class Held(Generic[T]):
    """A trio async context manager held open by a trio task, for asyncio code."""

    def __init__(self, run: GuestRun, call: _Call, value: T, leave: trio.Event) -> None:
        self.run = run
        self.value = value
        self._call = call
        self._leave = leave

    async def exit(self, *, cancellable: bool = True) -> None:
        """Leave the context manager and wait until its exit is done; its exception is
        raised here. A cancelled wait cancels the exit's trio task when ``cancellable``
        (and still waits for it), else just goes on waiting; ``CancelledError`` follows."""
        self._leave.set()
        future = self._call.future
        try:
            await future
        except asyncio.CancelledError:
            if not future.cancelled():
                raise
            if cancellable:
                await self.run.abort(self._call)
            elif self._call.running:
                finished = self._call.finished = self.run.loop.create_future()
                await wait_uncancelled(finished)
            raise


async def _hold(
    manager: AbstractAsyncContextManager[T], entered: asyncio.Future[T], leave: trio.Event
) -> None:
    try:
        async with manager as value:
            if entered.done():  # the asyncio side gave up while it was entering
                return
            entered.set_result(value)
            await leave.wait()
    except Exception as exc:
        if entered.done():
            raise  # from the exit: the asyncio side gets it from Held.exit
        entered.set_exception(exc)
    except BaseException:
        if not entered.done():
            entered.set_exception(RuntimeError("the trio guest run ended while entering"))
        raise


async def wait_uncancelled(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, whatever cancels the waiting task meanwhile; then
    raise ``CancelledError`` if it was cancelled (once), so the cancellation is not lost."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.cancelled():
                break
            cancelled = True
        except BaseException:
            break
    if cancelled:
        raise asyncio.CancelledError


async def acquire() -> GuestRun:
    """The running loop's guest run, started if needed; counts one more user."""
    loop = asyncio.get_running_loop()
    while True:
        run = _runs.get(loop)
        if run is None:
            run = _runs[loop] = GuestRun(loop)
            run.users += 1
            try:
                run.start()
            except BaseException:
                del _runs[loop]
                raise
            break
        if not run.closing:
            run.users += 1
            break
        await wait_uncancelled(run.done)  # the last user is ending it: start a new one
    try:
        await asyncio.shield(run._ready)
    except BaseException:
        await release(run)
        raise
    return run


async def release(run: GuestRun) -> None:
    """One user fewer; the last one ends the run and waits until it has ended."""
    run.users -= 1
    if run.users:
        return
    run.closing = True
    run._stop.set()
    try:
        await wait_uncancelled(run.done)
    finally:
        if _runs.get(run.loop) is run:
            del _runs[run.loop]
    error = run.done.exception()
    if error is not None:
        raise error


def _resolve(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
