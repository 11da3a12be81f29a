"""Running executions in a worker: from an ``execute`` frame to its ``result`` or ``error``.

:class:`Executions` is the worker's execution runner. For each ``execute`` it builds the
handler's ``ctx`` (its events as ``event`` frames, its workspace made on first use, its
platform calls as ``pcall`` frames), loads the handler (once per worker: the handler cache,
also filled by ``warmup``), calls it, and encodes what came of it:

- a return value: ``result`` (an output that is not plain data: ``INVALID_REQUEST``);
- an exception: ``error``, ``HANDLER_ERROR`` (``PERMISSION_DENIED`` when the kernel refused
  an access), or the ``ExecutionError`` the handler raised itself;
- a ``MemoryError`` (the address-space limit): ``WORKER_CRASHED``, then the worker exits,
  since its state can no longer be trusted;
- a ``cancel`` from the host: the context is marked cancelled, platform calls still waiting
  fail, and an async handler's cancel scope is cancelled (``ABORTED``);
- an async handler past its ``timeout``: its cancel scope's deadline (``TIMEOUT``). A sync
  handler cannot be stopped from inside: the host enforces its deadline by killing the
  worker.

What a handler started and left running is killed when its execution ends (with several in
flight: when none is). Sync handlers run where the reader decides (:meth:`start` returns
their job); async ones on the trio loop.

Standard library only at import time: worker children load this module at start-up.
"""

from __future__ import annotations

import _thread
import errno
import os
import time

from ..context import ExecutionContext
from ..errors import (
    AbortedError,
    ExecutionError,
    ExecutionTimeoutError,
    HandlerContractError,
    PermissionDeniedError,
    WorkerCrashedError,
    handler_error,
    plain_error,
    safe_text,
)
from ..errors import InvalidRequestError as _InvalidRequest
from ..handlers import Handler, load_handler
from ._leftovers import has_children, kill_leftovers
from .outbox import CapturedStream, FrameSink, current_execution
from .platform_calls import WorkerCaller

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

    from .channel import WorkerChannel
    from .outbox import Send
    from .platform_calls import PlatformCalls
    from .threads import HandlerThreads

__all__ = ["Executions"]

_OOM_EXIT = 137
_DENIED_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)  # the kernel said no: permissions


class _Running:
    """What the worker knows about an execution in flight."""

    __slots__ = ("cancel", "ctx")

    def __init__(self, ctx: ExecutionContext) -> None:
        self.ctx = ctx
        self.cancel: Callable[[], None] = ctx.cancel


