"""Running one instance of a child, and stopping it: the supervisor's hands on its tasks.

:class:`ChildRunner` starts each :class:`~._children.Run` as a task of the supervisor's
nursery, in a cancel scope of its own, and reports how it ended on :attr:`ChildRunner.exits`
(the supervisor handles those one at a time). Stopping a run cancels its scope and waits up
to the child's ``shutdown_timeout``; a run still going after that is marked overdue and left
to finish, never started a second time meanwhile.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import trio

from ._children import Child, Run
from ._specs import ChildSpec

__all__ = ["ChildRunner", "Exit", "accepts_task_status"]

logger = logging.getLogger("plugin_execution.supervisor")

#: A run that ended on its own: the child, the run, and what it raised (None: returned).
Exit = tuple[Child, Run, Exception | None]

# Past its deadline a cancelled child still gets this many scheduling rounds to finish: a
# cleanup that takes no time (a few checkpoints, all cancelled at once) is never overdue, even
# with shutdown_timeout=0, whatever order trio runs the child and the supervisor in.
_GRACE_ROUNDS = 8


def accepts_task_status(start: Callable[..., object]) -> bool:
    """Whether ``start`` takes a ``task_status`` (is started with ``nursery.start``)."""
    try:
        return "task_status" in inspect.signature(start).parameters
    except (TypeError, ValueError):  # no signature to inspect (some builtins)
        return False


class _Status:
    """The ``task_status`` a child sees: forwards ``started()`` and marks the run started."""

    def __init__(
        self, runner: ChildRunner, child: Child, run: Run, status: trio.TaskStatus[object]
    ) -> None:
        self._runner = runner
        self._child = child
        self._run = run
        self._status = status

    def started(self, value: object = None) -> None:
        self._runner.mark_started(self._child, self._run, self._status, value)


class ChildRunner:
    """Starts and stops the runs of children in ``nursery``; ``within`` bounds how long a
    start waits for the previous instance of its child to finish."""

    def __init__(self, nursery: trio.Nursery, within: float) -> None:
        self._nursery = nursery
        self._within = within
        self._exits_in, self.exits = trio.open_memory_channel[Exit](float("inf"))

    async def start(self, child: Child, run: Run) -> object:
        """Start ``run`` of ``child`` with :meth:`trio.Nursery.start` semantics: return its
        started value; an exception before ``started()`` is raised here, not reported."""
        return await self._nursery.start(self._run_child, child, run, 0.0, True)

    def start_after(self, child: Child, run: Run, delay: float) -> None:
        """Start ``run`` of ``child`` after ``delay`` seconds; however it ends is reported."""
        self._nursery.start_soon(self._run_child, child, run, delay, False)

    async def _run_child(
        self,
        child: Child,
        run: Run,
        delay: float,
        raise_before_started: bool,
        task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``child`` once and report how it ended on :attr:`exits`.

        With ``raise_before_started`` (the ``nursery.start`` callers: ``start_child``,
        ``restart_child`` and ordered restarts), ending before ``started()`` is raised to the
        caller, not reported.
        """
        outcome: Exception | None = None
        run.task = trio.lowlevel.current_task()
        try:
            with run.scope:
                if delay:
                    await trio.sleep(delay)
                try:
                    if child.takes_status:
                        await child.spec.start(task_status=_Status(self, child, run, task_status))
                    else:
                        self.mark_started(child, run, task_status, None)
                        await child.spec.start()
                except Exception as exc:
                    if raise_before_started and not run.started:
                        raise
                    outcome = exc
        finally:
            run.done.set()
        if raise_before_started and not run.started:
            if run.stopping:
                raise RuntimeError(
                    f"child {child.spec.name!r} was stopped before it finished starting"
                )
            return  # nursery.start raises: the child returned without calling started()
        if not run.stopping:
            self._exits_in.send_nowait((child, run, outcome))

    def mark_started(
        self, child: Child, run: Run, status: trio.TaskStatus[object], value: object
    ) -> None:
        status.started(value)
        run.started = True
        # Once it lives in our nursery only the supervisor stops it, in order, whatever cancels
        # the block. (If the start was cancelled, trio left it with the caller: don't shield.)
        if run.task.parent_nursery is self._nursery:
            run.scope.shield = True
        child.started_at = trio.current_time()
        if not run.stopping:
            child.state = "running"

    async def stop(self, child: Child) -> None:
        """Cancel the child's current run and wait up to its shutdown_timeout for it to end."""
        run = child.run
        run.stopping = True
        child.state = "stopping"
        run.scope.cancel()
        await self._wait_stopped(child.spec, run)

    async def _wait_stopped(self, spec: ChildSpec, run: Run) -> None:
        """Wait for a cancelled run up to ``spec.shutdown_timeout``; past it, mark it overdue."""
        with trio.move_on_after(spec.shutdown_timeout):
            await run.done.wait()
        for _ in range(_GRACE_ROUNDS):
            if run.done.is_set():
                return
            await trio.lowlevel.cancel_shielded_checkpoint()
        if not run.done.is_set():
            run.overdue = True
            logger.warning(
                "child %r is still running %g s after it was cancelled; moving on "
                "(it will not be started again before it finishes)",
                spec.name,
                spec.shutdown_timeout,
            )

    async def previous_finished(self, name: str, run: Run) -> None:
        """Wait up to ``within`` s for a child's earlier run to finish, else raise RuntimeError."""
        if not await self.wait_previous(name, run):
            raise RuntimeError(
                f"child {name!r}: its previous instance is still running "
                f"{self._within:g} s after this start began waiting for it; not starting "
                "a second instance (its start function ignores cancellation)"
            )

    async def wait_previous(self, name: str, run: Run) -> bool:
        """Whether a child's earlier run finished, waiting up to ``within`` s for it."""
        if not run.done.is_set():
            logger.warning(
                "child %r: waiting for its previous instance to finish before starting it again",
                name,
            )
            with trio.move_on_after(self._within):
                await run.done.wait()
        return run.done.is_set()
