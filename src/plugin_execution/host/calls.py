"""Calls: what the host has asked of one worker and waits for, and what the worker asks back.

:class:`Calls` keeps the executions submitted to the worker (:class:`Pending`), its pings and
warm-ups, and their deadlines; it routes every message read from the worker to whoever waits
for it (``dispatch``): a result or an error to its execution, an event to the execution's
sink, a channel message to its bridge, a platform call to :class:`PlatformCalls`. Past an
execution's deadline it asks the worker to cancel, and kills the worker after the cancel
grace if it did not.

:class:`PlatformCalls` serves the worker's ``PlatformCall`` s with the session the host made
for the execution (the worker's word is taken for nothing but the execution id), bounded in
number and bytes per execution, and replies.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from .._deadlines import Deadlines
from ..errors import AbortedError, ExecutionError, InvalidRequestError, WorkerCrashedError
from ..protocol import (
    Cancel,
    ChannelClose,
    ChannelCredit,
    ChannelData,
    Error,
    Event,
    Execute,
    Hello,
    Ping,
    PlatformCall,
    PlatformReply,
    Pong,
    ProtocolError,
    Result,
    Warmed,
    Warmup,
)
from ..types import ExecutionEvent, ExecutionResult, check_serializable
from .connection import Reply, WorkerConnection

if TYPE_CHECKING:
    from ..backends.job import Job
    from .handle import ChannelEndpoint

__all__ = ["LOST", "Calls", "Pending", "PlatformCalls", "execute_fields"]

#: The value of a reply that failed because the worker was lost, not by the worker's answer.
LOST: Final = object()
_MAX_CALLS_IN_FLIGHT = 64  # platform calls of one execution at once
# Bytes of the frames of one execution's platform calls in flight: what the host holds for
# its calls waiting (an invoke's input, a request body...) is bounded, not 64 x 64 MiB.
_MAX_CALL_BYTES_IN_FLIGHT = 64 * 1024 * 1024


class Pending(Reply):
    """An execution submitted to the worker: its job, and what of its request is still to
    be sent (see :meth:`Calls.submit`)."""

    __slots__ = ("cancel_grace", "job", "linger", "lost", "unsent")

    def __init__(self, job: Job, cancel_grace: float, linger: float) -> None:
        # Reply.__init__'s fields, set here: one is made per execution.
        self.done = False
        self.expired = False
        self.wake = None
        self.sink = job.sink
        self.value = None
        self.error = None
        self.job: Job | None = job
        self.lost = False  # it had no answer when the worker was lost (see untrack)
        self.cancel_grace = cancel_grace
        self.linger = linger
        self.unsent: tuple[list[memoryview], bool] | None = None


def execute_fields(job: Job, workspace: str | None, now: float) -> dict[str, Any]:
    """The fields of ``job``'s ``Execute`` up to its ``timeout`` (what is left of it at
    ``now``, trio clock), in the message's order: the frame is packed from them."""
    request = job.request
    target = job.target
    return {
        "execution_id": request.execution_id,
        "plugin_id": request.plugin_id,
        "handler_id": request.handler_id,
        "entry": target.entry,
        "root": target.root,
        "input": request.input,
        "context": request.context,
        "workspace": workspace,
        "timeout": max(0.001, job.deadline - now),
    }