class Executions:
    """The executions in flight in one worker, and the handlers it has loaded.

    ``send`` writes a frame (see ``FrameWriter.send``); ``exit(code)`` ends the worker;
    ``channels`` is the reader's table of open channels by id, from which a session's
    channel is dropped when its handler ends. ``in_thread``: a thread worker, which leaves
    processes alone (they are the host's).
    """

    def __init__(
        self,
        send: Send,
        threads: HandlerThreads,
        platform: PlatformCalls,
        channels: dict[str, WorkerChannel],
        exit: Callable[[int], None],
        *,
        in_thread: bool,
        send_message: Callable[[dict[str, Any], str | None], None],
    ) -> None:
        self._send = send
        self._send_message = send_message
        self._threads = threads
        self._platform = platform
        self._channels = channels
        self._exit = exit
        self._in_thread = in_thread
        self._pid = os.getpid()
        self._handlers: dict[tuple[str, str | None], Handler] = {}
        self.running: dict[str, _Running] = {}
        #: Members of batches not started yet, by id (see :meth:`batch`), and a lock each
        #: member's runner waits on while its async handler runs (released by _finish).
        self._queued: dict[str, dict[str, Any]] = {}
        self._ended: dict[str, Any] = {}
        self.stdout = CapturedStream(send, "stdout")
        self.stderr = CapturedStream(send, "stderr")

    def _handler(self, entry: str, root: str | None) -> tuple[Handler, bool]:
        key = (entry, root)
        handler = self._handlers.get(key)
        if handler is not None:
            return handler, True
        handler = self._handlers[key] = load_handler(entry, root)
        return handler, False

    def start(
        self, msg: dict[str, Any], channel: WorkerChannel | None
    ) -> Callable[[], None] | None:
        """Start the execution ``msg`` (an ``execute`` frame's fields), a channel session
        when ``channel`` is given. Returns the job that runs a sync handler, for the caller
        to run on a thread of its choice; starts anything else itself (or answers at once:
        a handler that cannot be loaded, a session handler that is not async)."""
        execution_id = msg["execution_id"]
        running = self._begin(msg)
        try:
            handler, warm = self._handler(msg["entry"], msg.get("root"))
        except BaseException as exc:  # what importing plugin code raised, whatever it is
            if channel is not None:
                self._channels.pop(channel.connection_id, None)
            error = exc if isinstance(exc, ExecutionError) else _handler_error(exc)
            self._finish(execution_id, error=error)
            return None
        running.ctx.blocking = not handler.is_async
        if channel is not None:
            if not handler.is_async:
                self._channels.pop(channel.connection_id, None)
                self._finish(
                    execution_id,
                    error=HandlerContractError(
                        f"channel entry {msg['entry']!r} is not an async function: a "
                        "session-style channel handler is 'async def handler(ctx, channel)'",
                        details={"entry": msg["entry"]},
                    ),
                )
                return None
            self._threads.start_loop().start_soon(
                self._run_async, handler, warm, msg, running, channel
            )
        elif handler.is_async:
            self._threads.start_loop().start_soon(self._run_async, handler, warm, msg, running)
        else:
            return lambda: self._run_sync(handler, warm, msg, running)
        return None

    def _begin(self, msg: dict[str, Any]) -> _Running:
        """The execution ``msg``'s context, made and entered in :attr:`running`."""
        execution_id = msg["execution_id"]
        workspace = msg.get("workspace")
        ctx = ExecutionContext._positional(
            execution_id,
            msg["plugin_id"],
            msg["handler_id"],
            msg.get("context") or {},
            FrameSink(self._send, execution_id),
            _workspace_provider(workspace) if workspace else None,
            WorkerCaller(self._platform, execution_id),
            False,
        )
        self.running[execution_id] = running = _Running(ctx)
        return running

    def batch(self, members: list[dict[str, Any]]) -> Callable[[], None]:
        """The job that runs a ``batch`` frame's executions one after another, each to its
        end (an async one too: a batch holds one slot of the worker), skipping those
        cancelled before their turn (see :meth:`cancel`). Each member's ``timeout`` counts
        from now. A member's result is written before the next one starts, so the host
        knows that members after an unanswered one never ran."""
        received = time.monotonic()
        queued = self._queued
        for member in members:
            queued[member["execution_id"]] = member

        handlers = self._handlers

        def run() -> None:
            for member in members:
                execution_id = member["execution_id"]
                if queued.pop(execution_id, None) is None:
                    continue  # cancelled before its turn, and answered then
                handler = handlers.get((member["entry"], member["root"]))
                if handler is not None and not handler.is_async:
                    # The usual member: a sync handler loaded already, answered before
                    # _run_sync returns. Its timeout is the host's to enforce.
                    running = self._begin(member)
                    running.ctx.blocking = True
                    self._run_sync(handler, True, member, running)
                    continue
                timeout = member["timeout"]
                if timeout:
                    member["timeout"] = max(0.001, timeout - (time.monotonic() - received))
                ended = self._ended[execution_id] = _thread.allocate_lock()
                ended.acquire()
                job = self.start(member, None)
                if job is not None:
                    job()
                ended.acquire()  # released by _finish, once its answer went out
                self._ended.pop(execution_id, None)

        return run

    def cancel(self, execution_id: str) -> None:
        """The host's ``cancel``: mark the context cancelled, cancel an async handler's
        scope, and fail the execution's platform calls still waiting (reader thread). A
        batch member not started yet is answered ``ABORTED`` and never starts."""
        if self._queued.pop(execution_id, None) is not None:
            self._finish(
                execution_id, error=AbortedError("cancelled by the host before it started")
            )
            return
        running = self.running.get(execution_id)
        if running is not None:
            cancel = running.cancel
            cancel()
            if running.cancel is not cancel:  # _run_async swapped it in meanwhile
                running.cancel()
        self._platform.abort(execution_id)

    def _run_sync(self, handler: Handler, warm: bool, msg: dict[str, Any], run: _Running) -> None:
        started = time.perf_counter()
        token = current_execution.set(msg["execution_id"])
        try:
            output = handler.plain_output(handler.call(run.ctx, msg["input"]))
        except ExecutionError as exc:
            self._finish(msg["execution_id"], error=exc)
        except MemoryError:
            self._out_of_memory(msg["execution_id"])
        except BaseException as exc:
            self._finish(msg["execution_id"], error=_handler_error(exc))
        else:
            self._finish(msg["execution_id"], output=output, started=started, warm=warm)
        finally:
            current_execution.reset(token)

    async def _run_async(
        self,
        handler: Handler,
        warm: bool,
        msg: dict[str, Any],
        run: _Running,
        channel: WorkerChannel | None = None,
    ) -> None:
        loop = self._threads.loop
        assert loop is not None  # this runs on it
        trio, token = loop.trio, loop.token
        started = time.perf_counter()
        current_execution.set(msg["execution_id"])
        timeout = msg.get("timeout")
        with trio.CancelScope() as scope:
            if timeout:
                scope.deadline = trio.current_time() + timeout
            cancel_ctx = run.cancel

            def cancel() -> None:  # called from the reader thread
                cancel_ctx()
                token.run_sync_soon(scope.cancel)

            run.cancel = cancel
            if channel is not None:
                channel.cancel = cancel
            if run.ctx.cancelled:  # the Cancel came before this task started
                scope.cancel()
            try:
                argument = msg["input"] if channel is None else channel
                output = handler.plain_output(await handler.call(run.ctx, argument))
            except ExecutionError as exc:
                self._finish(msg["execution_id"], error=exc)
                return
            except MemoryError:
                self._out_of_memory(msg["execution_id"])
                return
            except BaseException as exc:
                if _is_cancellation(exc, trio.Cancelled):
                    raise  # the scope's: a timeout or the host's Cancel, reported below
                # SystemExit, KeyboardInterrupt, GeneratorExit...: the handler's, like any
                # other exception; they must not end the loop other handlers run on.
                self._finish(msg["execution_id"], error=_handler_error(exc))
                return
            finally:
                if channel is not None:
                    channel.end()
                    self._channels.pop(channel.connection_id, None)
        if not scope.cancelled_caught:
            self._finish(
                msg["execution_id"], output=output, started=started, warm=warm, on_loop=True
            )
        elif run.ctx.cancelled:
            self._finish(msg["execution_id"], error=AbortedError("cancelled by the host"))
        else:
            self._finish(
                msg["execution_id"],
                error=ExecutionTimeoutError(
                    f"execution exceeded its {timeout:g} s timeout and was stopped",
                    details={"timeout_s": timeout},
                ),
            )

    def _out_of_memory(self, execution_id: str) -> None:
        """A handler hit the memory limit: report it, then exit, since this process's
        state can no longer be trusted (the pool replaces the worker)."""
        error = WorkerCrashedError(
            "the worker ran out of memory (its address-space limit was reached) and exited",
            details={"reason": "memory_limit", "exit_code": _OOM_EXIT, "pid": os.getpid()},
        )
        try:
            self._finish(execution_id, error=error)
        finally:
            self._exit(_OOM_EXIT)

    def _finish(
        self,
        execution_id: str,
        *,
        output: Any = None,
        error: ExecutionError | None = None,
        started: float = 0.0,
        warm: bool = False,
        on_loop: bool = False,
    ) -> None:
        """Send the execution's answer (its result, else its error); then let the batch it
        belongs to, if any, go on to its next member. ``on_loop``: an async handler's."""
        try:
            self._answer(execution_id, output, error, started, warm, on_loop)
        finally:
            ended = self._ended.pop(execution_id, None)
            if ended is not None:
                ended.release()

    def _answer(
        self,
        execution_id: str,
        output: Any,
        error: ExecutionError | None,
        started: float,
        warm: bool,
        on_loop: bool = False,
    ) -> None:
        self.stdout.finish(execution_id)
        self.stderr.finish(execution_id)
        running = self.running.pop(execution_id, None)
        if not self.running and not self._in_thread and has_children():
            # What the handler started and left running ends with its execution, before
            # the caller hears of the outcome (with several in flight: once none is).
            kill_leftovers()
        if error is None:
            used = running is not None and running.ctx.workspace_used
            # The Result message, whole (its fields in their order): the one frame each
            # execution sends for sure, packed without FrameWriter.send's checks.
            message = {
                "t": "result",
                "execution_id": execution_id,
                "output": output,
                "duration_s": time.perf_counter() - started,
                "metadata": {
                    "warm": warm,
                    "pid": self._pid,
                    # The host removes the workspace only when it was made (see WorkerPool).
                    "workspace_id": execution_id if used else None,
                },
            }
            if on_loop:  # for the host alone (see Calls.outcome): it ran on the trio loop
                message["metadata"]["async"] = True
            try:
                self._send_message(message, "output")
                return
            except BaseException as exc:  # msgpack's errors, or what a hostile value raised
                cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
                error = _InvalidRequest(  # worded as in-process (types.check_serializable)
                    "the handler's output is not serializable (plain data only: dict, list, "
                    f"str, bytes, int, float, bool, None): {type(cause).__name__}: "
                    f"{safe_text(cause)}"
                )
        # Bounded plain data, whatever the error holds: sending it cannot fail.
        self._send("error", {"execution_id": execution_id, "error": plain_error(error)})

    def warmup(self, msg: dict[str, Any]) -> None:
        """Load a handler into the cache and run its warm-up hook; answer ``warmed``. Runs
        on an executor thread (an async hook on the trio loop, waited for)."""
        fields = {"plugin_id": msg["plugin_id"], "handler_id": msg["handler_id"]}
        try:
            handler, _ = self._handler(msg["entry"], msg.get("root"))
            pending = handler.warmup()
            if hasattr(pending, "__await__"):
                self._threads.start_loop().run(pending)
        except BaseException as exc:  # a warm-up hook is plugin code: anything goes
            error = exc if isinstance(exc, ExecutionError) else _handler_error(exc)
            self._send("warmed", {**fields, "ok": False, "error": plain_error(error)})
        else:
            self._send("warmed", {**fields, "ok": True, "error": None})


def _handler_error(exc: BaseException) -> ExecutionError:
    """What the caller sees of a handler's exception: ``HANDLER_ERROR``, except an OSError by
    which the kernel refused an access (EACCES, EPERM, EROFS): the sandbox (or plain file
    permissions) stopped the handler, which is ``PERMISSION_DENIED``, naming the path when
    the error has one. Never raises, whatever the exception (see ``errors.handler_error``)."""
    error = handler_error(exc)
    try:
        if isinstance(exc, OSError) and exc.errno in _DENIED_ERRNOS:
            details = dict(error.details, errno=errno.errorcode[exc.errno])
            if exc.filename is not None:
                details["resource"] = safe_text(
                    os.fsdecode(exc.filename)
                    if isinstance(exc.filename, str | bytes)
                    else exc.filename
                )
            return PermissionDeniedError(
                f"the system refused the handler: {type(exc).__name__}: {safe_text(exc)}",
                details=details,
            )
    except BaseException:  # a hostile OSError subclass: report it as what it raised
        pass
    return error


def _is_cancellation(exc: BaseException, cancelled: type[BaseException]) -> bool:
    """``exc`` is trio's ``Cancelled``, or a group of nothing else (a handler's nursery)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(cancelled)[1] is None
    return isinstance(exc, cancelled)


def _workspace_provider(path: str) -> Callable[[], Path]:
    def provide() -> Path:
        from pathlib import Path

        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        return Path(path)

    return provide