class Calls:
    """The requests in flight on one worker, and the routing of its messages. Made by the
    worker handle, which gives it the connection and its own ``kill`` / ``crash_error``."""

    def __init__(
        self,
        connection: WorkerConnection,
        *,
        worker_id: str,
        kill: Callable[[], None],
        crash_error: Callable[[], ExecutionError],
        channels: dict[str, ChannelEndpoint],
    ) -> None:
        self.worker_id = worker_id
        self.lost = connection.lost
        self.channels = channels
        self.executions = 0
        self.exiting = False  # it said so: an execution's error was WORKER_CRASHED
        #: The last result came from an async handler (the worker says so in its metadata,
        #: which the caller does not see): the subprocess backend's hint for its next child.
        self.last_async = False
        self.nursery: trio.Nursery | None = None  # where deadlines' cancels and calls run
        self._kill = kill
        self._crash_error = crash_error
        self.connection = connection
        # The connection's methods, bound once: the round trip's path has no extra hop.
        self._protocol = connection.protocol
        self._write_now = connection.write_now
        self._send_rest = connection.send_rest
        self._send = connection.send
        self._wait_for = connection.wait_for
        self._pending: dict[str, Reply] = {}
        self._pongs: dict[int, Reply] = {}
        self._warmed: dict[tuple[str, str], Reply] = {}
        self._ping_seq = itertools.count()
        self.hello = Reply()
        # The deadlines of executions running here: (execution id, cancel grace, reply).
        self.deadlines = Deadlines(self.expire, self._unexpired)
        # Each execution running here: its session is what its platform calls are checked
        # against (see PlatformCalls).
        self._jobs: dict[str, Job] = {}
        self._platform = PlatformCalls(self._send, self._jobs)
        self._calls = self._platform.calls

    def start(self, nursery: trio.Nursery) -> None:
        """Run deadlines' cancels and platform calls in ``nursery`` from now on."""
        self.nursery = self._platform.nursery = nursery

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def running_plugins(self) -> tuple[str, ...]:
        """The plugin ids of the executions running now."""
        return tuple(job.request.plugin_id for job in self._jobs.values())

    def fail_all(self) -> None:
        """The worker is lost: every request waiting for it fails with ``crash_error()``."""
        for reply in (*self._pending.values(), *self._pongs.values(), *self._warmed.values()):
            reply.finish(LOST, self._crash_error())
        self._pongs.clear()
        self._warmed.clear()
        self.hello.finish(error=self._crash_error())

    def submit(
        self,
        job: Job,
        *,
        workspace: str | None = None,
        cancel_grace: float = 1.0,
        linger: float = 0.0,
    ) -> Pending:
        """Start ``job`` on this worker without waiting: the request goes out now if the
        socket takes it whole (else :meth:`collect` finishes sending it). Pair every call
        with :meth:`collect`, which waits for the answer and cleans up.

        The pool submits a queued caller's request in the same step that frees the worker,
        so the worker is not idle while the caller is scheduled. ``linger``: how long the
        worker polls for a next request after answering (``Execute.linger``), and the host
        for the reply before parking (see ``connection._poll``): a next request usually follows at
        once.
        """
        if self.lost.is_set():
            raise self._crash_error()
        request = job.request
        fields = execute_fields(job, workspace, trio.current_time())
        fields["linger"] = linger
        try:
            frame = self._protocol.send_execute(**fields)
        except ProtocolError:
            # Input must be plain data on every backend; a context may hold values the
            # converter makes plain (the general path); too big is too big.
            check_serializable(request.input, "input")
            try:
                frame = self._protocol.send(Execute(**fields))
            except ProtocolError as exc:
                raise InvalidRequestError(f"the request cannot be sent: {exc}") from None
        pending = Pending(job, cancel_grace, linger)
        self.track(pending)
        pending.unsent = self._write_now(frame)
        return pending

    def track(self, pending: Pending) -> None:
        """Count ``pending`` as in flight here: its answer is routed to it, its deadline
        watched, its platform calls served. Undone by :meth:`untrack`."""
        job = pending.job
        assert job is not None
        execution_id = job.request.execution_id
        self._pending[execution_id] = pending
        self._jobs[execution_id] = job
        self.deadlines.add(job.deadline, (execution_id, pending.cancel_grace, pending))
        self.executions += 1

    def track_all(self, pendings: list[Pending]) -> None:
        """:meth:`track` each of ``pendings`` (a batch's members), their deadlines at once."""
        running, jobs = self._pending, self._jobs
        deadlines: list[tuple[float, tuple[str, float, Reply]]] = []
        for pending in pendings:
            job = pending.job
            assert job is not None
            execution_id = job.request.execution_id
            running[execution_id] = pending
            jobs[execution_id] = job
            deadlines.append((job.deadline, (execution_id, pending.cancel_grace, pending)))
        self.deadlines.add_all(deadlines)
        self.executions += len(pendings)

    def untrack(self, pending: Pending) -> tuple[Any, ExecutionError | None]:
        """``pending`` is no longer in flight: forget it, end its platform calls still
        running, and let go of what it holds; returns its answer (value, error)."""
        job = pending.job
        assert job is not None, "collected twice"
        execution_id = job.request.execution_id
        del self._pending[execution_id]
        del self._jobs[execution_id]
        if self._calls:
            for scope in self._calls.pop(execution_id, ()):
                scope.cancel()
        # The deadline heap keeps ``pending`` until its deadline or a compaction: let go
        # of what may be big (the request's input, the output, an error's traceback).
        value, error, pending.error, pending.value = pending.value, pending.error, None, None
        pending.lost = value is LOST
        pending.job = pending.sink = pending.unsent = None
        return value, error

    def outcome(
        self, pending: Pending, job: Job, value: Any, error: ExecutionError | None, backend: str
    ) -> ExecutionResult | ExecutionError:
        """What came of an untracked ``pending`` (see :meth:`untrack`): its result, or the
        error to raise (``TIMEOUT`` past its deadline; the crash when no answer came)."""
        if pending.expired:
            return job.timeout_error()
        if error is not None:
            return error
        if not pending.done:
            return self._crash_error()
        metadata = value.metadata
        self.last_async = metadata.pop("async", False) is True
        return ExecutionResult(
            execution_id=job.request.execution_id,
            ok=True,
            output=value.output,
            duration_s=time.perf_counter() - job.started,
            backend=backend,
            worker_id=self.worker_id,
            metadata=metadata,
        )

    async def collect(
        self, pending: Pending, *, backend: str, sent_now: bool = True
    ) -> ExecutionResult:
        """Wait for the answer to a :meth:`submit` and return the result.

        Raises the handler's :class:`ExecutionError`; ``WorkerCrashedError`` when the worker
        dies; ``job.timeout_error()`` at the deadline, after sending ``Cancel`` and waiting
        the cancel grace for the worker to stop the handler, killing the worker if it did
        not. Cancellation does the same, then re-raises. ``sent_now``: the request went out
        just before this call, so its answer cannot be there yet. A submission that asked
        the worker to linger polls for the reply as long before parking (see ``connection._poll``).
        """
        job = pending.job
        assert job is not None, "collected twice"
        try:
            if pending.unsent is not None:
                unsent, pending.unsent = pending.unsent, None
                with trio.CancelScope(shield=True):  # never half a frame: it would end the worker
                    await self._send_rest(*unsent)
            await self._wait_for(pending, sent=sent_now, spin=pending.linger)
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self.stop_execution(job.request.execution_id, pending, pending.cancel_grace)
            raise
        finally:
            value, error = self.untrack(pending)
        outcome = self.outcome(pending, job, value, error, backend)
        if isinstance(outcome, ExecutionError):
            raise outcome
        return outcome

    async def execute(
        self,
        job: Job,
        *,
        backend: str,
        workspace: str | None = None,
        cancel_grace: float = 1.0,
        spin: float = 0.0,
    ) -> ExecutionResult:
        """Run ``job`` on this worker and return its result: :meth:`submit`, then
        :meth:`collect` (see there for the errors). ``spin``: seconds to poll for the reply
        before parking (see ``connection._poll``); the worker then lingers as long for the next
        request (one usually follows at once).
        """
        pending = self.submit(job, workspace=workspace, cancel_grace=cancel_grace, linger=spin)
        return await self.collect(pending, backend=backend)

    async def stop_execution(self, execution_id: str, pending: Reply, grace: float) -> None:
        """Ask the worker to stop an execution; kill it when it has not answered within
        ``grace`` seconds."""
        if pending.done or self.lost.is_set():
            return
        try:
            await self._send(Cancel(execution_id=execution_id, reason="stopped by the host"))
        except ExecutionError:
            return
        with trio.move_on_after(grace):
            await self._wait_for(pending)
        if not pending.done:
            self._kill()

    async def ping(self) -> Pong:
        """Ask the worker for a ``Pong`` (RSS, uptime, in-flight); wait as long as it takes.

        Raises ``WorkerCrashedError`` when the worker dies first. Wrap in a timeout to
        detect a hung worker.
        """
        seq = next(self._ping_seq)
        reply = self._pongs[seq] = Reply()
        try:
            await self._send(Ping(seq=seq))
            await self._wait_for(reply)
        finally:
            self._pongs.pop(seq, None)
        if not reply.done or reply.error is not None:
            raise self._crash_error()
        pong: Pong = reply.value
        return pong

    async def warmup(self, plugin_id: str, handler_id: str, entry: str, root: str | None) -> None:
        """Import a handler and run its ``warmup()`` hook in the worker; raise on failure."""
        reply = self._warmed[(plugin_id, handler_id)] = Reply()
        await self._send(Warmup(plugin_id=plugin_id, handler_id=handler_id, entry=entry, root=root))
        await self._wait_for(reply)
        if not reply.done or reply.error is not None:
            raise self._crash_error()
        warmed: Warmed = reply.value
        if not warmed.ok and warmed.error is not None:
            raise ExecutionError.from_dict(warmed.error)

    def expire(self, key: tuple[str, float, Reply]) -> None:
        """An execution's deadline passed (called by ``deadlines``): stop it meanwhile."""
        execution_id, grace, pending = key
        pending.expired = True
        assert self.nursery is not None
        self.nursery.start_soon(self._stop_expired, execution_id, pending, grace)

    def _unexpired(self, key: tuple[str, float, Reply]) -> bool:
        # The same reply, not just the same id: an id may be used again once it finished.
        pending = key[2]
        return self._pending.get(key[0]) is pending and not pending.done and not pending.expired

    async def _stop_expired(self, execution_id: str, pending: Reply, grace: float) -> None:
        """Past its deadline: ask the worker to stop the handler; kill the worker if it has
        not answered within ``grace`` seconds. The caller, still waiting, gets the answer (or
        the crash) and reports the timeout."""
        with trio.move_on_after(grace):
            try:
                await self._send(Cancel(execution_id=execution_id, reason="timed out"))
            except ExecutionError:
                return
            await trio.sleep_forever()
        if not pending.done:
            self._kill()

    def dispatch(self, msg: object) -> None:
        if type(msg) is Result:  # the usual message first: one check, not four
            pending = self._pending.get(msg.execution_id)
            if pending is not None:
                pending.finish(msg)
        elif isinstance(msg, ChannelData | ChannelCredit | ChannelClose):
            bridge = self.channels.get(msg.channel_id)
            if bridge is not None:
                bridge.on_message(msg)
        elif isinstance(msg, Event):
            pending = self._pending.get(msg.execution_id)
            if pending is not None:  # stamped when the handler emitted it, in the worker
                pending.sink.deliver_nowait(
                    ExecutionEvent(
                        execution_id=msg.execution_id,
                        kind=msg.kind,
                        data=msg.data,
                        timestamp=msg.timestamp,
                    )
                )
        elif isinstance(msg, Error):
            pending = self._pending.get(msg.execution_id)
            if pending is not None:
                error = ExecutionError.from_dict(msg.error)
                if isinstance(error, WorkerCrashedError):
                    self.exiting = True  # its last words: no other execution may follow
                pending.finish(error=error)
        elif isinstance(msg, Pong):
            pong = self._pongs.pop(msg.seq, None)
            if pong is not None:
                pong.finish(msg)
        elif isinstance(msg, Warmed):
            warmed = self._warmed.pop((msg.plugin_id, msg.handler_id), None)
            if warmed is not None:
                warmed.finish(msg)
        elif isinstance(msg, PlatformCall):
            self._platform.accept(msg, self._protocol.frame_size)
        elif isinstance(msg, Hello):
            self.hello.finish(msg)


class PlatformCalls:
    """The platform calls of the executions running on one worker: accepted or refused as
    they are read, served in the worker's nursery, answered with ``PlatformReply``."""

    def __init__(self, send: Callable[[Any], Awaitable[None]], jobs: dict[str, Job]) -> None:
        self._send = send
        self._jobs = jobs
        self.nursery: trio.Nursery | None = None
        #: The cancel scopes of each execution's calls in flight (see ``cancel``).
        self.calls: dict[str, set[trio.CancelScope]] = {}
        self._call_bytes: dict[str, int] = {}  # their frames' bytes, per execution

    def cancel(self, execution_id: str) -> None:
        """The execution ended: its calls still in flight end with ``AbortedError``."""
        for scope in self.calls.pop(execution_id, ()):
            scope.cancel()

    def accept(self, msg: PlatformCall, size: int) -> None:
        """Start serving a ``PlatformCall`` (``size``: its frame's bytes), or refuse it at
        once, keeping nothing of it: a call for an execution not running on this worker, or
        one that would take the execution's calls in flight past
        ``_MAX_CALL_BYTES_IN_FLIGHT``. Runs as the frame is read, so refused calls never
        pile up waiting for a task."""
        nursery = self.nursery
        if nursery is None:
            return
        execution_id = msg.execution_id
        job = self._jobs.get(execution_id)
        refused: ExecutionError | None = None
        held = self._call_bytes.get(execution_id, 0) + size
        if job is None:
            refused = AbortedError(f"execution {execution_id!r} is not running here")
        elif held > _MAX_CALL_BYTES_IN_FLIGHT:
            refused = InvalidRequestError(
                f"platform calls of {held} bytes in flight, over the limit of "
                f"{_MAX_CALL_BYTES_IN_FLIGHT} bytes per execution"
            )
        if refused is not None:
            nursery.start_soon(self._reply, msg.call_id, None, refused.to_dict())
            return
        assert job is not None
        self._call_bytes[execution_id] = held
        nursery.start_soon(self._platform_call, msg, job, size)

    async def _platform_call(self, msg: PlatformCall, job: Job, size: int) -> None:
        """Serve one ``PlatformCall`` accepted by :meth:`accept` with the session the
        host made for its execution (the worker's word is taken for nothing but the
        execution id), and reply. The cancel scopes and bytes of the calls in flight are
        kept per execution only while there are some."""
        from ..platform_client import error_to_wire

        error: dict[str, Any] | None = None
        value: Any = None
        execution_id = msg.execution_id
        scopes = self.calls.setdefault(execution_id, set())
        with trio.CancelScope() as scope:
            scopes.add(scope)
            try:
                if len(scopes) > _MAX_CALLS_IN_FLIGHT:
                    raise InvalidRequestError(
                        f"more than {_MAX_CALLS_IN_FLIGHT} platform calls in flight"
                    )
                value = await job.session.acall(msg.service, msg.method, msg.args, msg.kwargs)
            except Exception as exc:
                error = error_to_wire(exc)
            finally:
                scopes.discard(scope)
                if not scopes and self.calls.get(execution_id) is scopes:
                    del self.calls[execution_id]
                left = self._call_bytes[execution_id] - size
                if left:
                    self._call_bytes[execution_id] = left
                else:
                    del self._call_bytes[execution_id]
        if scope.cancelled_caught:
            error = AbortedError("the execution ended before this platform call").to_dict()
        await self._reply(msg.call_id, value, error)

    async def _reply(self, call_id: int, value: Any, error: dict[str, Any] | None) -> None:
        """Answer a ``PlatformCall``: ``value``, or ``error`` (an error's wire form)."""
        reply = PlatformReply(call_id=call_id, ok=error is None, value=value, error=error)
        try:
            await self._send(reply)
        except ProtocolError as exc:  # the value would not encode: say so instead
            failed = InvalidRequestError(f"the platform's reply could not be sent: {exc}")
            await self._send(
                PlatformReply(call_id=call_id, ok=False, value=None, error=failed.to_dict())
            )
        except ExecutionError:
            pass  # the worker is gone
